"""Hugging Face transformers as users have them: a BertModel called with a tokenizer's dict
batches, padded per batch, and an eval_func written for the fp32 model, tuned unchanged."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import lpot_ray
from lpot_ray.adaptors.pytorch import PyTorchAdaptor
from lpot_ray.config import load_config
from lpot_ray.errors import DataError
from lpot_ray.inputs import calibration_batches
from lpot_ray.space import TuningSpace

transformers = pytest.importorskip("transformers")

LAYERS = 2
LINEARS = [f"encoder.layer.{layer}.{name}" for layer in range(LAYERS)
           for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                        "attention.output.dense", "intermediate.dense", "output.dense")] + ["pooler.dense"]
CALIBRATION_LENGTHS = (9, 6, 12, 7)
EVALUATION_LENGTHS = (5, 14, 8, 11, 3)
FP32_OP = "encoder.layer.1.attention.self.key"  # kept fp32 by op_wise


def tiny_config(**extra):
    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64, **extra)


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return transformers.BertModel(tiny_config()).eval()


def token_batches(lengths, seed, size=4):
    """A tokenizer's batches padded per batch: each batch as long as its longest sentence (one of
    ``lengths``), the shorter ones padded with id 0 and masked out."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for longest in lengths:
        sentence_lengths = torch.randint(2, longest + 1, (size,), generator=generator)
        sentence_lengths[0] = longest
        mask = (torch.arange(longest) < sentence_lengths[:, None]).long()
        ids = torch.randint(1, 100, (size, longest), generator=generator) * mask
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def fidelity_func(fp32_model, batches, seen=None):
    """An eval_func written for the fp32 model: the mean cosine similarity of the model's token
    embeddings (``.last_hidden_state``) to the fp32 ones, over the real tokens."""
    with torch.no_grad():
        references = [fp32_model(**batch).last_hidden_state for batch in batches]

    def fidelity(model):
        if seen is not None:
            seen.append((model, torch.get_num_threads()))
        model.eval()
        similarities = []
        with torch.no_grad():
            for batch, reference in zip(batches, references):
                output = model(**batch).last_hidden_state
                cosine = torch.nn.functional.cosine_similarity(output, reference, dim=-1)
                similarities.append(cosine[batch["attention_mask"].bool()])
        return float(torch.cat(similarities).mean())

    return fidelity


def compiles() -> int:
    """Graphs compiled by torch.compile so far (not the small graphs a quantized model's eval()
    exports to find its dropout)."""
    from torch._dynamo.utils import counters

    return counters["aot_autograd"]["total"]


def tune_conf(tmp_path, approach="post_training_static_quant", **quantization):
    return {
        "model": {"name": "tiny_bert", "framework": "pytorch"},
        "quantization": {"approach": approach, **quantization},
        "tuning": {"accuracy_criterion": {"absolute": 0.02, "higher_is_better": True},
                   "exit_policy": {"max_trials": 3}, "workspace": {"path": str(tmp_path / "ws")}},
        "ray": {"workers": 1},
    }


# --- the adaptor on dict batches -------------------------------------------------------------
def test_dict_batches_export_with_keywords_and_ops_keep_the_module_names(bert):
    adaptor = PyTorchAdaptor()
    batches = token_batches(CALIBRATION_LENGTHS, seed=1)
    exported = adaptor.load(adaptor.prepare(bert, batches[0]))
    assert [spec.arg.name for spec in exported.graph_signature.input_specs if spec.kind.name == "USER_INPUT"] == [
        "input_ids", "attention_mask"]
    ops = [capability.op for capability in adaptor.capabilities(exported)]
    assert [op.name for op in ops] == LINEARS and {op.op_type for op in ops} == {"Linear"}
    query = ops[0]
    assert query.macs == CALIBRATION_LENGTHS[0] * 32 * 32  # per sentence of the example's length
    with pytest.raises(DataError, match="dicts of them by argument name"):
        adaptor.prepare(bert, {"input_ids": batches[0]["input_ids"].tolist()})


