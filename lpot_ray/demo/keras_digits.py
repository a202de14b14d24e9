"""The digits CNN in Keras: the TensorFlow example's and tests' real model.

Same layers and names as the PyTorch ``digits_cnn`` (conv1, conv2, fc1, fc2), channels-last as
Keras and TFLite want them. Batches are numpy (images [N, 8, 8, 1], labels [N]).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data import ArrayDataset, ArrayLoader, digits_arrays


def digits_arrays_nhwc(split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = digits_arrays(split)
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels


def digits_keras_loaders(batch_size: int = 64, calibration_batch_size: int = 32) -> tuple[ArrayLoader, ArrayLoader]:
    """(calibration, evaluation) loaders over the 8x8 digits, channels-last."""
    return (ArrayLoader(ArrayDataset(*digits_arrays_nhwc("calibration")), calibration_batch_size),
            ArrayLoader(ArrayDataset(*digits_arrays_nhwc("evaluation")), batch_size))


def digits_keras_cnn(width: int = 16) -> Any:
    """Two conv layers and two dense layers: 4 quantizable ops of very different sizes."""
    import keras

    images = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="conv1")(images)
    x = keras.layers.Conv2D(2 * width, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(4 * width, activation="relu", name="fc1")(x)
    logits = keras.layers.Dense(10, name="fc2")(x)
    return keras.Model(images, logits, name="digits_cnn")


def train_digits_keras(epochs: int = 8, seed: int = 0, width: int = 16) -> tuple[Any, ArrayLoader, ArrayLoader]:
    """A trained Keras digits CNN (about 97% accurate) with its calibration and evaluation loaders."""
    import keras

    keras.utils.set_random_seed(seed)
    model = digits_keras_cnn(width)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*digits_arrays_nhwc("train"), epochs=epochs, batch_size=64, verbose=0)
    return (model, *digits_keras_loaders())


def with_activation_outliers(model: Any, calibration: ArrayLoader, scale: float = 1000.0) -> Any:
    """The same function with one huge activation channel after conv1 (see ``digits.py``): its
    per-tensor int8 activation loses almost all resolution, so int8 needs a fallback."""
    import keras

    outlier = keras.models.clone_model(model)
    outlier.set_weights(model.get_weights())
    images = np.concatenate([batch for batch, _ in calibration])
    conv1_output = keras.Model(outlier.inputs, outlier.get_layer("conv1").output).predict(images, verbose=0)
    channel = int(conv1_output.mean(axis=(0, 1, 2)).argmax())
    conv1, conv2 = outlier.get_layer("conv1"), outlier.get_layer("conv2")
    kernel, bias = conv1.get_weights()
    kernel[..., channel] *= scale
    bias[channel] *= scale
    conv1.set_weights([kernel, bias])
    kernel, bias = conv2.get_weights()
    kernel[:, :, channel, :] /= scale  # Keras kernels are [kh, kw, in, out]
    conv2.set_weights([kernel, bias])
    return outlier
