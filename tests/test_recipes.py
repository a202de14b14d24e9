"""Accuracy-recovery recipes: exact in fp32, in the space as plain data, tried before fallback,
and what they recover on a real model."""

from dataclasses import replace

import numpy as np
import pytest

from lpot_ray.config import ExitPolicy, load_config
from lpot_ray.engine import Criterion, Engine
from lpot_ray.errors import SpaceError
from lpot_ray.history import History
from lpot_ray.recipes import CROSS_LAYER_EQUALIZATION as CLE
from lpot_ray.recipes import FAST_BIAS_CORRECTION as FBC
from lpot_ray.recipes import RECIPES, recipe_sets

SQ5, SQ75 = "smooth_quant:0.5", "smooth_quant:0.75"
from lpot_ray.space import TuneConfig, TuningSpace
from lpot_ray.strategies.basic import BasicStrategy

from conftest import accuracy_of, base_conf, tune_equalizing
from fakes import FakeExecutor, make_space


# --- as plain data ------------------------------------------------------------------------------
def test_recipe_sets_try_fewest_first_and_follow_the_yaml():
    assert recipe_sets(RECIPES, {})[:5] == ((), (CLE,), (SQ5,), (SQ75,), (FBC,))  # one alone first, in RECIPES order
    assert len(recipe_sets(RECIPES, {})) == 2 * 3 * 2 and (CLE, SQ5, FBC) in recipe_sets(RECIPES, {})
    assert recipe_sets((CLE, FBC), {FBC: True}) == ((FBC,), (CLE, FBC))  # always on
    assert recipe_sets(RECIPES, {CLE: False, "smooth_quant": False, FBC: False}) == ((),)
    assert recipe_sets((CLE,), {FBC: True}) == ((), (CLE,))  # not offered: never on
    assert recipe_sets(("smooth_quant",), {}, alphas=(0.6,)) == ((), ("smooth_quant:0.6",))
    recipes = load_config({"model": {"framework": "pytorch"}, "quantization": {"recipes": {
        "smooth_quant_args": {"alpha": "0.5, 0.6"}}}}).quantization.recipes
    assert recipes.smooth_quant_args.alpha == (0.5, 0.6)  # Neural Compressor's key, LPOT's list string
    assert load_config({"model": {"framework": "pytorch"}, "quantization": {"recipes": False}}).quantization.recipes.wanted() \
        == dict.fromkeys(RECIPES, False)


def test_recipes_are_a_dimension_of_the_space_and_part_of_a_configs_identity():
    plain = make_space(n_ops=2)
    space = TuningSpace.build(plain_capabilities(), load_config({"model": {"framework": "pytorch"}}).quantization, RECIPES)
    assert space.size == plain.size * 12
    assert {space.config_at(index).recipes for index in range(space.size)} == set(space.recipe_sets)
    config = space.config_at(0)
    assert config.recipes == () and config.key == plain.config_at(0).key  # no recipes: the key it always had
    with_cle = replace(config, recipes=(CLE,))
    assert with_cle.key != config.key and TuneConfig.from_dict(with_cle.to_dict()) == with_cle
    assert [variant.recipes for variant in space.recipe_variants(config)] == [(CLE,), (SQ5,), (SQ75,), (FBC,)]
    assert [variant.recipes for variant in space.recipe_variants(with_cle)] == [(CLE, SQ5), (CLE, SQ75), (CLE, FBC)]
    combined = space.combined_recipes(config, [replace(config, recipes=(SQ75,)), replace(config, recipes=(SQ5,)),
                                               replace(config, recipes=(CLE,))])
    assert combined.recipes == (CLE, SQ75)  # of SmoothQuant's alphas, the first given
    assert space.combined_recipes(config, [with_cle]) is None  # one recipe is no combination
    with pytest.raises(SpaceError, match=r"recipes \['smooth_quant'\] are not among"):
        space.check(replace(config, recipes=("smooth_quant",)))


def plain_capabilities():
    from lpot_ray.space import Op, OpCapability, OpScheme, TensorScheme

    int8 = [OpScheme(TensorScheme("int8", "sym", "per_channel"), TensorScheme("uint8", "asym", "per_tensor", algorithm))
            for algorithm in ("minmax", "kl")]
    return [OpCapability(Op(f"op{i}", "Linear", macs=10 * (i + 1)), tuple(int8)) for i in range(2)]


