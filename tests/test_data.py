"""LPOT's dataloader sections: datasets, transforms, filter and postprocess."""

import json

import numpy as np
import pytest
from PIL import Image

from lpot_ray.config import DataloaderSection, PostprocessSection
from lpot_ray.data import build_loader
from lpot_ray.errors import ConfigError


def loader(dataset, transform=None, batch_size=4, filter=None, postprocess=None):
    section = DataloaderSection(batch_size=batch_size, dataset=dataset, transform=transform, filter=filter)
    return build_loader(section, "evaluation.accuracy.dataloader",
                        PostprocessSection(transform=postprocess) if postprocess else None)


def test_digits_splits_match_the_demo_and_batch():
    batches = list(loader({"digits": {"split": "calibration"}}, batch_size=64))
    assert [len(inputs) for inputs, _ in batches] == [64, 64, 64, 8]
    assert batches[0][0].shape == (64, 1, 8, 8) and batches[0][0].dtype == np.float32


def test_numpy_file_with_label_shift(tmp_path):
    np.savez(tmp_path / "data.npz", x=np.arange(20, dtype=np.float32).reshape(10, 2), y=np.array([1, 2] * 5))
    data = loader({"numpy": {"path": str(tmp_path / "data.npz"), "inputs": "x", "labels": "y"}},
                  postprocess={"LabelShift": {"label_shift": 1}})
    labels = np.concatenate([labels for _, labels in data])
    assert labels.tolist() == [0, 1] * 5 and len(data.dataset) == 10


def test_label_balance_keeps_labels_of_the_given_size_as_lpot():
    from lpot_ray.data import label_balance

    samples = [("a", [1]), ("b", [1, 2]), ("c", [3])]
    assert [inputs for inputs, _ in label_balance(1)(samples)] == ["a", "c"]


def test_resize_keeps_the_aspect_ratio_for_an_int_and_floats_as_floats():
    from lpot_ray.transforms import resize

    image = np.random.default_rng(0).uniform(-1, 1, size=(300, 200, 3)).astype(np.float32)
    resized = resize(256)(image)
    assert resized.shape == (384, 256, 3) and resized.dtype == np.float32 and resized.min() < 0
    assert resize([10, 20])(image).shape == (10, 20, 3)


def test_image_folder_with_lpot_transforms(tmp_path):
    for label, color in (("cat", 40), ("dog", 200)):
        (tmp_path / label).mkdir()
        for index in range(3):
            Image.fromarray(np.full((40, 30, 3), color + index, dtype=np.uint8)).save(tmp_path / label / f"{index}.png")
    data = loader({"ImageFolder": {"root": str(tmp_path)}},
                  transform={"Resize": {"size": 24}, "CenterCrop": {"size": 16}, "ToArray": {},
                             "Normalize": {"mean": [127.5] * 3, "std": [127.5] * 3}, "Transpose": {"perm": [2, 0, 1]}})
    inputs, labels = next(iter(data))
    assert inputs.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1]
    assert np.allclose(inputs[0], (40 - 127.5) / 127.5)


def test_dummy_v2_shapes():
    inputs, labels = next(iter(loader({"dummy_v2": {"input_shape": [3, 5], "length": 6, "low": 0, "high": 1}})))
    assert inputs.shape == (4, 3, 5) and 0 <= inputs.min() and inputs.max() <= 1


@pytest.mark.parametrize(
    "dataset, transform, message",
    [
        ({"cifar": {}}, None, "dataset`: unknown dataset 'cifar'; known: COCORaw, COCORecord, GLUE, ImageFolder, ImageRecord, ImagenetRaw, digits, dummy_v2, numpy"),
        ({"digits": {}}, {"Blur": {}}, "transform`: unknown transform 'Blur'; known: AlignImageChannel, BilinearImagenet, Cast, CenterCrop, Normalize, "
         "PaddedCenterCrop, RandomHorizontalFlip, RandomResizedCrop, Rescale, Resize, ResizeCropImagenet, "
         "ResizeWithRatio, ToArray, ToTensor, Transpose"),
        ({"digits": {"split": "test"}}, None, "split 'test' must be one of train, calibration, evaluation, all"),
        ({"digits": {"colour": 1}}, None, "dataset.digits`: {'colour': 1} are not its parameters"),
        ({"numpy": {"path": "/nowhere/data.npz"}}, None, "/nowhere/data.npz: file not found"),
    ],
)
def test_bad_sections_name_the_key_and_what_is_known(dataset, transform, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("{", r"\{")):
        loader(dataset, transform)


