"""``genloop entrypoint``: a container's start (migrate, import, serve), from its environment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from genloop.cli.context import state


def entrypoint(
    host: Annotated[
        str, typer.Option(help="Bind address: all interfaces of the container's network.")
    ] = "0.0.0.0",  # noqa: S104 - a container publishes its port deliberately
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML config; its serve and security sections apply."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a key: serve.max_tokens=256 (repeatable)."),
    ] = None,
) -> None:
    """The container entrypoint: migrate the catalog, import the mounted model, serve.

    Reads $GENLOOP_MODELS (refs to serve, comma-separated: chat@production,embed),
    $GENLOOP_MODEL_DIR (a mounted checkpoint imported at start, once: a replica that finds
    it imported serves that version; $GENLOOP_MODEL_NAME names it), $GENLOOP_DATABASE_URL
    (the shared catalog) and $GENLOOP_REDIS_URL (rate limits shared by the replicas). N
    replicas may start at once: the migration and the import run under a catalog lock.
    A missing model or an unreachable database is one error line and exit code 1 or 2.

    Example: GENLOOP_MODELS=chat@production genloop entrypoint --port 8000
    """
    from genloop.cli.serve import serve
    from genloop.config import load_config, parse_config
    from genloop.errors import ConfigError
    from genloop.serve.container import ENV_MODEL_DIR, ENV_MODELS, prepare, read_env

    cfg = load_config(config, set_ or []) if config else parse_config({}, set_ or [])
    env = read_env()
    if not env.models and env.model_dir is None and not (cfg.serve.models or cfg.serve.upstreams):
        raise ConfigError(
            f"nothing to serve: set {ENV_MODELS}=NAME@ALIAS (registry refs, comma-separated) "
            f"or {ENV_MODEL_DIR}=/path/to/mounted/model (or serve.models in the config)"
        )
    refs = prepare(state.workspace, env)
    serve(model=refs or None, host=host, port=port, config=config, set_=set_)
