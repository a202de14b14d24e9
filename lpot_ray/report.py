"""A self-contained HTML report of a tuning workspace: what was tried, what was chosen, and why.

Plots (matplotlib, saved as PNG beside the page and embedded in it as data URIs, so the page
works offline and needs no CDN): accuracy against the objective for every trial with the
criterion line and the chosen trial marked; which ops stayed fp32 and how much of the model each
is; a timeline of trials per worker, showing the parallelism. Then the configuration and the
environment the tuning ran in.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Optional

from . import pareto, timings
from .criterion import Criterion
from .errors import ConfigError, HistoryError
from .history import History, resolve_db_path
from .trial import Kind, Status, Trial


def write_report(workspace: str, output: Optional[str] = None) -> Path:
    """Write ``report.html`` (and its PNG plots) for the history in ``workspace``."""
    path = resolve_db_path(workspace)
    if not path.is_file():
        raise HistoryError(f"{path}: no tuning history there")
    history = History(path, read_only=True)
    try:
        trials = [trial for trial in history.trials() if trial.kind == Kind.TRIAL]
        meta = {key: history.get_meta(key) for key in ("result", "baseline", "criterion", "job", "timings")}
    finally:
        history.close()
    page = Path(output) if output else path.parent / "report.html"
    chosen = (meta["result"] or {}).get("key")
    front = pareto.front(trials, Criterion(**meta["criterion"]).higher_is_better if meta.get("criterion") else True)
    plots = {
        "accuracy_vs_objective": _accuracy_plot(trials, meta, chosen, front),
        "fp32_ops": _ops_plot(trials, meta, chosen),
        "timeline": _timeline_plot(trials, chosen),
    }
    try:
        page.parent.mkdir(parents=True, exist_ok=True)
        for name, png in plots.items():
            (page.parent / f"{page.stem}_{name}.png").write_bytes(png)
        page.write_text(_page(trials, meta, chosen, plots, front))
    except OSError as error:
        raise ConfigError(f"{page}: can't write the report there ({error.strerror or error}); choose another -o") from None
    return page


# --- plots -----------------------------------------------------------------------------------
def _figure(width: float = 7.5, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot.subplots(figsize=(width, height), dpi=100)


def _png(figure: Any) -> bytes:
    import io

    from matplotlib import pyplot

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    return buffer.getvalue()


def _accuracy_plot(trials: list[Trial], meta: dict, chosen: Optional[str], front: list[Trial]) -> bytes:
    figure, axes = _figure()
    evaluated = [trial for trial in trials if trial.status == Status.OK and trial.accuracy is not None]
    for passed, colour, label in ((True, "tab:green", "passed"), (False, "tab:red", "failed the criterion")):
        group = [trial for trial in evaluated if trial.passed == passed]
        axes.scatter([trial.objective for trial in group], [trial.accuracy for trial in group], c=colour, label=label, s=25)
    threshold = _threshold(meta)
    if threshold is not None:
        axes.axhline(threshold, color="grey", linestyle="--", label="criterion")
    if meta.get("baseline") is not None:
        axes.axhline(meta["baseline"], color="black", linewidth=0.8, label="fp32 baseline")
    if front:
        axes.step([trial.objective for trial in front], [trial.accuracy for trial in front], where="post",
                  color="tab:green", linewidth=1, label="Pareto front")
    best = [trial for trial in evaluated if trial.key == chosen]
    if best:
        axes.scatter([best[0].objective], [best[0].accuracy], marker="*", s=300, facecolors="none",
                     edgecolors="black", linewidths=1.5, label="chosen")
    axes.set_xlabel("objective (fp32 share of the model's cost; lower is faster)")
    axes.set_ylabel("accuracy")
    axes.legend(loc="best", fontsize=8)
    return _png(figure)


def _threshold(meta: dict) -> Optional[float]:
    """The accuracy the criterion required, as the tuning recorded it."""
    return Criterion(**meta["criterion"]).threshold if meta.get("criterion") else None


def _ops_plot(trials: list[Trial], meta: dict, chosen: Optional[str]) -> bytes:
    ops = (meta.get("job") or {}).get("ops")
    if not ops:  # a history written without the job's description: names only
        ops = [{"name": name, "macs": 0} for name, _ in trials[0].config.op_schemes] if trials else []
    chosen_trial = next((trial for trial in trials if trial.key == chosen), None)
    fallen = set(chosen_trial.config.fp32_ops) if chosen_trial else set()
    times_fp32 = {op["name"]: sum(op["name"] in trial.config.fp32_ops for trial in trials) for op in ops}
    total = sum(op["macs"] for op in ops) or 1
    figure, axes = _figure(height=max(2.5, 0.35 * len(ops) + 1))
    names = [op["name"] for op in ops]
    shares = [op["macs"] / total for op in ops]
    colours = ["tab:orange" if name in fallen else "tab:blue" for name in names]
    axes.barh(names, shares, color=colours)
    for row, name in enumerate(names):
        axes.text(shares[row], row, f"  fp32 in {times_fp32[name]} of {len(trials)} trials", va="center", fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("share of the model's multiply-accumulates (orange: fp32 in the chosen config)")
    return _png(figure)


def _timeline_plot(trials: list[Trial], chosen: Optional[str]) -> bytes:
    figure, axes = _figure()
    timed = [trial for trial in trials if trial.started]
    start = min((trial.started for trial in timed), default=0.0)
    workers = sorted({trial.worker for trial in timed})
    for trial in timed:
        colour = "black" if trial.key == chosen else "tab:green" if trial.passed else "tab:red" if trial.status != Status.OK else "tab:grey"
        axes.barh(workers.index(trial.worker), trial.duration, left=trial.started - start, color=colour, edgecolor="white")
    axes.set_yticks(range(len(workers)), workers)
    axes.set_xlabel("seconds since the first trial (green passed, grey failed the criterion, red errored, black chosen)")
    return _png(figure)


# --- the page --------------------------------------------------------------------------------
def _page(trials: list[Trial], meta: dict, chosen: Optional[str], plots: dict[str, bytes], front: list[Trial]) -> str:
    result = meta.get("result") or {}
    job = meta.get("job") or {}
    figures = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(CAPTIONS[name])}</figcaption></figure>"
        for name, png in plots.items()
    )
    rows = "".join(
        f"<tr{' class=chosen' if trial.key == chosen else ''}><td>{trial.seq}</td><td>{html.escape(trial.status)}"
        f"{' (chosen)' if trial.key == chosen else ''}</td><td>{_number(trial.accuracy)}</td>"
        f"<td>{'yes' if trial.passed else ''}</td><td>{_number(trial.objective)}</td>"
        f"<td>{html.escape(_fallen_back(trial.config))}</td><td>{html.escape(trial.worker)}</td>"
        f"<td>{trial.duration:.2f}</td></tr>"
        for trial in trials
    )
    front_rows = "".join(
        f"<tr{' class=chosen' if trial.key == chosen else ''}><td>{trial.seq}</td><td>{_number(trial.accuracy)}</td>"
        f"<td>{_number(trial.objective)}</td><td>{html.escape(_fallen_back(trial.config))}</td></tr>"
        for trial in front
    ) or '<tr><td colspan="4">no trial passed</td></tr>'
    summary = (f"chosen trial key {html.escape(chosen)}, accuracy {_number(result.get('accuracy'))}"
               if chosen else "no config met the criterion")
    return TEMPLATE.format(
        summary=summary, baseline=_number(meta.get("baseline")), count=len(trials), figures=figures, rows=rows,
        front=front_rows,
        result=html.escape(json.dumps(result, indent=2, sort_keys=True)),
        timings=html.escape(timings.table(meta.get("timings") or {}) or "not recorded"),
        config=html.escape(json.dumps(job.get("config", {}), indent=2, sort_keys=True)),
        environment=html.escape(json.dumps(job.get("environment", {}), indent=2, sort_keys=True)),
    )


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


CAPTIONS = {
    "accuracy_vs_objective": "Accuracy against the objective for every trial; dashed: the criterion.",
    "fp32_ops": "Each op's share of the model, and how often it stayed fp32.",
    "timeline": "Trials per worker over time: the parallelism of the tuning.",
}

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lpot_ray tuning report</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 0.9em; }}
table {{ border-collapse: collapse; font-size: 0.85em; }} td, th {{ border-bottom: 1px solid #ddd; padding: 2px 8px; }}
tr.chosen {{ background: #ffe9a8; font-weight: bold; }} pre {{ background: #f5f5f5; padding: 1em; overflow-x: auto; }}
</style></head><body>
<h1>lpot_ray tuning report</h1>
<p id="summary">{summary}; fp32 baseline {baseline}; {count} trials.</p>
{figures}
<h2>Trials</h2>
<table><tr><th>seq</th><th>status</th><th>accuracy</th><th>passed</th><th>objective</th><th>fp32 (bf16) ops</th>
<th>worker</th><th>seconds</th></tr>{rows}</table>
<h2>Pareto front</h2>
<p>The passing trials no other passing trial beats on both accuracy and the objective, fastest first:
a faster model with less margin, or a safer one.</p>
<table id="pareto"><tr><th>seq</th><th>accuracy</th><th>objective</th><th>fp32 (bf16) ops</th></tr>{front}</table>
<h2>Result</h2><pre>{result}</pre>
<h2>Where the time went</h2><pre>{timings}</pre>
<h2>Configuration</h2><pre>{config}</pre>
<h2>Environment</h2><pre>{environment}</pre>
</body></html>
"""


def _fallen_back(config) -> str:
    """A trial's fp32 ops, then its bf16 ops marked so (bf16 where the CPU offered it)."""
    names = list(config.fp32_ops) + [f"{name} (bf16)" for name in config.bf16_ops]
    return ", ".join(names) or "-"
