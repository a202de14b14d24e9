"""A small CNN trained on scikit-learn's bundled digits: the demo's and the tests' real model."""

from __future__ import annotations

from typing import Any

from ..data import digits_arrays


def digits_loaders(batch_size: int = 64, calibration_batch_size: int = 32) -> tuple[Any, Any, Any]:
    """(train, calibration, evaluation) torch DataLoaders over the 8x8 digits, split 1300/200/297."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    def dataset(split: str) -> TensorDataset:
        images, labels = digits_arrays(split)
        return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))

    return (
        DataLoader(dataset("train"), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)),
        DataLoader(dataset("calibration"), batch_size=calibration_batch_size),
        DataLoader(dataset("evaluation"), batch_size=batch_size),
    )


def digits_cnn(width: int = 16) -> Any:
    """Two conv layers and two linear layers: 4 quantizable ops of very different sizes."""
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, width, 3, padding=1)
            self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
            self.fc1 = nn.Linear(2 * width * 4 * 4, 4 * width)
            self.fc2 = nn.Linear(4 * width, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.conv1(x))
            x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
            x = torch.relu(self.fc1(x.flatten(1)))
            return self.fc2(x)

    return DigitsCNN()


def train_digits_cnn(epochs: int = 8, seed: int = 0, width: int = 16) -> tuple[Any, Any, Any]:
    """A trained DigitsCNN (about 97% accurate) with its calibration and evaluation loaders."""
    import torch

    torch.manual_seed(seed)
    train, calibration, evaluation = digits_loaders()
    model = digits_cnn(width)
    fit(model, train, epochs, learning_rate=3e-3)
    return model.eval(), calibration, evaluation


def fit(model: Any, loader: Any, epochs: int, learning_rate: float) -> None:
    """Train a torch classifier in place: Adam on cross-entropy (also a q_func's body)."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()


def with_activation_outliers(model: Any, calibration: Any, scale: float = 1000.0) -> Any:
    """The same function with two huge activation channels, as large language models have.

    One output channel of conv1 and one of conv2 are scaled up by ``scale`` and the consumers'
    weights scaled down, so fp32 outputs are unchanged (ReLU and max-pooling commute with positive
    scaling) while per-tensor int8 activations at the inputs of conv2 and fc1 lose almost all
    resolution: tuning must keep conv2 and fc1 in fp32.
    """
    import copy

    import torch

    model = copy.deepcopy(model)
    with torch.no_grad():
        images = torch.cat([batch for batch, _ in calibration])
        conv1_out = torch.relu(model.conv1(images))
        channel = int(conv1_out.mean(dim=(0, 2, 3)).argmax())
        model.conv1.weight[channel] *= scale
        model.conv1.bias[channel] *= scale
        model.conv2.weight[:, channel] /= scale
        conv2_out = torch.max_pool2d(torch.relu(model.conv2(torch.relu(model.conv1(images)))), 2)
        channel = int(conv2_out.mean(dim=(0, 2, 3)).argmax())
        pooled = conv2_out.shape[2] * conv2_out.shape[3]
        model.conv2.weight[channel] *= scale
        model.conv2.bias[channel] *= scale
        model.fc1.weight[:, channel * pooled:(channel + 1) * pooled] /= scale
    return model.eval()