def test_samples_of_different_shapes_say_which_key_and_what_to_add(tmp_path):
    for index, size in enumerate((20, 30)):
        (tmp_path / "cat").mkdir(exist_ok=True)
        Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8)).save(tmp_path / "cat" / f"{index}.png")
    with pytest.raises(ConfigError, match=r"`evaluation.accuracy.dataloader`: samples come in shapes .*add Resize and CenterCrop"):
        loader({"ImageFolder": {"root": str(tmp_path)}}, transform={"ToArray": {}})
    with pytest.raises(ConfigError, match=r"`evaluation.accuracy.dataloader.transform.CenterCrop`: 64x64 is larger than the image"):
        loader({"ImageFolder": {"root": str(tmp_path)}}, transform={"CenterCrop": {"size": 64}})


@pytest.mark.parametrize("write, message", [
    (lambda path: np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1])),
     "hold Python objects, which lpot_ray does not unpickle"),
    (lambda path: path.write_bytes(b"\x93NUMPY garbage"), "not an .npz archive of numeric arrays"),
    (lambda path: np.savez(path, x=np.zeros((3, 2)), y=np.array([0, 1])), "3 'x' but 2 'y'; one label per input"),
])
def test_a_numpy_file_lpot_ray_cannot_use_is_named(tmp_path, write, message):
    path = tmp_path / "data.npz"
    write(path)
    with pytest.raises(ConfigError, match=message):
        loader({"numpy": {"path": str(path), "inputs": "x", "labels": "y"}})


@pytest.mark.parametrize("write, message", [
    (lambda path: path.write_bytes(b"PK\x03\x04 truncated"), "not an .npz archive of numeric arrays"),
    (lambda path: np.savez(path, x=np.float32(1.0), y=np.int64(0)), "must be arrays with one entry per sample"),
])
def test_a_damaged_or_scalar_npz_is_named(tmp_path, write, message):
    path = tmp_path / "data.npz"
    write(path)
    with pytest.raises(ConfigError, match=message):
        loader({"numpy": {"path": str(path), "inputs": "x", "labels": "y"}})


# --- LPOT's ImageNet and COCO datasets, on small files made here ------------------------------
def jpeg(color, size=(12, 16)):
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), color, dtype=np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def example(features):
    import tensorflow as tf

    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        if value and isinstance(value[0], float):
            return tf.train.Feature(float_list=tf.train.FloatList(value=value))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=value))

    return tf.train.Example(features=tf.train.Features(feature={k: feature(v) for k, v in features.items()}))


def write_records(path, examples):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for item in examples:
            writer.write(item.SerializeToString())
    return path


def test_image_record_reads_lpot_imagenet_tfrecords_in_file_order(tmp_path):
    write_records(tmp_path / "validation-00000-of-00002",
                  [example({"image/encoded": jpeg(30), "image/class/label": [5]}),
                   example({"image/encoded": jpeg(200), "image/class/label": [7]})])
    write_records(tmp_path / "validation-00001-of-00002", [example({"image/encoded": jpeg(90), "image/class/label": [1]})])
    (tmp_path / "README").write_text("not a record")  # outside the *-*-of-* pattern: not read
    data = loader({"ImageRecord": {"root": str(tmp_path)}}, transform={"Rescale": {}})
    inputs, labels = next(iter(data))
    assert labels.tolist() == [5, 7, 1] and inputs.shape == (3, 12, 16, 3) and inputs.dtype == np.float32
    assert np.allclose(inputs[:, 0, 0, 0] * 255, [30, 200, 90], atol=3)


@pytest.mark.parametrize("write, message", [
    (lambda path: None, "no TFRecord files match .*validation-00000-of-00128"),
    (lambda path: (path / "val-0-of-1").write_bytes(b"garbage, not a record"), "val-0-of-1: not a readable TFRecord file"),
    (lambda path: write_records(path / "val-0-of-1", [example({"image/encoded": jpeg(1)})]),
     "val-0-of-1, record 0: no 'image/class/label' feature"),
    (lambda path: write_records(path / "val-0-of-1", [example({"image/encoded": b"text", "image/class/label": [1]})]),
     "val-0-of-1, record 0: 'image/encoded' is not an image"),
])
def test_an_image_record_lpot_ray_cannot_read_is_named(tmp_path, write, message):
    write(tmp_path)
    with pytest.raises(ConfigError, match=r"`evaluation.accuracy.dataloader.dataset.ImageRecord`: .*" + message):
        loader({"ImageRecord": {"root": str(tmp_path)}})


