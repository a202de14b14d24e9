"""Every built-in metric: known values, and split-and-merge equals whole."""

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from lpot_ray.errors import ConfigError, EvaluationError
from lpot_ray.metrics import make_metric

RNG = np.random.default_rng(0)
SCORES = RNG.normal(size=(40, 5))
CLASSES = RNG.integers(0, 5, size=40)
BINARY = RNG.integers(0, 2, size=40)
VALUES = RNG.normal(size=(40, 3))
TARGETS = VALUES + RNG.normal(scale=0.1, size=(40, 3))
ANSWERS = ["the cat sat", "a dog", "blue sky today", "", "Paris"] * 4
TRUTHS = [["cat sat"], ["the dog", "dog"], ["sky is blue"], [""], ["paris", "Paris, France"]] * 4
HYPOTHESES = ["the cat is on the mat", "there is a dog here", "hello world", "a b c d e"] * 5
REFERENCES = ["the cat sat on the mat", "there is a dog", "hello there world", "a b c d e f"] * 5


def boxes(count, shift=0.0):
    corners = RNG.uniform(0, 50, size=(count, 2))
    return np.hstack([corners, corners + 10]) + shift


DETECTIONS = []
for _ in range(8):
    truth = boxes(3)
    DETECTIONS.append(((truth + RNG.normal(scale=0.5, size=truth.shape), RNG.uniform(size=3), np.array([1, 2, 1])),
                       (truth, np.array([1, 2, 1]))))

CASES = {
    "topk": ({"topk": 2}, SCORES, CLASSES),
    "Accuracy": ({"Accuracy": None}, SCORES, CLASSES),
    "F1": ({"F1": None}, np.eye(2)[RNG.integers(0, 2, size=40)], BINARY),
    "Loss": ({"Loss": None}, np.abs(VALUES[:, 0]), CLASSES),
    "MAE": ({"MAE": None}, VALUES, TARGETS),
    "MSE": ({"MSE": None}, VALUES, TARGETS),
    "RMSE": ({"RMSE": None}, VALUES, TARGETS),
    "SquadF1": ({"SquadF1": None}, ANSWERS, TRUTHS),
    "BLEU": ({"BLEU": None}, HYPOTHESES, REFERENCES),
    "mAP": ({"mAP": None}, [d for d, _ in DETECTIONS], [t for _, t in DETECTIONS]),
    "COCOmAP": ({"COCOmAP": None}, [d for d, _ in DETECTIONS], [t for _, t in DETECTIONS]),
    "mIOU": ({"mIOU": {"num_classes": 4}}, RNG.random((30, 4, 5, 5)), RNG.integers(0, 5, size=(30, 5, 5))),
    "GLUE mrpc": ({"GLUE": {"task": "mrpc"}}, SCORES[:, :2], BINARY),
    "GLUE cola": ({"GLUE": {"task": "cola"}}, SCORES[:, :2], BINARY),
    "GLUE sts-b": ({"GLUE": {"task": "sts-b"}}, VALUES[:, 0], TARGETS[:, 0]),
}


@pytest.mark.parametrize("name", CASES)
def test_split_and_merge_equals_whole(name):
    spec, preds, labels = CASES[name]
    whole = make_metric(spec)
    whole.update(preds, labels)
    parts = [make_metric(spec) for _ in range(3)]
    for part, (start, stop) in zip(parts, [(0, 7), (7, 20), (20, len(preds))], strict=True):
        part.update(preds[start:stop], labels[start:stop])
    parts[0].merge(parts[1])
    parts[0].merge(parts[2])
    assert math.isclose(parts[0].result(), whole.result(), rel_tol=1e-9, abs_tol=1e-12)


def test_known_values():
    def value(spec, preds, labels):
        metric = make_metric(spec)
        metric.update(preds, labels)
        return metric.result()

    predicted_binary = np.eye(2)[RNG.integers(0, 2, size=40)]
    assert math.isclose(value({"F1": None}, predicted_binary, BINARY), f1_score(BINARY, predicted_binary.argmax(1)))
    assert math.isclose(value({"MSE": None}, VALUES, TARGETS), float(((VALUES - TARGETS) ** 2).mean()))
    assert math.isclose(value({"RMSE": None}, VALUES, TARGETS), math.sqrt(((VALUES - TARGETS) ** 2).mean()))
    assert math.isclose(value({"MAE": None}, VALUES, TARGETS), float(np.abs(VALUES - TARGETS).mean()))
    assert value({"topk": 5}, SCORES, CLASSES) == 1.0
    assert value({"SquadF1": None}, ["The Cat!"], [["a cat"]]) == 1.0
    assert math.isclose(value({"SquadF1": None}, ["cat sat down"], [["cat sat"]]), 0.8)

    import sacrebleu

    assert math.isclose(value({"BLEU": None}, HYPOTHESES, REFERENCES),
                        sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score)
    truth = [(boxes(2), np.array([1, 1]))]
    perfect = [(truth[0][0], np.array([0.9, 0.8]), np.array([1, 1]))]
    assert value({"COCOmAP": None}, perfect, truth) == pytest.approx(1.0)
    assert value({"VOCmAP": None}, [(truth[0][0] + 100, np.array([0.9, 0.8]), np.array([1, 1]))], truth) == 0.0


