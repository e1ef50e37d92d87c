"""Fault-injection soak: two ``genloop serve`` replicas on a private PostgreSQL and Redis,
mixed traffic for N minutes, and three faults, each in its own window.

Everything runs on 127.0.0.1 in a temporary folder, so the faults never touch the
machine's own services:

- PostgreSQL 15 (``initdb`` + ``pg_ctl`` from /usr/lib/postgresql/15/bin, or $PG_BIN) on a
  free port; initdb refuses to run as root, so as root the cluster is made and run as the
  ``postgres`` user (``runuser -u postgres``);
- ``redis-server --save "" --appendonly no`` on a free port;
- a workspace whose catalog is that PostgreSQL, a random 2-layer Llama (32 wide, the
  serving tests' tiny model) registered as ``tiny@production``, an admin key and a client
  key (generate + feedback);
- two ``genloop serve`` processes (``serve.redis_url`` → the private Redis, so rate limits
  go through it on every request).

The client (httpx, asyncio) routes like a load balancer: round robin over the replicas
whose ``/ready`` answers 200 (polled every 0.25 s), and a request that cannot connect is
sent again to the other replica (``rerouted``). Traffic: chat completions, streaming
chats, feedback on earlier responses (to the replica that served them) and admin reads.

Faults, one after another with quiet time between: SIGKILL replica 1 (started again a
second later), Redis stopped (``--hold`` seconds, then started again), PostgreSQL restarted
(``pg_ctl stop -m fast``, ``--hold`` seconds down, ``pg_ctl start``). A fault's window runs
from its start until it is undone; its recovery time runs from then until a probe (chat →
feedback on it → admin read) succeeds on every replica. A request counts as "in a fault"
when it overlaps a window (for latency: a window plus its recovery).

Last, the drain: requests in flight on replica 0, SIGTERM, time until the process exits,
next to ``terminationGracePeriodSeconds`` in deploy/k8s/deployment.yaml.

    python benchmarks/bench_soak.py --quick          # ~0.5 min of traffic
    python benchmarks/bench_soak.py --minutes 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
CORPUS = [
    "The cat sat on the mat. The dog ran in the park. A bird sang in the tree.\n",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Rain fell on the quiet town, and the river rose slowly through the night.\n",
    "Hello there! How are you today? I am fine, thank you very much.\n",
] * 10
PROMPTS = ["Hello there!", "Tell me about the river.", "def add(a, b):", "How are you today?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f}s")


# ---------------------------------------------------------------------------------------
# private services
# ---------------------------------------------------------------------------------------


class Postgres:
    """A throw-away PostgreSQL cluster in ``root`` (trust auth, loopback, fsync off)."""

    def __init__(self, root: Path) -> None:
        if not (PG_BIN / "initdb").exists():
            raise SystemExit(f"PostgreSQL binaries not found in {PG_BIN} (set $PG_BIN)")
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        # initdb and postgres refuse to run as root: then the cluster belongs to 'postgres'
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        root.mkdir(parents=True)
        if self.as_user:
            shutil.chown(root, "postgres")
            root.parent.chmod(0o711)  # mkdtemp's 0700 would keep 'postgres' out
        self._run(
            "initdb", "-D", str(self.data), "-U", "genloop", "--auth=trust", "-E", "UTF8",
            "--no-sync",
        )  # fmt: skip
        self.url = f"postgresql://genloop@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*self.as_user, str(PG_BIN / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {(done.stderr or done.stdout)[-1000:]}")

    def _ctl(self, *args: str) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "postgres.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", opts, "-w", *args)

    def start(self) -> None:
        self._ctl("start")

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")


class Redis:
    """A redis-server without persistence on a free port."""

    def __init__(self, root: Path) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server not found on PATH")
        self.root = root
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        cmd += ["--save", "", "--appendonly", "no", "--dir", str(self.root)]
        with (self.root / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None


# ---------------------------------------------------------------------------------------
# workspace, model and replicas
# ---------------------------------------------------------------------------------------


def build_workspace(root: Path, database_url: str) -> dict[str, str]:
    """The workspace on PostgreSQL, tiny@production (a random 2 × 32 Llama) and two keys."""
    import torch

    from genloop.data.tokenizer import load_hf_tokenizer, train_bpe
    from genloop.models.family import get_family
    from genloop.models.pretrained import save_hf_dir
    from genloop.security.keys import create_key
    from genloop.workspace import init_workspace, registry

    tok_dir = train_bpe(CORPUS, root / "tok", vocab_size=320, min_frequency=1)
    tok = load_hf_tokenizer(tok_dir)
    torch.manual_seed(0)
    model = get_family("causal_lm").build(
        {
            "preset": "tiny",
            "vocab_size": len(tok),
            "n_layer": 2,
            "n_embd": 32,
            "n_head": 2,
            "context_length": 1024,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
    )
    model_dir = save_hf_dir(model, root / "model", family="causal_lm", tokenizer_dir=tok_dir)
    ws = init_workspace(root / "ws", database_url=database_url)
    try:
        registry.register_model(ws, "tiny", "causal_lm", model_dir)
        registry.promote(ws, "tiny@1", "production")
        return {
            "admin": create_key(ws.catalog, name="soak-admin", scopes=["admin"]).plaintext,
            "client": create_key(
                ws.catalog, name="soak-client", scopes=["generate", "feedback"]
            ).plaintext,
        }
    finally:
        ws.close()


@dataclass
class Replica:
    name: str
    port: int
    args: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=log)

    def wait_ready(self, admin_key: str, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} exited:\n{tail}")
            try:
                # the admin key is sent even where /ready needs none
                r = httpx.get(self.url + "/ready", headers=auth(admin_key), timeout=2)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def make_replicas(
    root: Path, database_url: str, redis_url: str, threads: int, extra_sets: list[str]
) -> list[Replica]:
    env = os.environ | {
        "GENLOOP_HOME": str(root / "ws"),
        "GENLOOP_DATABASE_URL": database_url,
        "GENLOOP_REDIS_URL": redis_url,  # read by the container entrypoint, where it exists
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    sets = [
        "serve.device=cpu",
        f"serve.redis_url={redis_url}",
        # limits far above the load: Redis is asked on every request, nobody gets a 429
        "serve.rate_limit.requests_per_min=1000000",
        "serve.rate_limit.tokens_per_min=100000000",
        "serve.ui=false",
        "serve.max_batch_size=16",
        "serve.kv_cache_bytes=67108864",
        "security.guardrails.max_repetition=null",  # a random model repeats itself
        *extra_sets,
    ]
    replicas = []
    for i in range(2):
        port = free_port()
        args = [sys.executable, "-m", "genloop", "serve", "-m", "tiny@production"]
        args += ["--port", str(port)]
        for s in sets:
            args += ["--set", s]
        replicas.append(Replica(f"replica{i}", port, args, env, root / f"replica{i}.log"))
    return replicas


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------------------------------
# the load generator
# ---------------------------------------------------------------------------------------


@dataclass
class Call:
    op: str
    replica: int
    start: float
    end: float
    status: int | None  # None: no HTTP response (connection refused, reset, broken stream)
    error: str = ""


@dataclass
class Fault:
    name: str
    start: float
    end: float = 0.0
    recovered: float | None = None


@dataclass
class Soak:
    replicas: list[Replica]
    keys: dict[str, str]
    max_tokens: int
    calls: list[Call] = field(default_factory=list)
    up: list[bool] = field(default_factory=list)
    responses: list[tuple[int, str]] = field(default_factory=list)  # (replica, response id)
    acked: set[int] = field(default_factory=set)  # feedback ids the servers acknowledged
    rerouted: int = 0
    rr: int = 0
    stop: bool = False

    def pick(self) -> int:
        live = [i for i, ok in enumerate(self.up) if ok] or list(range(len(self.replicas)))
        self.rr += 1
        return live[self.rr % len(live)]


async def watch_ready(soak: Soak, client: Any) -> None:
    """The load balancer's health check: /ready every 0.25 s."""
    import httpx

    while not soak.stop:
        for i, rep in enumerate(soak.replicas):
            try:
                r = await client.get(
                    rep.url + "/ready", headers=auth(soak.keys["admin"]), timeout=1.0
                )
                soak.up[i] = r.status_code == 200
            except httpx.HTTPError:
                soak.up[i] = False
        await asyncio.sleep(0.25)