def test_imagenet_raw_reads_the_image_list_and_leaves_out_missing_images(tmp_path, caplog):
    for name, color in (("a.png", 10), ("b.png", 250)):
        Image.fromarray(np.full((8, 8, 3), color, dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "val.txt").write_text("b.png 3\na.png 0\ngone.png 4\n")
    data = loader({"ImagenetRaw": {"data_path": str(tmp_path), "image_list": None}}, transform={"ToArray": {}})
    inputs, labels = next(iter(data))
    assert labels.tolist() == [3, 0] and inputs[:, 0, 0, 0].tolist() == [250, 10]
    assert "1 listed images are not in" in caplog.text and "gone.png" in caplog.text
    (tmp_path / "list.txt").write_text("a.png zero\n")
    with pytest.raises(ConfigError, match=r"ImagenetRaw`: .*list.txt, line 1: 'a.png zero' is not 'name label'"):
        loader({"ImagenetRaw": {"data_path": str(tmp_path), "image_list": str(tmp_path / "list.txt")}})


def coco_folder(tmp_path):
    """Three images: two boxes, one box, none (left out, as LPOT does)."""
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        Image.fromarray(np.zeros((50, 100, 3), dtype=np.uint8)).save(tmp_path / "val2017" / name)
    images = [{"id": index, "file_name": f"{index}.jpg", "width": 100, "height": 50} for index in (1, 2, 3)]
    notes = [{"image_id": 1, "bbox": [10, 5, 20, 10], "category_id": 18}, {"image_id": 1, "bbox": [50, 25, 50, 25], "category_id": 1},
             {"image_id": 2, "bbox": [0, 0, 100, 50], "category_id": 3}]
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps({"images": images, "annotations": notes}))
    return {"COCORaw": {"root": str(tmp_path)}}


def test_coco_raw_gives_normalized_boxes_and_category_ids_the_coco_metric_reads(tmp_path):
    from lpot_ray.metrics import make_metric

    dataset = coco_folder(tmp_path)
    data = loader(dataset, transform={"Resize": {"size": [30, 30]}, "ToArray": {}})
    inputs, labels = next(iter(data))
    assert inputs.shape == (2, 30, 30, 3) and labels.shape == (2, 2)
    boxes, classes = labels[0]
    assert np.allclose(boxes, [[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 1.0, 1.0]]) and classes.tolist() == [18, 1]
    metric = make_metric({"COCOmAP": None})
    metric.update([(true_boxes, np.ones(len(true_classes)), true_classes) for true_boxes, true_classes in labels], labels)
    assert metric.result() == pytest.approx(1.0)
    balanced = loader(dataset, transform={"Resize": {"size": [30, 30]}}, filter={"LabelBalance": {"size": 1}})
    assert [classes.tolist() for _, classes in balanced.dataset.labels] == [[3]]


def test_coco_record_reads_object_detection_examples(tmp_path):
    boxes = {"image/object/bbox/xmin": [0.1, 0.5], "image/object/bbox/ymin": [0.2, 0.0],
             "image/object/bbox/xmax": [0.4, 1.0], "image/object/bbox/ymax": [0.6, 0.5]}
    path = write_records(tmp_path / "val.record", [
        example({"image/encoded": jpeg(50, (20, 40)), "image/object/class/label": [3, 44], **boxes}),
        example({"image/encoded": jpeg(50, (20, 40)), "image/object/class/label": [7],
                 **{key: values[:1] for key, values in boxes.items()}})])
    data = loader({"COCORecord": {"root": str(path)}}, transform={"ResizeWithRatio": {"min_dim": 30, "max_dim": 60, "padding": True}})
    inputs, labels = next(iter(data))
    assert inputs.shape == (2, 60, 60, 3)  # 20x40 scaled by 1.5 (the shorter side to 30), padded to 60x60
    (first_boxes, first_classes), (_, second_classes) = labels
    assert first_classes.tolist() == [3, 44] and second_classes.tolist() == [7]
    # x1 0.1 of 60 pixels, no horizontal padding; y1 0.2 of 30 pixels, 15 pixels of padding on top
    assert np.allclose(first_boxes[0], [0.1, (15 + 0.2 * 30) / 60, 0.4, (15 + 0.6 * 30) / 60])
    bad = write_records(tmp_path / "bad.record", [example({"image/encoded": jpeg(1), "image/object/class/label": [1, 2],
                                                           **{key: values[:1] for key, values in boxes.items()}})])
    with pytest.raises(ConfigError, match=r"COCORecord`: .*bad.record, record 0: \[1, 1, 1, 1\] box corners for 2 classes"):
        loader({"COCORecord": {"root": str(bad)}})


