"""Fixtures for the HTTP server tests: a tiny causal LM registered in a workspace, API keys,
and live servers on loopback (uvicorn in a thread, port 0).

The model is random weights from a 2-layer, 32-wide Llama with a byte-level BPE tokenizer
(320 tokens, the default chat template), so loading and decoding take milliseconds. Two
versions with different seeds give different outputs, which the hot-swap tests rely on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from genloop.config import GenloopConfig, parse_config
from genloop.workspace import Workspace, init_workspace

CORPUS = [
    "The cat sat on the mat. The dog ran in the park. A bird sang in the tree.\n",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Rain fell on the quiet town, and the river rose slowly through the night.\n",
    "Hello there! How are you today? I am fine, thank you very much.\n",
] * 10


def build_model(out: Path, tokenizer_dir: Path, seed: int, context_length: int = 1024) -> Path:
    import torch

    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.family import get_family
    from genloop.models.pretrained import save_hf_dir

    tok = load_hf_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    model = get_family("causal_lm").build(
        {
            "preset": "tiny",
            "vocab_size": len(tok),
            "n_layer": 2,
            "n_embd": 32,
            "n_head": 2,
            "context_length": context_length,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
    )
    return save_hf_dir(model, out, family="causal_lm", tokenizer_dir=tokenizer_dir)


def build_wide_llama(
    out: Path, tokenizer_dir: Path, *, seed: int = 3, std: float = 0.15, **overrides: Any
) -> Path:
    """A tiny grouped-query Llama on the tokenizer in ``tokenizer_dir``, saved at ``out``: 2
    layers, 64 wide, 4 query heads sharing 2 key/value heads, plus ``overrides``. Its weights
    are drawn wide (``std``, 0.15 at 64 wide; ``seed``) so that greedy text varies from token
    to token (a default random init mostly repeats the prompt's last token, which would make
    exactness tests weak)."""
    import torch

    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.family import get_family
    from genloop.models.pretrained import save_hf_dir

    tok = load_hf_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    model = get_family("causal_lm").build(
        {
            "preset": "tiny",
            "vocab_size": len(tok),
            "n_layer": 2,
            "n_embd": 64,
            "n_head": 4,
            "n_kv_head": 2,
            "context_length": 128,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
        | overrides
    )
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, std)
    return save_hf_dir(model, out, family="causal_lm", tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny causal LMs (seeds 0 and 1) sharing one tokenizer."""
    from genloop.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("models")
    tok = train_bpe(CORPUS, root / "tok", vocab_size=320, min_frequency=1)
    return build_model(root / "a", tok, seed=0), build_model(root / "b", tok, seed=1)


def make_workspace(root: Path, model_dirs: tuple[Path, Path]) -> Workspace:
    """A workspace with tiny@1 and tiny@2, and tiny@production → 1."""
    from genloop.workspace import registry

    ws = init_workspace(root)
    registry.register_model(ws, "tiny", "causal_lm", model_dirs[0])
    registry.register_model(ws, "tiny", "causal_lm", model_dirs[1])
    registry.promote(ws, "tiny@1", "production")
    return ws


@pytest.fixture
def served_ws(tmp_path: Path, model_dirs: tuple[Path, Path]) -> Iterator[Workspace]:
    ws = make_workspace(tmp_path / "ws", model_dirs)
    yield ws
    ws.close()


def make_keys(ws: Workspace) -> dict[str, str]:
    """One key per scope set: admin, generate, feedback, generate+feedback."""
    from genloop.security.keys import create_key

    return {
        name: create_key(ws.catalog, name=name, scopes=scopes).plaintext
        for name, scopes in {
            "admin": ["admin"],
            "generate": ["generate"],
            "feedback": ["feedback"],
            "client": ["generate", "feedback"],
        }.items()
    }


