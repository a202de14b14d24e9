"""LPOT's dataloader sections: datasets, per-sample transforms, filters and label postprocessing.

A YAML ``dataloader`` becomes an ``ArrayLoader``: the dataset read once into numpy arrays,
transformed sample by sample, filtered, then served in batches of ``(inputs, labels)``. Numpy
batches are framework-neutral; each adaptor turns them into its own tensors. Everything here
pickles, so a loader travels to workers with the job.

Datasets: ``dummy_v2`` (random data of given shapes), ``digits`` (scikit-learn's bundled 8x8
digits, split like the demo), ``numpy`` (arrays from an ``.npz`` file), ``ImageFolder`` (one
sub-folder of images per class). Transforms: ``Resize``, ``CenterCrop``, ``Normalize``,
``ToArray``, ``Transpose``. Filter: ``LabelBalance``. Postprocess: ``LabelShift``.
"""

from __future__ import annotations

import contextlib
import inspect
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from .config import DataloaderSection, PostprocessSection
from .errors import ConfigError

Sample = tuple[Any, Any]


class ArrayDataset:
    """Samples held as two arrays."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray):
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> Sample:
        return self.inputs[index], self.labels[index]


class ArrayLoader:
    """Batches of (inputs, labels) over an ArrayDataset, in order."""

    def __init__(self, dataset: ArrayDataset, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self.dataset), self.batch_size):
            stop = start + self.batch_size
            yield self.dataset.inputs[start:stop], self.dataset.labels[start:stop]

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)


def build_loader(section: DataloaderSection, key: str, postprocess: Optional[PostprocessSection] = None) -> ArrayLoader:
    """The loader a YAML ``dataloader`` section describes; ``key`` is its path, for errors."""
    (name, params), = section.dataset.items()
    samples = _call(DATASETS, name, params, f"{key}.dataset")
    for transform_name, transform_params in (section.transform or {}).items():
        transform = _call(TRANSFORMS, transform_name, transform_params, f"{key}.transform")
        with _named(f"{key}.transform.{transform_name}"):
            samples = [(transform(inputs), label) for inputs, label in samples]
    if section.filter:
        (filter_name, filter_params), = section.filter.items()
        samples = _call(FILTERS, filter_name, filter_params, f"{key}.filter")(samples)
    if postprocess is not None:
        for post_name, post_params in postprocess.transform.items():
            relabel = _call(POSTPROCESS, post_name, post_params, "evaluation.accuracy.postprocess.transform")
            samples = [(inputs, relabel(label)) for inputs, label in samples]
    if not samples:
        raise ConfigError(f"`{key}`: the dataset yields no samples")
    shapes = sorted({np.shape(inputs) for inputs, _ in samples})
    if len(shapes) > 1:
        raise ConfigError(f"`{key}`: samples come in shapes {shapes[0]} and {shapes[1]}; one batch needs one shape "
                          "(add Resize and CenterCrop transforms)")
    dataset = ArrayDataset(np.stack([np.asarray(inputs) for inputs, _ in samples]),
                           np.asarray([label for _, label in samples]))
    return ArrayLoader(dataset, section.batch_size)


@contextlib.contextmanager
def _named(key: str) -> Iterator[None]:
    """Put the YAML key in front of a ConfigError raised by a dataset, transform or filter."""
    try:
        yield
    except ConfigError as error:
        raise ConfigError(f"`{key}`: {error}") from None


def _call(table: dict[str, Callable], name: str, params: Any, key: str) -> Any:
    if name not in table:
        raise ConfigError(f"`{key}`: unknown {key.rsplit('.', 1)[-1]} {name!r}; known: {', '.join(sorted(table))}")
    args, kwargs = ((), {}) if params is None else ((), params) if isinstance(params, dict) else ((params,), {})
    try:
        inspect.signature(table[name]).bind(*args, **kwargs)
    except TypeError as error:
        raise ConfigError(f"`{key}.{name}`: {params!r} are not its parameters ({error})") from None
    with _named(f"{key}.{name}"):
        return table[name](*args, **kwargs)


# --- datasets: each returns a list of (inputs, label) samples --------------------------------
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


def image_folder(root: str) -> list[Sample]:
    from PIL import Image

    folder = Path(root)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: folder not found")
    classes = sorted(child.name for child in folder.iterdir() if child.is_dir())
    samples = []
    for label, name in enumerate(classes):
        for image in sorted(path for path in (folder / name).iterdir() if not path.name.startswith(".")):
            try:
                with Image.open(image) as opened:
                    samples.append((opened.convert("RGB"), label))
            except OSError as error:
                raise ConfigError(f"{image}: not an image ({error})") from None
    return samples


DATASETS = {"dummy_v2": dummy_v2, "digits": digits, "numpy": numpy_arrays, "ImageFolder": image_folder}


# --- transforms: each returns a function of one sample's inputs ------------------------------
def _size(size: Any) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize(size: Any) -> Callable:
    """Like torchvision's Resize (LPOT's for PyTorch): an int resizes the shorter side and keeps
    the aspect ratio; [h, w] resizes to exactly that. Float arrays stay float."""

    def target(height: int, width: int) -> tuple[int, int]:
        if isinstance(size, int):
            scale = size / min(height, width)
            return max(1, round(height * scale)), max(1, round(width * scale))
        return int(size[0]), int(size[1])

    def apply(image: Any) -> Any:
        from PIL import Image

        if not isinstance(image, np.ndarray):
            height, width = target(image.height, image.width)
            return image.resize((width, height), Image.BILINEAR)
        array = image if image.ndim == 3 else image[..., None]
        height, width = target(*array.shape[:2])
        channels = [np.asarray(Image.fromarray(array[..., c].astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))
                    for c in range(array.shape[2])]
        resized = np.stack(channels, axis=-1).astype(image.dtype if image.dtype.kind == "f" else np.float32)
        return resized if image.ndim == 3 else resized[..., 0]

    return apply


def center_crop(size: Any) -> Callable:
    height, width = _size(size)

    def apply(image: Any) -> Any:
        array = np.asarray(image)
        top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
        if top < 0 or left < 0:
            raise ConfigError(f"{height}x{width} is larger than the image, {array.shape[0]}x{array.shape[1]}")
        return array[top:top + height, left:left + width]

    return apply


def normalize(mean: Any = 0.0, std: Any = 1.0) -> Callable:
    """(x - mean) / std over the last (channel) axis, as LPOT does for HWC images."""
    mean, std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return lambda image: (np.asarray(image, dtype=np.float32) - mean) / std


def to_array() -> Callable:
    return lambda image: np.asarray(image, dtype=np.float32)


def transpose(perm: list[int]) -> Callable:
    return lambda image: np.transpose(np.asarray(image), perm)


TRANSFORMS = {"Resize": resize, "CenterCrop": center_crop, "Normalize": normalize, "ToArray": to_array,
              "Transpose": transpose}


def label_balance(size: int) -> Callable[[list[Sample]], list[Sample]]:
    """LPOT's LabelBalance: keep the samples whose label holds exactly ``size`` entries (e.g.
    ``size`` boxes), so that detection labels batch into one array."""
    def apply(samples: list[Sample]) -> list[Sample]:
        return [(inputs, label) for inputs, label in samples if np.asarray(label).reshape(-1).size == size]

    return apply


FILTERS = {"LabelBalance": label_balance}


def label_shift(label_shift: int) -> Callable:
    """LPOT's LabelShift: labels minus ``label_shift`` (a model without a background class)."""
    return lambda label: np.asarray(label) - label_shift


POSTPROCESS = {"LabelShift": label_shift}