def chat_body(stream: bool, max_tokens: int) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "stream": stream,
    }


async def send(
    soak: Soak, client: Any, op: str, target: int | None = None, response_id: str = ""
) -> Call:
    """One request of kind ``op``, rerouted once to the other replica if it cannot connect
    (nothing was sent: safe to retry whatever the request)."""
    import httpx

    i = soak.pick() if target is None else target
    for attempt in range(2):
        start = time.monotonic()
        try:
            status = await one_request(soak, client, op, i, response_id)
            call = Call(op, i, start, time.monotonic(), status)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            soak.up[i] = False
            if attempt == 0:
                soak.rerouted += 1
                i = 1 - i
                continue
            call = Call(op, i, start, time.monotonic(), None, type(exc).__name__)
        except httpx.HTTPError as exc:  # reset or cut mid-way: not retried (not idempotent)
            call = Call(op, i, start, time.monotonic(), None, type(exc).__name__)
        soak.calls.append(call)
        return call
    raise AssertionError("unreachable")


async def one_request(soak: Soak, client: Any, op: str, i: int, response_id: str) -> int:
    url = soak.replicas[i].url
    headers = auth(soak.keys["admin" if op == "admin" else "client"])
    if op == "chat":
        r = await client.post(
            url + "/v1/chat/completions", json=chat_body(False, soak.max_tokens), headers=headers
        )
        if r.status_code == 200:
            soak.responses.append((i, r.json()["id"]))
        return int(r.status_code)
    if op == "stream":
        body = chat_body(True, soak.max_tokens)
        async with client.stream(
            "POST", url + "/v1/chat/completions", json=body, headers=headers
        ) as r:
            if r.status_code != 200:
                await r.aread()
                return int(r.status_code)
            done, streamed_id = False, None
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        return 599  # an error inside a 200 stream counts as a server error
                    streamed_id = event.get("id", streamed_id)
            if not done:
                return 599
            if streamed_id:
                soak.responses.append((i, streamed_id))
            return 200
    if op == "feedback":
        body = {"response_id": response_id, "rating": 1}
        r = await client.post(url + "/v1/feedback", json=body, headers=headers)
        if r.status_code == 200:
            soak.acked.add(int(r.json()["id"]))
        return int(r.status_code)
    if op == "admin":
        path = random.choice(["/v1/admin/models", "/v1/admin/status", "/v1/admin/feedback"])
        r = await client.get(url + path, headers=headers)
        return int(r.status_code)
    raise ValueError(op)


