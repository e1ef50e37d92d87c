"""Training under torchrun, on CPU with gloo: two ranks match one process, only rank 0
writes, a dead rank stops the job, and resume works (here across DDP → FSDP2).

One module-scoped scenario keeps the file fast (each torchrun start imports torch twice):

- ``ref``: one process, batch 2B, 6 steps (in this process);
- phase A: ``torchrun`` 2 × DDP, batch B per rank; rank 1 refuses every catalog or
  artifact write and SIGKILLs itself right after the step-3 checkpoint;
- phase B: ``torchrun -m genloop train --resume`` 2 × FSDP2 continues to step 6 (reading
  DDP's whole checkpoint; its own are sharded: ``test_fsdp.py`` covers those).

The two ranks' B windows of a step are exactly the single process's 2B windows
(``TokenDataset.batches`` splits each step's positions by rank) and DDP/FSDP average the
gradients, so with dropout off the losses agree up to float summation order.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from genloop.config import DataConfig, GenloopConfig, TokenizerConfig
from genloop.train import distributed

TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS, B = 6, 4
TRAIN = {
    "dataset": "tiny",
    "max_steps": STEPS,
    "warmup_steps": 1,
    "schedule": "constant",  # the same learning rates however the run is cut
    "lr": 3e-3,
    "batch_size": B,
    "eval_every": 3,
    "eval_batches": 2,
    "checkpoint_every": 3,
    "keep_last": 2,
    "device": "cpu",
    "precision": "fp32",  # bf16 rounds differently per shard shape; these compare numerics
    "strategy": "ddp",
}
CONFIG = {
    "tokenizer": {"vocab_size": 300, "seq_len": 32},
    "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "dropout": 0.0},
    "train": TRAIN,
}
RTOL = 1e-4

pytestmark = pytest.mark.skipif(
    not TORCHRUN.exists() or not torch.distributed.is_gloo_available(),
    reason="needs torchrun and the gloo backend",
)

# phase A's entry point: the CLI, with rank 1 instrumented
RANK1_GUARD = textwrap.dedent(
    """
    import os, signal, sys

    if os.environ["RANK"] == "1":
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        @event.listens_for(Engine, "before_cursor_execute")
        def _read_only(conn, cursor, statement, parameters, context, executemany):
            if statement.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
                raise RuntimeError("rank 1 wrote to the catalog: " + statement[:60])

        from genloop.workspace.store import ArtifactStore

        def _refuse(*args, **kwargs):
            raise RuntimeError("rank 1 wrote to the artifact store")

        ArtifactStore.writer = ArtifactStore.put_dir = ArtifactStore.delete = _refuse
        ArtifactStore.scratch = _refuse

        from genloop.train import distributed

        barrier = distributed.barrier

        def barrier_then_die(dist):  # the loop's barrier follows each checkpoint
            barrier(dist)
            os.kill(os.getpid(), signal.SIGKILL)

        distributed.barrier = barrier_then_die

    from genloop.cli.main import main

    sys.argv[0] = "genloop"
    main()
    """
)


@dataclass
class Scenario:
    home: Path
    ref_run: str
    ref_history: list[float]
    phase_a: subprocess.CompletedProcess[str]
    status_after_a: list[tuple[str, str | None]]  # (status, error) of the runs named dist
    phase_b: subprocess.CompletedProcess[str]


def write_config(path: Path, **train: Any) -> Path:
    cfg = {**CONFIG, "train": {**TRAIN, **train}}
    GenloopConfig.model_validate(cfg)  # a typo here should fail here, not in a subprocess
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENLOOP_")}
    env |= {"GENLOOP_HOME": str(home), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env["GENLOOP_DIST_TIMEOUT_S"] = "120"  # a hang fails the test, not the session
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *args]
    with subprocess.Popen(
        cmd,
        env=env,
        cwd=home.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a hung job is killed whole: torchrun and its workers
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"torchrun hung for {timeout} s\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def prepare_tiny(home: Path) -> None:
    from genloop.data.prepare import prepare_dataset
    from genloop.workspace import init_workspace

    words = ["the", "a", "model", "learns", "patterns", "from", "data", "every", "day", "night"]
    corpus = home.parent / "corpus"
    corpus.mkdir()
    for i in range(40):
        rng = random.Random(i)
        text = " ".join(rng.choice(words) for _ in range(200))
        (corpus / f"d{i}.txt").write_text(f"{text} (document {i}).", encoding="utf-8")
    data = DataConfig.model_validate(
        {
            "name": "tiny",
            "sources": [{"type": "files", "paths": [str(corpus)]}],
            "split": {"val": 0.1, "test": 0.0},
        }
    )
    with init_workspace(home) as ws:
        prepare_dataset(ws, data, TokenizerConfig(vocab_size=300, seq_len=32), workers=1)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    from genloop.train.loop import train
    from genloop.workspace import Workspace

    root = tmp_path_factory.mktemp("dist")
    home = root / "ws"
    prepare_tiny(home)

    # the single-process reference: the same global batch of 2B
    ref_cfg = GenloopConfig.model_validate({**CONFIG, "train": {**TRAIN, "batch_size": 2 * B}})
    with Workspace.open(home) as ws:
        ref = train(ws, ref_cfg, model_name="ref")

    cfg_a = write_config(root / "a.yaml")
    guard = root / "rank1_guard.py"
    guard.write_text(RANK1_GUARD)
    phase_a = torchrun(home, str(guard), "train", str(cfg_a), "--name", "dist")
    status_after_a = [(r.status, r.error) for r in runs_named(home, "dist")]
    cfg_b = write_config(root / "b.yaml", strategy="fsdp")
    phase_b = torchrun(
        home,
        "-m",
        "genloop",
        "--log-format",
        "json",
        "train",
        str(cfg_b),
        "--name",
        "dist",
        "--resume",
    )
    return Scenario(home, ref.run_id, ref.history, phase_a, status_after_a, phase_b)


def catalog(home: Path) -> Any:
    from genloop.workspace import Workspace

    return Workspace.open(home)


def runs_named(home: Path, name: str) -> list[Any]:
    from sqlalchemy import select

    from genloop.workspace.tables import Run

    with catalog(home) as ws, ws.catalog.session() as s:
        return list(s.scalars(select(Run).where(Run.name == name)))


def series(home: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from sqlalchemy import select

    from genloop.workspace.tables import RunMetric

    with catalog(home) as ws, ws.catalog.session() as s:
        rows = s.execute(
            select(RunMetric.step, RunMetric.value)
            .where(RunMetric.run_id == run_id, RunMetric.key == key)
            .order_by(RunMetric.step)
        )
        return [(int(step), float(value)) for step, value in rows]


def log_messages(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The messages of the JSON log lines on stderr (torchrun's own lines are not JSON)."""
    out = []
    for line in proc.stderr.splitlines():
        if line.startswith("{"):
            out.append(str(json.loads(line)["message"]))
    return out


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def test_killed_rank_stops_every_rank_and_keeps_the_checkpoint(scenario: Scenario) -> None:
    a = scenario.phase_a
    assert a.returncode != 0, output(a)
    assert "rank 1 wrote" not in a.stdout + a.stderr, output(a)
    # rank 0 was stopped mid-run (by its peer's closed connection or torchrun's SIGTERM)
    # and marked the run failed on its way out
    [(status, error)] = scenario.status_after_a
    assert status == "failed", output(a)
    assert error, output(a)
    # the step-3 checkpoint survives (phase B resumed from it)
    resumed = [m for m in log_messages(scenario.phase_b) if m.startswith("resuming run")]
    assert resumed and resumed[0].endswith("from step 3"), output(scenario.phase_b)