def test_glue_is_refused_naming_the_tokenizer_it_needs():
    with pytest.raises(ConfigError, match=r"dataset.GLUE`: GLUE needs the Hugging Face tokenizer of 'bert-base-uncased'"):
        loader({"GLUE": {"data_dir": "/data/MRPC", "model_name_or_path": "bert-base-uncased", "task": "mrpc"}})


# --- LPOT's transforms ------------------------------------------------------------------------
def gradient(height=40, width=60):
    """An RGB uint8 image whose pixels differ, so crops and flips show."""
    rows, columns = np.mgrid[0:height, 0:width]
    return np.stack([rows * 5 % 256, columns * 4 % 256, (rows + columns) % 256], axis=-1).astype(np.uint8)


def transformed(transform, image, label=0, framework="pytorch"):
    """``image`` after the transforms of a YAML ``transform`` section, in order."""
    from lpot_ray import data

    sample = (image, label)
    for name, params in transform.items():
        apply = data._call(data.transforms_for(framework), name, params, "transform")
        sample = apply(sample) if data.takes_label(apply) else (apply(sample[0]), sample[1])
    return sample[0]


def test_the_pytorch_imagenet_chain_matches_torchvisions_arithmetic():
    image = Image.fromarray(gradient())
    out = transformed({"Resize": {"size": 20}, "CenterCrop": {"size": 16}, "ToTensor": {},
                       "Normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}, image)
    assert out.shape == (3, 16, 16) and out.dtype == np.float32  # channels first after ToTensor
    expected = np.asarray(image.resize((30, 20), Image.BILINEAR))[2:18, 7:23].transpose(2, 0, 1) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406])[:, None, None], np.array([0.229, 0.224, 0.225])[:, None, None]
    assert np.allclose(out, (expected - mean) / std, atol=1e-5)


def test_resize_interpolation_follows_the_name():
    image = gradient(8, 8)
    nearest = transformed({"Resize": {"size": [16, 16], "interpolation": "nearest"}}, image)
    bicubic = transformed({"Resize": {"size": [16, 16], "interpolation": "bicubic"}}, image)
    assert set(np.unique(nearest[..., 1])) <= set(np.unique(image[..., 1])) and not np.array_equal(nearest, bicubic)
    assert nearest.dtype == np.uint8 and nearest.shape == (16, 16, 3)


def test_random_transforms_are_seeded_so_a_yaml_always_gives_the_same_data():
    transform = {"RandomResizedCrop": {"size": 8}, "RandomHorizontalFlip": {}}
    first = [transformed(transform, Image.fromarray(gradient())) for _ in range(2)]
    section = DataloaderSection(batch_size=8, dataset={"dummy_v2": {"input_shape": [40, 60, 3], "length": 8,
                                                                    "low": 0, "high": 255, "dtype": "uint8"}},
                                transform=transform)
    once, again = (build_loader(section, "k").dataset.inputs for _ in range(2))
    assert np.array_equal(first[0], first[1]) and np.array_equal(once, again)
    assert once.shape == (8, 8, 8, 3) and len({sample.tobytes() for sample in once}) == 8
    other_seed = transformed({"RandomResizedCrop": {"size": 8, "seed": 1}}, Image.fromarray(gradient()))
    assert not np.array_equal(transformed({"RandomResizedCrop": {"size": 8}}, Image.fromarray(gradient())), other_seed)


def test_random_horizontal_flip_flips_about_half_and_p_1_always():
    image = gradient(4, 6)
    flips = [np.array_equal(transformed({"RandomHorizontalFlip": {"seed": seed}}, image), image[:, ::-1]) for seed in range(40)]
    assert 10 < sum(flips) < 30
    assert np.array_equal(transformed({"RandomHorizontalFlip": {"p": 1.0}}, image), image[:, ::-1])


def test_bilinear_imagenet_is_inception_preprocessing():
    image = np.full((40, 40, 3), 255, dtype=np.uint8)
    image[:2] = 0  # outside the central 87.5% (2 of 40 rows each side): cropped away
    out = transformed({"BilinearImagenet": {"height": 10, "width": 12, "mean_value": [0.5, 0.5, 0.5], "scale": 2.0}}, image)
    assert out.shape == (10, 12, 3) and out.dtype == np.float32 and np.allclose(out, (1.0 - 0.5) * 2.0)


