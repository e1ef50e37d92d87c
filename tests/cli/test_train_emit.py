"""``genloop train --emit``: the launchers it prints, read the way their tools read them,
and the launch options' checks. Running what they print is tests/train/test_multinode.py.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ..conftest import CliResult, run_genloop

CONFIG = {
    "tokenizer": {"vocab_size": 300, "seq_len": 32},
    "model": {"n_layer": 2, "n_embd": 32, "n_head": 2},
    "train": {"dataset": "tiny", "max_steps": 10, "warmup_steps": 1},
}


def config(tmp_path: Path, device: str = "auto") -> Path:
    path = tmp_path / "story.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "train": {**CONFIG["train"], "device": device}}))
    return path


def emit(tmp_path: Path, cfg: Path, *args: str) -> CliResult:
    home = tmp_path / "not-created"
    result = run_genloop(home, "train", str(cfg), *args)
    assert not home.exists()  # printing a launcher opens no workspace and trains nothing
    return result


def printed(tmp_path: Path, cfg: Path, *args: str) -> str:
    result = emit(tmp_path, cfg, *args)
    assert result.returncode == 0, result.output
    assert result.stderr == ""
    return result.stdout


def command(text: str) -> list[str]:
    """The command of a script: comments dropped, continuation lines joined, shell-split."""
    body = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return shlex.split(" ".join(body).replace("\\ ", " "))


def test_pytorchjob_manifest(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    text = printed(
        tmp_path,
        cfg,
        *("--emit", "pytorchjob", "--nnodes", "3", "--nproc-per-node", "4"),
        *("--name", "Story_Teller", "--set", "train.lr=1e-3", "--rdzv-timeout", "900"),
    )
    assert "&id" not in text and "*id" not in text  # no YAML anchors: every pod spelled out
    job: dict[str, Any] = yaml.safe_load(text)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["metadata"]["name"] == "genloop-train-story-teller"
    assert job["spec"]["nprocPerNode"] == "4"  # a string in the v1 API
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in specs.items()} == {"Master": 1, "Worker": 2}
    for spec in specs.values():
        assert spec["restartPolicy"] == "Never"
        [container] = spec["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"
        assert container["image"] == "genloop:cuda"
        assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456}]
        assert container["resources"] == {"limits": {"nvidia.com/gpu": 4}}
        assert container["command"] == ["torchrun"]
        assert container["args"] == [
            "--nnodes=$(PET_NNODES)",
            "--nproc-per-node=$(PET_NPROC_PER_NODE)",
            "--node-rank=$(PET_NODE_RANK)",
            "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
            "--rdzv-conf=timeout=900",
            *("-m", "genloop", "train", str(cfg), "--name", "Story_Teller"),
            *("--set", "train.lr=1e-3"),
        ]
        env = {e["name"]: e for e in container["env"]}
        assert env["GENLOOP_HOME"]["value"] == "/data"
        # the catalog's URL (with its password) comes from a Secret, never inline
        assert "value" not in env["GENLOOP_DATABASE_URL"]
        assert env["GENLOOP_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "genloop",
            "key": "GENLOOP_DATABASE_URL",
            "optional": False,
        }
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
        assert volumes[mounts["/data"]]["persistentVolumeClaim"] == {"claimName": "genloop-data"}


def test_pytorchjob_on_cpus_and_one_node(tmp_path: Path) -> None:
    cfg = config(tmp_path, device="cpu")
    job = yaml.safe_load(printed(tmp_path, cfg, "--emit", "pytorchjob"))
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    assert job["spec"]["nprocPerNode"] == "1"  # one process per node without GPUs
    [container] = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert container["image"] == "genloop:latest" and "resources" not in container
    mine = yaml.safe_load(printed(tmp_path, cfg, "--emit", "pytorchjob", "--image", "reg/g:2"))
    [container] = mine["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert container["image"] == "reg/g:2"


def sbatch_options(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_script(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    script = printed(
        tmp_path,
        cfg,
        *("--emit", "slurm", "--nnodes", "4", "--nproc-per-node", "8", "--name", "story"),
        *("--rdzv-endpoint", "anything:29444", "--rdzv-timeout", "1200", "--resume"),
    )
    assert script.startswith("#!/bin/bash\n")
    assert sbatch_options(script) == {
        "job-name": "genloop-train-story",
        "nodes": "4",
        "ntasks-per-node": "1",
        "gpus-per-node": "8",
    }
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # the first node of the allocation hosts the rendezvous, found as Slurm documents it
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    last = script[script.index("srun torchrun") :]
    assert command(last) == [
        *("srun", "torchrun", "--nnodes", "$SLURM_JOB_NUM_NODES", "--nproc-per-node", "8"),
        *("--rdzv-backend", "c10d", "--rdzv-endpoint", "$rdzv_host:29444"),
        *("--rdzv-id", "$SLURM_JOB_ID", "--rdzv-conf", "join_timeout=1200"),
        *("-m", "genloop", "train", str(cfg), "--name", "story", "--resume"),
    ]
    on_cpus = printed(tmp_path, config(tmp_path, device="cpu"), "--emit", "slurm")
    assert "gpus-per-node" not in sbatch_options(on_cpus)
    assert sbatch_options(on_cpus)["nodes"] == "1"


def test_torchrun_command_carries_the_global_and_training_options(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    result = run_genloop(
        tmp_path / "not-created",
        *("--workspace", "/shared/ws", "--log-format", "json", "--debug"),
        *("train", str(cfg), "--emit", "torchrun", "--nnodes", "2", "--nproc-per-node", "2"),
        *("--rdzv-endpoint", "node-0:29500", "--rdzv-id", "job-7"),
        *("--resume", "--run", "abc", "--set", "train.lr=2e-3", "--json"),
    )
    assert result.returncode == 0, result.output
    assert command(result.stdout) == [
        *("torchrun", "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d"),
        *("--rdzv-endpoint", "node-0:29500", "--rdzv-id", "job-7"),
        *("-m", "genloop", "--workspace", "/shared/ws", "--log-format", "json", "--debug"),
        *("train", str(cfg), "--set", "train.lr=2e-3", "--resume", "--run-id", "abc", "--json"),
    ]
    assert "node-0:29500 is the rendezvous" in result.stdout
    check = subprocess.run(["sh", "-n"], input=result.stdout, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # one node: torchrun's --standalone, no endpoint to name
    one = command(printed(tmp_path, cfg, "--emit", "torchrun", "--nproc-per-node", "3"))
    assert one[:6] == ["torchrun", "--nnodes", "1", "--nproc-per-node", "3", "--standalone"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nnodes", "2"], "--nnodes above 1 needs --rdzv-endpoint HOST:PORT"),
        (["--nnodes", "2", "--emit", "torchrun"], "needs --rdzv-endpoint"),
        (["--nnodes", "0"], "--nnodes must be at least 1, not 0"),
        (["--nproc-per-node", "0"], "--nproc-per-node must be at least 1"),
        (["--nnodes", "2", "--rdzv-endpoint", "node-0"], "'node-0' must be HOST:PORT"),
        (["--nnodes", "2", "--rdzv-endpoint", "node-0:0"], "must be HOST:PORT"),
        (["--nnodes", "2", "--rdzv-endpoint", "n:1", "--rdzv-timeout", "0"], "at least 1 sec"),
        (["--nnodes", "2", "--rdzv-endpoint", "n:1", "--rdzv-id", "a b"], "--rdzv-id 'a b'"),
        (["--rdzv-endpoint", "node-0:29500"], "go with --nnodes, --nproc-per-node or --emit"),
        (["--emit", "slurm", "--image", "x"], "--image goes with --emit pytorchjob"),
        (["--emit", "helm"], "'helm' is not one of"),
    ],
)
def test_launch_options_are_checked(tmp_path: Path, args: list[str], message: str) -> None:
    result = emit(tmp_path, config(tmp_path), *args)
    assert result.returncode == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_under_torchrun_the_launch_options_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    result = emit(tmp_path, config(tmp_path), "--nproc-per-node", "2")
    assert result.returncode == 2, result.output
    assert "under torchrun leave them out" in result.stderr
