"""LPOT's pruning: the schedule and masks as LPOT defines them, a real PyTorch model pruned while
it trains (from the YAML alone and from the user's own loop), and the errors a user can make."""

import numpy as np
import pytest

import lpot_ray
from lpot_ray.config import PrunerSection, WeightCompression, load_config
from lpot_ray.errors import ConfigError
from lpot_ray.pruning import PrunerPlan, magnitude_mask

from conftest import accuracy_of

DIGITS_TRAIN = {"batch_size": 64, "dataset": {"digits": {"split": "train"}}}
DIGITS_EVAL = {"batch_size": 100, "dataset": {"digits": {"split": "evaluation"}}}


def pruning_conf(pruners, train=None, **compression):
    conf = {
        "model": {"name": "digits", "framework": "pytorch"},
        "pruning": {"approach": {"weight_compression": {**compression, "pruners": pruners}}},
        "evaluation": {"accuracy": {"metric": {"topk": 1}, "dataloader": DIGITS_EVAL}},
        "tuning": {"accuracy_criterion": {"relative": 0.03}},
    }
    if train is not None:
        conf["pruning"]["train"] = train
    return conf


def plan(**own):
    return PrunerPlan.resolve(PrunerSection(**own), WeightCompression(pruners=[{}], initial_sparsity=0.0,
                                                                      target_sparsity=0.6, end_epoch=4), ("w",))


