"""LPOT's per-sample transforms, on PIL images or numpy arrays (HWC, or CHW after ``ToTensor``).

Each entry of ``TRANSFORMS`` takes the YAML parameters and returns a function of one sample's
inputs, or, marked by ``with_label``, of the whole ``(inputs, label)`` sample when the label
moves with the image (detection boxes under padding). LPOT's PyTorch transforms are
torchvision's and its TensorFlow ones graph ops; here one numpy version of each follows LPOT's
parameter names and arithmetic, resampling through PIL (TensorFlow's resize does not
antialias, so a downscaled image differs from LPOT's by a little). ``Resize`` with an int
keeps the aspect ratio, as LPOT's PyTorch ``Resize`` does; LPOT's TensorFlow one squares it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .errors import ConfigError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32",
          "float64", "complex64", "complex128")


def with_label(function: Callable) -> Callable:
    """Mark a transform that maps the whole (inputs, label) sample."""
    function.takes_label = True
    return function


def _size(size: Any, name: str = "size") -> tuple[int, int]:
    """LPOT's size forms: ``N``, ``[N]`` or ``[height, width]``."""
    values = [size] if isinstance(size, int) and not isinstance(size, bool) else size
    if (not isinstance(values, (list, tuple)) or len(values) not in (1, 2)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)):
        raise ConfigError(f"{name} {size!r} must be a positive integer, [N] or [height, width]")
    return (values[0], values[-1])


def _array(image: Any) -> np.ndarray:
    return image if isinstance(image, np.ndarray) else np.asarray(image)


def _filter(interpolation: str) -> int:
    from PIL import Image

    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation {interpolation!r} must be one of {', '.join(INTERPOLATIONS)}")
    return {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]


def resize_to(image: Any, height: int, width: int, interpolation: str = "bilinear") -> Any:
    """``image`` resampled to height x width: a PIL image stays one, an 8-bit array stays 8-bit
    (torchvision resizes PIL images), other arrays become float, resampled channel by channel
    with their values unrounded."""
    from PIL import Image

    resample = _filter(interpolation)
    if not isinstance(image, np.ndarray):
        return image.resize((width, height), resample)
    if image.dtype == np.uint8 and (image.ndim == 2 or image.shape[2] in (1, 3)):  # 8-bit stays 8-bit, as PIL's
        resized = np.asarray(Image.fromarray(image.reshape(image.shape[:2]) if image.ndim == 3 and image.shape[2] == 1
                                             else image).resize((width, height), resample))
        return resized.reshape(height, width, *image.shape[2:])
    array = image if image.ndim == 3 else image[..., None]
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(array[..., c], dtype=np.float32), mode="F")
                           .resize((width, height), resample)) for c in range(array.shape[2])]
    resized = np.stack(channels, axis=-1).astype(image.dtype if image.dtype.kind == "f" else np.float32)
    return resized if image.ndim == 3 else resized[..., 0]


def _hw(image: Any) -> tuple[int, int]:
    return (image.shape[0], image.shape[1]) if isinstance(image, np.ndarray) else (image.height, image.width)


def resize(size: Any, interpolation: str = "bilinear") -> Callable:
    """Like torchvision's Resize (LPOT's for PyTorch): an int (or ``[N]``) resizes the shorter
    side and keeps the aspect ratio; [h, w] resizes to exactly that."""
    _filter(interpolation)
    keep_ratio = isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1)
    height, width = _size(size)

    def apply(image: Any) -> Any:
        if not keep_ratio:
            return resize_to(image, height, width, interpolation)
        h, w = _hw(image)
        scale = height / min(h, w)
        return resize_to(image, max(1, round(h * scale)), max(1, round(w * scale)), interpolation)

    return apply


def square_resize(size: Any, interpolation: str = "bilinear") -> Callable:
    """LPOT's Resize for TensorFlow, MXNet and ONNX Runtime: an int (or ``[N]``) makes the image N x N, its
    aspect ratio not kept; [h, w] resizes to exactly that."""
    _filter(interpolation)
    height, width = _size(size)
    return lambda image: resize_to(image, height, width, interpolation)