def test_two_ranks_match_one_process_through_resume(scenario: Scenario) -> None:
    b = scenario.phase_b
    assert b.returncode == 0, output(b)
    [run] = runs_named(scenario.home, "dist")
    assert run.status == "completed"
    losses = series(scenario.home, run.id, "loss")
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    ref = scenario.ref_history
    assert len(ref) == STEPS and ref[-1] < ref[0] - 0.2  # it learns, so agreement means something
    for (step, got), want in zip(losses, ref, strict=True):
        assert got == pytest.approx(want, rel=RTOL), f"step {step}: {got} vs {want}"
    ref_val = dict(series(scenario.home, scenario.ref_run, "grad_norm"))
    for step, got in series(scenario.home, run.id, "grad_norm"):
        assert got == pytest.approx(ref_val[step], rel=1e-3)


def test_only_rank_zero_writes_and_prints(scenario: Scenario) -> None:
    from sqlalchemy import func, select

    from genloop.workspace.tables import ModelVersion, RunMetric

    b = scenario.phase_b
    assert b.returncode == 0, output(b)
    [run] = runs_named(scenario.home, "dist")
    with catalog(scenario.home) as ws, ws.catalog.session() as s:
        dupes = s.execute(
            select(RunMetric.key, RunMetric.step)
            .where(RunMetric.run_id == run.id)
            .group_by(RunMetric.key, RunMetric.step)
            .having(func.count() > 1)
        ).all()
        versions = list(s.scalars(select(ModelVersion).where(ModelVersion.name == "dist")))
    assert dupes == []
    assert [(v.version, v.run_id) for v in versions] == [(1, run.id)]
    # the result and the INFO lines come from rank 0 alone
    assert b.stdout.count(f"run {run.id}: {STEPS} steps") == 1, output(b)
    assert b.stdout.count("registered model dist@1") == 1, output(b)
    assert [m for m in log_messages(b) if "resuming" in m] == [
        f"resuming run {run.id} from step 3"
    ], output(b)


