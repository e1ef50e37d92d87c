"""One workspace for the feedback tests: a prepared corpus and a tiny trained model.

The corpus is short question/answer documents; one family of them ("what colour is the
sky over CITY?") always has the wrong answer "green", the systematic mistake users
correct. The model (2 layers, 32 wide) is trained once; each test registers a copy of it
under its own name and promotes it, so tests never see each other's feedback, versions
or leases. Requests are written to the catalog as the server writes them: text
encrypted with the workspace's key.
"""

from __future__ import annotations

import functools
import itertools
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from genloop.config import GenloopConfig
from genloop.security.crypto import Cipher, load_cipher
from genloop.workspace import Workspace, init_workspace, registry
from genloop.workspace.registry import ModelVersionInfo
from genloop.workspace.tables import RequestLog

from ..conftest import CliResult, run_genloop, torch_on_one_thread

CITIES = ["paris", "rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito", "dakar", "seoul"]
FACTS = [
    ("what do cows drink", "water"),
    ("what do cats chase", "mice"),
    ("what do birds build", "nests"),
    ("what do bees make", "honey"),
]
DATASET = "qa"


def sky_prompt(city: str) -> str:
    return f"Q: what colour is the sky over {city}? A:"


def write_corpus(root: Path, docs: int = 60) -> Path:
    root.mkdir(parents=True)
    for i in range(docs):
        rng = random.Random(i)
        lines = []
        for _ in range(6):
            if rng.random() < 0.4:
                lines.append(f"{sky_prompt(rng.choice(CITIES))} green.")
            else:
                q, a = rng.choice(FACTS)
                lines.append(f"Q: {q}? A: {a}.")
        (root / f"doc{i:02d}.txt").write_text(" ".join(lines) + f" doc {i}.\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread (see ``one_torch_thread``) from the first feedback test on: session
    scope, since the session-scoped ``ws`` below trains the model."""
    with torch_on_one_thread():
        yield


@pytest.fixture(scope="session")
def fb_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("feedback")


@pytest.fixture(scope="session")
def ws(fb_root: Path) -> Iterator[Workspace]:
    """The workspace with the prepared corpus ``qa`` and the trained model ``base``."""
    from genloop.config import DataConfig, TokenizerConfig
    from genloop.data.prepare import prepare_dataset
    from genloop.train.loop import train

    workspace = init_workspace(fb_root / "ws")
    data = DataConfig.model_validate(
        {
            "name": DATASET,
            "sources": [{"type": "files", "paths": [str(write_corpus(fb_root / "corpus"))]}],
            "split": {"val": 0.1, "test": 0.15},
            "dedup": {"near": False},
            "workers": 1,
        }
    )
    prepare_dataset(workspace, data, TokenizerConfig(vocab_size=320, seq_len=32))
    cfg = GenloopConfig.model_validate(
        {
            "name": "base",
            "tokenizer": {"vocab_size": 320, "seq_len": 32},
            "model": {"preset": "tiny", "n_layer": 2, "n_embd": 32, "n_head": 2},
            "train": {
                "dataset": DATASET,
                "lr": 3e-3,
                "min_lr": 3e-4,
                "warmup_steps": 3,
                "max_steps": 40,
                "batch_size": 8,
                "eval_every": 40,
                "eval_batches": 1,
                "checkpoint_every": 40,
                "device": "cpu",
            },
        }
    )
    train(workspace, cfg)
    yield workspace
    workspace.close()


@pytest.fixture(scope="session")
def cipher(ws: Workspace) -> Cipher:
    return load_cipher(ws)


_names = itertools.count()


def production_model(ws: Workspace, prefix: str = "m") -> ModelVersionInfo:
    """A copy of the trained ``base`` under a new name, promoted to production."""
    base = registry.resolve(ws, "base@1")
    name = f"{prefix}{next(_names)}"
    info = registry.register_model(
        ws,
        name,
        "causal_lm",
        ws.store.open_verified(base.artifact),
        dataset_version_id=base.dataset_version_id,
        config=base.config,
    )
    return registry.promote(ws, info.ref, "production")


def log_request(
    ws: Workspace,
    cipher: Cipher,
    model: ModelVersionInfo,
    prompt: str | list[dict[str, str]],
    response: str,
    *,
    user_id: str | None = None,
    api_key_id: int | None = None,
) -> str:
    """A served request as the server logs it; returns its id (the response id)."""
    import json

    chat = not isinstance(prompt, str)
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    text = json.dumps(prompt) if chat else prompt
    with ws.catalog.session() as s:
        s.add(
            RequestLog(
                id=request_id,
                api_key_id=api_key_id,
                user_id=user_id,
                endpoint="chat.completions" if chat else "completions",
                model_name=model.name,
                model_version=model.version,
                prompt_enc=cipher.encrypt(str(text)),
                response_enc=cipher.encrypt(response),
                params={},
                prompt_tokens=3,
                completion_tokens=2,
            )
        )
    return request_id


def retrain_config(**overrides: Any) -> GenloopConfig:
    """A fast retrain: LoRA, 10 steps, perplexity on 16 test windows, a loose gate."""
    spec: dict[str, Any] = {
        "tokenizer": {"vocab_size": 320, "seq_len": 32},
        "train": {"device": "cpu", "seed": 0},
        "eval": {"suites": ["perplexity"], "max_samples": 16},
        "gate": {"rules": [{"metric": "perplexity", "op": "max_increase_pct", "value": 50}]},
        "feedback": {
            "min_items": 3,
            "per_user_cap": 20,
            "replay_ratio": 0.5,
            "retrain": {
                "method": "lora",
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "lr": 3e-3,
                "max_steps": 10,
                "batch_size": 4,
            },
        },
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            spec.setdefault(section, {})[field] = value
        else:
            spec[section] = value
    return GenloopConfig.model_validate(spec)


# Helpers as fixtures (test modules cannot import this file under importlib mode).


@pytest.fixture
def new_model(ws: Workspace) -> Any:
    return lambda prefix="m": production_model(ws, prefix)


@pytest.fixture
def log(ws: Workspace, cipher: Cipher) -> Any:
    def _log(model: ModelVersionInfo, prompt: Any, response: str, **kw: Any) -> str:
        return log_request(ws, cipher, model, prompt, response, **kw)

    return _log


@pytest.fixture
def config() -> Any:
    return retrain_config


@pytest.fixture
def yaml_config(tmp_path: Path) -> Any:
    return lambda cfg, name="retrain.yaml": write_config(tmp_path / name, cfg)


@pytest.fixture
def cli(ws: Workspace) -> Callable[..., CliResult]:
    """``genloop ARGS...`` on ``ws``, through its console entry point, in this process."""
    return functools.partial(run_genloop, ws)


def write_config(path: Path, cfg: GenloopConfig) -> Path:
    """``cfg`` as a YAML file (only the keys it sets)."""
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
    return path
