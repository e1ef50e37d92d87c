"""What every evaluation suite returns, so reports, comparison and the gate treat them alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SuiteResult:
    """One suite's outcome on one model.

    ``metrics`` are the headline numbers (``perplexity``, ``bleu``, ``pass@1`` …);
    ``per_sample`` holds per-example values of the metrics that have them, so two models
    can be compared with bootstrap confidence intervals; ``samples`` are a few examples
    for the report; ``settings`` record everything needed to reproduce the numbers
    (generation settings, seed, dataset split, extractor for image metrics).
    ``figures`` are PNG files for the report (a sample grid per prompt), by title: stored
    beside it under ``figures/``, shown in it, and left out of ``results.json``.
    """

    suite: str
    metrics: dict[str, float]
    per_sample: dict[str, list[float]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["figures"] = {title: figure_file(self.suite, i) for i, title in enumerate(self.figures)}
        return out


def figure_file(suite: str, index: int) -> str:
    """Where a suite's ``index``-th figure is stored, relative to the evaluation's folder."""
    return f"figures/{suite}-{index:03d}.png"
