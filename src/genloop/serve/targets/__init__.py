"""Cloud targets: genloop's server under a managed platform's container contract.

``genloop serve --target sagemaker|vertex|azureml`` (or the target detected from the
platform's environment, :func:`detect_target`) serves the genloop API as usual and, in
front of it, the routes the platform calls, as the platform documents them:

- sagemaker: ``GET /ping``, ``POST /invocations``, port 8080;
- vertex: ``GET $AIP_HEALTH_ROUTE``, ``POST $AIP_PREDICT_ROUTE``, port ``$AIP_HTTP_PORT``;
- azureml: ``GET /`` (liveness), ``GET /ready`` (readiness), ``POST /score``, port 5001.

Each platform module (``sagemaker.py``, ``vertex.py``, ``azureml.py``) builds a small
router: its routes, its body shape and its error shape; the prediction itself goes through
``predict.py`` to the completions and chat handlers, so limits, guardrails, request logs and
usage are those of the genloop API. The platform's own endpoint auth (IAM, endpoint keys)
sits in front, so these routes take no genloop key; they are charged to a catalog key named
``platform-<target>`` (scope ``generate``), whose rate limits apply and whose usage shows
in ``genloop monitor``.

The model comes from the platform's model directory (:func:`model_dir`): a genloop model
directory (with ``genloop.json``) is registered as it is, a Hugging Face checkpoint is
imported (``models/importer.py``), each as a new version of a model named after the
directory, unless the newest version of that name already holds the same files (a
restart on a kept catalog).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from genloop.errors import ConfigError

if TYPE_CHECKING:
    from fastapi import APIRouter

    from genloop.security.keys import Principal
    from genloop.workspace import Workspace

Target = Literal["sagemaker", "vertex", "azureml"]
TARGETS: tuple[str, ...] = get_args(Target)

SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")


@dataclass(frozen=True)
class TargetRoutes:
    """What ``create_app`` mounts for a target: its router and which of its paths are
    public (the platform's routes: no genloop key)."""

    target: Target
    router: APIRouter
    public: frozenset[str]
    port: int


def detect_target(env: Mapping[str, str]) -> Target | None:
    """The platform whose variables ``env`` holds (None: none, serve genloop's own API).

    ``GENLOOP_TARGET`` (a target or ``none``) decides when set: SageMaker runs the image
    with ``serve`` and sets none of its own variables on a single-container endpoint.
    """
    if env.get("GENLOOP_TARGET"):
        return check_target(env["GENLOOP_TARGET"])
    if env.get("AIP_HTTP_PORT") or env.get("AIP_PREDICT_ROUTE"):
        return "vertex"
    if env.get("AZUREML_MODEL_DIR"):
        return "azureml"
    if env.get("SM_MODEL_DIR") or env.get("SAGEMAKER_BIND_TO_PORT"):
        return "sagemaker"
    return None


def check_target(name: str) -> Target | None:
    """``--target`` as given: a target, or None for ``none``."""
    if name == "none":
        return None
    if name not in TARGETS:
        raise ConfigError(
            f"--target (GENLOOP_TARGET) must be one of {', '.join(TARGETS)}, none (got {name!r})"
        )
    return name  # type: ignore[return-value]


def model_dir(target: Target, env: Mapping[str, str]) -> Path:
    """Where the platform puts the model: SageMaker ``/opt/ml/model`` (``$SM_MODEL_DIR``),
    Vertex AI ``$AIP_STORAGE_URI`` (a local path; a ``gs://`` URI is not downloaded),
    Azure ML ``$AZUREML_MODEL_DIR`` (or the one folder inside it, as Azure mounts it)."""
    if target == "sagemaker":
        return Path(env.get("SM_MODEL_DIR") or SAGEMAKER_MODEL_DIR)
    if target == "vertex":
        uri = env.get("AIP_STORAGE_URI", "")
        if not uri:
            raise ConfigError(
                "AIP_STORAGE_URI is not set: give the model with --model-dir or --model"
            )
        if "://" in uri and not uri.startswith("file://"):
            raise ConfigError(
                f"AIP_STORAGE_URI is {uri}: genloop does not download from cloud storage; "
                "copy the model into the image and pass --model-dir, or serve a registry "
                "model with --model"
            )
        return Path(uri.removeprefix("file://"))
    path = env.get("AZUREML_MODEL_DIR", "")
    if not path:
        raise ConfigError("AZUREML_MODEL_DIR is not set: give the model with --model-dir")
    root = Path(path)
    inner = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if not (root / "config.json").is_file() and len(inner) == 1:
        return inner[0]  # Azure mounts a registered model's folder inside the model dir
    return root


def import_model_dir(ws: Workspace, path: Path) -> str:
    """The ref of the model at ``path`` (a genloop model directory, or a Hugging Face
    checkpoint, imported and checked), brought in once as the container entrypoint does
    (``serve.container.import_model_dir``): a restart on a kept catalog serves what is there."""
    from genloop.serve.container import import_model_dir as bring_in

    if not path.is_dir():
        raise ConfigError(
            f"model directory {path} does not exist: mount the model there, or pass "
            "--model-dir PATH (or --model NAME@ALIAS for a registry model)"
        )
    return bring_in(ws, path).ref


def platform_principal(ws: Workspace, target: Target) -> Principal:
    """The catalog key the platform's calls are charged to (made on first use)."""
    from genloop.security.keys import Principal, create_key, list_keys

    name = f"platform-{target}"
    found = [k for k in list_keys(ws.catalog) if k.name == name and k.status == "active"]
    info = found[0] if found else create_key(ws.catalog, name=name, scopes=["generate"]).info
    return Principal(
        key_id=info.id,
        name=info.name,
        prefix=info.prefix,
        scopes=frozenset(info.scopes),
        user_id=info.user_id,
    )


def target_routes(
    ws: Workspace, target: Target, env: Mapping[str, str] | None = None
) -> TargetRoutes:
    """The routes of ``target`` under the environment ``env`` (default: ``os.environ``)."""
    env = os.environ if env is None else env
    principal = platform_principal(ws, target)
    if target == "sagemaker":
        from genloop.serve.targets import sagemaker

        port = int(env.get("SAGEMAKER_BIND_TO_PORT") or sagemaker.PORT)
        return TargetRoutes(
            target, sagemaker.build_router(principal), frozenset(sagemaker.PUBLIC), port
        )
    if target == "vertex":
        from genloop.serve.targets import vertex

        health, predict = vertex.routes(env)
        return TargetRoutes(
            target,
            vertex.build_router(principal, health=health, predict=predict),
            frozenset({health, predict}),
            vertex.port(env),
        )
    from genloop.serve.targets import azureml

    router = azureml.build_router(principal)
    return TargetRoutes(target, router, frozenset(azureml.PUBLIC), azureml.PORT)
