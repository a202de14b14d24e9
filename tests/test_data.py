"""LPOT's dataloader sections: datasets, transforms, filter and postprocess."""

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
