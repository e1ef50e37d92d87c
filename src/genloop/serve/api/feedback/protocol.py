"""The request and response of ``POST /v1/feedback``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(
        min_length=1, max_length=64, description="The id of a response of this server."
    )
    rating: Literal[1, -1] = Field(description="+1 (good) or -1 (bad).")
    correction: str | None = Field(
        None, max_length=32_000, description="What the answer should have been."
    )
    comment: str | None = Field(None, max_length=4_000, description="Free text.")
    user: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="The end user giving it, as a label (default: the API key's user). "
        "Per-user caps and erasure go by the API key, not this field.",
    )


class FeedbackResponse(BaseModel):
    id: int
    object: Literal["feedback"] = "feedback"
    response_id: str
    rating: int
    status: str = "pending"
