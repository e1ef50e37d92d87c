"""``genloop train`` as a user runs it: output, exit codes, and SIGKILL then ``--resume``.

The fixture dataset is prepared once for the module; every run trains a 2-layer, 32-wide
model with attention dropout on it, on one thread, so that separate processes compute bit
for bit the same. The killed run and its resumption are real subprocesses; the other
commands run ``genloop``'s entry point in this process (argv, exit code, stdout and
stderr as a user sees them), which spares importing torch and transformers each time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file
from sqlalchemy import select

from genloop.train import checkpoint as ckpt
from genloop.workspace import Workspace, init_workspace, registry
from genloop.workspace.tables import Run, RunMetric

from ..conftest import CliResult, run_genloop, write_corpus

# one torch thread in this process, as OMP_NUM_THREADS=1 (genloop_env) gives the subprocesses
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

STEPS, KILL_AT = 24, 8


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """A workspace holding the prepared fixture dataset ``fx``."""
    from genloop.config import DataConfig, TokenizerConfig
    from genloop.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("train_cmd")
    workspace = init_workspace(root / "ws")
    data = DataConfig.model_validate(
        {
            "name": "fx",
            "sources": [{"type": "files", "paths": [str(write_corpus(root / "corpus"))]}],
            "split": {"val": 0.1, "test": 0.05},
            "workers": 1,
        }
    )
    prepare_dataset(workspace, data, TokenizerConfig(vocab_size=320, seq_len=32))
    yield workspace
    workspace.close()


def write_config(ws: Workspace, name: str, **train: Any) -> Path:
    spec = {
        "name": name,
        "tokenizer": {"vocab_size": 320, "seq_len": 32},
        "model": {"preset": "tiny", "n_layer": 2, "n_embd": 32, "n_head": 2, "dropout": 0.1},
        "train": {
            "dataset": "fx",
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 3,
            "max_steps": STEPS,
            "batch_size": 8,
            "eval_every": KILL_AT,
            "eval_batches": 2,
            "checkpoint_every": KILL_AT,
            "device": "cpu",
            **train,
        },
    }
    path = ws.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def genloop_env(ws: Workspace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GENLOOP_DATABASE_URL"}
    # one thread: fastest for a tiny model, and the same arithmetic in every process
    return env | {"GENLOOP_HOME": str(ws.root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def subprocess_genloop(ws: Workspace, *args: str | Path) -> CliResult:
    proc = subprocess.run(
        [sys.executable, "-m", "genloop", *map(str, args)],
        env=genloop_env(ws),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def succeeded(ran: CliResult) -> dict[str, Any]:
    assert ran.returncode == 0, ran.stderr
    out: dict[str, Any] = json.loads(ran.stdout)  # --json: nothing but the JSON
    return out


def one_error_line(ran: CliResult, *, alone: bool = True) -> str:
    """A user error: one line (``alone``: and nothing else, no warning) on stderr."""
    assert "Traceback" not in ran.stderr, ran.stderr
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, ran.stderr
    assert not alone or ran.stderr.strip() == errors[0], ran.stderr
    return errors[0]


def loss_series(ws: Workspace, run_id: str) -> list[tuple[int, float]]:
    with ws.catalog.session() as s:
        rows = s.execute(
            select(RunMetric.step, RunMetric.value)
            .where(RunMetric.run_id == run_id, RunMetric.key == "loss")
            .order_by(RunMetric.id)
        ).all()
    return [(int(step), float(value)) for step, value in rows]


def run_row(ws: Workspace, *, run_id: str | None = None, name: str | None = None) -> Run | None:
    with ws.catalog.session() as s:
        query = select(Run).where(Run.id == run_id if run_id else Run.name == name)
        row = s.scalars(query).first()
        if row is not None:
            s.expunge(row)
        return row


def weights(ws: Workspace, ref: str) -> dict[str, Any]:
    path = ws.store.open_verified(registry.resolve(ws, ref).artifact)
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def baseline(ws: Workspace) -> dict[str, Any]:
    """``genloop train base.yaml --json``: STEPS uninterrupted steps."""
    return succeeded(run_genloop(ws, "train", write_config(ws, "base"), "--json"))


def test_json_output(ws: Workspace, baseline: dict[str, Any]) -> None:
    assert set(baseline) == {"run_id", "steps", "metrics", "stopped_early", "model"}
    assert baseline["steps"] == STEPS and baseline["stopped_early"] is False
    assert baseline["model"] == "base@1"
    assert {"loss", "val_loss", "tokens_per_s", "val_ppl"} <= set(baseline["metrics"])
    run = run_row(ws, run_id=baseline["run_id"])
    assert run is not None and run.status == "completed"
    assert registry.resolve(ws, "base@1").run_id == baseline["run_id"]


def test_sigkill_then_resume_gives_the_same_weights_and_losses(
    ws: Workspace, baseline: dict[str, Any]
) -> None:
    config = write_config(ws, "killed")
    proc = subprocess.Popen(
        [sys.executable, "-m", "genloop", "train", str(config), "--json"],
        env=genloop_env(ws),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        marker = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            run = run_row(ws, name="killed")
            if run is not None and marker is None:
                marker = ws.store.path(ckpt.checkpoint_key(run.id, KILL_AT)) / "MANIFEST.sha256"
            if marker is not None and marker.exists():
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed = run_row(ws, name="killed")
    assert killed is not None and killed.status == "running"  # nobody could say otherwise
    done = [step for step, _ in ckpt.list_checkpoints(ws.store, killed.id)]
    assert done == [KILL_AT], "the kill came too late to test anything"

    resumed = succeeded(subprocess_genloop(ws, "train", config, "--resume", "--json"))
    assert resumed["run_id"] == killed.id and resumed["steps"] == STEPS
    assert resumed["model"] == "killed@1"

    expected, got = weights(ws, baseline["model"]), weights(ws, resumed["model"])
    assert expected.keys() == got.keys()
    different = [k for k in expected if not (expected[k] == got[k]).all()]
    assert not different, f"weights differ after resume: {different}"
    expected_losses = loss_series(ws, baseline["run_id"])
    assert [step for step, _ in expected_losses] == list(range(1, STEPS + 1))
    assert loss_series(ws, killed.id) == expected_losses  # each step once, the same values
    assert resumed["metrics"]["loss"] == baseline["metrics"]["loss"]
    assert resumed["metrics"]["val_loss"] == baseline["metrics"]["val_loss"]
    run = run_row(ws, run_id=killed.id)
    assert run is not None and run.status == "completed" and run.error is None


def test_divergence_exits_1_with_one_line_and_keeps_the_last_good_checkpoint(ws: Workspace) -> None:
    config = write_config(
        ws, "absurd", lr=1e6, min_lr=0, grad_clip=None, warmup_steps=0, checkpoint_every=1
    )
    ran = run_genloop(ws, "train", config)
    assert ran.returncode == 1
    line = one_error_line(ran)
    assert " at step " in line and "train.lr" in line
    run = run_row(ws, name="absurd")
    assert run is not None and run.status == "failed"
    assert run.error is not None and "at step" in run.error
    found = ckpt.load_latest(ws.store, run.id)  # verified against its manifest
    assert found is not None and found.step >= 1
    assert registry.list_models(ws, "absurd") == []

    # damaged checkpoints are refused by --resume with a clear error, not a silent restart
    for _, key in ckpt.list_checkpoints(ws.store, run.id):
        weights_file = ws.store.path(key) / "model.safetensors"
        weights_file.write_bytes(weights_file.read_bytes()[:-8])
    ran = run_genloop(ws, "train", config, "--resume")
    assert ran.returncode == 1
    assert "none of them verifies" in one_error_line(ran, alone=False)  # + one warning each


def test_a_bad_config_exits_2(ws: Workspace) -> None:
    config = ws.root / "bad.yaml"
    config.write_text("train:\n  lr: -1\n", encoding="utf-8")
    ran = run_genloop(ws, "train", config)
    assert ran.returncode == 2
    assert "train.lr" in one_error_line(ran)


def test_resume_with_nothing_to_resume_exits_1(ws: Workspace) -> None:
    ran = run_genloop(ws, "train", write_config(ws, "nothing"), "--resume")
    assert ran.returncode == 1
    assert "no unfinished training run of 'nothing'" in one_error_line(ran)
    assert run_row(ws, name="nothing") is None
    ran = run_genloop(ws, "train", write_config(ws, "nothing"), "--resume", "--run", "f" * 32)
    assert ran.returncode == 1
    assert "no run 'ffffffffffffffffffffffffffffffff' to resume" in one_error_line(ran)
