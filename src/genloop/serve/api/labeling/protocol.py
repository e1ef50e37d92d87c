"""The request bodies of ``/v1/label``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: dict[str, Any] = Field(
        description='The label: {"label": L} (classification), {"labels": [L, …]} (spans, one '
        'per token), {"text": T} (caption) or {"choice": "a" | "b"} (preference).'
    )
