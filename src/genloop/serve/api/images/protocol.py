"""The request of ``POST /v1/images/generations`` (the response is built in ``serving.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from genloop.serve.api.protocol import SEED_MAX, SEED_MIN


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, description="An image model from /v1/models.")
    prompt: str = Field(
        "",
        max_length=4000,
        description="What to draw: a sentence for text-to-image models, a class label for "
        "class-conditional ones (unconditional models take none).",
    )
    n: int = Field(1, ge=1, le=128, description="Images to generate (at most serve.max_n).")
    size: str | None = Field(
        None, pattern=r"^[0-9]{1,4}x[0-9]{1,4}$", description="WIDTHxHEIGHT to resize to."
    )
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="Only b64_json is supported."
    )
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="Same seed, same images.")
    user: str | None = Field(None, min_length=1, max_length=128)
    # extras (text-to-image models), as in diffusers' pipelines and vLLM's extra parameters
    negative_prompt: str | None = Field(
        None, max_length=4000, description="Text-to-image: what the images should not show."
    )
    num_inference_steps: int | None = Field(
        None, ge=1, le=1000, description="Text-to-image: denoising steps (default: the model's)."
    )
    guidance_scale: float | None = Field(
        None, ge=0.0, le=50.0, description="Text-to-image: classifier-free guidance scale."
    )
