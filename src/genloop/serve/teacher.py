"""Teachers: a generator that answers a batch of prompts, for data augmentation.

Two kinds behind one small interface (:class:`Teacher`):

* :class:`EngineTeacher`: a genloop text model (a registry ref or a local model directory)
  in this process, on the serving engine through the batch runner ``genloop generate
  --input`` uses (``serve/batch.py``: continuous batching, per-item seeds);
* :class:`UpstreamTeacher`: an OpenAI-compatible server (vLLM, another genloop server, a
  hosted API) at ``--upstream URL``, its model named by ``--upstream-model``, its key
  read from an environment variable (``$OPENAI_API_KEY`` unless told another), never
  from the command line, where ``ps`` shows it, nor from the URL.

A prompt is sent as plain text (``/v1/completions``: the model continues it) or, with
``chat``, as one user message (``/v1/chat/completions``; a genloop model renders its chat
template). Each request carries its own seed, so a seeded teacher gives the same answers
again (an upstream does when it honours ``seed``).

The upstream URL is the operator's choice, like ``serve.upstreams``: private and loopback
addresses are allowed (that is where one's own vLLM runs). What reaches it is bounded:
http(s) only, no credentials or query in the URL (the URL is recorded in every generated
row's lineage), no redirects followed, no proxy from the environment, each answer at most
``MAX_ANSWER_BYTES``, each request within ``timeout_s``. A refused key (401/403), an
unknown model (404) or a server that cannot be reached stops the run with one clear error;
any other failure is that item's ``error`` and the run goes on.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from genloop.errors import ConfigError, GenloopError

if TYPE_CHECKING:
    import httpx

    from genloop.serve.engine.engine import Engine
    from genloop.workspace.workspace import Workspace

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
MAX_ANSWER_BYTES = 4 * 1024 * 1024
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class TeacherSettings:
    max_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    chat: bool = False  # send each prompt as a user message


@dataclass(frozen=True)
class TeacherRequest:
    id: str
    prompt: str
    seed: int
    stop: tuple[str, ...] | None = None  # None: the teacher's settings


@dataclass(frozen=True)
class TeacherReply:
    id: str
    text: str | None  # None: failed, see error
    error: str | None = None


class Teacher(Protocol):
    settings: TeacherSettings

    def lineage(self) -> dict[str, Any]:
        """What generated rows record as their teacher (a model ref or an upstream)."""
        ...

    async def start(self) -> None: ...

    async def generate(self, requests: list[TeacherRequest]) -> list[TeacherReply]:
        """One reply per request, in the requests' order."""
        ...

    async def close(self) -> None: ...


# ------------------------------------------------------------------------ in process


class EngineTeacher:
    """A genloop text model on the serving engine. ``load`` builds the engine, in
    ``start()``: naming a teacher is cheap, so a bad dataset is reported before a model
    loads."""

    def __init__(
        self,
        load: Callable[[], Engine],
        lineage: dict[str, Any],
        settings: TeacherSettings,
    ) -> None:
        self._load = load
        self._engine: Engine | None = None
        self.settings = settings
        self._lineage = lineage

    def lineage(self) -> dict[str, Any]:
        return dict(self._lineage)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise GenloopError("the teacher is not started")
        return self._engine

    async def start(self) -> None:
        self._engine = await asyncio.to_thread(self._load)
        await self._engine.start()

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.close()
            self._engine = None

    async def generate(self, requests: list[TeacherRequest]) -> list[TeacherReply]:
        from genloop.serve.batch import BatchItem, run_batch
        from genloop.serve.engine.types import SamplingParams

        s = self.settings
        params = SamplingParams(
            max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, stop=s.stop
        )
        items = []
        for r in requests:
            own: dict[str, Any] = {"seed": r.seed}
            if r.stop is not None:
                own["stop"] = r.stop
            if s.chat:
                message = {"role": "user", "content": r.prompt}
                items.append(BatchItem(r.id, messages=[message], params=own))
            else:
                items.append(BatchItem(r.id, prompt=r.prompt, params=own))
        with tempfile.TemporaryDirectory(prefix="genloop-teacher-") as tmp:
            out = Path(tmp) / "answers.jsonl"
            await run_batch(self.engine, items, out, params=params)
            lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        by_id = {str(line["id"]): line for line in lines}
        return [_engine_reply(r.id, by_id.get(r.id)) for r in requests]