@pytest.mark.parametrize(
    "spec, preds, labels, message",
    [
        ({"topk": 1}, SCORES[:5], CLASSES[:4], r"topk: expected scores of shape \(batch, classes\) matching 4 labels, got \(5, 5\)"),
        ({"Accuracy": None}, SCORES[:5], CLASSES[:4], "Accuracy: 5 predictions for 4 labels"),
        ({"MSE": None}, VALUES[:5], TARGETS[:4], r"MSE: predictions of shape \(5, 3\) don't match labels of shape \(4, 3\)"),
        ({"BLEU": None}, HYPOTHESES[:3], REFERENCES[:2], "BLEU: 3 predictions for 2 references"),
        ({"mAP": None}, [(boxes(2), [0.5], [1])], [(boxes(1), [1])], "mAP: 2 boxes, 1 scores and 1 classes detected"),
        ({"topk": 1}, SCORES[:2], np.array(["cat", "dog"]), "topk: labels must be class indices .*labels such as 'cat'"),
        ({"Accuracy": None}, SCORES[:2], np.array([0.5, 1.0]), "Accuracy: labels must be class indices .*float64"),
        ({"topk": 1}, SCORES[:2, :3], np.array([0, 4]), "topk: label 4 is not a class of a model that gives 3 scores per sample"),
    ],
)
def test_mismatched_predictions_and_labels_say_which_shapes(spec, preds, labels, message):
    with pytest.raises(EvaluationError, match=message):
        make_metric(spec).update(preds, labels)


def test_bleu_smooths_like_sacrebleu_when_an_order_has_no_match():
    import sacrebleu

    hypotheses, references = ["the cat sat on mat here", "a dog barks loudly"], ["the cat lay on a mat now", "the dog barked loudly"]
    metric = make_metric({"BLEU": None})
    metric.update(hypotheses, references)
    assert metric.result() == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    assert metric.result() > 0


def test_sigmoid_outputs_and_one_hot_labels():
    sigmoid = np.array([[0.9], [0.8], [0.1], [0.2]])
    for name in ("Accuracy", "F1"):
        metric = make_metric({name: None})
        metric.update(sigmoid, np.array([1, 1, 0, 0]))
        assert metric.result() == 1.0
    topk = make_metric({"topk": 1})
    topk.update(np.eye(4), np.eye(4))
    assert topk.result() == 1.0


def test_metric_parameters_it_does_not_take_are_a_config_error():
    from lpot_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"`evaluation.accuracy.metric.MSE`: \{'squared': False\} are not its parameters"):
        make_metric({"MSE": {"squared": False}})


def test_an_error_metric_makes_the_criterion_lower_is_better_unless_the_yaml_says():
    from lpot_ray.config import load_config
    from lpot_ray.evaluation import Evaluation
    from lpot_ray.inputs import higher_is_better

    def direction(criterion):
        conf = {"model": {"framework": "pytorch"}, "evaluation": {"accuracy": {"metric": {"MSE": None}}},
                "tuning": {"accuracy_criterion": criterion}}
        return higher_is_better(load_config(conf), Evaluation(dataloader=[], metric={"MSE": None}))

    assert direction({"relative": 0.01}) is False
    assert direction({"relative": 0.01, "higher_is_better": True}) is True


def test_coco_map_key_picks_lpots_named_figure():
    truth = [(boxes(3), np.array([1, 1, 2]))]
    shifted = truth[0][0] + np.array([0, 0, 3, 3])  # boxes a little too large: IoU above 0.5, below 0.95
    detections = [(shifted, np.array([0.9, 0.8, 0.7]), np.array([1, 1, 2]))]

    def value(spec):
        metric = make_metric(spec)
        metric.update(detections, truth)
        return metric.result()

    at_50 = value({"COCOmAP": {"map_key": "DetectionBoxes_Precision/mAP@.50IOU"}})
    assert at_50 == value({"mAP": None}) > value({"COCOmAP": None})
    with pytest.raises(ConfigError, match="map_key`: 'mAP@.5' must be one of DetectionBoxes_Precision/mAP, "):
        make_metric({"COCOmAP": {"map_key": "mAP@.5"}})


