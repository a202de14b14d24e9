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
    from lpot_ray.digits import train_digits_cnn

    return train_digits_cnn(epochs=6)


@pytest.fixture
def digits(trained_digits):
    """(model, calibration loader, evaluation loader); the model is a fresh copy per test."""
    model, calibration, evaluation = trained_digits
    return copy.deepcopy(model), calibration, evaluation


@pytest.fixture(scope="session")
def outlier_digits(trained_digits):
    """The digits CNN with two activation outliers: conv2 and fc1 must stay fp32."""
    from lpot_ray.digits import with_activation_outliers

    model, calibration, evaluation = trained_digits
    return with_activation_outliers(model, calibration), calibration, evaluation


def base_conf(tmp_path, **tuning) -> dict:
    """A minimal configuration for the digits CNN with topk, workspace in tmp_path."""
    conf = {
        "model": {"name": "digits", "framework": "pytorch"},
        "evaluation": {"accuracy": {"metric": {"topk": 1}}},
        "tuning": {"workspace": {"path": str(tmp_path / "ws")}, **tuning},
        "ray": {"workers": 2},
    }
    return conf
