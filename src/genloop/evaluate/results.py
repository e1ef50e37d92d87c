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
    """

    suite: str
    metrics: dict[str, float]
    per_sample: dict[str, list[float]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
