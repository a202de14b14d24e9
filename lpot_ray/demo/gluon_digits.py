"""The digits CNN as a Gluon HybridBlock: the MXNet adaptor's real model for tests and demos.

Same data and shape as ``digits.digits_cnn`` (NCHW 8x8 images, two conv and two dense layers);
the loaders are framework-neutral ``ArrayLoader``s of numpy batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data import ArrayDataset, ArrayLoader, digits_arrays

PREFIX = "digitscnn_"  # fixed, so layer names do not depend on how many nets were built before


def digits_gluon_cnn(width: int = 16) -> Any:
    """Two conv layers (ReLU, then 2x2 max-pooling) and two dense layers: 4 quantizable ops."""
    from ..adaptors.mxnet import import_mxnet

    mx = import_mxnet()
    nn = mx.gluon.nn

    class DigitsCNN(mx.gluon.HybridBlock):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            with self.name_scope():
                self.conv0 = nn.Conv2D(width, 3, padding=1, activation="relu", in_channels=1)
                self.conv1 = nn.Conv2D(2 * width, 3, padding=1, activation="relu", in_channels=width)
                self.pool = nn.MaxPool2D(2)
                self.dense0 = nn.Dense(4 * width, activation="relu", in_units=2 * width * 4 * 4)
                self.dense1 = nn.Dense(10, in_units=4 * width)

        def hybrid_forward(self, F: Any, x: Any) -> Any:
            return self.dense1(self.dense0(self.pool(self.conv1(self.conv0(x)))))

    return DigitsCNN(prefix=PREFIX)


def digits_array_loader(split: str, batch_size: int) -> ArrayLoader:
    images, labels = digits_arrays(split)
    return ArrayLoader(ArrayDataset(images, labels), batch_size)


def train_digits_gluon(width: int = 16, epochs: int = 8, seed: int = 0) -> tuple[Any, ArrayLoader, ArrayLoader]:
    """A trained DigitsCNN (about 98% accurate) with calibration and evaluation loaders."""
    from ..adaptors.mxnet import import_mxnet

    mx = import_mxnet()
    mx.random.seed(seed)
    net = digits_gluon_cnn(width)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    trainer = mx.gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 3e-3})
    loss = mx.gluon.loss.SoftmaxCrossEntropyLoss()
    images, labels = digits_arrays("train")
    order = np.random.default_rng(seed)
    for _ in range(epochs):
        shuffled = order.permutation(len(images))
        for start in range(0, len(images), 64):
            batch = shuffled[start:start + 64]
            with mx.autograd.record():
                value = loss(net(mx.nd.array(images[batch])), mx.nd.array(labels[batch]))
            value.backward()
            trainer.step(len(batch))
    return net, digits_array_loader("calibration", 32), digits_array_loader("evaluation", 64)


def save_digits_gluon(net: Any, prefix: str) -> str:
    """Export a trained net as ``prefix-symbol.json`` + ``prefix-0000.params``; the symbol file's path."""
    from ..adaptors.mxnet import import_mxnet

    mx = import_mxnet()
    net.hybridize()
    net(mx.nd.zeros((1, 1, 8, 8)))  # export needs one hybridized forward pass
    net.export(prefix, 0)
    return f"{prefix}-symbol.json"


def load_digits_gluon(prefix: str) -> Any:
    """A SymbolBlock of what ``save_digits_gluon`` wrote: a HybridBlock, ready to tune."""
    from ..adaptors.mxnet import import_mxnet

    mx = import_mxnet()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MXNet can't decide the input's type before a forward
        return mx.gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data"], f"{prefix}-0000.params")


def with_activation_outliers(net: Any, calibration: ArrayLoader, scale: float = 1000.0) -> Any:
    """A copy of the net computing the same function with one huge conv0 output channel (conv1's
    weights scaled down to match): per-tensor int8 activations after conv0 lose almost all
    resolution. In MXNet an int8 op requantizes its own output, so both conv0 (which produces the
    outlier) and conv1 (which reads it) must stay fp32."""
    from ..adaptors.mxnet import import_mxnet

    mx = import_mxnet()
    outlier = digits_gluon_cnn(net.conv0.weight.shape[0])
    outlier.initialize()
    for source, target in zip(net.collect_params().values(), outlier.collect_params().values(), strict=True):
        target.set_data(source.data().copy())
    images = mx.nd.array(np.concatenate([batch for batch, _ in calibration]))
    channel = int(outlier.conv0(images).mean(axis=(0, 2, 3)).argmax().asscalar())
    for parameter in (outlier.conv0.weight, outlier.conv0.bias):
        data = parameter.data()
        data[channel] *= scale
        parameter.set_data(data)
    weight = outlier.conv1.weight.data()
    weight[:, channel] /= scale
    outlier.conv1.weight.set_data(weight)
    return outlier
