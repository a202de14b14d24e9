"""LPOT's mse strategy, made parallel: rank ops by their quantization error, then fall back.

Instead of one fallback trial per op, the ranking costs a single request to a worker: for the
most accurate model-wise config, each int8 op's output error against fp32 (normalised MSE), that
op alone quantized so that it is not blamed for the errors of the ops before it (Neural
Compressor 2.6's mse credits each trial's accuracy to the wrong op). Then, as in ``basic``:
accumulated fallback of the top-1, top-2, ... ops as speculative parallel prefixes, and pruning.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

from ..trial import InspectRequest, Status, Trial
from .base import Proposal
from .basic import BasicStrategy

log = logging.getLogger("lpot_ray")


class MseStrategy(BasicStrategy):
    first_prefix = 1  # nothing was tried in fp32 yet
    inspects_tensors = True

    def _ranking_proposals(self) -> list[Proposal]:
        return [InspectRequest(self.base)]

    def _rank(self, outcomes: list[Trial]) -> Optional[list[list[str]]]:
        if not outcomes or outcomes[0].status != Status.OK:
            log.warning("mse: no per-op errors (%s); falling back in model order",
                        outcomes[0].reason if outcomes else "inspection cancelled")
            return [[name] for name in self.base.int8_ops]
        errors = outcomes[0].figures["op_errors"]

        def error(name: str) -> float:  # NaN or inf means: the op broke; fall it back first
            value = errors.get(name, 0.0)
            return math.inf if not math.isfinite(value) else value

        return [[name] for name in sorted(self.base.int8_ops, key=lambda name: -error(name))]  # stable on ties
