"""Several machines, played on one: separate launchers on loopback train one run together.

Each "node" is its own launcher process, as on a cluster; they share the workspace folder
(here the same folder, on a cluster shared storage plus ``GENLOOP_DATABASE_URL``) and
meet at a c10d rendezvous on 127.0.0.1. One module-scoped workspace serves every run:

- ``single``: the 2-process, single-node reference, run from the command
  ``genloop train --emit torchrun --nproc-per-node 2`` prints (so it checks that, too);
- ``multi``: 2 nodes x 1 process: node A is plain ``torchrun --nnodes 2 ...``, node B is
  ``genloop train --nnodes 2 ...`` (genloop's launcher joins a job torchrun started);
- the Slurm script and the PyTorchJob manifest ``--emit`` prints, run as their cluster
  would run them on one node;
- a node whose peer never comes, which must give up with one line naming the endpoint.

Rank r takes the same windows of each step whichever node it is on, and gloo sums the two
ranks' gradients the same way, so the two-node run must match the one-node run exactly.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ..conftest import run_genloop, write_corpus

TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 4
CONFIG = {
    "tokenizer": {"vocab_size": 300, "seq_len": 32},
    "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "dropout": 0.0},
    "train": {
        "dataset": "tiny",
        "max_steps": STEPS,
        "warmup_steps": 1,
        "schedule": "constant",
        "lr": 3e-3,
        "batch_size": 2,
        "eval_every": STEPS,
        "eval_batches": 1,
        "checkpoint_every": STEPS,
        "device": "cpu",
        "precision": "fp32",
    },
}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(
        not TORCHRUN.exists() or not torch.distributed.is_gloo_available(),
        reason="needs torchrun and the gloo backend",
    ),
]


@dataclass
class Ran:
    """One command's exit code and output (with the command, for failure messages)."""

    cmd: Sequence[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def __str__(self) -> str:
        return (
            f"$ {' '.join(self.cmd)}\nexit {self.returncode} after {self.seconds:.0f} s\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def environment(home: Path, **extra: str) -> dict[str, str]:
    """This interpreter's environment for a node: the workspace, one thread, no leftovers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENLOOP_", "SLURM_"))}
    src = str(Path(__file__).resolve().parents[2] / "src")  # this checkout, not another
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(TORCHRUN.parent), env.get("PATH", "")])
    env |= {"GENLOOP_HOME": str(home), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env["GENLOOP_DIST_TIMEOUT_S"] = "120"  # a hang fails the test, not the session
    return env | extra


def start(cmd: Sequence[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        list(cmd),
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a hung node is killed whole: launcher and workers
    )


def finish(proc: subprocess.Popen[str], started: float, timeout: float = 240) -> Ran:
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, started + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    cmd = [str(a) for a in proc.args] if isinstance(proc.args, list) else [str(proc.args)]
    return Ran(cmd, proc.returncode, stdout, stderr, time.monotonic() - started)


def run(cmd: Sequence[str], env: dict[str, str], cwd: Path, timeout: float = 240) -> Ran:
    return finish(start(cmd, env, cwd), time.monotonic(), timeout)


def genloop(*args: str) -> list[str]:
    return [sys.executable, "-m", "genloop", *args]


@dataclass
class Workspace:
    home: Path
    config: Path  # inside the workspace folder: a PyTorchJob reads it from there


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    from genloop.config import DataConfig, GenloopConfig, TokenizerConfig
    from genloop.data.prepare import prepare_dataset
    from genloop.workspace import init_workspace

    root = tmp_path_factory.mktemp("multinode")
    home = root / "ws"
    data = DataConfig.model_validate(
        {
            "name": "tiny",
            "sources": [{"type": "files", "paths": [str(write_corpus(root / "corpus", 20))]}],
            "split": {"val": 0.1, "test": 0.0},
            "workers": 1,
        }
    )
    with init_workspace(home) as workspace:
        prepare_dataset(workspace, data, TokenizerConfig(vocab_size=300, seq_len=32))
    GenloopConfig.model_validate(CONFIG)  # a typo here fails here, not in a subprocess
    config = home / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    return Workspace(home, config)


def emit(ws: Workspace, *args: str) -> str:
    """What ``genloop train CONFIG --emit ...`` prints, run in the workspace folder (in this
    process: printing a launcher imports neither torch nor the model code)."""
    with pytest.MonkeyPatch.context() as m:
        m.chdir(ws.home)
        result = run_genloop(ws.home, "train", ws.config.name, *args)
    assert result.returncode == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def single(ws: Workspace) -> Ran:
    """The reference: one node, two processes, from ``--emit torchrun``'s command."""
    script = emit(ws, "--emit", "torchrun", "--nproc-per-node", "2", "--name", "single")
    assert "--standalone" in script and "--nproc-per-node 2" in script, script
    return run(["sh", "-c", script], environment(ws.home), ws.home)


@pytest.fixture(scope="module")
def two_nodes(ws: Workspace, single: Ran) -> tuple[Ran, Ran]:
    """Two nodes of one process each, started as two separate launchers."""
    endpoint = f"127.0.0.1:{free_port()}"
    rdzv = ["--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes"]
    train = ["train", ws.config.name, "--name", "multi"]
    node_a = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    node_a += [*rdzv, "-m", "genloop", *train]
    node_b = genloop(*train, "--nnodes", "2", "--nproc-per-node", "1", *rdzv)
    started = time.monotonic()
    procs = [start(cmd, environment(ws.home), ws.home) for cmd in (node_a, node_b)]
    a, b = (finish(p, started) for p in procs)
    return a, b


def runs_named(home: Path, name: str) -> list[Any]:
    from sqlalchemy import select

    from genloop.workspace import Workspace as Catalog
    from genloop.workspace.tables import Run

    with Catalog.open(home) as w, w.catalog.session() as s:
        return list(s.scalars(select(Run).where(Run.name == name)))


def losses(home: Path, run_id: str) -> list[tuple[int, float]]:
    from sqlalchemy import select

    from genloop.workspace import Workspace as Catalog
    from genloop.workspace.tables import RunMetric

    with Catalog.open(home) as w, w.catalog.session() as s:
        rows = s.execute(
            select(RunMetric.step, RunMetric.value)
            .where(RunMetric.run_id == run_id, RunMetric.key == "loss")
            .order_by(RunMetric.step)
        )
        return [(int(step), float(value)) for step, value in rows]


def final_weights(home: Path, run_id: str) -> dict[str, torch.Tensor]:
    from genloop.train import checkpoint as ckpt
    from genloop.workspace import Workspace as Catalog

    with Catalog.open(home) as w:
        latest = ckpt.load_latest(w.store, run_id)
        assert latest is not None and latest.step == STEPS
        return load_file(str(latest.path / "model.safetensors"))


def completed_run(home: Path, name: str, ran: Ran | str) -> Any:
    found = runs_named(home, name)
    assert [r.status for r in found] == ["completed"], ran
    return found[0]


def test_two_nodes_train_one_run_exactly_like_one_node(
    ws: Workspace, single: Ran, two_nodes: tuple[Ran, Ran]
) -> None:
    a, b = two_nodes
    assert single.returncode == 0, single
    assert a.returncode == 0, a
    assert b.returncode == 0, b
    ref = completed_run(ws.home, "single", single)
    run_ = completed_run(ws.home, "multi", f"{a}\n{b}")
    want, got = losses(ws.home, ref.id), losses(ws.home, run_.id)
    assert [step for step, _ in got] == list(range(1, STEPS + 1))
    assert want[-1][1] < want[0][1]  # it learns, so agreement means something
    assert got == want  # exactly: the same windows per rank, the same gloo sums
    w_single, w_multi = final_weights(ws.home, ref.id), final_weights(ws.home, run_.id)
    assert w_single.keys() == w_multi.keys()
    for key in w_single:
        assert torch.equal(w_single[key], w_multi[key]), key
    # rank 0 (on whichever node the rendezvous put it) printed the result, once
    printed = a.stdout + b.stdout
    assert printed.count(f"run {run_.id}: {STEPS} steps") == 1, f"{a}\n{b}"
    assert printed.count("registered model multi@1") == 1, f"{a}\n{b}"


def test_a_node_whose_peer_never_comes_gives_up_naming_the_endpoint(ws: Workspace) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = genloop("train", ws.config.name, "--name", "alone", "--nnodes", "2")
    cmd += ["--rdzv-endpoint", endpoint, "--rdzv-id", "alone", "--rdzv-timeout", "3"]
    ran = run(cmd, environment(ws.home), ws.home, timeout=120)
    assert ran.returncode == 1, ran
    assert ran.seconds < 60, ran  # 3 s of waiting, plus starting Python and torch
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, ran
    assert f"rendezvous at {endpoint} (--rdzv-id alone)" in errors[0], ran
    assert "within 3 s" in errors[0] and "port" in errors[0], ran
    assert "Traceback" not in ran.stderr, ran
    assert runs_named(ws.home, "alone") == []  # no process started, nothing written


def test_a_failing_rank_fails_the_launcher_with_one_line(ws: Workspace) -> None:
    cmd = genloop("train", ws.config.name, "--set", "train.dataset=missing")
    ran = run([*cmd, "--nproc-per-node", "1"], environment(ws.home), ws.home, timeout=120)
    assert ran.returncode == 1, ran
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
    # the rank's own error, then the launcher's summary
    assert len(errors) == 2 and "missing" in errors[0], ran
    assert errors[1].startswith("error: training failed: rank 0 exited with code 1"), ran
    assert "Traceback" not in ran.stderr, ran


def test_emitted_slurm_script_trains_on_one_node(ws: Workspace, tmp_path: Path) -> None:
    port = free_port()
    script = emit(
        ws,
        *("--emit", "slurm", "--nproc-per-node", "1", "--name", "slurm"),
        *("--rdzv-endpoint", f"ignored:{port}", "--set", "train.max_steps=2"),
    )
    path = tmp_path / "train.sbatch"
    path.write_text(script)
    # srun with one task on one node runs its command once, here; the first node of the
    # allocation is this machine, which the script lets $GENLOOP_RDZV_HOST say
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/sh\nexec "$@"\n')
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    env = environment(
        ws.home,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="1",
        SLURM_JOB_NODELIST="localhost",
        GENLOOP_RDZV_HOST="127.0.0.1",
    )
    env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
    ran = run(["bash", str(path)], env, ws.home)
    assert ran.returncode == 0, ran
    run_ = completed_run(ws.home, "slurm", ran)
    assert [step for step, _ in losses(ws.home, run_.id)] == [1, 2]
    assert "registered model slurm@1" in ran.stdout, ran


def test_emitted_pytorchjob_trains_on_one_node(ws: Workspace) -> None:
    manifest = yaml.safe_load(
        emit(ws, "--emit", "pytorchjob", "--name", "kube", "--set", "train.max_steps=2")
    )
    [container] = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"
    ]
    # what the training operator sets in a one-node job's Master pod (nprocPerNode: "1")
    pod_env = {
        "PET_NNODES": "1",
        "PET_NPROC_PER_NODE": manifest["spec"]["nprocPerNode"],
        "PET_NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "1",
        "RANK": "0",
        "PYTHONUNBUFFERED": "0",
    }

    def expand(arg: str) -> str:  # Kubernetes' $(NAME) expansion in command and args
        return re.sub(r"\$\((\w+)\)", lambda m: pod_env[m.group(1)], arg)

    cmd = [expand(a) for a in container["command"] + container["args"]]
    # the container's /data is the workspace volume and its working directory
    env = environment(ws.home, **pod_env)
    assert {"name": "GENLOOP_HOME", "value": "/data"} in container["env"]
    ran = run(cmd, env, ws.home)
    assert ran.returncode == 0, ran
    run_ = completed_run(ws.home, "kube", ran)
    assert [step for step, _ in losses(ws.home, run_.id)] == [1, 2]
