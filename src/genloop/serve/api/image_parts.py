"""OpenAI image content parts in chat messages: parsed into text and decoded images, with
bounded input.

A ``/v1/chat/completions`` message's ``content`` may be a list of parts::

    {"type": "text", "text": "What is in this picture?"}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR…", "detail": "auto"}}

:func:`parse_messages` turns each message into its text (the text parts joined, as
``ChatMessage.text`` does) and its images (Pillow RGB images, in order). Every refusal is an
:class:`~genloop.serve.errors.ApiError` whose ``param`` names the part
(``messages[0].content[1]``), so the client sees which one is wrong:

- a ``data:`` URI that is not ``image/*;base64`` → 400;
- an image of more than ``max_bytes`` (counted before decoding: from the base64 length,
  or from the bytes streamed) or more than ``max_pixels`` (from the header, before the
  pixels are decoded), or more than ``max_images`` in a request → 413;
- a URL that is not a ``data:`` URI → 400, unless ``allow_remote``; then it is fetched
  through data collection's SSRF guard (``genloop.data.sources.url``: http/https only, every
  address the host resolves to must be public unless ``allow_private``, the connection
  pinned to the checked address, each redirect checked again, the body counted while
  streaming) and must come back as ``image/*``;
- bytes Pillow cannot decode → 400 naming the part.

Fetching is blocking (httpx); a server calls :func:`parse_messages` off its event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from genloop.serve.errors import ApiError

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

MAX_IMAGE_BYTES = 4 * 1024 * 1024  # an encoded image (PNG, JPEG …)
MAX_IMAGE_PIXELS = 4096 * 4096  # width × height, checked from the header before decoding
MAX_IMAGES = 8  # per request
FETCH_TIMEOUT_S = 10.0
_DATA_URI = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^;,]*)*),", re.ASCII)


@dataclass(frozen=True)
class ImageLimits:
    """What a request's images may be (the server's settings)."""

    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    max_images: int = MAX_IMAGES
    allow_remote: bool = False  # http(s) URLs fetched (through the SSRF guard) or refused
    allow_private: bool = False  # remote URLs may resolve to private addresses (own servers)
    timeout_s: float = FETCH_TIMEOUT_S


@dataclass
class ParsedMessage:
    """One chat message with its image parts decoded."""

    role: str
    text: str  # the text parts joined (or the string content)
    images: list[Image] = field(default_factory=list)  # RGB, in the order of the parts


def parse_messages(
    messages: Sequence[Mapping[str, Any] | Any], limits: ImageLimits | None = None
) -> list[ParsedMessage]:
    """Each message's text and decoded images (see the module docstring).

    ``messages``: plain dicts as in the request JSON, or pydantic models (their
    ``model_dump()``). Raises :class:`ApiError` (400 or 413) naming the offending part.
    """
    limits = limits or ImageLimits()
    out: list[ParsedMessage] = []
    count = 0
    for i, message in enumerate(messages):
        m = _as_dict(message)
        role = str(m.get("role", ""))
        text, images = parse_content(m.get("content"), f"messages[{i}].content", limits)
        count += len(images)
        if count > limits.max_images:
            raise ApiError(
                f"a request may carry at most {limits.max_images} images",
                status=413,
                param=f"messages[{i}].content",
            )
        out.append(ParsedMessage(role, text, images))
    return out


def parse_content(
    content: str | Sequence[Mapping[str, Any] | Any] | None, where: str, limits: ImageLimits
) -> tuple[str, list[Image]]:
    """(text, images) of one message's ``content``; ``where`` names it in errors."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[Image] = []
    for j, raw in enumerate(content):
        part, param = _as_dict(raw), f"{where}[{j}]"
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ApiError("a text part needs a string 'text'", param=param)
            texts.append(text)
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, Mapping) else None
            if not isinstance(url, str) or not url:
                raise ApiError("an image_url part needs image_url.url", param=param)
            data = image_bytes(url, param, limits)
            if len(images) + 1 > limits.max_images:
                raise ApiError(
                    f"a request may carry at most {limits.max_images} images",
                    status=413,
                    param=param,
                )
            images.append(decode_image(data, param, limits))
        else:
            raise ApiError(
                f"content part type {kind!r} is not supported (use text or image_url)",
                param=param,
            )
    return "".join(texts), images


def image_bytes(url: str, param: str, limits: ImageLimits) -> bytes:
    """The encoded image a part's URL holds: a ``data:`` URI decoded, or a remote URL
    fetched through the SSRF guard when ``limits.allow_remote``."""
    if url[:5].lower() == "data:":
        return decode_data_uri(url, param, limits)
    if not limits.allow_remote:
        scheme = url.split(":", 1)[0] if ":" in url else "none"
        raise ApiError(
            f"image_url must be a data: URI (data:image/png;base64,…); remote URLs (scheme "
            f"{scheme!r}) are not allowed on this server",
            param=param,
        )
    return fetch_image(url, param, limits)