OPS = [("chat", 0.4), ("stream", 0.25), ("feedback", 0.2), ("admin", 0.15)]


async def worker(soak: Soak, client: Any) -> None:
    names, weights = zip(*OPS, strict=True)
    while not soak.stop:
        op = random.choices(names, weights)[0]
        if op == "feedback":
            if not soak.responses:
                continue
            target, response_id = random.choice(soak.responses[-50:])
            if not soak.up[target]:
                target = 1 - target  # its replica is gone: the catalog is shared
            await send(soak, client, op, target, response_id)
        else:
            await send(soak, client, op)


async def probe(soak: Soak, client: Any, i: int) -> bool:
    """chat → feedback on it → admin read, straight to replica ``i``: all 200?"""
    import httpx

    url, headers = soak.replicas[i].url, auth(soak.keys["client"])
    try:
        r = await client.post(
            url + "/v1/chat/completions", json=chat_body(False, 2), headers=headers, timeout=5
        )
        if r.status_code != 200:
            return False
        body = {"response_id": r.json()["id"], "rating": -1}
        r = await client.post(url + "/v1/feedback", json=body, headers=headers, timeout=5)
        if r.status_code != 200:
            return False
        soak.acked.add(int(r.json()["id"]))
        r = await client.get(url + "/v1/admin/models", headers=auth(soak.keys["admin"]), timeout=5)
        return bool(r.status_code == 200)
    except httpx.HTTPError:
        return False


