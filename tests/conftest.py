"""Shared fixtures: one Ray instance per session, a digits CNN trained once."""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def trained_digits():
    from lpot_ray.demo.torch_digits import train_digits_cnn

    return train_digits_cnn(epochs=6)


@pytest.fixture
def digits(trained_digits):
    """(model, calibration loader, evaluation loader); the model is a fresh copy per test."""
    model, calibration, evaluation = trained_digits
    return copy.deepcopy(model), calibration, evaluation


@pytest.fixture(scope="session")
def outlier_digits(trained_digits):
    """The digits CNN with two activation outliers: conv2 and fc1 must stay fp32."""
    from lpot_ray.demo.torch_digits import with_activation_outliers

    model, calibration, evaluation = trained_digits
    return with_activation_outliers(model, calibration), calibration, evaluation


@pytest.fixture(scope="session")
def keras_digits():
    """The digits CNN in Keras, trained once: (model, calibration loader, evaluation loader)."""
    from lpot_ray.demo.keras_digits import train_digits_keras

    return train_digits_keras(epochs=6)


def accuracy_of(model, loader) -> float:
    """Top-1 accuracy of a torch model over a loader of (images, labels) tensors."""
    import torch

    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total


def accuracy_of_numpy(predict, loader) -> float:
    """Top-1 accuracy of ``predict(images) -> scores`` over a loader of numpy batches."""
    import numpy as np

    correct = total = 0
    for images, labels in loader:
        correct += int((np.asarray(predict(images)).argmax(1) == labels).sum())
        total += len(labels)
    return correct / total


def base_conf(tmp_path, framework: str = "pytorch", **tuning) -> dict:
    """A minimal configuration for the digits CNN with topk, workspace in tmp_path. Recipes are
    off: the outlier CNNs here are built to need fallback, which equalization would spare them;
    so is bf16, whose use for fallback ops follows their measured speed (tests of each turn it on)."""
    conf = {
        "model": {"name": "digits", "framework": framework},
        "quantization": {"recipes": False, "use_bf16": False},
        "evaluation": {"accuracy": {"metric": {"topk": 1}}},
        "tuning": {"workspace": {"path": str(tmp_path / "ws")}, **tuning},
        "ray": {"workers": 2},
    }
    return conf


def tune_equalizing(framework: str, model, calibration, evaluation, tmp_path, accuracy):
    """Tune an outlier CNN with recipes searched (the default): it must pass all int8 through
    equalization instead of falling back, and its saved model must keep the recipe
    (``accuracy(model, loader)`` scores the reloaded model). Returns the result."""
    import lpot_ray
    from lpot_ray.recipes import CROSS_LAYER_EQUALIZATION

    conf = base_conf(tmp_path, framework, accuracy_criterion={"absolute": 0.02}, exit_policy={"timeout": 0, "max_trials": 20})
    del conf["quantization"]  # recipes searched, as by default
    conf["ray"]["workers"] = 1
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation)
    assert result.passed and result.fp32_ops == () and CROSS_LAYER_EQUALIZATION in result.config.recipes
    assert result.baseline - result.accuracy <= 0.02
    loaded = lpot_ray.load(result.save(tmp_path / "saved"))
    assert loaded.config.recipes == result.config.recipes
    assert accuracy(loaded.model, evaluation) == pytest.approx(result.accuracy)
    return result