def test_fsdp_checkpoint_and_model_hold_full_weights(scenario: Scenario) -> None:
    from genloop.models.family import get_family
    from genloop.train import checkpoint as ckpt
    from genloop.train.loop import make_optimizer
    from genloop.workspace import registry

    assert scenario.phase_b.returncode == 0, output(scenario.phase_b)
    [run] = runs_named(scenario.home, "dist")
    with catalog(scenario.home) as ws:
        got = ckpt.load_latest(ws.store, run.id)
        want = ckpt.load_latest(ws.store, scenario.ref_run)
        assert got is not None and want is not None and got.step == want.step == STEPS
        assert got.state["format"] == "sharded"  # FSDP2 writes its shards, not a whole file
        # read back whole by one process, it holds the single process's weights and moments
        model = get_family("causal_lm").build(
            {"preset": "tiny", "vocab_size": 300, "n_layer": 2, "n_embd": 32, "n_head": 2}
        )
        opt = make_optimizer(
            model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), device=torch.device("cpu")
        )
        ckpt.restore(got, model, opt)
        a, b = model.state_dict(), load_file(str(want.path / "model.safetensors"))
        assert set(b) <= set(a)
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=k)
        moments = load_file(str(want.path / "optimizer.safetensors"))
        state = opt.state_dict()["state"]
        for k, v in moments.items():
            index, _, key = k.partition(".")
            torch.testing.assert_close(state[int(index)][key], v, rtol=1e-3, atol=1e-5, msg=k)
        groups = opt.state_dict()["param_groups"]
        assert [g["params"] for g in groups] == [
            g["params"] for g in want.state["optimizer"]["param_groups"]
        ]
        # the exported model is a plain transformers checkpoint with the trained weights
        family = get_family("causal_lm")
        exported = family.load(ws.store.open_verified(registry.resolve(ws, "dist").artifact))
        reference = family.load(ws.store.open_verified(registry.resolve(ws, "ref").artifact))
    ids = torch.arange(16).reshape(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            exported(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-3, atol=1e-4
        )


def test_a_bad_config_fails_every_rank(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(json.dumps({"train": {"max_steps": 0}}))
    proc = torchrun(tmp_path / "ws", "-m", "genloop", "train", str(cfg), timeout=120)
    assert proc.returncode != 0
    # every rank fails on its own; torchrun may stop the slower rank before it prints
    assert proc.stderr.count("invalid value for 'train.max_steps'") >= 1, output(proc)
    # torchrun prints its own traceback when a rank fails; genloop's ranks print none
    assert "genloop/" not in proc.stderr.split("torch/distributed/run.py")[0], output(proc)


# in-process checks of the helpers a single process uses (no process group)


def test_single_process_helpers_are_plain() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    dist = distributed.setup("cpu")
    assert (dist.world_size, dist.is_main, dist.enabled) == (1, True, False)
    assert not distributed.is_sharded(model)
    tensors, extras = distributed.sharded_state(model, opt)  # a plain model: whole tensors
    assert set(model.state_dict()) < set(tensors)
    assert "optimizer.state.0.weight.exp_avg" in tensors
    assert extras["param_groups.0.weight.lr"] == 0.1
    sd = model.state_dict()
    osd = opt.state_dict()
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    assert distributed.load_full_state_dict(fresh, sd) == ([], [])
    distributed.load_full_optimizer_state_dict(fresh, fresh_opt, osd)
    for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], osd["state"][0]["exp_avg"])
    assert distributed.mean_across(2.5, dist) == 2.5
    assert distributed.broadcast("x", dist) == "x"
    distributed.barrier(dist)
    distributed.teardown(dist)


def test_rank_comes_from_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.is_main_process()
    monkeypatch.setenv("RANK", "3")
    assert distributed.env_rank() == 3 and not distributed.is_main_process()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_rank_zero_prints_the_result(
    rank: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from genloop.cli.main import app
    from genloop.train import loop
    from genloop.workspace import init_workspace

    init_workspace(tmp_path / "ws").close()
    seen: list[int] = []

    def fake_train(ws: Any, cfg: Any, **kwargs: Any) -> loop.TrainResult:
        kwargs["progress"](1, 1, {"loss": 1.0, "tokens_per_s": 10.0})
        seen.append(1)
        return loop.TrainResult(run_id="r" * 32, steps=1, metrics={"loss": 1.0})

    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setenv("RANK", rank)
    cfg = write_config(tmp_path / "cfg.yaml")
    for extra in ([], ["--json"]):
        result = CliRunner().invoke(
            app, ["--workspace", str(tmp_path / "ws"), "train", str(cfg), *extra]
        )
        assert result.exit_code == 0, result.output
        assert ("r" * 32 in result.output) == (rank == "0"), result.output
    assert seen == [1, 1]