def test_tuple_batches_are_the_positional_arguments_at_any_length(bert):
    adaptor = PyTorchAdaptor()
    batches = [(batch["input_ids"].numpy(), batch["attention_mask"].numpy()) for batch in token_batches((7, 10), seed=2)]
    exported = adaptor.load(adaptor.prepare(bert, batches[0]))
    for inputs in batches:
        expected = bert(*map(torch.from_numpy, inputs)).last_hidden_state.detach().numpy()
        np.testing.assert_allclose(adaptor.predict(exported.module(), inputs), expected, atol=1e-5)


def test_calibration_batches_count_a_dict_batch_s_samples_not_its_keys():
    batches = token_batches((5,) * 6, seed=2)  # 4 sentences a batch, 2 keys
    conf = load_config({"model": {"framework": "pytorch"}, "quantization": {"calibration": {"sampling_size": 8}}})
    assert len(calibration_batches(conf, batches, None)) == 2
    labelled = [(batch, torch.zeros(4)) for batch in batches]  # (inputs, labels): the labels dropped
    assert calibration_batches(conf, labelled, None)[0] is batches[0]


@pytest.fixture(scope="module")
def quantized_bert(bert):
    adaptor = PyTorchAdaptor()
    calibration = token_batches(CALIBRATION_LENGTHS, seed=3)
    exported = adaptor.load(adaptor.prepare(bert, calibration[0]))
    space = TuningSpace.build(adaptor.capabilities(exported), load_config({"model": {"framework": "pytorch"}}).quantization)
    config = space.model_wise_configs()[0]
    quantized = adaptor.quantize(exported, config, calibration)
    return adaptor, exported, space, config, quantized, calibration


def test_quantized_model_runs_unseen_lengths_and_returns_the_model_output(bert, quantized_bert):
    adaptor, _, _, _, quantized, _ = quantized_bert
    for batch in token_batches(EVALUATION_LENGTHS, seed=4):
        output = quantized(**batch)
        assert type(output) is type(bert(**batch))
        assert output.last_hidden_state.shape == (4, batch["input_ids"].shape[1], 32)
        assert output.pooler_output.shape == (4, 32)
    batch = token_batches((6,), seed=5)[0]
    with torch.no_grad():
        expected = quantized(**batch).last_hidden_state.numpy()
    np.testing.assert_array_equal(adaptor.predict(quantized, batch), expected)


# --- tuned end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def static_tuning(bert, tmp_path_factory):
    """One static tuning: the result, the models the eval_func was given, the evaluation batches,
    the folder, and how many graphs inductor compiled meanwhile."""
    tmp_path = tmp_path_factory.mktemp("static")
    evaluation = token_batches(EVALUATION_LENGTHS, seed=8)
    seen = []
    conf = tune_conf(tmp_path, op_wise={FP32_OP: {"activation": {"dtype": "fp32"}}})
    compiled = compiles()
    result = lpot_ray.tune(bert, conf, q_dataloader=token_batches(CALIBRATION_LENGTHS, seed=9),
                           eval_func=fidelity_func(bert, evaluation, seen))
    return result, seen, evaluation, tmp_path, compiles() - compiled


def test_static_tuning_with_an_unchanged_eval_func_reaches_int8_on_every_length(bert, static_tuning):
    result, seen, evaluation, _, compiles = static_tuning
    assert result.passed and result.accuracy > 0.98
    assert result.fp32_ops == (FP32_OP,)
    assert result.int8_ops == tuple(name for name in LINEARS if name != FP32_OP)  # read from the compiled code
    kinds = {type(model).__name__ for model, _ in seen}
    assert {"BertModel", "GraphModule", "CompiledModel"} <= kinds  # fp32, each trial's int8, the compiled int8
    with torch.no_grad():
        output, expected = result.model(**evaluation[1]), bert(**evaluation[1])
    assert type(output) is type(expected)
    cosine = torch.nn.functional.cosine_similarity(output.last_hidden_state, expected.last_hidden_state, dim=-1)
    assert float(cosine.mean()) > 0.98
    assert compiles == 2  # the int8 model once for all five lengths, the fp32 one (for latency) once


