"""Accuracy-recovery recipes: rewrites of the fp32 model, exact in fp32 (bias correction aside),
applied before it is quantized, that an int8 model may need fewer fp32 ops after.

A recipe is an entry in a config (``TuneConfig.recipes``): a name, and for SmoothQuant its alpha
(``smooth_quant:0.5``); plain data the search varies like a scheme, that a framework's adaptor
implements where its int8 path can use it (``Adaptor.recipes``).

- ``cross_layer_equalization``: for two Conv/Linear ops joined by ReLU, pooling or a flatten
  (or nothing), scale each channel down in the first op and up in the second by the same factor,
  chosen to give the channel the same weight range in both (Nagel et al., data-free quantization;
  AIMET's CLE). Outlier activation channels are shrunk with the weights that made them.
- ``smooth_quant``: for Linear ops, divide each input channel by s_j = max|X_j|^alpha /
  max|W_j|^(1 - alpha) and multiply the weights' column by it (Xiao et al., SmoothQuant; Intel
  Neural Compressor's name): activation outliers, which per-tensor int8 can't hold, move into
  the weights, which are quantized per channel. The transformer case.
- ``fast_bias_correction``: after quantizing, compare each op's output mean per channel on the
  calibration batches with fp32's and move the bias by the difference (Neural Compressor's
  name), so the int8 model's outputs are not biased.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import numpy as np

CROSS_LAYER_EQUALIZATION = "cross_layer_equalization"
SMOOTH_QUANT = "smooth_quant"
FAST_BIAS_CORRECTION = "fast_bias_correction"
# In the order they are applied: equalized weights, then smoothed inputs, then the biases of
# their int8 form.
RECIPES = (CROSS_LAYER_EQUALIZATION, SMOOTH_QUANT, FAST_BIAS_CORRECTION)
EQUALIZATION_PASSES = 3  # a chain conv -> conv -> linear settles in a few passes (AIMET iterates so too)
SMOOTH_QUANT_ALPHAS = (0.5, 0.75)  # searched unless `smooth_quant_args.alpha` says (0.5: Neural Compressor's default)


def equalize_arrays(arrays: dict, pairs: Sequence[tuple], channels_last: bool = False) -> None:
    """Cross-layer equalization of numpy weights, in place (the adaptors whose weights are numpy
    arrays share it): for each ``(first, bias, second)`` pair of keys (``bias`` None where the
    first op has none), channel c gets s_c = sqrt(r1_c / r2_c), with r1_c the largest |weight| of
    the first op's output channel c and r2_c that of the second op's weights reading it; the first
    op's channel (and bias) is divided by s_c and those weights multiplied by it, so both have the
    range sqrt(r1_c * r2_c) (1 where a range is 0). The second op's weights are [out, ...] with
    its input features in blocks per channel: ``[out, channels, block]`` (channel-first: PyTorch,
    ONNX, MXNet), or ``[out, block, channels]`` with ``channels_last`` (TFLite). Repeated
    ``EQUALIZATION_PASSES`` times, so that a chain settles."""
    for _ in range(EQUALIZATION_PASSES):
        for first, bias, second in pairs:
            w1, w2 = arrays[first], arrays[second]
            channels = w1.shape[0]
            blocks = w2.reshape(w2.shape[0], -1, channels) if channels_last else w2.reshape(w2.shape[0], channels, -1)
            channel_axis = 2 if channels_last else 1
            range1 = np.abs(w1.reshape(channels, -1)).max(axis=1)
            range2 = np.abs(np.moveaxis(blocks, channel_axis, 0).reshape(channels, -1)).max(axis=1)
            usable = (range1 > 0) & (range2 > 0)
            scale = np.ones(channels)
            scale[usable] = np.sqrt(range1[usable] / range2[usable])
            arrays[first] = w1 / scale.reshape(-1, *([1] * (w1.ndim - 1)))
            if bias is not None:
                arrays[bias] = arrays[bias] / scale
            along_channels = [1, 1, 1]
            along_channels[channel_axis] = channels
            arrays[second] = (blocks * scale.reshape(along_channels)).reshape(w2.shape)


def entry(name: str, alpha: Optional[float] = None) -> str:
    """A config's entry for a recipe: its name, with SmoothQuant's alpha."""
    return name if alpha is None else f"{name}:{alpha:g}"


def name_of(recipe: str) -> str:
    return recipe.partition(":")[0]


def alpha_of(recipe: str) -> float:
    return float(recipe.partition(":")[2])


def recipe_sets(offered: Sequence[str], wanted: dict[str, Optional[bool]],
                alphas: Sequence[float] = SMOOTH_QUANT_ALPHAS) -> tuple[tuple[str, ...], ...]:
    """The recipe combinations a search may try, fewest recipes first (the default, then each
    alone, in ``RECIPES`` order): each offered recipe is off (``wanted`` False), always on (True)
    or either (unset); ones not offered are never on. SmoothQuant comes once per alpha."""
    options = []
    for name in RECIPES:
        choice = wanted.get(name) if name in offered else False
        variants = tuple((entry(name, alpha),) for alpha in alphas) if name == SMOOTH_QUANT else ((name,),)
        options.append(((),) if choice is False else variants if choice else ((),) + variants)
    combinations = {sum(parts, ()) for parts in itertools.product(*options)}
    return tuple(sorted(combinations, key=lambda recipes: (len(recipes), [order(recipe) for recipe in recipes])))


def order(recipe: str) -> tuple[int, str]:
    """Where a recipe is applied among the others (and how its variants sort)."""
    return RECIPES.index(name_of(recipe)), recipe
