"""The extension API: plug-ins registered by decorator or entry point, named in YAML."""

import textwrap
from pathlib import Path

import pytest

import lpot_ray
from lpot_ray import registry
from lpot_ray.errors import ConfigError, PluginError

from conftest import base_conf


def readme_example() -> str:
    """The code block of README's "Extending" section."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Extending"):]
    return section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]


exec(compile(readme_example(), "README.md", "exec"))  # registers model_wise_only and error_rate


def test_plugins_registered_by_decorator_are_named_in_yaml(digits, tmp_path):
    model, calibration, evaluation = digits
    conf = base_conf(tmp_path, strategy={"name": "model_wise_only"},
                     accuracy_criterion={"absolute": 0.01, "higher_is_better": False})
    conf["evaluation"]["accuracy"]["metric"] = {"error_rate": None}
    conf["ray"]["workers"] = 1
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation)
    assert result.passed and result.n_trials == 1
    assert result.baseline < 0.1  # an error rate, not an accuracy


def test_a_plugin_missing_a_method_is_rejected_at_registration():
    with pytest.raises(PluginError, match="strategy 'broken' .* lacks required method 'tell'"):
        @registry.strategies.register("broken")
        class Broken:
            def ask(self, n):
                return []

            finished = True
    with pytest.raises(PluginError, match="lacks required method 'merge'"):
        registry.metrics.register("half_metric", type("Half", (), {"update": None, "result": None}))


def test_entry_points_of_installed_packages_are_found(tmp_path, monkeypatch):
    package = tmp_path / "my_strategies.py"
    package.write_text(textwrap.dedent('''
        from lpot_ray.strategies.exhaustive import ExhaustiveStrategy

        class Reversed(ExhaustiveStrategy):
            """Exhaustive, registered from another package."""
    '''))
    dist = tmp_path / "my_strategies-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-strategies\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[lpot_ray.strategies]\nreversed = my_strategies:Reversed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry.strategies, "_entry_points_loaded", False)
    assert registry.strategies.get("reversed").__name__ == "Reversed"
    assert "reversed" in registry.strategies.names()


def test_yaml_can_not_name_an_import_path():
    with pytest.raises(ConfigError, match="unknown strategy 'os:system'; registered: basic"):
        registry.strategies.get("os:system")


def test_a_strategy_needing_an_ability_the_adaptor_lacks_is_refused_up_front(digits, tmp_path):
    from lpot_ray.adaptors.base import Adaptor
    from lpot_ray.adaptors.pytorch import PyTorchAdaptor

    @registry.adaptors.register("pytorch_without_inspection")
    class WithoutInspection(PyTorchAdaptor):
        inspect_tensors = Adaptor.inspect_tensors

    model, calibration, evaluation = digits
    conf = base_conf(tmp_path, strategy={"name": "mse"})
    conf["model"]["framework"] = "pytorch_without_inspection"
    with pytest.raises(ConfigError, match="`tuning.strategy.name`: 'mse' ranks ops by inspecting tensors, "
                                          "which the pytorch_without_inspection adaptor can't do"):
        lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation)