def test_compiled_int8_model_runs_any_length_and_batch_size_without_compiling_again(static_tuning):
    result, seen, _, _, _ = static_tuning
    compiled_model, threads = next((model, threads) for model, threads in seen if type(model).__name__ == "CompiledModel")
    before, previous_threads = compiles(), torch.get_num_threads()
    torch.set_num_threads(threads)  # as when it was compiled: a thread count of its own would compile anew
    with torch.no_grad():
        for batch in token_batches((4, 17, 30), seed=11) + token_batches((13,), seed=12, size=9):
            output, reference = compiled_model(**batch), result.model(**batch)
            assert type(output) is type(reference) and output.pooler_output.shape == reference.pooler_output.shape
            cosine = torch.nn.functional.cosine_similarity(output.last_hidden_state, reference.last_hidden_state, dim=-1)
            assert float(cosine.min()) > 0.999  # the int8 kernels compute what the reference int8 model does
    torch.set_num_threads(previous_threads)
    assert compiles() == before


def test_saved_int8_model_reloads_and_is_called_with_a_dict(bert, static_tuning):
    result, _, evaluation, tmp_path, _ = static_tuning
    loaded = lpot_ray.load(result.save(tmp_path / "saved"))
    assert loaded.int8_ops == result.int8_ops
    with torch.no_grad():
        for batch in evaluation:
            output = loaded.model(**batch)
            assert type(output) is type(bert(**batch))
            torch.testing.assert_close(output.last_hidden_state, result.model(**batch).last_hidden_state)


def test_saved_model_loads_in_a_process_that_has_not_imported_transformers(static_tuning):
    result, _, evaluation, tmp_path, _ = static_tuning
    folder = result.save(tmp_path / "elsewhere")
    torch.save(evaluation[0], folder / "batch.pt")
    script = ("import sys, torch, lpot_ray\n"
              "assert 'transformers' not in sys.modules\n"
              "model = lpot_ray.load(sys.argv[1]).model\n"
              "output = model(**torch.load(sys.argv[2]))\n"
              "print(type(output).__name__, *output.last_hidden_state.shape)\n")
    run = subprocess.run([sys.executable, "-c", script, str(folder), str(folder / "batch.pt")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-4:] == ["BaseModelOutputWithPoolingAndCrossAttentions", "4", str(EVALUATION_LENGTHS[0]), "32"]


def test_dynamic_tuning_with_labelled_dict_batches_and_a_built_in_metric(tmp_path):
    torch.manual_seed(1)
    model = transformers.BertForSequenceClassification(tiny_config(num_labels=3)).eval()
    evaluation = []
    for batch in token_batches(EVALUATION_LENGTHS, seed=10, size=8):
        with torch.no_grad():
            evaluation.append((batch, model(**batch).logits.argmax(-1)))  # labels: the fp32 model's answers
    conf = tune_conf(tmp_path, approach="post_training_dynamic_quant")
    conf["evaluation"] = {"accuracy": {"metric": {"topk": 1}}}
    conf["tuning"]["accuracy_criterion"] = {"absolute": 0.1}
    result = lpot_ray.tune(model, conf, q_dataloader=[inputs for inputs, _ in evaluation], eval_dataloader=evaluation)
    assert result.passed and result.baseline == 1.0 and result.accuracy >= 0.9
    assert result.int8_ops == tuple(f"bert.{name}" for name in LINEARS) + ("classifier",)
    with torch.no_grad():
        output = result.model(**evaluation[0][0])
    assert type(output) is transformers.modeling_outputs.SequenceClassifierOutput and output.logits.shape == (8, 3)