def _crop(array: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    if top < 0 or left < 0 or top + height > array.shape[0] or left + width > array.shape[1]:
        raise ConfigError(f"{height}x{width} is larger than the image, {array.shape[0]}x{array.shape[1]}")
    return array[top:top + height, left:left + width]


def center_crop(size: Any) -> Callable:
    height, width = _size(size)

    def apply(image: Any) -> np.ndarray:
        array = _array(image)
        return _crop(array, (array.shape[0] - height) // 2, (array.shape[1] - width) // 2, height, width)

    return apply


def padded_center_crop(size: Any, crop_padding: int = 0) -> Callable:
    """LPOT's PaddedCenterCrop (EfficientNet's eval crop): a centred square of
    ``size / (size + crop_padding)`` of the shorter side."""
    height, width = _size(size)
    if height != width:
        raise ConfigError(f"size {size!r}: the crop is square, height and width must be equal")
    if not isinstance(crop_padding, int) or crop_padding < 0:
        raise ConfigError(f"crop_padding {crop_padding!r} must be a non-negative integer")

    def apply(image: Any) -> np.ndarray:
        array = _array(image)
        h, w = array.shape[:2]
        side = int(height / (height + crop_padding) * min(h, w))
        return _crop(array, (h - side + 1) // 2, (w - side + 1) // 2, side, side)

    return apply


def _channels(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32).reshape(-1)
    if array.size == 0:
        raise ConfigError(f"{name} {values!r} must be a number or one per channel")
    return array


def normalize(mean: Any = 0.0, std: Any = 1.0) -> Callable:
    """(x - mean) / std per channel: over the last axis of an HWC image, as LPOT's TensorFlow
    Normalize, or the first of a CHW one after ``ToTensor``, as torchvision's."""
    mean, std = _channels(mean, "mean"), _channels(std, "std")
    if (std < 1e-6).any():
        raise ConfigError(f"std {std.tolist()} must be greater than 0")

    def apply(image: Any) -> np.ndarray:
        array = np.asarray(image, dtype=np.float32)
        channels = max(mean.size, std.size)
        if channels == 1 or (array.ndim >= 1 and array.shape[-1] == channels):
            return (array - mean) / std
        if array.ndim == 3 and array.shape[0] == channels:
            return (array - mean[:, None, None]) / std[:, None, None]
        raise ConfigError(f"{channels} means and stds for an image of shape {array.shape}; give one per channel")

    return apply


def to_array() -> Callable:
    return lambda image: np.asarray(image, dtype=np.float32)


def transpose(perm: list[int]) -> Callable:
    def apply(image: Any) -> np.ndarray:
        array = np.asarray(image)
        if sorted(perm) != list(range(array.ndim)):
            raise ConfigError(f"perm {perm!r} is not a permutation of the {array.ndim} axes of an image of shape {array.shape}")
        return np.transpose(array, perm)

    return apply


def to_tensor() -> Callable:
    """torchvision's ToTensor, as numpy: HWC to CHW float32, 8-bit values scaled to [0, 1]
    (float arrays are only transposed, as torchvision does)."""
    def apply(image: Any) -> np.ndarray:
        array = np.asarray(image)
        array = array[..., None] if array.ndim == 2 else array
        scaled = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
        return np.ascontiguousarray(scaled.transpose(2, 0, 1))

    return apply


def rescale() -> Callable:
    """LPOT's Rescale: values to [0, 1], as float32."""
    return lambda image: np.asarray(image, dtype=np.float32) / 255.0


def cast(dtype: str = "float32") -> Callable:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} must be one of {', '.join(DTYPES)}")
    return lambda image: np.asarray(image).astype(dtype)


def align_image_channel(dim: int = 3) -> Callable:
    """LPOT's AlignImageChannel: grey [H, W] to ``dim`` channels, RGBA to RGB, RGB to grey
    (ITU-R 601 luma, as OpenCV and PIL compute it)."""
    if dim not in (1, 3, 4):
        raise ConfigError(f"dim {dim!r} must be 1, 3 or 4")

    def apply(image: Any) -> Any:
        if not isinstance(image, np.ndarray):
            return image.convert({1: "L", 3: "RGB", 4: "RGBA"}[dim])
        array = np.dstack([image] * dim) if image.ndim == 2 else image
        if array.shape[-1] == dim:
            return array
        if array.shape[-1] == 4 and dim == 3:
            return array[..., :3]
        if array.shape[-1] == 3 and dim == 1:
            grey = array.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            return (np.round(grey) if array.dtype.kind in "ui" else grey).astype(array.dtype)[..., None]
        raise ConfigError(f"can't turn an image of {array.shape[-1]} channels into {dim}")

    return apply


def _rng(seed: int) -> np.random.Generator:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed {seed!r} must be an integer")
    return np.random.default_rng(seed)


def random_resized_crop(size: Any, scale: Any = (0.08, 1.0), ratio: Any = (3 / 4, 4 / 3),
                        interpolation: str = "bilinear", seed: int = 0) -> Callable:
    """torchvision's RandomResizedCrop: a crop of random area (``scale``) and aspect
    (``ratio``), resized to ``size``. The draws come from a generator seeded when the loader is
    built (``seed``, lpot_ray's own), so the same YAML gives the same samples: a resumed tuning
    compares accuracies recorded on this data, and a fresh draw would change the data."""
    height, width = _size(size)
    (low, high), (ratio_low, ratio_high) = _pair(scale, "scale"), _pair(ratio, "ratio")
    if ratio_low <= 0 or low <= 0:
        raise ConfigError(f"scale {scale!r} and ratio {ratio!r} must be positive")
    _filter(interpolation)
    rng = _rng(seed)

    def apply(image: Any) -> Any:
        top, left, h, w = _random_box(rng, *_hw(image), (low, high), (ratio_low, ratio_high))
        if not isinstance(image, np.ndarray):
            return resize_to(image.crop((left, top, left + w, top + h)), height, width, interpolation)
        return resize_to(image[top:top + h, left:left + w], height, width, interpolation)

    return apply


def _pair(values: Any, name: str) -> tuple[float, float]:
    if not isinstance(values, (list, tuple)) or len(values) != 2 or not all(isinstance(v, (int, float)) for v in values):
        raise ConfigError(f"{name} {values!r} must be [min, max]")
    if values[0] > values[1]:
        raise ConfigError(f"{name} {list(values)} must be [min, max], min first")
    return float(values[0]), float(values[1])


def _random_box(rng: np.random.Generator, h: int, w: int, scale: tuple[float, float],
                ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision draws them: ten tries, then a centred crop."""
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        crop_w, crop_h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < crop_w <= w and 0 < crop_h <= h:
            return int(rng.integers(0, h - crop_h + 1)), int(rng.integers(0, w - crop_w + 1)), crop_h, crop_w
    aspect = w / h
    crop_w, crop_h = (w, round(w / ratio[0])) if aspect < ratio[0] else (round(h * ratio[1]), h) if aspect > ratio[1] else (w, h)
    return (h - crop_h) // 2, (w - crop_w) // 2, crop_h, crop_w


def random_horizontal_flip(p: float = 0.5, seed: int = 0) -> Callable:
    """torchvision's RandomHorizontalFlip, with probability ``p``; seeded as RandomResizedCrop
    is, for the same reason."""
    if not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ConfigError(f"p {p!r} must be a probability in [0, 1]")
    rng = _rng(seed)

    def apply(image: Any) -> np.ndarray:
        array = _array(image)
        return array[:, ::-1].copy() if rng.random() < p else array

    return apply


def _float01(image: Any) -> np.ndarray:
    """TensorFlow's convert_image_dtype to float32: 8-bit values to [0, 1], floats unchanged."""
    array = np.asarray(image)
    return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)


def bilinear_imagenet(height: int, width: int, central_fraction: float = 0.875, mean_value: Any = (0.0, 0.0, 0.0),
                      scale: float = 1.0) -> Callable:
    """LPOT's BilinearImagenet (Inception preprocessing): values to [0, 1], the central
    ``central_fraction`` cropped, bilinear resize to height x width, values to [-1, 1], then
    ``(x - mean_value) * scale``."""
    _size([height, width], "height and width")
    if central_fraction is not None and not 0 < central_fraction <= 1:
        raise ConfigError(f"central_fraction {central_fraction!r} must be in (0, 1]")
    mean = _channels(mean_value, "mean_value")

    def apply(image: Any) -> np.ndarray:
        array = _float01(image)
        if central_fraction:
            h, w = array.shape[:2]
            top, left = int((h - h * central_fraction) / 2), int((w - w * central_fraction) / 2)
            array = array[top:h - top, left:w - left]
        array = resize_to(array, height, width)
        return (((array - 0.5) * 2.0 - mean) * scale).astype(np.float32)

    return apply


def resize_crop_imagenet(height: int, width: int, random_crop: bool = False, resize_side: int = 256,
                         random_flip_left_right: bool = False, mean_value: Any = (0.0, 0.0, 0.0), scale: float = 1.0,
                         seed: int = 0) -> Callable:
    """LPOT's ResizeCropImagenet (VGG/ResNet preprocessing): the shorter side resized to
    ``resize_side`` (bilinear, values kept 0..255), a centred (or random) height x width crop,
    an optional random left-right flip, then ``(x - mean_value) * scale``. Random choices are
    seeded as RandomResizedCrop's are."""
    _size([height, width], "height and width")
    _size(resize_side, "resize_side")
    mean, rng = _channels(mean_value, "mean_value"), _rng(seed)

    def apply(image: Any) -> np.ndarray:
        array = np.asarray(image).astype(np.float32)
        h, w = array.shape[:2]
        factor = resize_side / min(h, w)
        array = resize_to(array, int(np.rint(h * factor)), int(np.rint(w * factor)))
        h, w = array.shape[:2]
        if random_crop:
            top, left = int(rng.integers(0, max(h - height, 0) + 1)), int(rng.integers(0, max(w - width, 0) + 1))
        else:
            top, left = (h - height) // 2, (w - width) // 2
        array = _crop(array, top, left, height, width)
        if random_flip_left_right and rng.random() < 0.5:
            array = array[:, ::-1]
        return ((array - mean) * scale).astype(np.float32)

    return apply


def resize_with_ratio(min_dim: int = 800, max_dim: int = 1365, padding: bool = False, constant_value: float = 0) -> Callable:
    """LPOT's ResizeWithRatio (Mask/Faster R-CNN): scale up so the shorter side is at least
    ``min_dim`` while the longer stays within ``max_dim``; with ``padding``, pad to
    max_dim x max_dim, centred, and move the label's normalized boxes with the image."""
    for name, value in (("min_dim", min_dim), ("max_dim", max_dim)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{name} {value!r} must be a positive integer")
    if padding and not max_dim:
        raise ConfigError("padding needs max_dim, the side it pads to")

    @with_label
    def apply(sample: tuple[Any, Any]) -> tuple[Any, Any]:
        image, label = sample
        array = np.asarray(image)
        h, w = array.shape[:2]
        factor = max(1.0, min_dim / min(h, w)) if min_dim else 1.0
        if max_dim and round(max(h, w) * factor) > max_dim:
            factor = max_dim / max(h, w)
        if factor != 1.0:
            array = resize_to(array, round(h * factor), round(w * factor))
        if not padding:
            return array, label
        new_h, new_w = array.shape[:2]
        top, left = (max_dim - new_h) // 2, (max_dim - new_w) // 2
        pads = [(top, max_dim - new_h - top), (left, max_dim - new_w - left)] + [(0, 0)] * (array.ndim - 2)
        return np.pad(array, pads, constant_values=constant_value), _moved_boxes(label, (new_h, new_w), (top, left), max_dim)

    return apply


def _moved_boxes(label: Any, size: tuple[int, int], offset: tuple[int, int], side: int) -> Any:
    """Normalized (x1, y1, x2, y2) boxes of an image of ``size`` placed at ``offset`` in a
    side x side canvas, normalized to the canvas."""
    if not (isinstance(label, tuple) and len(label) == 2):
        return label
    boxes, classes = label
    (h, w), (top, left) = size, offset
    pixels = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * [w, h, w, h] + [left, top, left, top]
    return (pixels / side).astype(np.float32), classes


TRANSFORMS: dict[str, Callable[..., Callable]] = {
    "Resize": resize, "CenterCrop": center_crop, "Normalize": normalize, "ToArray": to_array, "Transpose": transpose,
    "ToTensor": to_tensor, "Rescale": rescale, "Cast": cast, "AlignImageChannel": align_image_channel,
    "PaddedCenterCrop": padded_center_crop, "RandomResizedCrop": random_resized_crop,
    "RandomHorizontalFlip": random_horizontal_flip, "BilinearImagenet": bilinear_imagenet,
    "ResizeCropImagenet": resize_crop_imagenet, "ResizeWithRatio": resize_with_ratio,
}
# Where LPOT's transform of a name differs by framework: the table above is its PyTorch one.
FRAMEWORK_TRANSFORMS: dict[str, dict[str, Callable[..., Callable]]] = {
    "tensorflow": {"Resize": square_resize}, "mxnet": {"Resize": square_resize}, "onnxrt": {"Resize": square_resize},
}


def transforms_for(framework: str) -> dict[str, Callable[..., Callable]]:
    """The transforms of LPOT's table for ``framework``."""
    return {**TRANSFORMS, **FRAMEWORK_TRANSFORMS.get(framework, {})}


def takes_label(transform: Callable) -> bool:
    return getattr(transform, "takes_label", False)