def lpots_update_sparsity(epoch, start, end, initial, target, frequency):
    """LPOT 1.x's ``Pruner.update_sparsity``, written out as LPOT's source has it."""
    if start == end:
        return initial
    if epoch < start:
        return 0
    if epoch > end:
        return target
    return initial + (target - initial) * ((epoch - start) // frequency) * frequency / (end - start)


def test_the_schedule_steps_from_initial_to_target_sparsity_as_lpot_computes_it():
    every_epoch = plan()
    assert [round(every_epoch.sparsity_at(epoch), 6) for epoch in range(7)] == [0.0, 0.15, 0.3, 0.45, 0.6, 0.6, 0.6]
    every_other = plan(update_frequency=2)
    assert [round(every_other.sparsity_at(epoch), 6) for epoch in range(6)] == [0.0, 0.0, 0.3, 0.3, 0.6, 0.6]
    late = plan(start_epoch=2, target_sparsity=0.9)
    assert late.sparsity_at(1) == 0.0 and late.recomputes_in(2) and not late.recomputes_in(1)
    assert plan(start_epoch=3, end_epoch=3).sparsity_at(3) == 0.0  # LPOT's rule: start == end prunes to initial
    assert not plan(prune_type="pattern_lock").recomputes_in(0)
    for start, end, initial, frequency in [(0, 4, 0.0, 1), (1, 3, 0.1, 1), (0, 4, 0.2, 2), (0, 5, 0.0, 2), (2, 9, 0.05, 3)]:
        schedule = plan(start_epoch=start, end_epoch=end, initial_sparsity=initial, update_frequency=frequency)
        for epoch in range(12):
            assert schedule.sparsity_at(epoch) == pytest.approx(lpots_update_sparsity(epoch, start, end, initial, 0.6, frequency))


def test_a_magnitude_mask_prunes_exactly_the_smallest_weights():
    weight = np.random.default_rng(0).normal(size=(8, 3, 3, 3))
    keep = magnitude_mask(weight, 0.7)
    assert (~keep).sum() == round(weight.size * 0.7)
    assert np.abs(weight[~keep]).max() <= np.abs(weight[keep]).min()
    per_channel = magnitude_mask(weight, 0.5, per_channel=True)
    assert ((~per_channel).reshape(8, -1).sum(axis=1) == 14).all()  # round(27 * 0.5) in each output channel
    assert magnitude_mask(weight, 0.0).all()


def test_the_yaml_alone_prunes_a_trained_cnn_to_its_target_while_fine_tuning(digits):
    model, _, evaluation = digits
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    train = {"start_epoch": 0, "end_epoch": 3, "iteration": 10, "dataloader": DIGITS_TRAIN,
             "optimizer": {"SGD": {"learning_rate": 0.01, "momentum": 0.9}}, "criterion": {"CrossEntropyLoss": {}}}
    pruners = [{"prune_type": "basic_magnitude", "names": ["conv2.weight", "fc1.weight"], "end_epoch": 2,
                "target_sparsity": 0.6}]
    pruner = lpot_ray.Pruning(pruning_conf(pruners, train))
    pruner.model = model
    result = pruner()

    assert result.model is model
    assert result.sparsity == {"conv2.weight": pytest.approx(0.6, abs=1e-3), "fc1.weight": pytest.approx(0.6, abs=1e-3)}
    assert result.overall_sparsity == pytest.approx(0.6, abs=1e-3)
    assert (model.conv1.weight == 0).float().mean() < 0.01  # not named: not pruned, but trained
    assert not np.allclose(before["conv1.weight"].numpy(), model.conv1.weight.detach().numpy())
    assert result.accuracy == pytest.approx(accuracy_of(model, evaluation), abs=1e-9)
    assert result.passed is (result.accuracy >= 0.97 * result.baseline_accuracy)
    assert result.accuracy > 0.9, result


def test_a_users_training_loop_calls_the_hooks_and_pattern_lock_keeps_the_zeros_it_found(digits):
    import torch

    from lpot_ray.demo.torch_digits import digits_loaders

    model, _, _ = digits
    with torch.no_grad():
        model.fc1.weight[:, ::2] = 0.0  # half the weights already pruned
    zeros = model.fc1.weight == 0
    train, _, _ = digits_loaders()
    pruner = lpot_ray.Pruning(pruning_conf([{"prune_type": "pattern_lock", "names": ["fc1.weight"]},
                                            {"prune_type": "basic_magnitude", "names": ["conv2.weight"]}],
                                           target_sparsity=0.5, end_epoch=1))
    epochs = []

    def train_func(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for epoch in range(2):
            pruner.on_epoch_begin(epoch)
            epochs.append(epoch)
            for step, (images, labels) in enumerate(train):
                pruner.on_batch_begin(step)
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(images), labels).backward()
                optimizer.step()
                pruner.on_batch_end()
                if step == 5:
                    break
            pruner.on_epoch_end()

    pruner.model, pruner.pruning_func = model, train_func
    result = pruner()
    assert epochs == [0, 1]
    assert bool((model.fc1.weight[zeros] == 0).all()) and result.sparsity["fc1.weight"] == pytest.approx(0.5)
    assert result.sparsity["conv2.weight"] == pytest.approx(0.5, abs=1e-3)


def test_pruning_mistakes_are_named(digits):
    model, _, _ = digits
    pruner = lpot_ray.Pruning(pruning_conf([{"names": ["conv9.weight"]}], {"dataloader": DIGITS_TRAIN}))
    pruner.model = model
    with pytest.raises(ConfigError, match=r"pruners\.0\.names.*'conv9\.weight' not among.*conv1\.weight"):
        pruner()

    pruner = lpot_ray.Pruning(pruning_conf([{"names": ["fc1.weight"]}, {"names": ["fc1.weight"]}], {"dataloader": DIGITS_TRAIN}))
    pruner.model = model
    with pytest.raises(ConfigError, match="'fc1.weight' is pruned by pruner 0 too"):
        pruner()

    for schedule, message in [({"start_epoch": 3, "end_epoch": 1}, "start_epoch 3 is after end_epoch 1"),
                              ({"initial_sparsity": 0.7, "target_sparsity": 0.5}, "initial_sparsity 0.7 is above target_sparsity 0.5")]:
        pruner = lpot_ray.Pruning(pruning_conf([{"names": ["fc1.weight"], **schedule}], {"dataloader": DIGITS_TRAIN}))
        pruner.model = model
        with pytest.raises(ConfigError, match=rf"pruners\.0`: {message}"):
            pruner()

    pruner = lpot_ray.Pruning(pruning_conf([{}]))
    pruner.model = model
    with pytest.raises(ConfigError, match="set train_func.*or give `pruning.train`"):
        pruner()

    pruner.train_func = lambda model: None
    with pytest.raises(ConfigError, match=r"never called on_epoch_begin\(epoch\)"):
        pruner()

    with pytest.raises(ConfigError, match="Pruning.model: set the model"):
        lpot_ray.Pruning(pruning_conf([{}]))()
    with pytest.raises(ConfigError, match="Pruning needs a `pruning` section"):
        lpot_ray.Pruning({"model": {"name": "m", "framework": "pytorch"}})


def test_lpot_pruning_options_lpot_ray_lacks_are_refused_by_name():
    conf = pruning_conf([{"prune_type": "group_lasso"}])
    with pytest.raises(ConfigError, match="prune_type`: 'group_lasso' is an LPOT option lpot_ray does not support yet"):
        load_config(conf)
    conf = pruning_conf([{}])
    conf["model"]["framework"] = "tensorflow"
    with pytest.raises(ConfigError, match="`pruning` with `model.framework: tensorflow` is an LPOT option"):
        load_config(conf)
    with pytest.raises(ConfigError, match="target_sparsity"):
        load_config(pruning_conf([{"target_sparsity": 1.5}]))


def test_the_command_line_names_a_model_file_that_cant_take_the_training_batches(digits, tmp_path, capsys):
    import torch
    import yaml

    from lpot_ray import cli

    model, _, _ = digits
    torch.export.save(torch.export.export(model, (torch.zeros(2, 1, 8, 8),)), str(tmp_path / "fixed.pt2"))  # batch 2 only
    conf = pruning_conf([{"names": ["fc1.weight"]}], {"dataloader": DIGITS_TRAIN, "end_epoch": 1})
    conf["model"]["path"] = str(tmp_path / "fixed.pt2")
    conf["tuning"]["workspace"] = {"path": str(tmp_path / "ws")}
    (tmp_path / "prune.yaml").write_text(yaml.safe_dump(conf))
    assert cli.main(["prune", str(tmp_path / "prune.yaml")]) == cli.EXIT_BAD_INPUT
    assert "lpot_ray needs a dynamic batch dimension" in capsys.readouterr().err
    assert not (tmp_path / "ws" / "pruned").exists()
