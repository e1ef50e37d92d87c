"""``/v1/chat/completions`` with OpenAI image parts, answered by a captioning model: a tiny
ViT + GPT-2 captioner trained for a moment on three images (so each image has a known
caption), registered beside the tiny text model and served on loopback."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from genloop.workspace import Workspace, registry

from .conftest import LiveServer, make_keys, running_server, serve_config, wait_for_request_row

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

STEPS = 50
CAPTIONS = ["a red square on the left", "a blue circle on the right", "a large green triangle"]


def pictures() -> torch.Tensor:
    """Three 16×16 RGB uint8 images (3, 3, 16, 16), one per caption."""
    x = torch.full((3, 3, 16, 16), 255, dtype=torch.uint8)
    x[0, 1:, :, :8] = 0  # red, left half
    x[1, :2, :, 8:] = 0  # blue, right half
    x[2, 0::2, 4:12, 4:12] = 0  # green, middle
    return x


def png(index: int, side: int = 16) -> bytes:
    """Picture ``index`` as PNG bytes, upscaled to ``side`` (the server resizes it back)."""
    image = Image.fromarray(pictures()[index].permute(1, 2, 0).numpy())
    if side != 16:
        image = image.resize((side, side), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}


def ask(*parts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    text = {"type": "text", "text": "What is in this picture?"}
    return {"model": "captioner", "messages": [{"role": "user", "content": [text, *parts]}]} | extra


def train_captioner(out: Path) -> Path:
    """A captioner that has learnt the three pictures' captions (a few seconds)."""
    from genloop.data.tokenizer import load_hf_tokenizer, train_bpe
    from genloop.models.captioning import FAMILY, pixel_values

    tok_dir = train_bpe(CAPTIONS * 20, out / "tok", vocab_size=300)
    tok = load_hf_tokenizer(tok_dir)
    torch.manual_seed(0)
    config = {
        "image_size": 16,
        "channels": 3,
        "vocab_size": len(tok),
        "n_layer": 1,
        "n_embd": 64,
        "n_head": 4,
        "patch_size": 4,
        "context_length": 24,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    model = FAMILY.build(config)
    rows = [tok(c)["input_ids"] + [tok.eos_token_id] for c in CAPTIONS]
    width = max(map(len, rows))
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    batch = {"pixel_values": pixel_values(model, pictures()), "labels": labels}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):
        loss = FAMILY.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return FAMILY.save(model.eval(), out / "model", tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_captioner(tmp_path_factory.mktemp("captioner"))


@pytest.fixture(scope="module")
def server(module_ws: Workspace, captioner_dir: Path) -> Iterator[LiveServer]:
    registry.register_model(module_ws, "captioner", "captioning", captioner_dir)
    cfg = serve_config(
        models=["tiny@production", "captioner"],
        image_inputs={"max_bytes": 4000, "max_images": 3},
    )
    with running_server(module_ws, cfg, make_keys(module_ws)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=server.url + "/v1", api_key=server.keys["client"], max_retries=0
    ) as c:
        yield c


def test_a_data_uri_image_gets_its_caption(server: LiveServer) -> None:
    with server.client(server.keys["client"]) as c:
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert models["captioner"]["kind"] == "vision" and models["captioner"]["ref"] == (
            "captioner@1"
        )
        for i, expected in enumerate(CAPTIONS):
            r = c.post("/v1/chat/completions", json=ask(image_part(data_uri(png(i, side=48)))))
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["id"].startswith("chatcmpl-") and r.headers["X-Request-Id"] == body["id"]
            assert body["object"] == "chat.completion" and body["model"] == "captioner@1"
            choice = body["choices"][0]
            assert choice["message"] == {"role": "assistant", "content": expected}
            assert choice["finish_reason"] == "stop"
            usage = body["usage"]
            assert usage["prompt_tokens"] == 17  # [CLS] + (16 / 4)² patches
            assert usage["completion_tokens"] > len(expected.split())  # words, then eos
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

        # several images: one caption each, in order, one per line
        two = ask(image_part(data_uri(png(2))), image_part(data_uri(png(0))))
        r = c.post("/v1/chat/completions", json=two)
        assert r.json()["choices"][0]["message"]["content"] == f"{CAPTIONS[2]}\n{CAPTIONS[0]}"
        assert r.json()["usage"]["prompt_tokens"] == 34

        # max_tokens bounds the caption: cut, and said so
        r = c.post("/v1/chat/completions", json=ask(image_part(data_uri(png(1))), max_tokens=2))
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 2
        assert CAPTIONS[1].startswith(body["choices"][0]["message"]["content"])


def test_the_openai_client_sends_an_image_and_streams_the_caption(
    client: openai.OpenAI,
) -> None:
    messages: Any = [
        {"role": "system", "content": "You describe pictures."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe this."},
                {"type": "image_url", "image_url": {"url": data_uri(png(1)), "detail": "low"}},
            ],
        },
    ]
    r = client.chat.completions.create(model="captioner", messages=messages, temperature=0)
    assert r.choices[0].message.content == CAPTIONS[1]
    assert r.choices[0].finish_reason == "stop" and r.usage is not None

    chunks = list(
        client.chat.completions.create(
            model="captioner",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == CAPTIONS[1]
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finished[-1] == "stop" and set(finished[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_bad_images_and_settings_are_refused_by_name(server: LiveServer) -> None:
    ok = image_part(data_uri(png(0)))
    big = data_uri(png(0, side=400) + bytes(4000))  # more than image_inputs.max_bytes
    not_png = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    cases: list[tuple[dict[str, Any], int, str | None]] = [
        (ask(image_part("https://example.com/cat.png")), 400, "messages[0].content[1]"),
        (ask(image_part("file:///etc/passwd")), 400, "messages[0].content[1]"),
        (ask(image_part(big)), 413, "messages[0].content[1]"),
        (ask(image_part("data:image/png;base64,%%%not-base64")), 400, "messages[0].content[1]"),
        (ask(image_part(not_png)), 400, "messages[0].content[1]"),
        (ask(ok, ok, ok, ok), 413, "messages[0].content[4]"),  # image_inputs.max_images
        (ask(ok) | {"model": "tiny@production"}, 400, "messages[0].content[1]"),
        (ask(), 400, "messages[0].content"),  # nothing to caption
        (ask(ok, temperature=0.7), 400, "temperature"),
        (ask(ok, n=2), 400, "n"),
        (ask(ok, stop=["."]), 400, "stop"),
        (ask(ok, logprobs=True), 400, "logprobs"),
        (ask(ok, max_tokens=100_000), 400, "max_tokens"),
    ]
    with server.client(server.keys["client"]) as c:
        for body, status, param in cases:
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == status, (param, r.text)
            error = r.json()["error"]
            assert error["param"] == param, error
            if body["model"] == "tiny@production":
                assert "does not take images" in error["message"]
        # an image in a system message, and an unknown part field: schema errors
        system = {"role": "system", "content": [ok]}
        r = c.post("/v1/chat/completions", json=ask(ok) | {"messages": [system]})
        assert r.status_code == 400 and "only user messages" in r.text
        odd = {"type": "image_url", "image_url": {"url": data_uri(png(0)), "zoom": 2}}
        assert c.post("/v1/chat/completions", json=ask(odd)).status_code == 400
        # a captioning model does not complete text
        r = c.post("/v1/completions", json={"model": "captioner", "prompt": "a red"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        # and the server is still well
        assert c.post("/v1/chat/completions", json=ask(ok)).status_code == 200


def test_feedback_links_to_the_caption_and_the_log_keeps_no_image(
    server: LiveServer, module_ws: Workspace
) -> None:
    from genloop.security.crypto import load_cipher

    uri = data_uri(png(2))
    with server.client(server.keys["client"]) as c:
        r = c.post("/v1/chat/completions", json=ask(image_part(uri)))
        response_id = r.json()["id"]
        f = c.post("/v1/feedback", json={"response_id": response_id, "rating": -1})
        assert f.status_code == 200, f.text
        assert f.json()["response_id"] == response_id
    row = wait_for_request_row(module_ws, response_id)
    assert row.endpoint == "chat.completions" and row.model_name == "captioner"
    assert row.status == 200 and row.completion_tokens == r.json()["usage"]["completion_tokens"]
    cipher = load_cipher(module_ws)
    prompt = cipher.decrypt(row.prompt_enc)
    assert json.loads(prompt) == [{"role": "user", "content": "What is in this picture?[image]"}]
    assert cipher.decrypt(row.response_enc) == CAPTIONS[2]
    payload = uri.split(",", 1)[1]
    assert payload[:40] not in prompt and payload[:40] not in json.dumps(row.params)


PNG_BYTES = png(0)


@settings(max_examples=25, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=600),
        st.integers(0, len(PNG_BYTES)).map(lambda k: PNG_BYTES[:k]),  # truncated
        st.binary(min_size=1, max_size=40).map(lambda b: PNG_BYTES[:60] + b + PNG_BYTES[60:]),
    ),
    mime=st.sampled_from(["image/png", "image/jpeg", "image/webp", "text/plain"]),
)
def test_any_bytes_get_a_caption_or_a_refusal_naming_the_part(
    server: LiveServer, data: bytes, mime: str
) -> None:
    url = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
    with server.client(server.keys["client"]) as c:
        r = c.post("/v1/chat/completions", json=ask(image_part(url)))
    assert r.status_code in (200, 400, 413), r.text
    if r.status_code != 200:
        assert r.json()["error"]["param"] == "messages[0].content[1]"


@contextlib.contextmanager
def image_host() -> Iterator[str]:
    """An HTTP server on loopback serving picture 0 as /pic.png."""
    body = png(0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/pic.png"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_remote_images_are_fetched_only_where_allowed(
    server: LiveServer, module_ws: Workspace
) -> None:
    """Through serve.image_inputs: allowed remote URLs still pass the SSRF guard (a
    loopback host is private), unless private hosts are allowed too."""
    with image_host() as url:
        for allow_private, status in ((False, 400), (True, 200)):
            images = {"allow_remote": True, "allow_private_hosts": allow_private}
            cfg = serve_config(models=["captioner"], image_inputs=images)
            with (
                running_server(module_ws, cfg, make_keys(module_ws)) as s,
                s.client(s.keys["client"]) as c,
            ):
                r = c.post("/v1/chat/completions", json=ask(image_part(url)))
                assert r.status_code == status, r.text
                if status == 200:
                    assert r.json()["choices"][0]["message"]["content"] == CAPTIONS[0]
                else:  # the SSRF guard: loopback is private
                    assert r.json()["error"]["param"] == "messages[0].content[1]"