async def recover(soak: Soak, client: Any, fault: Fault, limit_s: float = 60.0) -> None:
    ok = [False] * len(soak.replicas)
    while not all(ok) and time.monotonic() - fault.end < limit_s:
        for i in range(len(ok)):
            ok[i] = ok[i] or await probe(soak, client, i)
        if not all(ok):
            await asyncio.sleep(0.1)
    if all(ok):
        fault.recovered = time.monotonic()


async def run_faults(
    soak: Soak, client: Any, pg: Postgres, redis: Redis, gap: float, hold: float
) -> list[Fault]:
    faults = []

    async def window(name: str, inject: Any, undo: Any, down: float) -> None:
        await asyncio.sleep(gap)
        fault = Fault(name, time.monotonic())
        print(f"fault {name}: injected", flush=True)
        await asyncio.to_thread(inject)
        await asyncio.sleep(down)
        await asyncio.to_thread(undo)
        fault.end = time.monotonic()
        await recover(soak, client, fault)
        took = f"{fault.recovered - fault.end:.2f}s" if fault.recovered else "not within 60s"
        print(f"fault {name}: window {fault.end - fault.start:.2f}s, recovery {took}", flush=True)
        faults.append(fault)

    victim = soak.replicas[1]
    await window("replica_kill", victim.kill, victim.start, 1.0)
    await window("redis_stop", redis.stop, redis.start, hold)
    await window("postgres_restart", pg.stop, pg.start, hold)
    return faults


async def soak_run(
    soak: Soak, pg: Postgres, redis: Redis, seconds: float, concurrency: int, hold: float
) -> list[Fault]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency * 4, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        soak.up = [True] * len(soak.replicas)
        watcher = asyncio.create_task(watch_ready(soak, client))
        workers = [asyncio.create_task(worker(soak, client)) for _ in range(concurrency)]
        started = time.monotonic()
        faults = await run_faults(soak, client, pg, redis, gap=max(2.0, seconds / 6), hold=hold)
        await asyncio.sleep(max(2.0, seconds - (time.monotonic() - started)))
        soak.stop = True
        await asyncio.gather(*workers, watcher)
    return faults


# ---------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------


def p99_ms(latencies: list[float]) -> float | None:
    if not latencies:
        return None
    ordered = sorted(latencies)
    return round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1)


def overlaps(c: Call, start: float, end: float) -> bool:
    return c.start <= end and c.end >= start


def in_catalog(database_url: str, feedback_ids: set[int], response_ids: set[str]) -> Any:
    """(feedback ids, request ids) of those given that the catalog holds."""
    from sqlalchemy import select

    from genloop.workspace.db import Catalog
    from genloop.workspace.tables import Feedback, RequestLog

    catalog = Catalog(database_url)
    try:
        with catalog.session() as s:
            feedback = set(s.scalars(select(Feedback.id).where(Feedback.id.in_(feedback_ids))))
            requests = set(s.scalars(select(RequestLog.id).where(RequestLog.id.in_(response_ids))))
        return feedback, requests
    finally:
        catalog.dispose()


def grace_period_s() -> int | None:
    text = (REPO / "deploy" / "k8s" / "deployment.yaml").read_text()
    m = re.search(r"terminationGracePeriodSeconds:\s*(\d+)", text)
    return int(m.group(1)) if m else None


