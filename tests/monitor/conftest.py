"""Monitoring fixtures: the real cipher, a loopback webhook receiver, a trained tiny model."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from genloop.workspace import Workspace, init_workspace

PROSE = (
    "the cat sat on the mat and the dog ran to the park while birds sang in the tall green "
    "trees near a quiet river where children play every sunny day"
)
WORDS = PROSE.split()


def prose(rng: random.Random, words: int) -> str:
    """A sentence in the style of the training corpus."""
    start = rng.randrange(len(WORDS) - 6)
    out: list[str] = []
    while len(out) < words:
        out += WORDS[start : start + 6]
        start = rng.randrange(len(WORDS) - 6)
    return " ".join(out[:words]) + "."


def write_corpus(root: Path, docs: int = 40) -> Path:
    root.mkdir(parents=True)
    for i in range(docs):
        rng = random.Random(i)
        text = " ".join(prose(rng, 6) for _ in range(8))
        (root / f"doc{i:02d}.txt").write_text(f"{text} doc {i}.\n", encoding="utf-8")
    return root


@pytest.fixture
def cipher(workspace: Workspace) -> Any:
    """The workspace's real cipher (``genloop.security.crypto``)."""
    from genloop.security.crypto import load_cipher

    return load_cipher(workspace)


class Receiver:
    """A real HTTP server on 127.0.0.1 that records the JSON bodies POSTed to it."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.raw: list[bytes] = []  # the bodies as sent (signatures cover these bytes)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                receiver.raw.append(raw)
                receiver.headers.append(dict(self.headers))
                receiver.bodies.append(json.loads(raw))  # last: wait() counts these
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, n: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The bodies received, once there are ``n`` (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while len(self.bodies) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.bodies

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Workspace, str]]:
    """A workspace with the fixture dataset ``fx`` and ``tiny@1`` trained on it (10 steps).

    Shared by the tests that need a real tokenizer, training data and a causal LM; each
    of them uses its own served-model name for traffic, so they do not see each other.
    """
    from genloop.config import DataConfig, GenloopConfig, TokenizerConfig
    from genloop.data.prepare import prepare_dataset
    from genloop.train.loop import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("monitor")
    ws = init_workspace(root / "ws")
    data = DataConfig.model_validate(
        {
            "name": "fx",
            "sources": [{"type": "files", "paths": [str(write_corpus(root / "corpus"))]}],
            "split": {"val": 0.1, "test": 0.1},
            "workers": 1,
        }
    )
    prepare_dataset(ws, data, TokenizerConfig(vocab_size=320, seq_len=32))
    cfg = GenloopConfig.model_validate(
        {
            "name": "tiny",
            "tokenizer": {"vocab_size": 320, "seq_len": 32},
            "model": {"preset": "tiny", "n_layer": 2, "n_embd": 32, "n_head": 2},
            "train": {
                "dataset": "fx",
                "lr": 3e-3,
                "max_steps": 10,
                "warmup_steps": 2,
                "batch_size": 8,
                "eval_every": 5,
                "eval_batches": 1,
                "checkpoint_every": 10,
                "device": "cpu",
            },
        }
    )
    result = train(ws, cfg)
    assert result.model is not None
    try:
        yield ws, result.model.ref
    finally:
        ws.close()
        torch.set_num_threads(threads)
