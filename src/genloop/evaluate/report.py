"""An evaluation's report: markdown, and self-contained HTML with matplotlib plots.

The HTML needs nothing outside itself (inline CSS, plots as PNG data URIs), so it can be
opened from the artifact store, attached to a CI run or served by the UI as is.

    report.md    metrics, settings, per-sample summaries, a few examples per suite
    report.html  the same, plus a bar chart of each suite's metrics and the distribution
                 of every per-sample metric
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from genloop.evaluate.record import EvaluationRecord
from genloop.evaluate.results import SuiteResult, figure_file

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
MAX_EXAMPLES = 5  # examples shown per suite
MAX_CELL = 400  # characters of an example's field shown


def write_report(out_dir: Path, record: EvaluationRecord, results: Sequence[SuiteResult]) -> None:
    """Write ``report.md`` and ``report.html`` for ``record`` into ``out_dir``."""
    (out_dir / REPORT_MD).write_text(render_markdown(record, results), encoding="utf-8")
    (out_dir / REPORT_HTML).write_text(render_html(record, results), encoding="utf-8")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.6g}"
    return "n/a" if value is None else str(value)


def _title(record: EvaluationRecord) -> str:
    on = f" on {record.dataset}" if record.dataset else ""
    return f"Evaluation {record.id}: {record.model}{on}"


def _summary(values: Sequence[float]) -> dict[str, float]:
    finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not finite:
        return {"n": float(len(values))}
    return {
        "n": float(len(values)),
        "mean": statistics.fmean(finite),
        "std": statistics.pstdev(finite),
        "min": min(finite),
        "median": statistics.median(finite),
        "max": max(finite),
    }


def _clip(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


# ---------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------


def _md_cell(value: Any) -> str:
    # escaped: markdown renders raw HTML, and examples are model output
    text = html.escape(_clip(value), quote=False)
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "⏎")


def _md_table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def render_markdown(record: EvaluationRecord, results: Sequence[SuiteResult]) -> str:
    lines = [f"# {_title(record)}", ""]
    lines += [
        f"- model: {record.model}",
        f"- dataset: {record.dataset or 'none'}",
        f"- suites: {', '.join(r.suite for r in results)}",
        f"- created: {record.created_at.isoformat()}",
        "",
        "## Metrics",
        "",
    ]
    lines += _md_table(["metric", "value"], [[k, _fmt(v)] for k, v in record.metrics.items()])
    lines += ["## Settings", "", "```json", json.dumps(record.settings, indent=2), "```", ""]
    for r in results:
        lines += [f"## Suite: {r.suite}", ""]
        lines += _md_table(["metric", "value"], [[k, _fmt(v)] for k, v in r.metrics.items()])
        if r.per_sample:
            lines += ["Per-sample values:", ""]
            stats = {k: _summary(v) for k, v in r.per_sample.items()}
            cols = ["n", "mean", "std", "min", "median", "max"]
            rows = [[k] + [_fmt(s.get(c)) for c in cols] for k, s in stats.items()]
            lines += _md_table(["metric", *cols], rows)
        if r.samples:
            lines += [f"Examples ({min(len(r.samples), MAX_EXAMPLES)} of {len(r.samples)}):", ""]
            columns = _sample_columns(r.samples)
            rows = [[s.get(c, "") for c in columns] for s in r.samples[:MAX_EXAMPLES]]
            lines += _md_table(columns, rows)
        for i, title in enumerate(r.figures):
            alt = _md_cell(title).replace("[", "(").replace("]", ")")
            lines += [f"![{alt}]({figure_file(r.suite, i)})", ""]
    return "\n".join(lines)


def _sample_columns(samples: Sequence[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for sample in samples[:MAX_EXAMPLES]:
        columns += [k for k in sample if k not in columns]
    return columns


# ---------------------------------------------------------------------------------------
# HTML with plots
# ---------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left;
         vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.85em;
          max-width: 30rem; }
pre { background: #f6f6f6; padding: 0.75rem; overflow-x: auto; }
img { max-width: 100%; }
"""


