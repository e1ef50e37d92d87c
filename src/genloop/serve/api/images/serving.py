"""The handler of ``POST /v1/images/generations``.

The prompt is the model's condition: a sentence for text-to-image models (with
``negative_prompt``, ``num_inference_steps`` and ``guidance_scale`` as extras), a class
label for class-conditional ones; unconditional ones take none. A prompt longer than the
text encoder's context is cut, and the response says so in ``warnings``. Images come
back as base64 PNG (``response_format: b64_json``), resized to ``size`` when one is
given. One generation runs at a time per model (they use every core already); the others
wait in a short queue, and beyond it get 429.
"""

from __future__ import annotations

import base64
import io
import time
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse, Response

from genloop.serve.api.protocol import new_id
from genloop.serve.api.streaming import CLIENT_CLOSED, until_disconnected
from genloop.serve.errors import error_type, invalid

if TYPE_CHECKING:
    from PIL.Image import Image
    from starlette.requests import Request

    from genloop.security.keys import Principal
    from genloop.serve.api.images.protocol import ImageRequest
    from genloop.serve.models import LoadedModel
    from genloop.serve.state import ServerState

MAX_SIDE = 1024


async def serve_images(
    state: ServerState, request: Request, body: ImageRequest, principal: Principal
) -> Response:
    cfg = state.cfg.serve
    if body.response_format != "b64_json":
        raise invalid("only response_format b64_json is supported", "response_format")
    if body.n > cfg.max_n:
        raise invalid(f"n is {body.n}; this server allows at most {cfg.max_n}", "n")
    size = _size(body.size)
    flags = state.check_input(body.prompt) if body.prompt else []
    started = time.monotonic()
    loaded = await state.models.acquire(body.model)
    response_id = new_id("img")
    status, images = 500, []
    try:
        generator = loaded.image_generator()
        seed = None if body.seed is None else body.seed % 2**63
        warnings = generator.prompt_warnings(body.prompt)
        if warnings and cfg.long_image_prompts == "refuse":
            raise invalid(f"{warnings[0]} (this server refuses prompts that long)", "prompt")

        def call() -> list[Image]:
            return generator.generate(
                body.prompt,
                body.n,
                seed,
                negative_prompt=body.negative_prompt,
                steps=body.num_inference_steps,
                guidance_scale=body.guidance_scale,
            )

        work = _generate(state, loaded, call)
        result = await until_disconnected(request, work)
        if result is None:
            status = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)
        images = result
        data = [{"b64_json": _png(img, size)} for img in images]
        status = 200
        content: dict[str, Any] = {
            "created": int(time.time()),
            "data": data,
            "id": response_id,
            "model": loaded.ref,
        }
        if warnings:
            content["warnings"] = warnings  # e.g. a prompt cut to the text encoder's context
        return JSONResponse(content, headers={"X-Request-Id": response_id})
    except Exception as exc:
        status = int(getattr(exc, "http_status", 500))
        state.metrics.error(loaded.info.name, error_type(exc), loaded.info.version)
        raise
    finally:
        state.models.release(loaded)
        _record(state, loaded, body, principal, response_id, status, len(images), flags, started)


async def _generate(state: ServerState, loaded: LoadedModel, call: Any) -> list[Image]:
    """Run one generation in a thread, one at a time per model, within the request timeout."""
    cfg = state.cfg.serve
    result: list[Image] = await loaded.run_exclusive(
        call, max_queue=cfg.max_queue, timeout_s=cfg.request_timeout_s, what="image generation"
    )
    return result


def _size(size: str | None) -> tuple[int, int] | None:
    if size is None:
        return None
    w, h = (int(x) for x in size.split("x"))
    if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
        raise invalid(f"size must be between 1x1 and {MAX_SIDE}x{MAX_SIDE}", "size")
    return w, h


def _png(image: Image, size: tuple[int, int] | None) -> str:
    from PIL import Image as PILImage

    if size is not None and image.size != size:
        image = image.resize(size, PILImage.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _record(
    state: ServerState,
    loaded: LoadedModel,
    body: ImageRequest,
    principal: Principal,
    response_id: str,
    status: int,
    count: int,
    flags: list[str],
    started: float,
) -> None:
    from genloop.monitor.usage import RequestRecord

    e2e = time.monotonic() - started
    info = loaded.info
    state.metrics.request_finished(info.name, info.version, status, "stop", 0, count, e2e)
    if status == 429:
        return
    # user text goes only where the log encrypts it (the prompt), never in the parameters
    params: dict[str, Any] = body.model_dump(
        exclude={"prompt", "negative_prompt", "user"}, exclude_none=True
    )
    prompt = body.prompt
    if body.negative_prompt:
        prompt = f"{prompt}\n[negative prompt] {body.negative_prompt}"
    state.recorder.submit(
        RequestRecord(
            request_id=response_id,
            endpoint="images.generations",
            model_name=info.name,
            model_version=info.version,
            api_key_id=principal.key_id,
            key_prefix=principal.prefix,
            user_id=body.user or principal.user_id,
            prompt=prompt,
            response=f"{count} images",
            params=params,
            completion_tokens=count,
            latency_ms=e2e * 1000.0,
            status=status,
            flags=flags,
        )
    )