def decode_data_uri(url: str, param: str, limits: ImageLimits) -> bytes:
    """The bytes of ``data:image/…;base64,…``; its size is bounded before it is decoded."""
    match = _DATA_URI.match(url)
    if match is None:
        raise ApiError("image_url is not a valid data: URI", param=param)
    mime = (match["type"] or "").lower()
    params = [p.strip().lower() for p in match["params"].split(";") if p.strip()]
    if not mime.startswith("image/"):
        raise ApiError(
            f"a data: URI image must have an image/* media type, not {mime or 'none'!r}",
            param=param,
        )
    if "base64" not in params:
        raise ApiError("a data: URI image must be base64-encoded (;base64,)", param=param)
    payload = url[match.end() :]
    if len(payload) * 3 // 4 > limits.max_bytes + 2:  # before decoding anything
        raise _too_large(param, limits, f"about {len(payload) * 3 // 4} bytes")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError("the data: URI image is not valid base64", param=param) from None
    if len(data) > limits.max_bytes:
        raise _too_large(param, limits, f"{len(data)} bytes")
    return data


def fetch_image(url: str, param: str, limits: ImageLimits) -> bytes:
    """The bytes at ``url``, fetched the way data collection fetches pages (the same SSRF
    guard: ``UrlSource``'s checked, pinned, redirect-checking open) and counted while
    streaming; the response must be ``image/*``."""
    import time

    import httpx

    from genloop.data.records import Quarantined
    from genloop.data.sources.url import USER_AGENT, TooLarge, UrlSource, read_limited

    guard = UrlSource(
        url,
        allow_private=limits.allow_private,
        max_bytes=limits.max_bytes,
        timeout_s=limits.timeout_s,
        respect_robots=False,  # one image a user asked for, not a crawl
    )
    deadline = time.monotonic() + limits.timeout_s
    with httpx.Client(
        timeout=limits.timeout_s,
        follow_redirects=False,
        trust_env=False,  # a proxy would resolve names where the guard cannot check them
        headers={"User-Agent": USER_AGENT},
        limits=httpx.Limits(max_keepalive_connections=0),
    ) as client:
        try:
            opened = guard.open_checked(client, url, robots=None)
            if isinstance(opened, Quarantined):
                raise ApiError(f"image_url refused: {opened.detail}", param=param)
            _, response = opened
            try:
                if not 200 <= response.status_code < 300:
                    raise ApiError(f"image_url answered HTTP {response.status_code}", param=param)
                ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if not ctype.startswith("image/"):
                    raise ApiError(
                        f"image_url is not an image (content type {ctype or 'missing'!r})",
                        param=param,
                    )
                return read_limited(response, limits.max_bytes, deadline)
            finally:
                response.close()
        except TooLarge as exc:
            raise _too_large(param, limits, str(exc)) from None
        except TimeoutError:
            raise ApiError(
                f"image_url was not fetched within {limits.timeout_s} s", param=param
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ApiError(f"image_url could not be fetched ({exc})", param=param) from None


def decode_image(data: bytes, param: str, limits: ImageLimits) -> Image:
    """An RGB Pillow image from encoded bytes; its size is checked from the header before
    the pixels are decoded."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        with PILImage.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > limits.max_pixels:
                raise _too_large(
                    param, limits, f"{width}×{height} pixels", f"{limits.max_pixels} pixels"
                )
            opened.load()
            image = opened.convert("RGB")
    except ApiError:
        raise
    except PILImage.DecompressionBombError:
        raise _too_large(param, limits, "too many pixels", f"{limits.max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ApiError(f"the image could not be decoded ({exc})", param=param) from None
    return image


def to_uint8(images: Sequence[Image], size: int | None = None) -> torch.Tensor:
    """Images as one uint8 tensor (N, 3, H, W): each resized to ``size``×``size``
    (bicubic), or all of the first one's size when ``size`` is None."""
    import numpy as np
    import torch

    if not images:
        return torch.zeros((0, 3, size or 1, size or 1), dtype=torch.uint8)
    target = (size, size) if size is not None else images[0].size
    rgb = [im.convert("RGB") for im in images]
    arrays = [np.asarray(im if im.size == target else im.resize(target, resample=3)) for im in rgb]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _as_dict(value: Mapping[str, Any] | Any) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        dumped = dump()
        if isinstance(dumped, Mapping):
            return dumped
    raise ApiError(f"expected a JSON object, got {type(value).__name__}")


def _too_large(param: str, limits: ImageLimits, found: str, limit: str | None = None) -> ApiError:
    limit = limit or f"{limits.max_bytes} bytes"
    return ApiError(f"the image is too large ({found}; the limit is {limit})", status=413,
                    param=param)  # fmt: skip