def serve_config(**serve: Any) -> GenloopConfig:
    """A config serving tiny@production with test-friendly defaults, plus ``serve`` keys."""
    data: dict[str, Any] = {
        "serve": {"models": ["tiny@production"], "port": 0, "device": "cpu"} | serve,
        # a random model repeats itself: don't let the repetition guard cut streams short
        "security": {"guardrails": {"max_repetition": None}},
    }
    return parse_config(data)


def wait_for_request_row(ws: Workspace, request_id: str, timeout: float = 10.0) -> Any:
    """The ``requests`` row of a response (written off the event loop, a moment later)."""
    from genloop.workspace.tables import RequestLog

    deadline = time.monotonic() + timeout
    while True:
        with ws.catalog.session() as s:
            row = s.get(RequestLog, request_id)
        if row is not None:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"no request row {request_id}")
        time.sleep(0.05)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class LiveServer:
    """``create_app`` under uvicorn on 127.0.0.1 (a free port), in a background thread."""

    def __init__(self, app: Any, cfg: GenloopConfig, keys: dict[str, str]) -> None:
        self.app = app
        self.cfg = cfg
        self.keys = keys
        self.url = ""

    @property
    def state(self) -> Any:
        return self.app.state.server

    def __enter__(self) -> LiveServer:
        import uvicorn

        from genloop.cli.serve import uvicorn_config

        config = uvicorn_config(self.app, self.cfg.serve.model_copy(update={"host": "127.0.0.1"}))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        scheme = "https" if self.cfg.serve.ssl_certfile else "http"
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, verify=False) as c:
            while True:
                r = c.get("/ready")
                if r.status_code == 200:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready: {r.text}")
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def client(self, key: str | None = None, **kw: Any) -> httpx.Client:
        headers = auth(key) if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kw)


@contextmanager
def running_server(
    ws: Workspace, cfg: GenloopConfig, keys: dict[str, str], **create_app_kwargs: Any
) -> Iterator[LiveServer]:
    """``create_app(ws, cfg)`` served on loopback until the block ends; ready on entry."""
    from genloop.serve.app import create_app

    server = LiveServer(create_app(ws, cfg, **create_app_kwargs), cfg, keys)
    with server:
        yield server


@pytest.fixture
def live_server(served_ws: Workspace) -> Iterator[Callable[..., LiveServer]]:
    """A factory: ``live_server(cfg, **create_app_kwargs)`` → a started LiveServer
    (stopped when the test ends)."""
    keys = make_keys(served_ws)
    with ExitStack() as stack:

        def start(cfg: GenloopConfig | None = None, **kwargs: Any) -> LiveServer:
            return stack.enter_context(
                running_server(served_ws, cfg or serve_config(), keys, **kwargs)
            )

        yield start


@pytest.fixture(scope="module")
def module_ws(
    tmp_path_factory: pytest.TempPathFactory, model_dirs: tuple[Path, Path]
) -> Iterator[Workspace]:
    """One workspace for a whole test module (with tiny@1, tiny@2)."""
    ws = make_workspace(tmp_path_factory.mktemp("ws"), model_dirs)
    yield ws
    ws.close()


def tiny_text_to_image(tmp: Path) -> Path:
    """A random Stable-Diffusion-style pipeline (32×32 RGB, a 16-position text encoder)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from genloop.data.tokenizer import load_hf_tokenizer, train_bpe
    from genloop.models.family import get_family
    from genloop.models.text_to_image import build_text_to_image

    torch.manual_seed(0)
    ae = get_family("autoencoder_kl").build({"image_size": 32, "channels": 3, "base_channels": 8})
    captions = [f"a {c} {s} on the left" for c in ("red", "blue") for s in ("circle", "square")]
    tokenizer = load_hf_tokenizer(train_bpe(captions * 8, tmp / "tok", vocab_size=300))
    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    ).eval()
    model = build_text_to_image(
        {"base_channels": 32, "timesteps": 100, "sample_steps": 2},
        ae.vae,  # type: ignore[attr-defined]
        encoder,
        tokenizer,
    )
    return Path(get_family("text_to_image").save(model, tmp / "pipe"))
