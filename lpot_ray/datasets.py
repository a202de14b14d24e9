"""LPOT's datasets: each returns the list of ``(inputs, label)`` samples it holds.

Images come as PIL images (folders of image files) or HWC uint8 arrays (TFRecords), as LPOT's
PyTorch and TensorFlow datasets give them. Detection labels are ``(boxes [M, 4], classes [M])``
as the COCO metrics read them: boxes ``x1, y1, x2, y2`` normalized to the image's width and
height (so resizing the image leaves them valid; LPOT's are the same numbers in ``y1, x1, y2,
x2`` order), classes COCO's category ids.
"""

from __future__ import annotations

import glob
import json
import logging
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .errors import ConfigError

log = logging.getLogger("lpot_ray")
Sample = tuple[Any, Any]


def dummy_v2(input_shape: list[int], label_shape: Optional[list[int]] = None, low: float = -128.0,
             high: float = 127.0, dtype: str = "float32", length: int = 100, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    inputs = rng.uniform(low, high, size=(length, *input_shape)).astype(dtype)
    labels = rng.integers(0, 10, size=(length, *(label_shape or []))) if label_shape else np.zeros(length, dtype=np.int64)
    return list(zip(inputs, labels, strict=True))


DIGITS_SPLITS = {"train": (0, 1300), "calibration": (1300, 1500), "evaluation": (1500, None), "all": (0, None)}


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 1, 8, 8] float32 in [0, 1], labels [N]) of one split of scikit-learn's digits,
    shuffled once with seed 0: the demo's data, and the ``digits`` dataset's."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(images))
    start, stop = DIGITS_SPLITS[split]
    images = (images[order] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return images[start:stop], labels[order][start:stop]


def digits(split: str = "evaluation") -> list[Sample]:
    if split not in DIGITS_SPLITS:
        raise ConfigError(f"split {split!r} must be one of {', '.join(DIGITS_SPLITS)}")
    return list(zip(*digits_arrays(split), strict=True))


def numpy_arrays(path: str, inputs: str = "inputs", labels: str = "labels") -> list[Sample]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: file not found")
    try:
        arrays = np.load(file)  # allow_pickle=False: an array of Python objects is refused, never unpickled
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise ConfigError(f"{file}: not an .npz archive of numeric arrays ({error})") from None
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise ConfigError(f"{file}: expected an .npz archive of named arrays (np.savez), got one array")
    with arrays:
        missing = [name for name in (inputs, labels) if name not in arrays]
        if missing:
            raise ConfigError(f"{file} has no array {missing[0]!r}; it has {', '.join(arrays.files)}")
        try:
            inputs_array, labels_array = arrays[inputs], arrays[labels]
        except ValueError:
            raise ConfigError(f"{file}: arrays {inputs!r} or {labels!r} hold Python objects, which lpot_ray does not "
                              "unpickle; save numeric arrays") from None
        except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as error:
            raise ConfigError(f"{file}: a damaged .npz archive ({error})") from None
    if inputs_array.ndim == 0 or labels_array.ndim == 0:
        raise ConfigError(f"{file}: {inputs!r} and {labels!r} must be arrays with one entry per sample, not single values")
    if len(inputs_array) != len(labels_array):
        raise ConfigError(f"{file}: {len(inputs_array)} {inputs!r} but {len(labels_array)} {labels!r}; one label per input")
    return list(zip(inputs_array, labels_array, strict=True))


def _folder(path: Any, what: str = "folder") -> Path:
    folder = Path(str(path))
    if not folder.is_dir():
        raise ConfigError(f"{folder}: {what} not found")
    return folder


def _open_rgb(path: Path) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except OSError as error:
        raise ConfigError(f"{path}: not an image ({error})") from None


def image_folder(root: str) -> list[Sample]:
    """One sub-folder of images per class, classes numbered in name order."""
    folder = _folder(root)
    classes = sorted(child.name for child in folder.iterdir() if child.is_dir())
    return [(_open_rgb(image), label) for label, name in enumerate(classes)
            for image in sorted(path for path in (folder / name).iterdir() if not path.name.startswith("."))]


def imagenet_raw(data_path: str, image_list: Optional[str] = None) -> list[Sample]:
    """LPOT's ImagenetRaw: images in ``data_path``, named with their labels by ``image_list``
    lines of "name label" (default ``data_path/val.txt``). Listed images that are missing are
    left out, as LPOT does, with a warning."""
    folder = _folder(data_path)
    listing = Path(image_list) if image_list is not None else folder / "val.txt"
    if not listing.is_file():
        raise ConfigError(f"{listing}: image list not found")
    entries = [_list_entry(line, listing, number) for number, line in enumerate(listing.read_text().splitlines(), 1)
               if line.strip()]
    present = [(folder / name, label) for name, label in entries if (folder / name).is_file()]
    if len(present) < len(entries):
        missing = next(name for name, _ in entries if not (folder / name).is_file())
        log.warning("%s: %d listed images are not in %s (%s first); left out", listing, len(entries) - len(present),
                    folder, missing)
    if not present:
        raise ConfigError(f"{listing}: none of its {len(entries)} images is in {folder}")
    return [(_open_rgb(path), label) for path, label in present]


def _list_entry(line: str, listing: Path, number: int) -> tuple[str, int]:
    parts = line.split()
    if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
        raise ConfigError(f"{listing}, line {number}: {line.strip()!r} is not 'name label' (an image and an integer)")
    return parts[0], int(parts[1])


# --- TFRecords of tf.train.Example, as LPOT's TensorFlow datasets read them -----------------------
def _records(files: list[str]) -> Iterator[tuple[str, int, Any]]:
    """(file, index, tf.train.Example) of every record of ``files``, in order."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError

    for file in files:
        index = -1
        try:
            for index, record in enumerate(tf.data.TFRecordDataset(file).as_numpy_iterator()):
                yield file, index, tf.train.Example.FromString(record)
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as error:
            raise ConfigError(f"{file}: not a readable TFRecord file after record {index} ({error.message.strip()})") from None
        except DecodeError:
            raise ConfigError(f"{file}, record {index + 1}: not a tf.train.Example") from None


def _feature(example: Any, name: str, kind: str, where: str, required: bool = True) -> list:
    feature = example.features.feature
    if name not in feature or not getattr(feature[name], kind).value:
        if required:
            raise ConfigError(f"{where}: no {name!r} feature")
        return []
    return list(getattr(feature[name], kind).value)


def _decode(encoded: bytes, where: str) -> np.ndarray:
    """An HWC uint8 RGB array, decoded as LPOT decodes ImageNet records (TensorFlow's JPEG
    decoder, integer DCT, no fancy upscaling); PNG and other formats through decode_image."""
    import tensorflow as tf

    try:
        if encoded[:3] == b"\xff\xd8\xff":
            image = tf.io.decode_jpeg(encoded, channels=3, fancy_upscaling=False, dct_method="INTEGER_FAST")
        else:
            image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError as error:
        raise ConfigError(f"{where}: 'image/encoded' is not an image ({error.message.strip()})") from None
    return image.numpy()


def image_record(root: str) -> list[Sample]:
    """LPOT's ImageRecord: ImageNet as TFRecord files named ``*-*-of-*`` in ``root`` (e.g.
    validation-00000-of-00128), each record an Example with ``image/encoded`` JPEG bytes and an
    ``image/class/label``."""
    pattern = str(Path(str(root)) / "*-*-of-*")
    files = sorted(glob.glob(pattern))
    if not files:
        raise ConfigError(f"no TFRecord files match {pattern} (LPOT's ImageRecord layout: validation-00000-of-00128 ...)")
    samples = []
    for file, index, example in _records(files):
        where = f"{file}, record {index}"
        encoded = _feature(example, "image/encoded", "bytes_list", where)[0]
        label = _feature(example, "image/class/label", "int64_list", where)[0]
        samples.append((_decode(encoded, where), int(label)))
    return samples


def coco_record(root: str, num_cores: int = 28) -> list[Sample]:
    """LPOT's COCORecord: a TFRecord file (or glob) of TensorFlow object detection's COCO
    Examples: ``image/encoded``, normalized ``image/object/bbox/{xmin,ymin,xmax,ymax}`` and
    ``image/object/class/label``. ``num_cores`` (LPOT's reader threads) changes nothing here."""
    files = sorted(glob.glob(str(root)))
    if not files:
        raise ConfigError(f"{root}: TFRecord file not found")
    samples = []
    for file, index, example in _records(files):
        where = f"{file}, record {index}"
        image = _decode(_feature(example, "image/encoded", "bytes_list", where)[0], where)
        corners = [_feature(example, f"image/object/bbox/{name}", "float_list", where, required=False)
                   for name in ("xmin", "ymin", "xmax", "ymax")]
        classes = _feature(example, "image/object/class/label", "int64_list", where, required=False)
        if not classes and _feature(example, "image/object/class/text", "bytes_list", where, required=False):
            raise ConfigError(f"{where}: class names but no 'image/object/class/label' ids, which the COCO metrics compare")
        if len({len(values) for values in corners} | {len(classes)}) != 1:
            raise ConfigError(f"{where}: {[len(values) for values in corners]} box corners for {len(classes)} classes")
        boxes = np.asarray(corners, dtype=np.float32).T.reshape(-1, 4)
        samples.append((image, (boxes, np.asarray(classes, dtype=np.int64))))
    return samples


def coco_raw(root: str, img_dir: str = "val2017", anno_dir: str = "annotations/instances_val2017.json") -> list[Sample]:
    """LPOT's COCORaw: images in ``root/img_dir`` and COCO's instances JSON at
    ``root/anno_dir``. Images without boxes or missing from the folder are left out, as LPOT does."""
    folder, annotations = _folder(Path(str(root)) / img_dir, "image folder"), Path(str(root)) / anno_dir
    coco = _coco_json(annotations)
    boxes: dict[Any, list] = {}
    for note in coco["annotations"]:
        if note.get("bbox"):
            boxes.setdefault(note.get("image_id"), []).append(note)
    samples = []
    for image in coco["images"]:
        file = folder / str(image.get("file_name"))
        if image.get("id") in boxes and file.is_file():
            samples.append((_open_rgb(file), _coco_label(image, boxes[image["id"]], annotations)))
    return samples


def _coco_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: COCO annotation file not found")
    try:
        coco = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not a JSON file ({error})") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list) or not isinstance(coco.get("annotations"), list):
        raise ConfigError(f"{path}: not COCO instances (a JSON object with 'images' and 'annotations' lists)")
    return coco


def _coco_label(image: dict, notes: list[dict], path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(normalized x1, y1, x2, y2 boxes, category ids) of one image's annotations."""
    try:
        width, height = float(image["width"]), float(image["height"])
        xywh = np.asarray([note["bbox"] for note in notes], dtype=np.float32).reshape(-1, 4)
        classes = np.asarray([note["category_id"] for note in notes], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{path}: image {image.get('id')!r}: needs width, height and annotations with a 4-number "
                          f"bbox and a category_id ({type(error).__name__}: {error})") from None
    corners = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return (corners / [width, height, width, height]).astype(np.float32), classes


def glue(data_dir: str, model_name_or_path: str, max_seq_length: int = 128, do_lower_case: bool = True,
         task: str = "mrpc", model_type: str = "bert", dynamic_length: bool = False, evaluate: bool = True) -> list[Sample]:
    """LPOT's GLUE tokenizes the task's TSV files with the Hugging Face tokenizer of
    ``model_name_or_path``; lpot_ray does not depend on transformers, so it refuses the dataset
    rather than guess at a tokenization."""
    raise ConfigError(f"GLUE needs the Hugging Face tokenizer of {model_name_or_path!r} (the transformers package), "
                      "which lpot_ray does not use; tokenize the task's data yourself and pass the dataloader to "
                      "lpot_ray.tune")


DATASETS = {"dummy_v2": dummy_v2, "digits": digits, "numpy": numpy_arrays, "ImageFolder": image_folder,
            "ImagenetRaw": imagenet_raw, "ImageRecord": image_record, "COCORecord": coco_record, "COCORaw": coco_raw,
            "GLUE": glue}
