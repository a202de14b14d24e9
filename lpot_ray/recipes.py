"""Accuracy-recovery recipes: rewrites of the fp32 model, exact in fp32, applied before it is
quantized, that an int8 model may need fewer fp32 ops after.

A recipe is a name in a config (``TuneConfig.recipes``): plain data the search varies like a
scheme, that a framework's adaptor implements where its int8 path can use it (``Adaptor.recipes``).

- ``cross_layer_equalization``: for two Conv/Linear ops joined by ReLU, pooling or a flatten
  (or nothing), scale each channel down in the first op and up in the second by the same factor,
  chosen to give the channel the same weight range in both (Nagel et al., data-free quantization;
  AIMET's CLE). Outlier activation channels are shrunk with the weights that made them.
- ``fast_bias_correction``: after quantizing, compare each op's output mean per channel on the
  calibration batches with fp32's and move the bias by the difference (Intel Neural Compressor's
  name), so the int8 model's outputs are not biased.
"""

from __future__ import annotations

import itertools
from typing import Optional

CROSS_LAYER_EQUALIZATION = "cross_layer_equalization"
FAST_BIAS_CORRECTION = "fast_bias_correction"
# In the order they are applied: equalized weights first, then the biases of their int8 form.
RECIPES = (CROSS_LAYER_EQUALIZATION, FAST_BIAS_CORRECTION)


def recipe_sets(offered: tuple[str, ...], wanted: dict[str, Optional[bool]]) -> tuple[tuple[str, ...], ...]:
    """The recipe combinations a search tries, fewest recipes first (the default, then each
    alone, in ``RECIPES`` order): each offered recipe is off (``wanted`` False), always on (True)
    or both (unset); ones not offered are never on."""
    options = []
    for name in RECIPES:
        choice = wanted.get(name) if name in offered else False
        options.append(((),) if choice is False else ((name,),) if choice else ((), (name,)))
    combinations = {sum(parts, ()) for parts in itertools.product(*options)}
    return tuple(sorted(combinations, key=lambda names: (len(names), [RECIPES.index(name) for name in names])))
