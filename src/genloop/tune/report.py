"""A study's report: optimization history, parameter importances and parallel coordinates.

Stored as one artifact (``runs/<study run>/report``) holding the three plots as PNG, a
self-contained ``report.html`` that embeds them with the table of trials, and
``report.json`` with the same figures for programs. Rewritten each time a study ends.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.workspace.workspace import Workspace

if TYPE_CHECKING:
    import optuna

    from genloop.workspace.registry import ModelVersionInfo

PLOTS = {
    "optimization_history": "Optimization history",
    "param_importances": "Parameter importances",
    "parallel_coordinate": "Parallel coordinates",
}


def write_report(
    ws: Workspace,
    study: optuna.Study,
    key: str,
    *,
    metric: str,
    model: ModelVersionInfo | None = None,
) -> str:
    """Write the report of ``study`` as artifact ``key`` (replacing an older one)."""
    import optuna
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    importances, importance_note = param_importances(study, len(complete))
    data = {
        "study": study.study_name,
        "metric": metric,
        "direction": study.direction.name.lower(),
        "best": _best(study, complete),
        "model": model.ref if model else None,
        "importances": importances,
        "trials": [_trial_row(t) for t in trials],
    }
    notes: dict[str, str] = {}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with ws.store.writer(key, overwrite=True) as out:
            if complete:
                _save_plot(out, "optimization_history", lambda: _history(study, metric))
                _save_plot(out, "parallel_coordinate", lambda: _parallel(study, metric))
            else:
                notes["optimization_history"] = notes["parallel_coordinate"] = (
                    "no complete trial yet"
                )
            if importances:
                _save_plot(out, "param_importances", lambda: _importance_bars(importances))
            else:
                notes["param_importances"] = importance_note
            (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")
            (out / "report.html").write_text(_html(data, out, notes), encoding="utf-8")
    finally:
        optuna.logging.set_verbosity(verbosity)
    return key


def param_importances(study: optuna.Study, n_complete: int) -> tuple[dict[str, float], str]:
    """fANOVA importances (they sum to 1), or ({}, why not) when they cannot be told."""
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    if n_complete < 2:
        return {}, "needs at least 2 complete trials"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as exc:  # e.g. every trial sampled the same values
        return {}, f"not computable: {exc}"
    values = {k: float(v) for k, v in found.items() if math.isfinite(float(v))}
    return values, "" if values else "not computable"


def _best(study: optuna.Study, complete: list[optuna.trial.FrozenTrial]) -> dict[str, Any] | None:
    if not complete:
        return None
    best = study.best_trial
    return {
        "trial": best.number,
        "value": best.value,
        "params": best.params,
        "run_id": best.user_attrs.get("run_id"),
    }


def _trial_row(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    state = t.state.name.lower()
    if t.user_attrs.get("interrupted"):
        state = "interrupted"
    return {
        "number": t.number,
        "state": state,
        "value": t.value if t.value is not None else _last_intermediate(t),
        "steps": t.user_attrs.get("steps"),
        "params": t.params,
        "run_id": t.user_attrs.get("run_id"),
        "error": t.user_attrs.get("error"),
        "duration_s": t.duration.total_seconds() if t.duration else None,
    }


def _last_intermediate(t: optuna.trial.FrozenTrial) -> float | None:
    if not t.intermediate_values:
        return None
    return float(t.intermediate_values[max(t.intermediate_values)])


# plots: optuna's own (matplotlib backend) where they exist, else a plain bar chart


def _pyplot() -> Any:
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    return plt


def _save_plot(out: Path, name: str, draw: Callable[[], Any]) -> None:
    plt = _pyplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib plots are "experimental"
        ax = draw()
    fig = ax.get_figure()
    try:
        fig.set_size_inches(9, 5)
        fig.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def _history(study: optuna.Study, metric: str) -> Any:
    from optuna.visualization.matplotlib import plot_optimization_history

    return plot_optimization_history(study, target_name=metric)


def _parallel(study: optuna.Study, metric: str) -> Any:
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    return plot_parallel_coordinate(study, target_name=metric)


def _importance_bars(importances: dict[str, float]) -> Any:
    plt = _pyplot()
    _, ax = plt.subplots()
    names = list(importances)[::-1]  # the most important on top
    ax.barh(names, [importances[n] for n in names], color="#4c72b0")
    ax.set_xlabel("importance (fANOVA, sums to 1)")
    ax.set_title("Parameter importances")
    for i, n in enumerate(names):
        ax.text(importances[n], i, f" {importances[n]:.2f}", va="center")
    ax.set_xlim(0, max(1.0, max(importances.values()) * 1.15))
    return ax


def _html(data: dict[str, Any], out: Path, notes: dict[str, str]) -> str:
    esc = html.escape
    best = data["best"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>study {esc(data['study'])}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;"
        "padding:.25em .5em;text-align:left}img{max-width:100%}.failed{color:#b00}"
        ".pruned{color:#777}</style></head><body>",
        f"<h1>Study {esc(data['study'])}</h1>",
        f"<p>objective: {esc(data['direction'])} <code>{esc(data['metric'])}</code></p>",
    ]
    if best is not None:
        params = ", ".join(
            f"<code>{esc(k)}</code> = {esc(_fmt(v))}" for k, v in best["params"].items()
        )
        parts.append(
            f"<p>best: trial {best['trial']}, {esc(data['metric'])} = {_fmt(best['value'])}; "
            f"{params}</p>"
        )
    if data["model"]:
        parts.append(f"<p>registered model: <code>{esc(data['model'])}</code></p>")
    for name, title in PLOTS.items():
        parts.append(f"<h2>{esc(title)}</h2>")
        png = out / f"{name}.png"
        if png.exists():
            encoded = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(f"<img alt='{esc(title)}' src='data:image/png;base64,{encoded}'>")
        else:
            parts.append(f"<p>({esc(notes.get(name, 'not available'))})</p>")
    parts.append("<h2>Trials</h2><table><tr><th>#</th><th>state</th>")
    parts.append(
        f"<th>{esc(data['metric'])}</th><th>steps</th><th>parameters</th><th>note</th></tr>"
    )
    for row in data["trials"]:
        params = ", ".join(f"{esc(k)}={esc(_fmt(v))}" for k, v in row["params"].items())
        parts.append(
            f"<tr class='{esc(row['state'])}'><td>{row['number']}</td><td>{esc(row['state'])}</td>"
            f"<td>{_fmt(row['value'])}</td><td>{_fmt(row['steps'])}</td><td>{params}</td>"
            f"<td>{esc(row['error'] or '')}</td></tr>"
        )
    parts.append("</table></body></html>\n")
    return "\n".join(parts)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
