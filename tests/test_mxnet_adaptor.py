"""The MXNet adaptor on a real Gluon digits CNN: MXNet's own int8 graph, tuning through Ray."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import lpot_ray
from lpot_ray.config import load_config
from lpot_ray.errors import ConfigError, DataError, MissingFrameworkError, ModelError
from lpot_ray.history import History
from lpot_ray.space import TuningSpace

from cli_helpers import assert_history_and_report, digits_conf, tune_yaml
from conftest import accuracy_of_numpy, base_conf, tune_equalizing

try:
    from lpot_ray.adaptors.mxnet import MXNetAdaptor, import_mxnet

    mx = import_mxnet()
except MissingFrameworkError as error:
    pytest.skip(f"MXNet adaptor tests need MXNet: {error}", allow_module_level=True)

from lpot_ray.demo.gluon_digits import train_digits_gluon, with_activation_outliers  # noqa: E402

CONV0, CONV1, DENSE0, DENSE1 = OPS = ("digitscnn_conv0_fwd", "digitscnn_conv1_fwd", "digitscnn_dense0_fwd",
                                      "digitscnn_dense1_fwd")


@pytest.fixture(scope="module")
def trained():
    return train_digits_gluon(epochs=8)


@pytest.fixture(scope="module")
def outlier_net(trained):
    net, calibration, evaluation = trained
    return with_activation_outliers(net, calibration), calibration, evaluation


def build(net, calibration, **quantization):
    adaptor = MXNetAdaptor()
    batches = [images for images, _ in calibration]
    model = adaptor.load(adaptor.prepare(net, batches[0]))
    conf = {"model": {"framework": "mxnet"}, "quantization": quantization}
    space = TuningSpace.build(adaptor.capabilities(model), load_config(conf).quantization)
    return adaptor, model, space, batches


def test_capabilities_list_conv_and_dense_layers_by_symbol_name_with_macs(trained):
    net, calibration, _ = trained
    _, _, space, _ = build(net, calibration)
    assert [(op.name, op.op_type) for op in space.ops] == [
        (CONV0, "Convolution"), (CONV1, "Convolution"), (DENSE0, "FullyConnected"), (DENSE1, "FullyConnected")]
    assert space.ops[1].macs == 8 * 8 * 32 * 16 * 9  # conv1: output elements x (in_ch x 3 x 3)
    assert space.ops[2].weights == 64 * 512
    algorithms = {scheme.activation.algorithm for op in space.ops for scheme in space.choices[op.name][:-1]}
    assert algorithms == {"minmax", "kl"}


def test_quantized_graph_runs_int8_and_a_fallback_layer_stays_fp32(trained):
    net, calibration, evaluation = trained
    adaptor, model, space, batches = build(net, calibration)
    full = space.model_wise_configs()[0]
    lowered = adaptor.lower(adaptor.quantize(model, full, batches), space.ops, full, batches[0])
    assert lowered.int8_ops == OPS and lowered.fp32_ops == ()
    assert "_sg_mkldnn_conv" in lowered.model.symbol.tojson() and '"quantized": "true"' in lowered.model.symbol.tojson()

    config = full.with_fallback([CONV1])
    passes = adaptor.calibration_passes
    quantized = adaptor.quantize(model, config, batches)
    assert adaptor.calibration_passes == passes  # thresholds came from the cache
    lowered = adaptor.lower(quantized, space.ops, config, batches[0])
    assert lowered.int8_ops == (CONV0, DENSE0, DENSE1) and lowered.fp32_ops == (CONV1,)
    fp32 = accuracy_of_numpy(lambda images: adaptor.predict(model, images), evaluation)
    int8 = accuracy_of_numpy(lambda images: adaptor.predict(lowered.model, images), evaluation)
    assert fp32 > 0.95 and int8 > fp32 - 0.02


def test_kl_calibration_picks_other_thresholds_than_minmax(outlier_net):
    net, calibration, _ = outlier_net
    adaptor, model, space, batches = build(net, calibration)
    minmax, kl = space.model_wise_configs()
    assert kl.op_schemes[0][1].activation.algorithm == "kl"
    ranges = [adaptor.quantize(model, config, batches).symbol.attr_dict() for config in (minmax, kl)]
    node = "quantized_sg_mkldnn_conv_act_0"
    assert float(ranges[1][node]["max_calib_range"]) < float(ranges[0][node]["max_calib_range"])


@pytest.mark.filterwarnings("ignore:Cannot decide type")
def test_tune_through_ray_keeps_everything_int8_and_saves_mxnet_files(ray_session, trained, tmp_path):
    net, calibration, evaluation = trained
    result = lpot_ray.tune(net, base_conf(tmp_path, "mxnet"), q_dataloader=calibration, eval_dataloader=evaluation)
    assert result.passed and result.int8_ops == OPS and result.fp32_ops == ()
    assert result.accuracy >= result.baseline * 0.99
    assert result.objectives["latency_ratio"] > 0

    folder = result.save(tmp_path / "saved")
    assert (folder / "model-symbol.json").is_file() and (folder / "model-0000.params").is_file()
    loaded = lpot_ray.load(folder)
    adaptor = MXNetAdaptor()
    assert loaded.int8_ops == OPS
    assert abs(accuracy_of_numpy(lambda images: adaptor.predict(loaded.model, images), evaluation) - result.accuracy) < 1e-9
    block = mx.gluon.SymbolBlock.imports(str(folder / "model-symbol.json"), ["data"], str(folder / "model-0000.params"))
    assert abs(accuracy_of_numpy(lambda images: block(mx.nd.array(images)).asnumpy(), evaluation) - result.accuracy) < 1e-9


def test_strict_criterion_through_ray_falls_back_the_outlier_layers(ray_session, outlier_net, tmp_path):
    net, calibration, evaluation = outlier_net
    adaptor, model, space, batches = build(net, calibration)
    int8 = accuracy_of_numpy(lambda images: adaptor.predict(adaptor.quantize(model, space.model_wise_configs()[0], batches), images),
                       evaluation)
    fp32 = accuracy_of_numpy(lambda images: adaptor.predict(model, images), evaluation)
    assert fp32 - int8 > 0.5  # all-int8 is broken: fallback is required

    driver = os.getpid()

    def slow_eval(candidate):  # slow in the driver, so that the Ray worker joins (importing its framework) and takes trials
        time.sleep(1.5 if os.getpid() == driver else 0)
        return accuracy_of_numpy(lambda images: candidate(images).asnumpy(), evaluation)

    conf = base_conf(tmp_path, "mxnet", accuracy_criterion={"absolute": 0.02}, exit_policy={"timeout": 600, "max_trials": 30})
    del conf["evaluation"]
    result = lpot_ray.tune(net, conf, q_dataloader=calibration, eval_func=slow_eval)
    assert result.passed and set(result.fp32_ops) == {CONV0, CONV1} and result.int8_ops == (DENSE0, DENSE1)
    assert fp32 - result.accuracy <= 0.02
    assert "worker-1" in {trial.worker for trial in History(tmp_path / "ws" / "history.db").trials()}
    loaded = lpot_ray.load(result.save(tmp_path / "saved"))
    assert loaded.fp32_ops == result.fp32_ops
    assert abs(accuracy_of_numpy(lambda images: adaptor.predict(loaded.model, images), evaluation) - result.accuracy) < 1e-9


def test_mse_strategy_inspects_the_mxnet_model(ray_session, outlier_net, tmp_path):
    net, calibration, evaluation = outlier_net
    conf = base_conf(tmp_path, "mxnet", strategy={"name": "mse"}, accuracy_criterion={"absolute": 0.02},
                      exit_policy={"timeout": 600, "max_trials": 20})
    conf["ray"]["workers"] = 1
    result = lpot_ray.tune(net, conf, q_dataloader=calibration, eval_dataloader=evaluation)
    assert result.passed and set(result.fp32_ops) == {CONV0, CONV1}
    (inspection,) = [trial for trial in History(tmp_path / "ws" / "history.db").trials() if trial.kind == "inspection"]
    errors = inspection.figures["op_errors"]
    assert set(errors) == set(OPS)
    assert errors[CONV1] > 100 * max(errors[CONV0], errors[DENSE0], errors[DENSE1])  # its input lost the small channels


def test_gluon_data_loaders_with_ndarray_labels_evaluate_like_numpy_ones(trained):
    from lpot_ray.evaluation import Evaluation

    net, calibration, evaluation = trained
    adaptor, model, _, _ = build(net, calibration)
    images, labels = zip(*[(images, labels) for images, labels in evaluation])
    dataset = mx.gluon.data.ArrayDataset(mx.nd.array(np.concatenate(images)), mx.nd.array(np.concatenate(labels)))
    gluon_loader = mx.gluon.data.DataLoader(dataset, batch_size=64)
    assert isinstance(next(iter(gluon_loader))[1], mx.nd.NDArray)
    measure = lambda loader: Evaluation(dataloader=loader, metric={"topk": 1}).run(adaptor, model)  # noqa: E731
    assert measure(gluon_loader) == measure(evaluation) > 0.9


def test_not_a_hybrid_block_is_a_model_error(trained):
    _, calibration, _ = trained
    images = next(iter(calibration))[0]

    class Imperative(mx.gluon.Block):
        def forward(self, x):
            return x

    class NotHybridizable(mx.gluon.HybridBlock):
        def hybrid_forward(self, F, x):
            return F.array(x.asnumpy())  # needs concrete values: fails on symbols

    with pytest.raises(ModelError, match="expected a Gluon HybridBlock .* got Imperative"):
        MXNetAdaptor().prepare(Imperative(), images)
    with pytest.raises(ModelError, match="NotHybridizable fails to run hybridized"):
        MXNetAdaptor().prepare(NotHybridizable(), images)


def test_unknown_op_wise_name_lists_the_symbol_layer_names(trained, tmp_path):
    net, calibration, evaluation = trained
    conf = base_conf(tmp_path, "mxnet")
    conf["quantization"] = {"op_wise": {"conv9": {"activation": {"dtype": ["fp32"]}}}}
    with pytest.raises(ConfigError, match=f"'conv9' matches no op of the model; its ops are: {CONV0}, {CONV1}"):
        lpot_ray.tune(net, conf, q_dataloader=calibration, eval_dataloader=evaluation)


def test_wrong_shape_calibration_batch_names_given_and_expected_shapes(trained, tmp_path):
    net, _, evaluation = trained
    wrong = [(np.zeros((8, 3, 8, 8), np.float32), np.zeros(8, np.int64))]
    with pytest.raises(DataError, match=r"shape \(8, 3, 8, 8\) does not fit the model, which takes \(batch, 1, \.\.\.\)"):
        lpot_ray.tune(net, base_conf(tmp_path, "mxnet"), q_dataloader=wrong, eval_dataloader=evaluation)

    adaptor = MXNetAdaptor()
    model = adaptor.load(adaptor.prepare(net, np.zeros((4, 1, 8, 8), np.float32)))
    space = TuningSpace.build(adaptor.capabilities(model), load_config({"model": {"framework": "mxnet"}}).quantization)
    with pytest.raises(DataError, match=r"shape \(4, 1, 6, 6\) does not fit the model, which takes \(batch, 1, 8, 8\)"):
        adaptor.quantize(model, space.model_wise_configs()[0], [np.zeros((4, 1, 6, 6), np.float32)])


def test_importing_lpot_ray_and_the_gluon_digits_module_imports_no_mxnet():
    code = "import sys, lpot_ray, lpot_ray.demo.gluon_digits; print('mxnet' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_tune_mxnet_checkpoint_files_from_a_yaml_alone(trained, tmp_path):
    from lpot_ray.demo.gluon_digits import save_digits_gluon

    conf = digits_conf(tmp_path, "mxnet", save_digits_gluon(trained[0], str(tmp_path / "digits")))
    done = tune_yaml(tmp_path, conf)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "int8 accuracy" in done.stdout
    assert (tmp_path / "ws" / "int8_model" / "model-symbol.json").is_file()
    assert_history_and_report(tmp_path / "ws")

    conf["model"]["path"] = str(tmp_path / "digits-0000.params")
    done = tune_yaml(tmp_path, conf)
    assert done.returncode == 2 and "expected an MXNet 'prefix-symbol.json' file" in done.stderr

def test_equalization_of_the_parameters_is_exact_and_rescues_the_outlier_net(outlier_net):
    """The x1000 channel between conv0 and conv1 breaks static int8; the equalized parameters
    compute the same in fp32, and the net quantizes all int8 at the fp32 accuracy with them."""
    import dataclasses
    import json

    from lpot_ray.adaptors import mxnet_recipes
    from lpot_ray.recipes import CROSS_LAYER_EQUALIZATION

    net, calibration, evaluation = outlier_net
    adaptor, model, space, batches = build(net, calibration)
    assert adaptor.recipes(model) == (CROSS_LAYER_EQUALIZATION,)
    params = {name: array.asnumpy() for name, array in model.arg_params.items()}
    rewritten, pairs = mxnet_recipes.equalize(json.loads(model.symbol.tojson()), params)
    assert pairs == 3  # conv0 -> conv1 -> (pool, dense's flatten) dense0 -> dense1
    assert set(rewritten) == {f"digitscnn_{layer}_{kind}" for layer in ("conv0", "conv1", "dense0")
                              for kind in ("weight", "bias")} | {"digitscnn_dense1_weight"}
    config = space.model_wise_configs()[0]
    equalizing = dataclasses.replace(config, recipes=(CROSS_LAYER_EQUALIZATION,))
    for batch in batches:
        fp32 = adaptor.predict(model, batch)
        assert np.allclose(adaptor.predict(adaptor.rewritten(model, equalizing), batch), fp32,
                           rtol=1e-4, atol=1e-4 * float(np.abs(fp32).max()))

    accuracy = lambda candidate: accuracy_of_numpy(lambda images: adaptor.predict(candidate, images), evaluation)  # noqa: E731
    assert accuracy(adaptor.quantize(model, config, batches)) < 0.5
    equalized = adaptor.quantize(model, equalizing, batches)
    assert accuracy(equalized) >= accuracy(model) - 0.02
    assert adaptor.lower(equalized, space.ops, equalizing, batches[0]).int8_ops == OPS
    errors = adaptor.inspect_tensors(model, equalizing, batches)  # against the equalized fp32 layers
    assert max(errors.values()) < 1e-3


def test_a_tuning_equalizes_instead_of_falling_back_and_the_saved_model_keeps_it(outlier_net, tmp_path):
    result = tune_equalizing("mxnet", *outlier_net, tmp_path, lambda model, loader: accuracy_of_numpy(
        lambda images: model(mx.nd.array(images)).asnumpy(), loader))
    assert result.int8_ops == OPS
