"""Launching a training job on one machine or many: torchrun, run for you or written out.

``genloop train CONFIG --nnodes 2 --rdzv-endpoint HOST:PORT`` on every node starts the
job with torchrun's own launcher (``torch.distributed.run``): the nodes meet at a c10d
rendezvous hosted by the node at ``HOST``, each node starts ``--nproc-per-node`` processes
running ``python -m genloop train CONFIG``, and global ranks are handed out by the
rendezvous, so no node needs to be told its rank.

The launcher runs torchrun's agent in this process rather than ``torchrun`` as a child
process, for the failure a multi-node launch meets first: a peer that never arrives (a
typo in the endpoint, a closed port, a node that did not start). torchrun then raises a
:class:`~torch.distributed.elastic.rendezvous.api.RendezvousError`; in a child process
that would reach us only as a traceback on stderr, mixed with the ranks' output, while
here it is a typed exception that :func:`launch` turns into one line naming the endpoint
and what to check. Everything else is torchrun's: its arguments, environment and
behaviour are those of the ``torchrun`` command :func:`torchrun_args` spells out.

:func:`render` writes the same job out instead of running it: a plain torchrun command,
a Slurm batch script or a Kubeflow ``PyTorchJob`` manifest.
"""

from __future__ import annotations

import copy
import re
import shlex
from dataclasses import dataclass
from typing import Any, Literal

from genloop.errors import ConfigError, GenloopError

Emit = Literal["torchrun", "slurm", "pytorchjob"]
DEFAULT_PORT = 29500  # torchrun's own default rendezvous port
PYTORCHJOB_PORT = 23456  # the training operator's default for its "pytorchjob-port"


@dataclass(frozen=True)
class Launch:
    """How many machines and processes, and where they meet.

    ``rdzv_endpoint`` is ``HOST:PORT`` of the node hosting the rendezvous (``None``: one
    node, torchrun's ``--standalone``); ``rdzv_timeout`` bounds, in seconds, how long a node
    waits for the others to join (torchrun's ``join_timeout``, 600 when ``None``).
    """

    nnodes: int = 1
    nproc_per_node: int = 1
    rdzv_endpoint: str | None = None
    rdzv_id: str = "genloop"
    rdzv_timeout: int | None = None

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be at least 1, not {self.nnodes}")
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be at least 1, not {self.nproc_per_node}")
        if self.rdzv_timeout is not None and self.rdzv_timeout < 1:
            raise ConfigError(f"--rdzv-timeout must be at least 1 second, not {self.rdzv_timeout}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.rdzv_id):
            raise ConfigError(
                f"--rdzv-id {self.rdzv_id!r} must be letters, digits, '.', '_' or '-'"
            )
        if self.rdzv_endpoint is not None:
            split_endpoint(self.rdzv_endpoint)

    @property
    def host(self) -> str:
        return split_endpoint(self.rdzv_endpoint)[0] if self.rdzv_endpoint else "localhost"

    @property
    def port(self) -> int:
        return split_endpoint(self.rdzv_endpoint)[1] if self.rdzv_endpoint else DEFAULT_PORT


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST:PORT`` → ``(HOST, PORT)``; a clear error for anything else."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--rdzv-endpoint {endpoint!r} must be HOST:PORT (a node every node can reach, "
            f"e.g. node-0:{DEFAULT_PORT})"
        )
    return host, int(port)


def quiet_store_retries() -> None:
    """Keep torch's C++ logs in this process to fatal errors; call before torch loads.

    A node that cannot reach the rendezvous retries for a minute, and torch's C++ store
    logs every retry as a warning with a C++ stack, a screenful each; :func:`launch`
    reports the failure itself. torch reads ``TORCH_CPP_LOG_LEVEL`` once, as it loads, so
    the variable is set for that moment only: the training processes this one starts get
    the user's environment (and torch's logs) back. A level the user set is kept.
    """
    import os
    import sys

    if "torch" in sys.modules or "TORCH_CPP_LOG_LEVEL" in os.environ:
        return
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    try:
        import torch  # noqa: F401
    finally:
        del os.environ["TORCH_CPP_LOG_LEVEL"]


def default_nproc_per_node(device: str) -> int:
    """One process per GPU of this machine; 1 without GPUs or with ``train.device: cpu``."""
    if device == "cpu":
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def torchrun_options(job: Launch) -> list[str]:
    """torchrun's own options for ``job`` (what comes before the program)."""
    args = ["--nnodes", str(job.nnodes), "--nproc-per-node", str(job.nproc_per_node)]
    if job.rdzv_endpoint is None:
        return [*args, "--standalone"]
    args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", job.rdzv_endpoint]
    args += ["--rdzv-id", job.rdzv_id]
    if job.rdzv_timeout is not None:
        args += ["--rdzv-conf", f"join_timeout={job.rdzv_timeout}"]
    return args


