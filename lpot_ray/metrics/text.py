"""Text: SquadF1 (token overlap of answers) and BLEU (through sacrebleu)."""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

from ..errors import EvaluationError, MissingFrameworkError
from .base import SummedMetric

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_BLEU_ORDER = 4


def _normalise(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(char for char in text.lower() if char not in set(string.punctuation))
    return _ARTICLES.sub(" ", text).split()


def _token_f1(prediction: str, truth: str) -> float:
    predicted, expected = _normalise(prediction), _normalise(truth)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if not predicted or not expected:
        return float(predicted == expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _texts(preds: Sequence, labels: Sequence, metric: str) -> None:
    if len(preds) != len(labels):
        raise EvaluationError(f"{metric}: {len(preds)} predictions for {len(labels)} references")


class SquadF1(SummedMetric):
    """Mean over questions of the best token-overlap F1 against any of the reference answers."""

    SUMS = ("f1", "count")

    def update(self, preds: Sequence[str], labels: Sequence) -> None:
        _texts(preds, labels, "SquadF1")
        for prediction, truths in zip(preds, labels, strict=True):
            truths = [truths] if isinstance(truths, str) else list(truths)
            if not truths:
                raise EvaluationError("SquadF1: a question has no reference answer")
            self.add(f1=max(_token_f1(prediction, truth) for truth in truths), count=1)

    def result(self) -> float:
        return self.sums["f1"] / self.require("count")


class BLEU(SummedMetric):
    """Corpus BLEU (sacrebleu, 13a tokenisation), from n-gram counts summed over batches."""

    ORDER = _BLEU_ORDER
    SUMS = tuple(f"{kind}{n}" for kind in ("correct", "total") for n in range(_BLEU_ORDER)) + ("sys_len", "ref_len")

    def update(self, preds: Sequence[str], labels: Sequence[str]) -> None:
        _texts(preds, labels, "BLEU")
        if not preds:
            return
        score = _sacrebleu().corpus_score(list(preds), [list(labels)])
        for n in range(self.ORDER):
            self.add(**{f"correct{n}": score.counts[n], f"total{n}": score.totals[n]})
        self.add(sys_len=score.sys_len, ref_len=score.ref_len)

    def result(self) -> float:
        self.require("sys_len")
        from sacrebleu.metrics import BLEU as SacreBLEU

        correct = [int(self.sums[f"correct{n}"]) for n in range(self.ORDER)]
        total = [int(self.sums[f"total{n}"]) for n in range(self.ORDER)]
        score = SacreBLEU.compute_bleu(correct, total, int(self.sums["sys_len"]), int(self.sums["ref_len"]),
                                       smooth_method="exp")  # sacrebleu's corpus default
        return score.score


def _sacrebleu():
    try:
        from sacrebleu.metrics import BLEU as SacreBLEU
    except ImportError:
        raise MissingFrameworkError("sacrebleu (for the BLEU metric)", "metrics") from None
    return SacreBLEU()
