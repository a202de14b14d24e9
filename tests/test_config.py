import math
import re

import pytest

from lpot_ray.config import load_config
from lpot_ray.errors import ConfigError

MINIMAL = {"model": {"framework": "pytorch"}}


def with_section(**sections):
    return {**MINIMAL, **sections}


def test_defaults_follow_lpot():
    config = load_config(MINIMAL)
    assert config.tuning.accuracy_criterion.relative == 0.01
    assert config.tuning.accuracy_criterion.higher_is_better is True
    assert config.tuning.exit_policy.timeout == 0
    assert config.tuning.strategy.name == "basic"
    assert config.quantization.calibration.sampling_size == (100,)


def test_yaml_file_is_read(tmp_path):
    path = tmp_path / "conf.yaml"
    path.write_text(
        "model:\n  name: net\n  framework: pytorch\n"
        "quantization:\n  calibration:\n    sampling_size: [50, 100]\n"
        "  model_wise:\n    activation:\n      algorithm: [minmax, kl]\n"
        "  op_wise: {'fc.*': {activation: {dtype: [fp32]}}}\n"
        "tuning:\n  accuracy_criterion:\n    absolute: 0.02\n    higher_is_better: False\n"
        "  exit_policy: {timeout: 30, max_trials: 7}\n"
        "ray: {workers: 3, cpus_per_worker: 0.5}\n"
    )
    config = load_config(path)
    assert config.quantization.calibration.sampling_size == (50, 100)
    assert config.quantization.model_wise.activation.algorithm == ("minmax", "kl")
    assert config.quantization.op_wise["fc.*"].activation.dtype == ("fp32",)
    assert config.tuning.accuracy_criterion.absolute == 0.02
    assert config.tuning.accuracy_criterion.relative is None
    assert config.tuning.exit_policy.max_trials == 7
    assert config.ray.workers == 3


