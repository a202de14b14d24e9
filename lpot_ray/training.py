"""LPOT's ``quantization.train``: a ``q_func`` built from the YAML, for training without code.

``YamlTraining`` is plain data (the YAML section), so it travels to Ray workers like any q_func;
called on the prepared (fake-quantized) PyTorch model, it builds the training loader, the
optimizer and the criterion the section names, and trains in place.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from .config import TrainSection


@dataclass(frozen=True)
class YamlTraining:
    section: TrainSection

    def __call__(self, model: Any) -> None:
        import torch

        from .data import build_loader
        from .evaluation import split_batch

        loader = build_loader(self.section.dataloader, "quantization.train.dataloader")
        optimizer = self._optimizer(torch, model.parameters())
        criterion = self._criterion(torch)
        for _ in range(self.section.start_epoch, self.section.end_epoch):
            for batch in itertools.islice(loader, self.section.iteration):
                inputs, labels = split_batch(batch)
                optimizer.zero_grad()
                loss = criterion(model(torch.as_tensor(inputs)), torch.as_tensor(labels).long())
                loss.backward()
                optimizer.step()

    def _optimizer(self, torch: Any, parameters: Any) -> Any:
        (name, params), = self.section.optimizer.items()
        params = dict(params)
        learning_rate = params.pop("learning_rate", 0.01)
        if name == "SGD":
            return torch.optim.SGD(parameters, lr=learning_rate, **params)
        betas = (params.pop("beta_1", 0.9), params.pop("beta_2", 0.999))
        eps = params.pop("epsilon", 1e-8)
        return torch.optim.Adam(parameters, lr=learning_rate, betas=betas, eps=eps, **params)

    def _criterion(self, torch: Any) -> Any:
        (_, params), = self.section.criterion.items()
        reduction = str(params.get("reduction", "mean")).lower()
        return torch.nn.CrossEntropyLoss(reduction="sum" if reduction == "sum" else "mean")
