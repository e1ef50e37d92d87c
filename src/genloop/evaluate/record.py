"""A stored evaluation as the API, the CLI and the UI see it: the type the store returns and
the report renders."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any


@dataclass
class EvaluationRecord:
    """One stored evaluation as the API, the CLI (``--json``) and the UI see it."""

    id: int
    model_version_id: int
    model: str  # "name@version"
    dataset_version_id: int | None
    dataset: str | None  # "name@version"
    suite: str  # the suites, '+'-joined: "perplexity+generation"
    metrics: dict[str, float | None]
    settings: dict[str, Any]
    report: str | None  # artifact key
    created_at: datetime
    run_id: str | None = None
    suites: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat()
        return d