def torchrun_args(job: Launch, program: list[str]) -> list[str]:
    """torchrun's arguments: its options, then ``-m genloop PROGRAM`` for every process."""
    return [*torchrun_options(job), "-m", "genloop", *program]


def launch(job: Launch, program: list[str]) -> None:
    """Run ``genloop PROGRAM`` on ``job.nproc_per_node`` processes of this node, as one
    node of ``job.nnodes``; returns when every process of the job has finished.

    Raises :class:`GenloopError` naming the endpoint when the nodes cannot meet, and when
    a process fails (its own error is printed above by the process itself).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousClosedError,
        RendezvousConnectionError,
        RendezvousError,
        RendezvousTimeoutError,
    )
    from torch.distributed.run import parse_args, run

    where = f"the rendezvous at {job.rdzv_endpoint} (--rdzv-id {job.rdzv_id})"
    check = (
        f"check that every node runs the same command (--rdzv-endpoint {job.rdzv_endpoint} "
        f"--rdzv-id {job.rdzv_id} --nnodes {job.nnodes}), that {job.host} "
        f"resolves on every node and that port {job.port} on it is open to them"
    )
    try:
        run(parse_args(torchrun_args(job, program)))  # type: ignore[no-untyped-call]
    except RendezvousTimeoutError:
        waited = job.rdzv_timeout or 600
        raise GenloopError(
            f"not all {job.nnodes} nodes joined {where} within {waited} s: {check}, "
            "and that the other nodes were started (--rdzv-timeout waits longer)"
        ) from None
    except RendezvousConnectionError as exc:
        cause = exc.__cause__ or exc
        raise GenloopError(
            f"cannot reach {where}: {cause}; the node at {job.host} hosts it and must be "
            f"started, and {check}"
        ) from None
    except RendezvousClosedError:
        raise GenloopError(
            f"{where} is closed: the job it was for has already ended (finished or "
            "failed) on the other nodes; start every node again"
        ) from None
    except RendezvousError as exc:
        raise GenloopError(f"{where} failed ({type(exc).__name__}: {exc}); {check}") from None
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        how = (
            f"was killed by {failure.signal_name()}"
            if failure.exitcode < 0
            else f"exited with code {failure.exitcode}"
        )
        error = GenloopError(
            f"training failed: rank {rank} {how} (its own error is printed above); a run "
            "that had started keeps its last checkpoint: continue it with --resume"
        )
        error.exit_code = 2 if failure.exitcode == 2 else 1  # a usage error stays one
        raise error from None
    except SignalException as exc:
        raise GenloopError(
            f"the launcher was stopped by {exc.sigval.name}; the last checkpoint is kept: "
            "continue with --resume"
        ) from None


# ----------------------------------------------------------------- written-out launchers


def render(
    emit: Emit,
    job: Launch,
    program: list[str],
    *,
    gpus: bool,
    job_name: str,
    image: str | None = None,
) -> str:
    """The launcher text for ``emit``: what to run (or submit) to train ``program``."""
    if emit == "torchrun":
        return render_torchrun(job, program)
    if emit == "slurm":
        return render_slurm(job, program, gpus=gpus, job_name=job_name)
    return render_pytorchjob(
        job, program, gpus=gpus, job_name=job_name, image=image or default_image(gpus)
    )


def default_image(gpus: bool) -> str:
    """The tags the Dockerfile documents: ``genloop`` (CPU) and ``genloop:cuda``."""
    return "genloop:cuda" if gpus else "genloop:latest"


def job_name(text: str) -> str:
    """A Slurm / Kubernetes job name from a model or config name (DNS-1123: a-z, 0-9, -)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return ("genloop-train-" + slug)[:63].rstrip("-")


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _command(head: list[str], options: list[str], program: list[str]) -> str:
    """One shell command: ``head``, an option (and its value) per line, then the program."""
    lines = [" ".join(head)]
    i = 0
    while i < len(options):
        if i + 1 < len(options) and not options[i + 1].startswith("-"):
            lines.append(f"  {options[i]} {options[i + 1]}")
            i += 2
        else:
            lines.append(f"  {options[i]}")
            i += 1
    lines.append("  -m genloop " + shlex.join(program))
    return " \\\n".join(lines) + "\n"


SHARED_WORKSPACE = (
    "# Every node needs the same workspace: $GENLOOP_HOME (or --workspace) on shared storage\n"
    "# (NFS, Lustre, ...) and, with several nodes, the catalog in PostgreSQL: set\n"
    "# GENLOOP_DATABASE_URL in the environment (never write its password in this file).\n"
)


def render_torchrun(job: Launch, program: list[str]) -> str:
    """A shell command to run on every node (``sh`` runs the text as it is)."""
    head = (
        f"# genloop: train on {_count(job.nnodes, 'node')} x {job.nproc_per_node} process(es) each"
    )
    if job.nnodes > 1:
        head += (
            f"; run this same command on every node.\n# {job.host}:{job.port} is the "
            "rendezvous: the node at that address hosts it, the others must reach it."
        )
    options = [shlex.quote(w) for w in torchrun_options(job)]
    return f"{head}\n{SHARED_WORKSPACE}{_command(['torchrun'], options, program)}"