async def measure_drain(rep: Replica, key: str, in_flight: int, max_tokens: int) -> dict[str, Any]:
    """Streams in flight on ``rep``, SIGTERM once each has its first token, time to exit."""
    import httpx

    first = [asyncio.Event() for _ in range(in_flight)]
    finished: list[bool] = []

    async def stream(client: httpx.AsyncClient, ev: asyncio.Event) -> None:
        body = chat_body(True, max_tokens) | {"temperature": 0}
        done = False
        try:
            async with client.stream(
                "POST", rep.url + "/v1/chat/completions", json=body, headers=auth(key)
            ) as r:
                async for line in r.aiter_lines():
                    ev.set()
                    done = done or line == "data: [DONE]"
        except httpx.HTTPError:
            pass
        ev.set()
        finished.append(done)

    assert rep.proc is not None
    async with httpx.AsyncClient(timeout=120) as client:
        tasks = [asyncio.create_task(stream(client, ev)) for ev in first]
        await asyncio.gather(*(ev.wait() for ev in first))
        sigterm = time.monotonic()
        rep.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(rep.proc.wait, 120)
        drain = time.monotonic() - sigterm
        await asyncio.gather(*tasks)
    return {
        "drain_s": round(drain, 2),
        "drain_exit_code": code,
        "drain_in_flight": in_flight,
        "drain_streams_completed": sum(finished),
    }