def test_basic_tries_recipes_before_fallback_and_falls_back_on_the_best_recipe(tmp_path):
    """Equalization recovers op0's loss and most of op1's, not all: fallback runs with it and
    needs op1 only."""
    space = TuningSpace.build(plain_capabilities(), load_config({"model": {"framework": "pytorch"}}).quantization,
                              (CLE,))

    history = History(tmp_path / "h.db")
    engine = Engine(BasicStrategy(space), FakeExecutor(two_op_accuracy, 2), history, Criterion(0.9, absolute=0.005),
                    ExitPolicy(timeout=60), space.fp32_macs_fraction)
    outcome = engine.run()
    trials = outcome.trials
    assert [trial.config.recipes for trial in trials[:3]] == [(), (), (CLE,)]  # model-wise, then the best with CLE
    assert all(trial.config.recipes == (CLE,) for trial in trials[3:])  # fallback from the CLE config
    best = outcome.passing[0]
    assert best.config.recipes == (CLE,) and best.config.fp32_ops == ("op1",)  # op0 stays int8 thanks to CLE


def test_bayesian_searches_recipes_as_a_dimension_and_finds_the_equalized_pass(tmp_path):
    from lpot_ray.strategies.bayesian import BayesianStrategy

    space = TuningSpace.build(plain_capabilities(), load_config({"model": {"framework": "pytorch"}}).quantization, (CLE,))
    strategy = BayesianStrategy(space, seed=0)
    strategy.parallelism = 2
    engine = Engine(strategy, FakeExecutor(two_op_accuracy, 2), History(tmp_path / "h.db"),
                    Criterion(0.9, absolute=0.005), ExitPolicy(timeout=60, max_trials=24), space.fp32_macs_fraction)
    outcome = engine.run()
    for trial in outcome.trials:
        space.check(trial.config)
    assert {trial.config.recipes for trial in outcome.trials} == {(), (CLE,)}
    assert outcome.passing[0].config.recipes == (CLE,) and outcome.passing[0].config.fp32_ops == ("op1",)


def two_op_accuracy(config):
    """op0 int8 costs 0.03 unless equalized; op1 int8 costs 0.05, 0.01 equalized."""
    equalized = CLE in config.recipes
    return (0.9 - (0.01 if equalized else 0.05) * ("op1" in config.int8_ops)
            - (0.0 if equalized else 0.03) * ("op0" in config.int8_ops))


# --- PyTorch -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported_outliers(outlier_digits):
    from lpot_ray.adaptors.pytorch import PyTorchAdaptor

    model, calibration, evaluation = outlier_digits
    adaptor = PyTorchAdaptor()
    return adaptor, adaptor.load(adaptor.prepare(model, next(iter(calibration))[0])), calibration, evaluation


def test_equalization_is_exact_in_fp32_and_leaves_the_fp32_model_alone(exported_outliers):
    import torch

    from lpot_ray.adaptors import pytorch_recipes

    adaptor, exported, _, evaluation = exported_outliers
    before = {name: tensor.clone() for name, tensor in exported.module().named_parameters()}
    equalized = pytorch_recipes.equalized(exported.module())
    # conv1 -> conv2 through ReLU, conv2 -> fc1 through ReLU, max-pooling and flatten, fc1 -> fc2
    assert set(equalized) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias",
                              "fc2.weight"}
    module = pytorch_recipes.with_parameters(exported.module(), equalized)
    images = next(iter(evaluation))[0]
    with torch.no_grad():
        fp32, equalized_output = exported.module()(images), module(images)
    assert torch.allclose(equalized_output, fp32, rtol=1e-4, atol=1e-4 * float(fp32.abs().max()))
    assert all(torch.equal(tensor, before[name]) for name, tensor in exported.module().named_parameters())
    ranges = [float(module.get_parameter(name).detach().abs().amax()) for name in ("conv1.weight", "conv2.weight")]
    assert max(ranges) < 50 < float(exported.module().conv1.weight.detach().abs().amax())  # the x1000 channel is gone


def test_equalization_makes_an_outlier_model_pass_all_int8_where_plain_int8_breaks(exported_outliers):
    adaptor, exported, calibration, evaluation = exported_outliers
    batches = [images for images, _ in calibration]
    space = TuningSpace.build(adaptor.capabilities(exported), load_config({"model": {"framework": "pytorch"}}).quantization,
                              adaptor.recipes(exported))
    config = space.model_wise_configs()[0]
    baseline = accuracy_of(exported.module(), evaluation)
    assert accuracy_of(adaptor.quantize(exported, config, batches), evaluation) < 0.5
    assert accuracy_of(adaptor.quantize(exported, replace(config, recipes=(CLE,)), batches), evaluation) >= baseline - 0.01