def test_miou_known_value_and_ignored_pixels():
    metric = make_metric({"mIOU": {"num_classes": 3}})
    labels = np.array([[[0, 0, 1, 255]]])  # 255: ignored, as LPOT's segmentation datasets mark borders
    preds = np.array([[[0, 1, 1, 2]]])
    metric.update(preds, labels)
    # class 0: 1 right of 2 labelled; class 1: 1 right, 1 extra predicted; class 2: never labelled or predicted
    assert math.isclose(metric.result(), (1 / 2 + 1 / 2) / 2)



def test_glue_reports_each_tasks_own_figure_as_lpot_does():
    from scipy import stats
    from sklearn.metrics import matthews_corrcoef

    def value(task, preds, labels):
        metric = make_metric({"GLUE": {"task": task}})
        metric.update([preds], labels)  # a model's only output, as a list of one array
        return metric.result()

    logits = SCORES[:, :2]
    assert value("mrpc", logits, BINARY) == (logits.argmax(1) == BINARY).mean()
    assert math.isclose(value("cola", logits, BINARY), matthews_corrcoef(BINARY, logits.argmax(1)))
    pearson, spearman = stats.pearsonr(VALUES[:, 0], TARGETS[:, 0])[0], stats.spearmanr(VALUES[:, 0], TARGETS[:, 0])[0]
    assert math.isclose(value("sts-b", VALUES[:, 0], TARGETS[:, 0]), (pearson + spearman) / 2)
    assert make_metric({"GLUE": {"task": "mrpc"}}).merges_exactly
    assert not make_metric({"GLUE": {"task": "sts-b"}}).merges_exactly  # float sums in another order
    with pytest.raises(ConfigError, match=r"GLUE.task`: 'squad' must be one of mrpc, qqp"):
        make_metric({"GLUE": {"task": "squad"}})


def test_coco_map_v2_reads_the_models_batched_outputs_through_its_index_mapping():
    truth = [t for _, t in DETECTIONS]
    per_image = make_metric({"COCOmAP": None})
    per_image.update([d for d, _ in DETECTIONS], truth)
    # an exported detector's outputs: boxes [B, N, 4], classes [B, N], scores [B, N], padded to N = 5
    # with junk detections that a count [B] leaves out
    padded = [(np.vstack([b, np.full((2, 4), 7.0)]), np.append(s, [0.99, 0.99]), np.append(c, [2, 2]))
              for (b, s, c), _ in DETECTIONS]
    outputs = (np.stack([b for b, _, _ in padded]), np.stack([c for _, _, c in padded]),
               np.stack([s for _, s, _ in padded]), np.full(len(padded), 3))
    mapping = {"boxes": 0, "classes": 1, "scores": 2, "num_detections": 3}
    v2 = make_metric({"COCOmAPv2": {"output_index_mapping": mapping}})
    v2.update(outputs, truth)
    assert v2.result() == per_image.result() > 0
    with pytest.raises(ConfigError, match=r"output_index_mapping`: unknown output\(s\) labels; known: num_detections"):
        make_metric({"COCOmAPv2": {"output_index_mapping": {"labels": 1}}})
    with pytest.raises(EvaluationError, match="the model gives 2 outputs; output_index_mapping"):
        v2.update(outputs[:2], truth)
    with pytest.raises(EvaluationError, match=r"COCOmAPv2: expected the model's outputs \(a list of arrays\), got one ndarray"):
        v2.update(outputs[0], truth)


def test_compare_label_false_measures_the_outputs_against_the_fp32_models():
    from lpot_ray.evaluation import Evaluation

    class Scaling:  # an adaptor whose "models" are factors applied to the inputs
        @staticmethod
        def predict(model, inputs):
            return np.asarray(inputs) * model

    batches = [(np.arange(4.0) + i, np.zeros(4)) for i in range(3)]  # labels that compare_label ignores
    evaluation = Evaluation(dataloader=batches, metric={"MSE": {"compare_label": False}})
    fp32 = lambda position, inputs: Scaling.predict(1.0, inputs)  # noqa: E731
    assert evaluation.run(Scaling, 1.0) == 0.0  # the baseline: the fp32 model against itself
    inputs = np.concatenate([b for b, _ in batches])
    assert math.isclose(evaluation.run(Scaling, 1.1, fp32=fp32), float(((0.1 * inputs) ** 2).mean()))
    assert Evaluation(dataloader=batches, metric={"MSE": None}).run(Scaling, 1.0) == float((inputs ** 2).mean())