def render_slurm(job: Launch, program: list[str], *, gpus: bool, job_name: str) -> str:
    """An sbatch script: one torchrun per node (``srun``), meeting on the allocation's
    first node; ``$GENLOOP_RDZV_HOST`` overrides that node's name (for networks where the
    nodes reach each other under other names, and to run the script outside Slurm)."""
    sbatch = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={job.nnodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if gpus:
        sbatch.append(f"#SBATCH --gpus-per-node={job.nproc_per_node}")
    options = [
        "--nnodes",
        '"$SLURM_JOB_NUM_NODES"',
        "--nproc-per-node",
        str(job.nproc_per_node),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f'"$rdzv_host:{job.port}"',
        "--rdzv-id",
        '"$SLURM_JOB_ID"',
    ]
    if job.rdzv_timeout is not None:
        options += ["--rdzv-conf", f"join_timeout={job.rdzv_timeout}"]
    return (
        "\n".join(sbatch)
        + "\n# genloop: submit with `sbatch THIS_FILE`. One task per node runs torchrun, which "
        f"starts\n# {job.nproc_per_node} training process(es) there; the nodes meet at a c10d "
        "rendezvous on the\n# allocation's first node.\n" + SHARED_WORKSPACE + "set -euo pipefail\n"
        'rdzv_host="${GENLOOP_RDZV_HOST:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" '
        '| head -n 1)}"\n' + _command(["srun", "torchrun"], options, program)
    )


def render_pytorchjob(
    job: Launch, program: list[str], *, gpus: bool, job_name: str, image: str
) -> str:
    """A Kubeflow training-operator ``PyTorchJob`` (kubeflow.org/v1): a Master and
    ``nnodes - 1`` Workers, each running torchrun with the variables the operator sets.

    With ``spec.nprocPerNode`` the operator gives every pod ``PET_NNODES``,
    ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` (the
    Master pod's service); Kubernetes expands ``$(NAME)`` in ``args`` from them, and
    torchrun's static rendezvous on the Master does the rest.
    """
    import yaml

    args = [
        "--nnodes=$(PET_NNODES)",
        "--nproc-per-node=$(PET_NPROC_PER_NODE)",
        "--node-rank=$(PET_NODE_RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
    ]
    if job.rdzv_timeout is not None:
        args.append(f"--rdzv-conf=timeout={job.rdzv_timeout}")  # the static rendezvous's name
    args += ["-m", "genloop", *program]
    container: dict[str, Any] = {
        "name": "pytorch",  # the operator finds the container (and its port) by these names
        "image": image,
        "command": ["torchrun"],
        "args": args,
        "ports": [{"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT}],
        "env": [
            {"name": "GENLOOP_HOME", "value": "/data"},
            {
                "name": "GENLOOP_DATABASE_URL",  # from the Secret of deploy/k8s/secret.yaml
                "valueFrom": {
                    "secretKeyRef": {
                        "name": "genloop",
                        "key": "GENLOOP_DATABASE_URL",
                        "optional": job.nnodes == 1,
                    }
                },
            },
        ],
        "volumeMounts": [
            {"name": "data", "mountPath": "/data"},
            {"name": "shm", "mountPath": "/dev/shm"},  # noqa: S108 (NCCL's shared memory)
        ],
    }
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": job.nproc_per_node}}

    def replicas(count: int) -> dict[str, Any]:
        return {
            "replicas": count,
            "restartPolicy": "Never",  # a restart would start a new run; --resume continues
            "template": {
                "spec": {
                    "containers": [copy.deepcopy(container)],  # no YAML anchors
                    "volumes": [
                        {"name": "data", "persistentVolumeClaim": {"claimName": "genloop-data"}},
                        {"name": "shm", "emptyDir": {"medium": "Memory"}},
                    ],
                }
            },
        }

    specs = {"Master": replicas(1)}
    if job.nnodes > 1:
        specs["Worker"] = replicas(job.nnodes - 1)
    manifest = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": job_name, "labels": {"app.kubernetes.io/name": "genloop"}},
        "spec": {"nprocPerNode": str(job.nproc_per_node), "pytorchReplicaSpecs": specs},
    }
    head = (
        "# genloop: apply with `kubectl apply -f THIS_FILE` (needs Kubeflow's training "
        "operator).\n# The pods share the workspace on the genloop-data volume (ReadWriteMany, "
        "mounted at /data,\n# the working directory: a relative config path is read from "
        "there) and the catalog\n# named by GENLOOP_DATABASE_URL in the genloop Secret "
        "(deploy/k8s/secret.yaml).\n"
    )
    return head + yaml.safe_dump(manifest, sort_keys=False, width=100)