def test_bias_correction_removes_most_of_the_int8_outputs_bias(digits):
    from lpot_ray.adaptors.pytorch import PyTorchAdaptor

    model, calibration, evaluation = digits
    adaptor = PyTorchAdaptor()
    exported = adaptor.load(adaptor.prepare(model, next(iter(calibration))[0]))
    assert adaptor.recipes(exported) == RECIPES
    config = TuningSpace.build(adaptor.capabilities(exported), load_config({"model": {"framework": "pytorch"}}).quantization,
                               adaptor.recipes(exported)).model_wise_configs()[0]
    batches = [images for images, _ in calibration]
    reference = np.concatenate([adaptor.predict(exported.module(), images) for images, _ in evaluation])

    def errors(recipes):  # on the evaluation batches, which the correction never saw
        quantized = adaptor.quantize(exported, replace(config, recipes=recipes), batches)
        error = np.concatenate([adaptor.predict(quantized, images) for images, _ in evaluation]) - reference
        return float(np.abs(error.mean(axis=0)).mean()), float((error ** 2).mean())

    (plain_bias, plain_mse), (corrected_bias, corrected_mse) = errors(()), errors((FBC,))
    assert corrected_bias < 0.5 * plain_bias and corrected_mse < plain_mse  # measured: a fifth of the bias left


def test_a_tuning_equalizes_instead_of_falling_back_and_the_saved_model_keeps_it(ray_session, outlier_digits, tmp_path):
    result = tune_equalizing("pytorch", *outlier_digits, tmp_path, accuracy_of)
    assert len(result.int8_ops) == 4


def test_a_recipe_asked_for_where_it_cant_apply_is_off_with_a_warning(digits, tmp_path, caplog):
    import logging

    from lpot_ray import session

    model, calibration, evaluation = digits
    conf = base_conf(tmp_path)
    conf["quantization"] = {"approach": "post_training_dynamic_quant", "recipes": {FBC: True}}
    caplog.set_level(logging.WARNING, "lpot_ray")
    job = session.prepare(load_config(conf), model, calibration, eval_dataloader=evaluation)
    job.history.close()
    assert "`quantization.recipes.fast_bias_correction`: the pytorch adaptor can't apply it to this model under " \
           "post_training_dynamic_quant; it is off" in caplog.text
    assert FBC not in {recipe for recipes in job.space.recipe_sets for recipe in recipes}
    assert job.space.recipe_sets[:4] == ((), (CLE,), (SQ5,), (SQ75,))


@pytest.fixture(scope="module")
def outlier_bert_module():
    """A tiny BertModel whose hidden states have a few x100 channels where they enter Linear
    layers (LayerNorm weights scaled, as large transformers have them), with its calibration and
    evaluation batches."""
    import torch

    pytest.importorskip("transformers", reason="the torch extra is not installed")
    import transformers

    from test_transformers import tiny_config, token_batches

    torch.manual_seed(0)
    bert = transformers.BertModel(tiny_config()).eval()
    with torch.no_grad():
        bert.embeddings.LayerNorm.weight[7] *= 100
        for layer in bert.encoder.layer:
            layer.attention.output.LayerNorm.weight[[3, 17]] *= 100
        bert.encoder.layer[0].output.LayerNorm.weight[5] *= 100
    return bert, token_batches((9, 6, 12, 7), 0), token_batches((5, 14, 8, 11, 3), 1)


@pytest.fixture(scope="module")
def outlier_bert(outlier_bert_module):
    """That BERT exported by the PyTorch adaptor: (adaptor, exported, calibration, evaluation)."""
    from lpot_ray.adaptors.pytorch import PyTorchAdaptor

    bert, calibration, evaluation = outlier_bert_module
    adaptor = PyTorchAdaptor()
    return adaptor, adaptor.load(adaptor.prepare(bert, calibration[0])), calibration, evaluation


