"""``genloop serve``: an OpenAI-compatible HTTP server for model versions (and upstreams)."""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from genloop.cli.context import console, err_console, open_workspace

if TYPE_CHECKING:
    from fastapi import FastAPI

    from genloop.config import GenloopConfig, ServeConfig
    from genloop.serve.targets import Target, TargetRoutes
    from genloop.workspace import Workspace


def serve(
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="A model to serve: NAME, NAME@VERSION or NAME@ALIAS (repeatable). An alias "
            "is followed live: promoting a version swaps it in without dropping requests.",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(help="Bind address \\[default: serve.host, 127.0.0.1].", show_default=False),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="Port (0: any free one) \\[default: serve.port, 8000].", show_default=False
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML config; its serve and security sections apply."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a key: serve.max_tokens=256 (repeatable)."),
    ] = None,
    ssl_certfile: Annotated[
        Path | None, typer.Option("--ssl-certfile", help="TLS certificate (PEM): serve HTTPS.")
    ] = None,
    ssl_keyfile: Annotated[
        Path | None, typer.Option("--ssl-keyfile", help="TLS private key (PEM).")
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            help="Serve a cloud platform's container contract too: sagemaker, vertex, azureml, "
            "or none (genloop's API only) \\[default: $GENLOOP_TARGET, else detected from the "
            "platform's environment variables]. Binds 0.0.0.0 on the platform's port; see "
            "docs/deploy.md.",
            show_default=False,
        ),
    ] = None,
    model_dir: Annotated[
        Path | None,
        typer.Option(
            "--model-dir",
            help="With a target: the model directory to import and serve \\[default: the "
            "platform's, e.g. /opt/ml/model]. Ignored when --model is given.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve models over an OpenAI-compatible API: /v1/completions, /v1/chat/completions,
    /v1/images/generations, /v1/models, plus /v1/feedback, the admin API and the web UI.

    Every route but /health and /ready needs an API key (genloop keys create). Binds
    127.0.0.1 unless told otherwise. $GENLOOP_REDIS_URL stands in for serve.redis_url
    (rate limits shared by replicas). SIGTERM drains: no new requests, running ones
    finish (or are aborted after serve.drain_timeout_s), then the process exits.

    With --target (SageMaker, Vertex AI, Azure ML), the platform's health and prediction
    routes are served too, without a key (the platform's endpoint auth sits in front), and
    the platform's model directory is imported and served: see docs/deploy.md.

    Example: genloop serve -m code-lm@production --port 8000
    """
    from pydantic import ValidationError

    from genloop.config import ServeConfig, load_config, parse_config
    from genloop.errors import ConfigError
    from genloop.evaluate.run import evaluate_model
    from genloop.serve.app import create_app
    from genloop.serve.targets import check_target, detect_target

    platform = check_target(target) if target is not None else detect_target(os.environ)
    cfg = load_config(config, set_ or []) if config else parse_config({}, set_ or [])
    updates: dict[str, Any] = {}
    if model:
        updates["models"] = list(model)
    if host is not None:
        updates["host"] = host
    if port is not None:
        updates["port"] = port
    if ssl_certfile is not None or ssl_keyfile is not None:
        updates["ssl_certfile"], updates["ssl_keyfile"] = ssl_certfile, ssl_keyfile
    if cfg.serve.redis_url is None and os.environ.get("GENLOOP_REDIS_URL"):
        updates["redis_url"] = os.environ["GENLOOP_REDIS_URL"]  # the replicas' shared limits
    try:
        serve_cfg = ServeConfig.model_validate(cfg.serve.model_dump() | updates)
    except ValidationError as exc:
        problems = "; ".join(
            ".".join(map(str, e["loc"]))
            + ": " * bool(e["loc"])
            + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise ConfigError(f"invalid serve options: {problems}") from None
    for path in (serve_cfg.ssl_certfile, serve_cfg.ssl_keyfile):
        if path is not None and not path.is_file():
            raise ConfigError(f"TLS file not found: {path}")
    if not serve_cfg.models and not serve_cfg.upstreams and platform is None:
        raise ConfigError(
            "nothing to serve: pass --model NAME@ALIAS (or set serve.models / serve.upstreams)"
        )
    if serve_cfg.engine == "vllm":  # before anything loads: name the install command now
        from genloop.serve.engine.vllm import require_vllm_python

        require_vllm_python(serve_cfg.vllm.python)
    ws = open_workspace()
    try:
        routes = None
        if platform is not None:
            serve_cfg, routes = _platform_setup(ws, platform, serve_cfg, model_dir, host, port)
        cfg = cfg.model_copy(update={"serve": serve_cfg})
        app = create_app(ws, cfg, evaluate=evaluate_model, target=routes)
        for info in app.state.server.models.check_refs():
            console.print(f"model {info.ref} ({info.family})", highlight=False)
        if routes is not None:
            console.print(
                f"{routes.target} routes: {', '.join(sorted(routes.public))}", highlight=False
            )
        elif not _is_loopback(serve_cfg.host) and serve_cfg.ssl_certfile is None:
            err_console.print(
                f"[yellow]warning:[/] serving on {serve_cfg.host} without TLS: API keys cross "
                "the network in the clear (use --ssl-certfile/--ssl-keyfile or a TLS proxy)"
            )
        run_server(app, cfg)
    finally:
        ws.close()


def _platform_setup(
    ws: Workspace,
    platform: Target,
    serve_cfg: ServeConfig,
    model_dir: Path | None,
    host: str | None,
    port: int | None,
) -> tuple[ServeConfig, TargetRoutes]:
    """A cloud target's routes, and ``serve_cfg`` on its address and model: the platform's
    model directory is imported unless a model or upstream is named."""
    from genloop.serve.targets import import_model_dir, target_routes
    from genloop.serve.targets import model_dir as platform_model_dir

    routes = target_routes(ws, platform)
    updates: dict[str, Any] = {}
    if not serve_cfg.models and not serve_cfg.upstreams:
        path = model_dir or platform_model_dir(platform, os.environ)
        ref = import_model_dir(ws, path)
        console.print(f"imported {path} as {ref}", highlight=False)
        updates["models"] = [ref]
    if host is None:  # the platform reaches the container from outside it
        updates["host"] = "0.0.0.0"  # noqa: S104
    if port is None:
        updates["port"] = routes.port
    return serve_cfg.model_copy(update=updates), routes


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(app: FastAPI, cfg: GenloopConfig) -> None:
    """Run uvicorn with the configured limits until SIGINT/SIGTERM (which drain first)."""
    serve_cfg = cfg.serve
    config = uvicorn_config(app, serve_cfg)
    server = _make_server(config, app, serve_cfg)
    # uvicorn re-raises the signal it stopped on once it is done; after a drain that is a
    # normal exit, not a death by signal.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise SystemExit(1)
    console.print("stopped", highlight=False)


def uvicorn_config(app: FastAPI, serve_cfg: ServeConfig) -> Any:
    """uvicorn settings for ``serve_cfg``: the address, TLS and the protocol-level limits."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=serve_cfg.host,
        port=serve_cfg.port,
        ssl_certfile=str(serve_cfg.ssl_certfile) if serve_cfg.ssl_certfile else None,
        ssl_keyfile=str(serve_cfg.ssl_keyfile) if serve_cfg.ssl_keyfile else None,
        http="h11",  # its header limit is configurable (httptools' is not)
        # the app answers 431 above max_header_bytes; h11 stops buffering at twice that
        h11_max_incomplete_event_size=2 * serve_cfg.max_header_bytes,
        timeout_graceful_shutdown=int(serve_cfg.drain_timeout_s) + 5,
        timeout_keep_alive=5,
        log_config=None,
        log_level="warning",
        access_log=False,
        server_header=False,
        lifespan="on",
    )


def _make_server(config: Any, app: FastAPI, serve_cfg: ServeConfig) -> Any:
    """A uvicorn.Server that drains the engines on SIGTERM and says where it listens."""
    import asyncio

    import uvicorn

    from genloop.serve.app import begin_drain

    class Server(uvicorn.Server):
        _loop: asyncio.AbstractEventLoop | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            # Runs in the signal handler: hand the drain to the event loop.
            if not self.should_exit and self._loop is not None:
                self._loop.call_soon_threadsafe(begin_drain, app, serve_cfg.drain_timeout_s)
            super().handle_exit(sig, frame)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            self._loop = asyncio.get_running_loop()
            if self.started:
                _announce(self, app, serve_cfg)

    return Server(config)


def _announce(server: Any, app: FastAPI, serve_cfg: ServeConfig) -> None:
    import asyncio

    port = serve_cfg.port
    for s in server.servers:
        for sock in s.sockets:
            port = sock.getsockname()[1]
    scheme = "https" if serve_cfg.ssl_certfile else "http"
    host = f"[{serve_cfg.host}]" if ":" in serve_cfg.host else serve_cfg.host
    console.print(f"serving on {scheme}://{host}:{port}", highlight=False)
    sys.stdout.flush()
    state = app.state.server

    async def ready() -> None:
        await state.models.wait_started()
        loaded = [f"{m['id']} → {m['ref']}" for m in state.models.listing()]
        missing = [s.spec for s in state.models.served if s.current is None]
        if loaded:
            console.print(f"ready: {', '.join(loaded)}", highlight=False)
        for served in state.models.served:
            plan = getattr(served.current and served.current.engine, "cache_plan", None)
            if plan is not None:  # the native engine: how its batch and cache were sized
                console.print(f"{served.spec}: {plan.describe()}", highlight=False)
        if missing:
            err_console.print(f"[red]not loaded:[/] {', '.join(missing)} (see the log)")
        sys.stdout.flush()

    state.extras["announce"] = asyncio.get_running_loop().create_task(ready())
