"""Shared fixtures: one Ray instance per session, a digits CNN trained once."""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def trained_digits():
    from lpot_ray.digits import train_digits_cnn

    return train_digits_cnn(epochs=6)


@pytest.fixture
def digits(trained_digits):
    """(model, calibration loader, evaluation loader); the model is a fresh copy per test."""
    model, calibration, evaluation = trained_digits
    return copy.deepcopy(model), calibration, evaluation


@pytest.fixture(scope="session")
def outlier_digits(trained_digits):
    """The digits CNN with two activation outliers (as LLMs have): conv2 and fc1 lose accuracy
    in int8 with per-tensor activations; the fp32 function is unchanged."""
    import torch

    model, calibration, evaluation = trained_digits
    model = copy.deepcopy(model)
    scale = 1000.0
    with torch.no_grad():
        images = torch.cat([batch for batch, _ in calibration])
        conv1_out = torch.relu(model.conv1(images))
        channel = int(conv1_out.mean(dim=(0, 2, 3)).argmax())
        model.conv1.weight[channel] *= scale
        model.conv1.bias[channel] *= scale
        model.conv2.weight[:, channel] /= scale
        conv2_out = torch.max_pool2d(torch.relu(model.conv2(torch.relu(model.conv1(images)))), 2)
        channel = int(conv2_out.mean(dim=(0, 2, 3)).argmax())
        model.conv2.weight[channel] *= scale
        model.conv2.bias[channel] *= scale
        model.fc1.weight[:, channel * 16 : channel * 16 + 16] /= scale
    return model.eval(), calibration, evaluation


def base_conf(tmp_path, **tuning) -> dict:
    """A minimal configuration for the digits CNN with topk, workspace in tmp_path."""
    conf = {
        "model": {"name": "digits", "framework": "pytorch"},
        "evaluation": {"accuracy": {"metric": {"topk": 1}}},
        "tuning": {"workspace": {"path": str(tmp_path / "ws")}, **tuning},
        "ray": {"workers": 2},
    }
    return conf