def test_smooth_quant_is_exact_in_fp32_and_moves_activation_outliers_into_the_weights(outlier_bert):
    import torch

    adaptor, exported, calibration, evaluation = outlier_bert
    assert "smooth_quant" in adaptor.recipes(exported)
    space = TuningSpace.build(adaptor.capabilities(exported), load_config({"model": {"framework": "pytorch"}}).quantization,
                              adaptor.recipes(exported))
    config = space.model_wise_configs()[0]
    smoothed = adaptor.fp32_module(exported, replace(config, recipes=(SQ5,)), calibration)
    with torch.no_grad():
        for batch in evaluation:
            fp32 = exported.module()(**batch).last_hidden_state
            assert torch.allclose(smoothed(**batch).last_hidden_state, fp32, atol=1e-4 * float(fp32.abs().max()))

    def error(recipes):  # relative error of the int8 model's hidden states
        quantized = adaptor.quantize(exported, replace(config, recipes=recipes), calibration)
        with torch.no_grad():
            return sum(float((quantized(**batch).last_hidden_state - exported.module()(**batch).last_hidden_state).norm()
                             / exported.module()(**batch).last_hidden_state.norm()) for batch in evaluation)

    assert error((SQ5,)) < error(()) / 2


def test_a_module_called_twice_is_not_rescaled_for_one_of_its_calls():
    import torch

    from lpot_ray.adaptors import pytorch_recipes
    from lpot_ray.adaptors.pytorch import PyTorchAdaptor

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.shared, self.head = torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 4, 1), torch.nn.Linear(4, 2)

        def forward(self, x):
            x = self.shared(torch.relu(self.shared(torch.relu(self.first(x)))))
            return self.head(torch.relu(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    adaptor = PyTorchAdaptor()
    exported = adaptor.load(adaptor.prepare(Twice().eval(), torch.rand(2, 1, 8, 8)))
    assert pytorch_recipes.equalized(exported.module()) == {}  # first -> shared and shared -> shared share a weight
    assert not pytorch_recipes.equalizable(exported.module()) and CLE not in adaptor.recipes(exported)


def test_smooth_quant_on_the_onnx_graph_is_exact_and_cuts_the_int8_error(outlier_bert_module):
    """The outlier BERT exported to ONNX: a Mul before each group of MatMul nodes, their weight
    rows scaled up as much; the same function in fp32, a far smaller int8 error."""
    import io
    import warnings

    pytest.importorskip("onnxruntime", reason="the onnxrt extra is not installed")
    import onnx
    import torch

    from lpot_ray.adaptors.onnxrt import OnnxRuntimeAdaptor
    from lpot_ray.recipes import SMOOTH_QUANT

    bert, calibration, evaluation = outlier_bert_module
    names = list(calibration[0])

    class Hidden(torch.nn.Module):  # positional inputs and one output, as ONNX has them
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, *inputs):
            return self.bert(**dict(zip(names, inputs))).last_hidden_state

    buffer = io.BytesIO()
    axes = {name: {0: "batch", 1: "length"} for name in [*names, "hidden"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on transformers' mask code
        torch.onnx.export(Hidden(), tuple(calibration[0].values()), buffer, dynamo=False, input_names=names,
                          output_names=["hidden"], dynamic_axes=axes, opset_version=17)
    adaptor = OnnxRuntimeAdaptor()
    feeds = lambda batches: [{name: batch[name].numpy() for name in names} for batch in batches]  # noqa: E731
    calibration, evaluation = feeds(calibration), feeds(evaluation)
    fp32 = adaptor.load(adaptor.prepare(onnx.load_from_string(buffer.getvalue()), calibration[0]))
    assert SMOOTH_QUANT in adaptor.recipes(fp32)
    space = TuningSpace.build(adaptor.capabilities(fp32), load_config({"model": {"framework": "onnxrt"}}).quantization,
                              adaptor.recipes(fp32))
    config = space.model_wise_configs()[0]
    smoothed = adaptor.rewritten(fp32, replace(config, recipes=(SQ5,)), calibration)
    assert sum(node.op_type == "Mul" and node.name.startswith("SmoothQuant")
               for node in onnx.load_from_string(smoothed.content).graph.node) == 4 * 2  # qkv, output, intermediate, ffn out; 2 layers
    for batch in evaluation:
        expected = fp32(batch)
        assert np.allclose(smoothed(batch), expected, atol=1e-4 * float(np.abs(expected).max()))

    def error(recipes):  # relative error of the int8 model's hidden states
        quantized = adaptor.quantize(fp32, replace(config, recipes=recipes), calibration)
        return sum(float(np.linalg.norm(quantized(batch) - fp32(batch)) / np.linalg.norm(fp32(batch))) for batch in evaluation)

    assert error((SQ5,)) < 0.7 * error(())
    quantized = adaptor.quantize(fp32, replace(config, recipes=(SQ5,)), calibration)
    assert len(adaptor.lower(quantized, space.ops, replace(config, recipes=(SQ5,)), calibration[0]).int8_ops) == 12