@pytest.mark.parametrize(
    "raw, expected",
    [
        (with_section(tuning={"accuracy_criterion": {"relative": -0.1}}),
         "`tuning.accuracy_criterion.relative`: -0.1 must be in [0, 1)"),
        (with_section(tuning={"accuracy_criterion": {"relative": 0.1, "absolute": 0.1}}), "either relative or absolute"),
        (with_section(tuning={"strategy": {"name": "basic"}, "speed": 1}), "`tuning.speed` is not a known key; allowed here: strategy"),
        (with_section(distillation={"teacher": "resnet50"}), "`distillation` is an LPOT option lpot_ray does not support yet"),
        (with_section(version=2.0), "`version`: 2.0 is not an LPOT 1.x configuration version; lpot_ray reads version 1.0"),
        (with_section(quantization={"approach": "post_training_auto_quant"}),
         "`quantization.approach: post_training_auto_quant` is an LPOT option lpot_ray does not support yet"),
        (with_section(quantization={"model_wise": {"weight": {"granularity": "per_chan"}}}), "'per_chan' must be one of per_channel, per_tensor"),
        (with_section(quantization={"op_wise": {"conv[": {}}}), "not a valid regular expression"),
        (with_section(tuning={"exit_policy": {"timeout": "soon"}}), "`tuning.exit_policy.timeout`: 'soon'"),
        (with_section(tuning={"exit_policy": {"max_trials": 0}}), "`tuning.exit_policy.max_trials`: 0"),
        (with_section(ray={"workers": 0}), "`ray.workers`: 0"),
        (with_section(quantization={"calibration": {"sampling_size": 0}}), "`quantization.calibration.sampling_size`: 0 must be a positive"),
        (with_section(evaluation={"accuracy": {"metric": {"topk": 1, "Accuracy": None}}}), "exactly one metric"),
        ({"model": {"name": "x"}}, "`model.framework` is required"),
        (with_section(device="gpu"), "`device: gpu` is an LPOT option"),
        (with_section(tuning={"exit_policy": {"performance_only": "perhaps"}}), "performance_only`: 'perhaps' input should be a valid boolean"),
        (with_section(quantization={"model_wise": {"weight": {"dtype": ["int8", "int4"]}}}),
         "`quantization.model_wise.weight.dtype`: ['int8', 'int4'] has 'int4', which is not one of int8, uint8, fp32, bf16"),
        (with_section(quantization={"op_wise": {"fc": {"weights": {}}}}),
         "`quantization.op_wise.fc.weights` is not a known key; allowed here: weight, activation"),
        (with_section(quantization={"calibration": {"sampling_size": 1.5}}), "1.5 must be a positive integer or a list"),
        (with_section(tuning={"multi_objectives": {"objective": ["performance", "modelsize"], "weight": [1]}}),
         "weight has 1 values for 2 objectives"),
        (with_section(tuning={"objective": "accuracy"}), "`tuning.objective: accuracy` is an LPOT option"),
        (with_section(tuning={"accuracy_criterion": {"absolute": math.nan}}),
         "`tuning.accuracy_criterion.absolute`: nan input should be a finite number"),
        (with_section(tuning={"exit_policy": {"timeout": math.inf}}), "`tuning.exit_policy.timeout`: inf input should be a finite number"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(raw, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(raw)
    assert expected in str(caught.value)


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: {framework: pytorch\n")
    with pytest.raises(ConfigError, match="broken.yaml: malformed YAML"):
        load_config(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)


LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n" for previous, name in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize(
    "content, expected",
    [
        (LAUGHS, "its aliases (*name) expand to more than 100000 values: refused as an alias bomb"),
        ("model: &m\n  name: x\n  framework: pytorch\n  again: *m\n", "alias *m refers to a node that contains it (line 4)"),
        ("model: " + "[" * 200 + "]" * 200 + "\n", "nested more than 64 levels deep"),
        ("model: {name: x, framework: pytorch}\ntuning: {random_seed: 1}\ntuning: {random_seed: 2}\n",
         "key 'tuning' is given twice in one mapping (line 3)"),
        (bytes(range(256)) * 4, "not a text (UTF-8) YAML file"),
    ],
    ids=["alias-bomb", "recursive-anchor", "deep-nesting", "duplicate-section", "binary"],
)
def test_hostile_or_broken_yaml_files_fail_fast_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "conf.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: {expected}")



def test_lpot_value_forms_and_aliases_read_as_lpot_reads_them(caplog):
    config = load_config(with_section(
        model={"framework": "pytorch_fx", "inputs": "image", "outputs": "logits"},
        evaluation={"accuracy": {"metric": {"COCOmAP": {"anno_path": "/data/instances.json"}}}},
        quantization={"calibration": {"sampling_size": "50, 100", "dataloader": {"dataset": {"digits": {}}, "last_batch": "rollover"}},
         "model_wise": {"activation": {"dtype": "uint8, fp32", "algorithm": "minmax kl"}}}))
    assert config.model.framework == "pytorch" and config.quantization.calibration.sampling_size == (50, 100)
    assert config.quantization.model_wise.activation.dtype == ("uint8", "fp32")
    assert config.quantization.model_wise.activation.algorithm == ("minmax", "kl")
    assert config.evaluation.accuracy.metric == {"COCOmAP": {}}
    for said in ("`model.framework: pytorch_fx` runs as pytorch", "`model.inputs` changes nothing here",
                 "`quantization.calibration.dataloader.last_batch` changes nothing here",
                 "`evaluation.accuracy.metric.COCOmAP.anno_path` changes nothing here"):
        assert said in caplog.text


def test_an_lpot_framework_lpot_ray_lacks_is_named_before_anything_else():
    with pytest.raises(ConfigError, match="`model.framework: engine` is an LPOT framework lpot_ray does not"):
        load_config({"model": {"framework": "engine"}, "quantization": {"calibration": {"sampling_size": "x"}}})


def test_yaml_merge_keys_and_framework_forms_read_as_yaml_and_lpot_mean_them(tmp_path):
    path = tmp_path / "conf.yaml"
    path.write_text("defaults: &defaults {random_seed: 7}\nmodel: {name: m, framework: pytorch}\n"
                    "tuning: {<<: *defaults, random_seed: 9}\n")
    with pytest.raises(ConfigError, match="`defaults` is not a known key"):  # merged, then the extra key is named
        load_config(path)
    path.write_text("model: {name: m, framework: pytorch}\ntuning: {<<: {random_seed: 7}, random_seed: 9}\n")
    assert load_config(path).tuning.random_seed == 9  # a merged value overridden, as YAML allows
    path.write_text("model: {name: m, framework: pytorch}\nversion: 2001-13-01\n")
    with pytest.raises(ConfigError, match="conf.yaml: malformed YAML: month must be in 1..12"):
        load_config(path)
    with pytest.raises(ConfigError, match="`model.framework`: \\['pytorch'\\]"):
        load_config({"model": {"framework": ["pytorch"]}})


@pytest.mark.parametrize("arguments, message", [
    ({"count": 0}, "`ray.workers`: 0 input should be greater than or equal to 1"),
    ({"cpus_per_worker": -1}, "`ray.cpus_per_worker`: -1 input should be greater than 0"),
    ({"resources_per_worker": {"GPU": 1}}, "`ray.resources_per_worker`: {'GPU': 1} names GPU"),
])
def test_a_workers_block_checks_its_arguments_as_the_ray_section_before_starting_anything(arguments, message):
    import lpot_ray

    with pytest.raises(ConfigError, match=re.escape(message)):
        with lpot_ray.workers(**arguments):
            raise AssertionError("the block ran")
