"""OpenAI image content parts: data URIs decoded with real Pillow images and real base64,
bounded sizes (413), remote URLs refused unless allowed and then fetched through the SSRF
guard, undecodable images named by their part (400)."""

from __future__ import annotations

import base64
import contextlib
import io
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from genloop.serve.api.image_parts import ImageLimits, parse_messages, to_uint8
from genloop.serve.errors import ApiError


def encoded(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_part(url: str) -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}


def refused(messages: list[dict[str, object]], limits: ImageLimits | None = None) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_messages(messages, limits)
    return info.value


RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)  # (H, W, 3)


def test_text_and_image_parts_become_text_and_decoded_images() -> None:
    messages = [
        {"role": "system", "content": "You describe pictures."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is "},
                image_part(data_uri(encoded(PIXELS))),
                {"type": "text", "text": "in this picture?"},
                image_part(data_uri(encoded(PIXELS[:, :, 0]), "IMAGE/PNG")),  # grey
            ],
        },
    ]
    system, user = parse_messages(messages)
    assert (system.role, system.text, system.images) == ("system", "You describe pictures.", [])
    assert user.text == "What is in this picture?" and len(user.images) == 2
    assert user.images[0].mode == "RGB" and user.images[0].size == (20, 12)
    assert np.array_equal(np.asarray(user.images[0]), PIXELS)  # PNG is lossless
    grey = np.asarray(user.images[1])
    assert grey.shape == (12, 20, 3) and np.array_equal(grey[..., 1], PIXELS[:, :, 0])
    tensor = to_uint8(user.images)
    assert tensor.shape == (2, 3, 12, 20) and tensor.dtype == torch.uint8
    assert torch.equal(tensor[0], torch.from_numpy(PIXELS).permute(2, 0, 1))
    assert to_uint8(user.images, size=8).shape == (2, 3, 8, 8)


def test_a_jpeg_decodes_and_pydantic_messages_are_read_too() -> None:
    from pydantic import BaseModel

    class Message(BaseModel):
        role: str
        content: list[dict[str, object]]

    flat = np.full((16, 16, 3), 200, dtype=np.uint8)
    (msg,) = parse_messages(
        [Message(role="user", content=[image_part(data_uri(encoded(flat, "JPEG"), "image/jpeg"))])]
    )
    assert np.abs(np.asarray(msg.images[0]).astype(int) - 200).max() <= 2


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://example.com/cat.png", "must be a data: URI"),
        ("file:///etc/passwd", "remote URLs \\(scheme 'file'\\) are not allowed"),
        ("data:text/plain;base64,aGVsbG8=", "image/\\* media type, not 'text/plain'"),
        ("data:image/png,rawbytes", "must be base64-encoded"),
        ("data:image/png;base64,@@not base64@@", "not valid base64"),
        ("data:nonsense", "not a valid data: URI"),
    ],
)
def test_urls_that_are_not_base64_image_data_uris_are_400(url: str, message: str) -> None:
    err = refused([{"role": "user", "content": [{"type": "text", "text": "hi"}, image_part(url)]}])
    assert err.http_status == 400 and err.param == "messages[0].content[1]"
    assert re.search(message, err.message)


def test_undecodable_images_are_400_naming_the_part() -> None:
    good = image_part(data_uri(encoded(PIXELS)))
    bad = image_part(data_uri(b"GIF89a but not really an image"))
    err = refused(
        [{"role": "user", "content": "hi"}, {"role": "user", "content": [good, good, bad]}]
    )
    assert err.http_status == 400 and err.param == "messages[1].content[2]"
    assert "could not be decoded" in err.message
    truncated = image_part(data_uri(encoded(PIXELS)[:60]))
    assert refused([{"role": "user", "content": [truncated]}]).http_status == 400


def test_oversized_images_are_413() -> None:
    png = encoded(PIXELS)
    small = ImageLimits(max_bytes=len(png) - 1)
    err = refused([{"role": "user", "content": [image_part(data_uri(png))]}], small)
    assert err.http_status == 413 and err.param == "messages[0].content[0]"
    assert "too large" in err.message
    assert parse_messages(  # exactly at the limit is fine
        [{"role": "user", "content": [image_part(data_uri(png))]}], ImageLimits(max_bytes=len(png))
    )[0].images
    # a tiny file that decodes to many pixels: refused from its header
    blank = encoded(np.zeros((300, 300, 3), dtype=np.uint8))
    err = refused(
        [{"role": "user", "content": [image_part(data_uri(blank))]}],
        ImageLimits(max_pixels=200 * 200),
    )
    assert err.http_status == 413 and "300×300 pixels" in err.message
    # too many images in one request
    two = [image_part(data_uri(png))] * 2
    err = refused(
        [{"role": "user", "content": two}, {"role": "user", "content": two}],
        ImageLimits(max_images=3),
    )
    assert err.http_status == 413 and err.param == "messages[1].content"


def test_other_part_types_and_malformed_parts_are_400() -> None:
    err = refused([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}])
    assert err.http_status == 400 and "'input_audio' is not supported" in err.message
    err = refused([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])
    assert err.param == "messages[0].content[0]" and "image_url.url" in err.message


# ----------------------------------------------------------------------- remote images


@pytest.fixture
def server() -> Iterator[str]:
    png = encoded(PIXELS)
    routes: dict[str, tuple[int, str, bytes]] = {
        "/cat.png": (200, "image/png", png),
        "/page.html": (200, "text/html", b"<p>not an image</p>"),
        "/big.png": (200, "image/png", png + b"\0" * 4096),
        "/gone.png": (404, "text/plain", b"no"),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, ctype, body = routes.get(self.path, (404, "text/plain", b"no"))
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_remote_urls_go_through_the_ssrf_guard_when_allowed(server: str) -> None:
    def message(path: str) -> list[dict[str, object]]:
        return [{"role": "user", "content": [image_part(server + path)]}]

    # remote fetching off (the default): refused before any connection
    assert refused(message("/cat.png")).http_status == 400
    # on, but the guard refuses the loopback address
    err = refused(message("/cat.png"), ImageLimits(allow_remote=True))
    assert err.http_status == 400 and "not a public address" in err.message
    # on, for a private server: fetched and decoded
    own = ImageLimits(allow_remote=True, allow_private=True, max_bytes=len(encoded(PIXELS)) + 100)
    (msg,) = parse_messages(message("/cat.png"), own)
    assert np.array_equal(np.asarray(msg.images[0]), PIXELS)
    assert "not an image (content type 'text/html')" in refused(message("/page.html"), own).message
    assert "HTTP 404" in refused(message("/gone.png"), own).message
    assert refused(message("/big.png"), own).http_status == 413
