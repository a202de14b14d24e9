"""PyTorch's side of pruning: a module's conv and linear weights read as numpy and masked in place."""

from __future__ import annotations

from typing import Any

import numpy as np

PRUNABLE_DIMS = (2, 4)  # linear and 2-d conv weights, as LPOT prunes


class TorchWeights:
    """``pruning.Weights`` over a ``torch.nn.Module``'s parameters, by their dotted names."""

    def __init__(self, model: Any):
        self.parameters = {name: parameter for name, parameter in model.named_parameters()
                           if parameter.dim() in PRUNABLE_DIMS}
        self.masks: dict[str, Any] = {}

    def names(self) -> tuple[str, ...]:
        return tuple(self.parameters)

    def read(self, name: str) -> np.ndarray:
        return self.parameters[name].detach().float().cpu().numpy()

    def set_mask(self, name: str, keep: np.ndarray) -> None:
        import torch

        parameter = self.parameters[name]
        self.masks[name] = torch.from_numpy(np.ascontiguousarray(keep)).to(device=parameter.device, dtype=parameter.dtype)
        self._apply(name)

    def apply_masks(self) -> None:
        for name in self.masks:
            self._apply(name)

    def _apply(self, name: str) -> None:
        import torch

        with torch.no_grad():
            self.parameters[name].mul_(self.masks[name])
