"""LPOT's dataloader sections: datasets, per-sample transforms, filters and label postprocessing.

A YAML ``dataloader`` becomes an ``ArrayLoader``: the dataset read once into numpy arrays,
transformed sample by sample, filtered, then served in batches of ``(inputs, labels)``. Numpy
batches are framework-neutral; each adaptor turns them into its own tensors. Everything here
pickles, so a loader travels to workers with the job.

Datasets (``datasets.py``): ``dummy_v2`` (random data of given shapes), ``digits``
(scikit-learn's bundled 8x8 digits, split like the demo), ``numpy`` (arrays from an ``.npz``
file), ``ImageFolder`` (one sub-folder of images per class), ``ImagenetRaw`` (a folder of
images and a "name label" list), ``ImageRecord`` (ImageNet TFRecords), ``COCORecord`` (a COCO
TFRecord) and ``COCORaw`` (COCO images and instances JSON); ``GLUE`` is refused by name, as it
needs a Hugging Face tokenizer. Transforms (``transforms.py``): ``Resize``, ``CenterCrop``,
``Normalize``, ``ToArray``, ``Transpose``, ``ToTensor``, ``Rescale``, ``Cast``,
``AlignImageChannel``, ``PaddedCenterCrop``, ``RandomResizedCrop``, ``RandomHorizontalFlip``,
``BilinearImagenet``, ``ResizeCropImagenet``, ``ResizeWithRatio`` (random ones seeded, so a
YAML always gives the same data). Filter: ``LabelBalance``. Postprocess: ``LabelShift``.
Detection labels (boxes, classes per image, of any count) batch as an object array whose rows
unpack into each image's boxes and classes, as the COCO metrics read them.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Optional

import numpy as np

from .config import DataloaderSection, PostprocessSection
from .datasets import DATASETS, Sample, digits_arrays  # noqa: F401 (digits_arrays: the demos' data)
from .errors import ConfigError
from .transforms import takes_label, transforms_for


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


def build_loader(section: DataloaderSection, key: str, postprocess: Optional[PostprocessSection] = None,
                 framework: str = "pytorch") -> ArrayLoader:
    """The loader a YAML ``dataloader`` section describes, with ``framework``'s transforms (LPOT's
    Resize differs between them); ``key`` is its path, for errors."""
    (name, params), = section.dataset.items()
    samples = _call(DATASETS, name, params, f"{key}.dataset")
    transforms = transforms_for(framework)
    for transform_name, transform_params in (section.transform or {}).items():
        transform = _call(transforms, transform_name, transform_params, f"{key}.transform")
        with _named(f"{key}.transform.{transform_name}"):
            samples = [transform(sample) if takes_label(transform) else (transform(sample[0]), sample[1])
                       for sample in samples]
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
    dataset = ArrayDataset(np.stack([np.asarray(inputs) for inputs, _ in samples]), _labels([label for _, label in samples]))
    return ArrayLoader(dataset, section.batch_size)


def _labels(labels: list[Any]) -> np.ndarray:
    """One array of labels; detection labels (a tuple of arrays per sample, of any length) as an
    object array [N, parts], whose batch rows unpack into each sample's parts."""
    if not all(isinstance(label, tuple) for label in labels):
        return np.asarray(labels)
    parts = {len(label) for label in labels}
    if len(parts) != 1:
        raise ConfigError(f"labels come in tuples of {min(parts)} and {max(parts)} parts")
    table = np.empty((len(labels), parts.pop()), dtype=object)
    for row, label in enumerate(labels):
        for column, part in enumerate(label):
            table[row, column] = np.asarray(part)
    return table


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


def label_balance(size: int) -> Callable[[list[Sample]], list[Sample]]:
    """LPOT's LabelBalance: keep the samples whose label holds exactly ``size`` entries, or, for
    a detection label (boxes, classes), ``size`` boxes, as LPOT's COCO filters count them."""
    def entries(label: Any) -> int:
        return len(np.asarray(label[0]).reshape(-1, 4)) if isinstance(label, tuple) else np.asarray(label).reshape(-1).size

    return lambda samples: [(inputs, label) for inputs, label in samples if entries(label) == size]


FILTERS = {"LabelBalance": label_balance}


def label_shift(label_shift: int) -> Callable:
    """LPOT's LabelShift: labels minus ``label_shift`` (a model without a background class); of
    a detection label (boxes, classes), the classes."""
    def apply(label: Any) -> Any:
        if isinstance(label, tuple):
            return (label[0], np.asarray(label[1]) - label_shift, *label[2:])
        return np.asarray(label) - label_shift

    return apply


POSTPROCESS = {"LabelShift": label_shift}
