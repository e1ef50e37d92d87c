"""``genloop generate MODEL --embed --input docs.jsonl``: rows written with their embedding,
equal to what ``Embedder.embed`` computes, and clear errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from genloop.models.embeddings import Embedder, load_embedder
from genloop.workspace import Workspace, init_workspace, registry

from ..conftest import CliResult, run_genloop
from ..serve.conftest import build_model
from ..tiny_encoders import build_bert, encoder_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]
DOCS = [
    {"id": 1, "text": "which cat"},
    {"id": 2, "text": "a spoon here", "lang": "en"},
    {"id": 3, "text": "the dog ran"},
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """``enc@1``: a tiny BERT (masked_lm, 16 positions); ``lm@1`` a model that can't embed."""
    root = tmp_path_factory.mktemp("embed_cmd")
    tok = encoder_tokenizer(root / "tok")
    workspace = init_workspace(root / "ws")
    registry.register_model(workspace, "enc", "masked_lm", build_bert(root / "b", tok, context=16))
    registry.register_model(workspace, "lm", "causal_lm", build_model(root / "c", tok, seed=0))
    yield workspace
    workspace.close()


@pytest.fixture(scope="module")
def embedder(ws: Workspace) -> Embedder:
    return load_embedder(registry.artifact_path(ws, "enc"))


def write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def error_line(ran: CliResult) -> str:
    assert ran.returncode != 0 and "Traceback" not in ran.stderr, ran.stderr
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, ran.stderr
    return errors[0]


def test_rows_come_back_with_their_embedding(
    ws: Workspace, embedder: Embedder, tmp_path: Path
) -> None:
    docs = write(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "out.jsonl"
    ran = run_genloop(ws, "generate", "enc", "--embed", "-i", docs, "-o", out, "--json")
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout)
    assert summary["rows"] == 3 and summary["dimensions"] == 32
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "embedding"} for r in rows] == DOCS
    got = np.array([r["embedding"] for r in rows], dtype=np.float32)
    assert np.allclose(got, embedder.embed([d["text"] for d in DOCS]), atol=1e-5)
    assert not (tmp_path / "out.jsonl.part").exists()

    other = write(tmp_path / "other.jsonl", [{"body": d["text"]} for d in DOCS])
    ran = run_genloop(
        ws, "generate", "enc", "--embed", "-i", other, "--field", "body", "--dimensions", "4"
    )
    assert ran.returncode == 0, ran.stderr
    streamed = [json.loads(line) for line in ran.stdout.splitlines()]  # no --output: stdout
    want = embedder.embed([d["text"] for d in DOCS], dimensions=4)
    assert np.allclose([r["embedding"] for r in streamed], want, atol=1e-5)
    assert "3 rows embedded (4 dimensions) to stdout" in ran.stderr


def test_bad_models_rows_and_options_get_one_clear_line(ws: Workspace, tmp_path: Path) -> None:
    docs = write(tmp_path / "docs.jsonl", DOCS)
    line = error_line(run_genloop(ws, "generate", "lm", "--embed", "-i", docs))
    assert "causal_lm model, which cannot embed" in line and "masked_lm" in line
    missing = write(tmp_path / "missing.jsonl", [DOCS[0], {"id": 9, "body": "x"}])
    out = tmp_path / "out.jsonl"
    line = error_line(run_genloop(ws, "generate", "enc", "--embed", "-i", missing, "-o", out))
    assert "missing.jsonl:2" in line and '"text"' in line and "--field" in line
    assert not out.exists() and not (tmp_path / "out.jsonl.part").exists()
    long = write(tmp_path / "long.jsonl", [{"text": "the dog ran to the park " * 6}])
    line = error_line(run_genloop(ws, "generate", "enc", "--embed", "-i", long))
    assert "long.jsonl:1" in line and "at most 16" in line and "--truncate" in line
    cut = run_genloop(ws, "generate", "enc", "--embed", "-i", long, "--truncate")
    assert cut.returncode == 0 and len(json.loads(cut.stdout)["embedding"]) == 32
    lone = tmp_path / "lone.jsonl"
    lone.write_text('{"text": "owl"}\n{"text": "\\ud800"}\n')
    line = error_line(run_genloop(ws, "generate", "enc", "--embed", "-i", lone))
    assert "lone.jsonl:2: the text is not valid Unicode" in line
    line = error_line(run_genloop(ws, "generate", "enc", "--embed", "-p", "owl"))
    assert "--embed reads --input" in line
    line = error_line(
        run_genloop(ws, "generate", "enc", "--embed", "-i", docs, "--dimensions", "64")
    )
    assert "dimensions is 64" in line and "32" in line
    line = error_line(run_genloop(ws, "generate", "enc", "-p", "owl", "--dimensions", "4"))
    assert "go with --embed" in line
    line = error_line(run_genloop(ws, "generate", "enc", "-p", "owl"))
    assert "embedding model (masked_lm)" in line and "--embed --input" in line