def _engine_reply(request_id: str, line: dict[str, Any] | None) -> TeacherReply:
    if line is None:
        return TeacherReply(request_id, None, "no answer")
    if "error" in line:
        return TeacherReply(request_id, None, str(line["error"]))
    if line.get("finish_reason") not in ("stop", "length"):
        return TeacherReply(request_id, None, f"generation ended early: {line['finish_reason']}")
    return TeacherReply(request_id, str(line["text"]))


def load_engine_teacher(
    ws: Workspace | None,
    model: str,
    settings: TeacherSettings,
    *,
    device: str = "auto",
    batch_size: int = 16,
) -> EngineTeacher:
    """The model ``model`` names (a registry ref, or a model directory's path with a '/')
    as a teacher; text models only."""
    from genloop.config import ServeConfig
    from genloop.serve.engine import load_engine
    from genloop.serve.engine.loader import model_family
    from genloop.workspace import registry

    local = Path(model).expanduser()
    lineage: dict[str, Any]
    if ("/" in model or model.startswith(".")) and local.is_dir():
        path, name, version = local, local.resolve().name, None
        family = model_family(local)
        lineage = {"model_dir": str(local.resolve()), "family": family}
    else:
        if ws is None:
            raise GenloopError(f"{model!r} is not a model directory, and no workspace is open")
        info = registry.resolve(ws, model)
        path, name, version, family = (
            ws.store.open_verified(info.artifact),  # the manifest is checked
            info.name,
            info.version,
            info.family,
        )
        lineage = {"model": info.ref, "model_version_id": info.id, "family": family}
    if family not in ("causal_lm", "seq2seq"):
        raise GenloopError(
            f"{model} is a {family} model; a teacher generates text: give a causal_lm or "
            "seq2seq model, or --upstream URL --upstream-model NAME"
        )
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, not {device!r}")
    cfg = ServeConfig(
        device=device,  # checked above
        max_batch_size=batch_size,
        max_queue=batch_size,
        max_tokens=max(settings.max_tokens, 1),
        request_timeout_s=24 * 3600.0,  # a batch job has no client waiting on it
    )

    def load() -> Engine:
        return load_engine(path, model_name=name, model_version=version, cfg=cfg)

    return EngineTeacher(load, lineage, settings)


# -------------------------------------------------------------------------- upstream


def check_upstream_url(url: str) -> str:
    """``url`` as a base URL ending in ``/v1``; a clear error for what may not be one."""
    import httpx

    from genloop.serve.upstream import normalize_base_url

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigError(f"--upstream {url!r} is not a URL ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(
            f"--upstream must be an http(s) URL such as http://host:8000/v1, not {url!r}"
        )
    if parsed.userinfo:
        raise ConfigError(
            "--upstream must not hold credentials (they would be recorded in the lineage); "
            "put the key in an environment variable (--api-key-env)"
        )
    if parsed.query or parsed.fragment:
        raise ConfigError("--upstream must not hold a query or fragment: give the base URL")
    return normalize_base_url(str(parsed.copy_with(query=None, fragment=None)))