def summarize(soak: Soak, faults: list[Fault], database_url: str, seconds: float) -> dict[str, Any]:
    calls = soak.calls

    def in_window(c: Call) -> bool:
        return any(overlaps(c, f.start, f.end) for f in faults)

    def in_fault(c: Call) -> bool:  # window plus recovery, for latency
        return any(overlaps(c, f.start, f.recovered or f.end) for f in faults)

    def is_5xx(c: Call) -> bool:
        return c.status is not None and c.status >= 500

    answered = [c for c in calls if c.status is not None]
    served = {response_id for _, response_id in soak.responses}
    stored, recorded = in_catalog(database_url, soak.acked, served)
    figures: dict[str, Any] = {
        "requests_sent": len(calls) + soak.rerouted,
        "requests_per_s": round(len(calls) / seconds, 2),
        "http_5xx_outside_faults": sum(is_5xx(c) and not in_window(c) for c in calls),
        "http_5xx_in_faults": sum(is_5xx(c) and in_window(c) for c in calls),
        "http_4xx": sum(c.status is not None and 400 <= c.status < 500 for c in calls),
        "conn_rerouted": soak.rerouted,
        "conn_failed_in_faults": sum(c.status is None and in_window(c) for c in calls),
        "conn_failed_outside_faults": sum(c.status is None and not in_window(c) for c in calls),
        "feedback_acked": len(soak.acked),
        "feedback_stored": len(stored),
        "feedback_lost": len(soak.acked - stored),
        # 200 responses without their request row (SIGKILL loses what was not yet written)
        "request_rows_missing": len(served - recorded),
        "p99_ms_outside_faults": p99_ms([c.end - c.start for c in answered if not in_fault(c)]),
        "p99_ms_in_faults": p99_ms([c.end - c.start for c in answered if in_fault(c)]),
    }
    for f in faults:
        figures[f"window_s_{f.name}"] = round(f.end - f.start, 2)
        figures[f"recovery_s_{f.name}"] = (
            round(f.recovered - f.end, 2) if f.recovered is not None else None
        )
    by_op: dict[str, dict[str, int]] = {}
    for c in calls:
        key = str(c.status) if c.status is not None else (c.error or "no_response")
        by_op.setdefault(c.op, {}).setdefault(key, 0)
        by_op[c.op][key] += 1
    print("outcomes by kind of request:", json.dumps(by_op), flush=True)
    outside = [c for c in calls if is_5xx(c) and not in_window(c)]
    for c in outside[:10]:
        print(f"  5xx outside a fault: {c.op} on replica{c.replica} → {c.status}", flush=True)
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="About half a minute of traffic.")
    parser.add_argument("--minutes", type=float, default=None, help="Traffic time (default 3).")
    parser.add_argument("--concurrency", type=int, default=None, help="Concurrent clients.")
    parser.add_argument("--hold", type=float, default=None, help="Seconds Redis/PG stay down.")
    parser.add_argument("--max-tokens", type=int, default=16, help="Tokens per chat.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica.")
    parser.add_argument(
        "--serve-set", action="append", default=[], help="Extra --set for both replicas."
    )
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder.")
    args = parser.parse_args(argv)
    minutes = args.minutes if args.minutes is not None else (0.5 if args.quick else 3.0)
    concurrency = args.concurrency or (4 if args.quick else 8)
    hold = args.hold if args.hold is not None else (2.0 if args.quick else 5.0)
    seconds = minutes * 60
    random.seed(0)

    tmp = Path(tempfile.mkdtemp(prefix="genloop-soak-"))
    pg = redis = None
    replicas: list[Replica] = []
    try:
        t0 = time.monotonic()
        pg = Postgres(tmp / "pg")
        pg.start()
        redis = Redis(tmp)
        redis.start()
        keys = build_workspace(tmp, pg.url)
        replicas = make_replicas(tmp, pg.url, redis.url, args.threads, args.serve_set)
        for rep in replicas:
            rep.start()
        for rep in replicas:
            rep.wait_ready(keys["admin"])
        print(
            f"set up in {time.monotonic() - t0:.1f}s: PostgreSQL :{pg.port}, Redis "
            f":{redis.port}, replicas {', '.join(r.url for r in replicas)}",
            flush=True,
        )
        soak = Soak(replicas, keys, args.max_tokens)
        started = time.monotonic()
        faults = asyncio.run(soak_run(soak, pg, redis, seconds, concurrency, hold))
        elapsed = time.monotonic() - started
        drain = asyncio.run(measure_drain(replicas[0], keys["client"], 4, 256))
        replicas[1].stop()  # SIGTERM: its last request rows are written
        figures = summarize(soak, faults, pg.url, elapsed) | drain
    finally:
        for rep in replicas:
            rep.stop()
        if redis is not None:
            redis.stop()
        if pg is not None:
            try:
                pg.stop()
            except RuntimeError as exc:
                print(f"PostgreSQL did not stop cleanly: {exc}", file=sys.stderr)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    from genloop.config import ServeConfig

    grace = grace_period_s()
    # the longest a replica may take to exit: the drain's limit, then uvicorn's own
    # (cli/serve.py: timeout_graceful_shutdown = drain_timeout_s + 5)
    drain_timeout = ServeConfig().drain_timeout_s
    worst = drain_timeout + 5
    figures["k8s_grace_period_s"] = grace
    figures["drain_timeout_s"] = drain_timeout
    figures["drain_worst_case_s"] = worst
    figures["grace_fits"] = grace is not None and grace > max(worst, figures["drain_s"])
    figures.update(
        {"seconds": round(elapsed, 1), "concurrency": concurrency, "hold_s": hold}
        | {"quick": args.quick}
    )

    print(f"\nrequests sent:                {figures['requests_sent']}")
    print(f"5xx outside fault windows:    {figures['http_5xx_outside_faults']} (goal 0)")
    print(f"5xx inside fault windows:     {figures['http_5xx_in_faults']}")
    print(
        f"connection errors:            {figures['conn_rerouted']} rerouted, "
        f"{figures['conn_failed_in_faults']} failed in faults, "
        f"{figures['conn_failed_outside_faults']} outside"
    )
    print(
        f"feedback acknowledged/stored: {figures['feedback_acked']}/"
        f"{figures['feedback_stored']} ({figures['feedback_lost']} lost, goal 0)"
    )
    print(f"responses without a request row: {figures['request_rows_missing']}")
    print(
        f"p99 latency:                  {figures['p99_ms_outside_faults']} ms outside faults, "
        f"{figures['p99_ms_in_faults']} ms in faults (with recovery)"
    )
    for f in faults:
        print(
            f"{f.name + ':':30}window {figures[f'window_s_{f.name}']}s, "
            f"recovery {figures[f'recovery_s_{f.name}']}s"
        )
    print(
        f"drain:                        {figures['drain_s']}s with {figures['drain_in_flight']} "
        f"streams in flight ({figures['drain_streams_completed']} completed); k8s "
        f"terminationGracePeriodSeconds {grace}, worst case {worst:g}s "
        f"(serve.drain_timeout_s {drain_timeout:g} + 5) → "
        + ("fits" if figures["grace_fits"] else "DOES NOT FIT")
    )
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