def _png(fig: Any) -> str:
    """A matplotlib figure as a ``data:`` URI (no file, no external resource)."""
    buf = io.BytesIO()
    # fixed margins, not bbox_inches="tight": that lays the figure out twice (~40 % slower)
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def metric_bars(result: SuiteResult) -> str | None:
    """A horizontal bar per headline metric of one suite that is a score in [0, 1] (ROUGE,
    exact match, pass@k, rates); metrics on other scales (perplexity, BLEU's 0–100,
    lengths) would flatten them, and are in the tables."""
    items = [
        (k, float(v))
        for k, v in result.metrics.items()
        if isinstance(v, int | float) and math.isfinite(v) and 0 <= v <= 1
    ]
    if not items:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 0.35 * len(items) + 1.2))
    fig.subplots_adjust(left=0.25, right=0.95, top=1 - 0.45 / fig.get_figheight(), bottom=0.1)
    ax = fig.add_subplot()
    names = [k for k, _ in items][::-1]
    values = [v for _, v in items][::-1]
    bars = ax.barh(names, values, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], padding=3, fontsize=8)
    ax.set_xlim(0, 1.1)
    ax.set_title(f"{result.suite}: scores", y=1.0, pad=6)  # a fixed y skips a layout pass
    return _png(fig)


def per_sample_histogram(name: str, values: Sequence[float]) -> str | None:
    finite = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not finite:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 2.8))
    fig.subplots_adjust(left=0.1, right=0.97, top=0.88, bottom=0.12)
    ax = fig.add_subplot()
    ax.hist(finite, bins=min(30, max(5, len(set(finite)))), color="#55a868")
    mean = statistics.fmean(finite)
    ax.axvline(mean, color="#c44e52", linestyle="--", label=f"mean {mean:.4g}")
    ax.set_title(f"{name}: per-sample distribution (n={len(finite)})", y=1.0, pad=6)
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    return _png(fig)


def _html_table(columns: list[str], rows: list[list[Any]], *, text: bool = False) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for v in row:
            numeric = isinstance(v, int | float) and not isinstance(v, bool)
            cls = "num" if numeric else ("text" if text else "")
            shown = _fmt(v) if numeric or v is None else _clip(v)
            cells.append(f'<td class="{cls}">{html.escape(shown)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def render_html(record: EvaluationRecord, results: Sequence[SuiteResult]) -> str:
    title = html.escape(_title(record))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title><style>{_CSS}</style></head><body>",
        f"<h1>{title}</h1>",
        _html_table(
            ["", "value"],
            [
                ["model", record.model],
                ["dataset", record.dataset or "none"],
                ["suites", ", ".join(r.suite for r in results)],
                ["created", record.created_at.isoformat()],
            ],
        ),
        "<h2>Metrics</h2>",
        _html_table(["metric", "value"], [[k, v] for k, v in record.metrics.items()]),
        "<h2>Settings</h2>",
        f"<pre>{html.escape(json.dumps(record.settings, indent=2))}</pre>",
    ]
    for r in results:
        parts.append(f"<h2>Suite: {html.escape(r.suite)}</h2>")
        parts.append(_html_table(["metric", "value"], [[k, v] for k, v in r.metrics.items()]))
        bars = metric_bars(r)
        if bars:
            parts.append(f'<img alt="{html.escape(r.suite)} metrics" src="{bars}">')
        for name, values in r.per_sample.items():
            s = _summary(values)
            cols = ["n", "mean", "std", "min", "median", "max"]
            parts.append(f"<h3>{html.escape(name)} per sample</h3>")
            parts.append(_html_table(cols, [[s.get(c) for c in cols]]))
            hist = per_sample_histogram(name, values)
            if hist:
                parts.append(f'<img alt="{html.escape(name)} distribution" src="{hist}">')
        if r.samples:
            shown = min(len(r.samples), MAX_EXAMPLES)
            parts.append(f"<h3>Examples ({shown} of {len(r.samples)})</h3>")
            columns = _sample_columns(r.samples)
            rows = [[s.get(c, "") for c in columns] for s in r.samples[:MAX_EXAMPLES]]
            parts.append(_html_table(columns, rows, text=True))
        for title, png in r.figures.items():  # inline: the page needs nothing beside it
            uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
            caption = html.escape(title)
            parts.append(
                f'<figure><img alt="{caption}" src="{uri}"><figcaption>{caption}'
                "</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