class UpstreamTeacher:
    """An OpenAI-compatible server (module docstring)."""

    def __init__(
        self,
        url: str,
        model: str,
        settings: TeacherSettings,
        *,
        api_key: str | None = None,
        key_env: str = DEFAULT_KEY_ENV,
        concurrency: int = 8,
        timeout_s: float = 120.0,
    ) -> None:
        if not model:
            raise ConfigError("--upstream-model is empty: name the model the server serves")
        if concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, not {concurrency}")
        self.base_url = check_upstream_url(url)
        self.model = model
        self.settings = settings
        self.key_env = key_env
        self._key = api_key
        self._concurrency = concurrency
        self._timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None

    def lineage(self) -> dict[str, Any]:
        return {"upstream": self.base_url, "model": self.model}

    async def start(self) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self._timeout_s, connect=CONNECT_TIMEOUT_S),
            follow_redirects=False,
            trust_env=False,  # never through a proxy from the environment
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def generate(self, requests: list[TeacherRequest]) -> list[TeacherReply]:
        if self._client is None:
            raise GenloopError("the upstream teacher is not started")
        client = self._client
        gate = asyncio.Semaphore(self._concurrency)

        async def one(r: TeacherRequest) -> TeacherReply:
            async with gate:
                return await self._one(client, r)

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def _one(self, client: httpx.AsyncClient, r: TeacherRequest) -> TeacherReply:
        import httpx

        s = self.settings
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": r.seed,
        }
        stop = s.stop if r.stop is None else r.stop
        if stop:
            body["stop"] = list(stop)
        if s.chat:
            path, body["messages"] = "/chat/completions", [{"role": "user", "content": r.prompt}]
        else:
            path, body["prompt"] = "/completions", r.prompt
        url = self.base_url + path
        try:
            async with client.stream("POST", url, json=body) as response:
                raw = await _read_limited(response)
                status = response.status_code
        except httpx.ConnectError as exc:
            raise GenloopError(
                f"upstream {self.base_url} could not be reached ({exc}); is it running?"
            ) from None
        except (httpx.HTTPError, _TooLarge) as exc:
            return TeacherReply(r.id, None, f"{type(exc).__name__}: {exc}")
        message = _error_message(raw)
        if status in (401, 403):
            raise GenloopError(
                f"upstream {self.base_url} refused the key (HTTP {status}: {message}); set "
                f"${self.key_env} to a key it accepts"
            )
        if status == 404:
            raise GenloopError(
                f"upstream {self.base_url} answered 404 for model {self.model!r} ({message}); "
                "check --upstream-model and that the URL ends at the API root (…/v1)"
            )
        if status != 200:
            return TeacherReply(r.id, None, f"HTTP {status}: {message}")
        try:
            choice = json.loads(raw)["choices"][0]
            text = choice["message"]["content"] if s.chat else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            return TeacherReply(r.id, None, "the answer is not an OpenAI completion")
        if not isinstance(text, str):
            return TeacherReply(r.id, None, "the answer holds no text")
        return TeacherReply(r.id, text)


class _TooLarge(Exception):
    pass


async def _read_limited(response: httpx.Response) -> bytes:
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise _TooLarge(f"an answer over {MAX_ANSWER_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _error_message(raw: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error body, else its first 200 bytes."""
    try:
        error = json.loads(raw).get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:300]
    except (ValueError, AttributeError):
        pass
    return raw[:200].decode("utf-8", "replace")


def upstream_teacher(
    url: str, model: str, settings: TeacherSettings, *, key_env: str = DEFAULT_KEY_ENV
) -> UpstreamTeacher:
    """An upstream teacher whose key is read from ``$key_env`` (none when unset)."""
    if not key_env:
        raise ConfigError("--api-key-env is empty: name the environment variable of the key")
    return UpstreamTeacher(url, model, settings, api_key=os.environ.get(key_env), key_env=key_env)


def open_teacher(
    ws: Workspace | None,
    settings: TeacherSettings,
    *,
    model: str | None = None,
    upstream: str | None = None,
    upstream_model: str | None = None,
    key_env: str = DEFAULT_KEY_ENV,
    device: str = "auto",
    batch_size: int = 16,
) -> Teacher | None:
    """The teacher the options name (``--teacher`` or ``--upstream`` +
    ``--upstream-model``), or None when they name none."""
    if model is not None and upstream is not None:
        raise ConfigError("give --teacher MODEL or --upstream URL, not both")
    if upstream is None:
        if upstream_model is not None:
            raise ConfigError("--upstream-model goes with --upstream URL")
        if model is None:
            return None
        return load_engine_teacher(ws, model, settings, device=device, batch_size=batch_size)
    if upstream_model is None:
        raise ConfigError("--upstream needs --upstream-model NAME: the model the server serves")
    return upstream_teacher(upstream, upstream_model, settings, key_env=key_env)