def test_resize_crop_imagenet_resizes_the_shorter_side_then_crops_and_centres():
    image = np.full((40, 80, 3), 100, dtype=np.uint8)
    out = transformed({"ResizeCropImagenet": {"height": 16, "width": 16, "resize_side": 20,
                                              "mean_value": [123.68, 116.78, 103.94], "scale": 0.5}}, image)
    assert out.shape == (16, 16, 3) and np.allclose(out[0, 0], (100 - np.array([123.68, 116.78, 103.94])) * 0.5, atol=1e-3)
    with pytest.raises(ConfigError, match=r"ResizeCropImagenet`: 32x32 is larger than the image, 20x40"):
        loader({"dummy_v2": {"input_shape": [40, 80, 3], "length": 1}},
               transform={"ResizeCropImagenet": {"height": 32, "width": 32, "resize_side": 20}})


def test_padded_center_crop_keeps_a_share_of_the_shorter_side():
    out = transformed({"PaddedCenterCrop": {"size": 224, "crop_padding": 32}}, gradient(40, 80))
    side = int(224 / 256 * 40)  # 35
    assert out.shape == (side, side, 3) and np.array_equal(out, gradient(40, 80)[3:3 + side, 23:23 + side])


def test_rescale_cast_and_align_image_channel():
    image = gradient(4, 4)
    assert np.allclose(transformed({"Rescale": {}}, image), image / 255.0)
    assert transformed({"Cast": {"dtype": "float16"}}, image).dtype == np.float16
    grey = transformed({"AlignImageChannel": {"dim": 1}}, image)
    assert grey.shape == (4, 4, 1) and abs(int(grey[1, 1, 0]) - round(image[1, 1] @ [0.299, 0.587, 0.114])) <= 1
    assert transformed({"AlignImageChannel": {"dim": 3}}, image[..., 0]).shape == (4, 4, 3)
    assert np.array_equal(transformed({"AlignImageChannel": {}}, np.dstack([image, image[..., :1]])), image)
    assert transformed({"AlignImageChannel": {"dim": 1}}, Image.fromarray(image)).mode == "L"


@pytest.mark.parametrize("transform, message", [
    ({"Resize": {"size": 8, "interpolation": "lanczos"}}, "Resize`: interpolation 'lanczos' must be one of nearest, bilinear, bicubic"),
    ({"Cast": {"dtype": "float8"}}, "Cast`: dtype 'float8' must be one of bool, int8"),
    ({"AlignImageChannel": {"dim": 2}}, "AlignImageChannel`: dim 2 must be 1, 3 or 4"),
    ({"RandomResizedCrop": {"size": 8, "scale": [1.0, 0.5]}}, r"RandomResizedCrop`: scale \[1.0, 0.5\] must be \[min, max\], min first"),
    ({"PaddedCenterCrop": {"size": [224, 200]}}, "PaddedCenterCrop`: size .* height and width must be equal"),
    ({"CenterCrop": {"size": "big"}}, "CenterCrop`: size 'big' must be a positive integer, \\[N\\] or \\[height, width\\]"),
    ({"Normalize": {"mean": [0.5, 0.5], "std": [1, 1]}}, r"Normalize`: 2 means and stds for an image of shape \(6, 6, 3\)"),
    ({"Normalize": {"std": [0.0]}}, r"Normalize`: std \[0.0\] must be greater than 0"),
    ({"Transpose": {"perm": [2, 0]}}, r"Transpose`: perm \[2, 0\] is not a permutation of the 3 axes"),
    ({"ResizeWithRatio": {"padding": True, "max_dim": None}}, "ResizeWithRatio`: padding needs max_dim"),
    ({"RandomHorizontalFlip": {"p": 2}}, "RandomHorizontalFlip`: p 2 must be a probability"),
])
def test_bad_transform_parameters_name_the_key_the_value_and_what_is_expected(transform, message):
    with pytest.raises(ConfigError, match=r"`evaluation.accuracy.dataloader.transform\." + message):
        loader({"dummy_v2": {"input_shape": [6, 6, 3], "length": 2}}, transform=transform)


@pytest.mark.parametrize("framework, shape", [("pytorch", (8, 12, 3)), ("tensorflow", (8, 8, 3)), ("mxnet", (8, 8, 3)), ("onnxrt", (8, 8, 3))])
def test_resize_to_an_int_keeps_the_aspect_ratio_only_for_pytorch_as_in_lpot(framework, shape):
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    assert transformed({"Resize": {"size": 8}}, image, framework=framework).shape == shape
    assert transformed({"Resize": {"size": [8, 10]}}, image, framework=framework).shape == (8, 10, 3)
