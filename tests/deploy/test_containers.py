"""The deployment files run as declared, without a Docker engine.

The Dockerfile's ENTRYPOINT + CMD + ENV, the compose services and the Kubernetes
Deployment (+ its Secret) are read from the files, and their commands run here in
subprocesses with their environment; only what points outside this machine is replaced:
host names and ports (PostgreSQL, Redis, the listening port), and the container paths of
volumes (/data, the mounted model). Two compose replicas start at once against an empty
PostgreSQL database (the migration race), import the same mounted checkpoint, answer
/ready without a key and a chat completion each, and share one key's per-minute budget
through Redis.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy.engine import make_url

from ..conftest import reset_postgres
from ..serve.conftest import CORPUS, build_model

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("GENLOOP_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"
REQUESTS_PER_MIN = 3
SECRET_KEY = base64.urlsafe_b64encode(bytes(range(32))).decode()  # what an operator fills in
pytestmark = [pytest.mark.postgres, pytest.mark.redis]


def dockerfile() -> tuple[list[str], dict[str, str]]:
    """The runtime stage's ENTRYPOINT + CMD and its ENV."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    command: dict[str, list[str]] = {}
    env: dict[str, str] = {}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word in ("ENTRYPOINT", "CMD"):
            command[word] = json.loads(rest)
        elif word == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
    return command["ENTRYPOINT"] + command["CMD"], env


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if op == ":?" and not env.get(name):
            raise AssertionError(f"compose needs {name}: {arg}")
        return env.get(name) or (arg if op == ":-" else "")

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Here:
    """Where this machine's services are, standing in for the containers' names."""

    pg_url: str
    home: Path
    model_dir: Path

    def environment(self, declared: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in declared.items() if k not in ("PATH", "VIRTUAL_ENV")}
        pg = make_url(self.pg_url)
        if "GENLOOP_DATABASE_URL" in env:  # the compose/Secret server → the local one
            url = make_url(env["GENLOOP_DATABASE_URL"])
            env["GENLOOP_DATABASE_URL"] = url.set(
                host=pg.host,
                port=pg.port,
                username=pg.username,
                password=pg.password,
                database=pg.database,
            ).render_as_string(hide_password=False)
        if "GENLOOP_REDIS_URL" in env:  # redis://redis:6379/0 → this machine's server
            here = httpx.URL(REDIS_URL)
            url = httpx.URL(env["GENLOOP_REDIS_URL"])
            env["GENLOOP_REDIS_URL"] = str(url.copy_with(host=here.host, port=here.port))
        env["GENLOOP_HOME"] = str(self.home)  # /data: the shared volume
        if env.get("GENLOOP_MODEL_DIR", "").startswith("/models/"):  # the mounted volume
            env["GENLOOP_MODEL_DIR"] = str(self.model_dir)
        keep = {k: os.environ[k] for k in ("PATH", "HOME", "PYTHONPATH") if k in os.environ}
        return (
            keep
            | env
            | {
                "OMP_NUM_THREADS": "1",
                "GENLOOP_SECRET_KEY": env.get("GENLOOP_SECRET_KEY") or "x" * 43,
            }
        )

    def start(
        self,
        command: list[str],
        declared: dict[str, str],
        *extra: str,
        override: dict[str, str] | None = None,
    ) -> Replica:
        assert command[0] == "genloop"
        args = list(command[1:])
        port = free_port()
        args[args.index("--port") + 1] = str(port)
        args[args.index("--host") + 1] = "127.0.0.1"
        proc = subprocess.Popen(
            [sys.executable, "-m", "genloop", *args, *extra],
            env=self.environment(declared) | (override or {}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return Replica(proc, f"http://127.0.0.1:{port}")


@dataclass
class Replica:
    proc: subprocess.Popen[str]
    url: str

    def wait_ready(self, timeout: float = 90) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"replica exited {self.proc.returncode}: {self.output()}")
            try:
                r = httpx.get(self.url + "/ready", timeout=5)
                if r.status_code == 200:
                    return r
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "replica never became ready"
            time.sleep(0.2)

    def chat(self, key: str) -> httpx.Response:
        body = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        return httpx.post(
            self.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )

    def output(self) -> str:
        out, err = self.proc.communicate(timeout=30)
        return out + err

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # drains: nothing runs, so at once
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="module")
def here(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Here:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis unreachable at {REDIS_URL}: {exc}", pytrace=False)
        pytest.skip(f"Redis unreachable at {REDIS_URL}: {exc}")
    finally:
        client.close()
    from genloop.data.tokenizer import train_bpe

    reset_postgres(pg_url)  # an empty database: the replicas race to migrate it
    root = tmp_path_factory.mktemp("deploy")
    tok = train_bpe(CORPUS, root / "tok", vocab_size=320, min_frequency=1)
    return Here(pg_url, root / "data", build_model(root / "model", tok, seed=0))


def compose_service(name: str) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"][name]
    env = {"GENLOOP_SECRET_KEY": SECRET_KEY, "GENLOOP_MODEL_PATH": "./model"}
    declared = {k: interpolate(str(v), env) for k, v in service["environment"].items()}
    return [*dockerfile()[0][:1], *service["command"]], dockerfile()[1] | declared, compose


@pytest.fixture(scope="module")
def replicas(here: Here) -> Iterator[list[Replica]]:
    """The compose file's two genloop services, started at the same moment."""
    started = []
    # counters of this run only: a fresh catalog numbers its keys from 1 again, and the
    # shared Redis keeps a minute's counts of the last run's key 1
    prefix = f"genloop-test-{uuid.uuid4().hex}-"
    try:
        for name in ("genloop-1", "genloop-2"):
            command, env, _ = compose_service(name)
            started.append(
                here.start(
                    command,
                    env,
                    "--set",
                    f"serve.rate_limit.requests_per_min={REQUESTS_PER_MIN}",
                    "--set",
                    f"serve.rate_limit.redis_prefix={prefix}",
                )
            )
        for r in started:
            r.wait_ready()
        yield started
    finally:
        for r in started:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        for r in started:
            r.stop()


def test_compose_replicas_migrate_once_and_share_one_rate_limit(
    here: Here, replicas: list[Replica]
) -> None:
    from genloop.security.keys import create_key
    from genloop.workspace import Workspace, registry
    from genloop.workspace.db import current_revision, head_revision

    a, b = replicas
    for r in (a, b):  # readiness without a key, and nothing but a status
        assert httpx.get(r.url + "/ready").json() == {"status": "ready"}
        assert httpx.get(r.url + "/health").json() == {"status": "ok"}
    with Workspace.open(here.home, database_url=here.pg_url) as ws:
        assert current_revision(ws.catalog.engine) == head_revision(ws.catalog.engine)
        # both imported the mounted checkpoint at once; the catalog holds it once
        assert [v.ref for v in registry.list_models(ws, "chat")] == ["chat@1"]
        key = create_key(ws.catalog, name="deploy-test", scopes=["generate"]).plaintext
    codes = [a.chat(key).status_code, b.chat(key).status_code, a.chat(key).status_code]
    assert codes == [200] * REQUESTS_PER_MIN
    refused = b.chat(key)  # B has seen one request of this key; Redis counted three
    assert refused.status_code == 429, refused.text
    assert "retry-after" in refused.headers
    # nginx balances over exactly these replicas
    _, _, compose = compose_service("genloop-1")
    conf = (ROOT / "deploy/nginx/genloop.conf").read_text()
    upstreams = re.findall(r"^\s*server (\S+):(\d+)", conf, re.M)
    services = [
        n for n, s in compose["services"].items() if s.get("command", [""])[0] == "entrypoint"
    ]
    assert upstreams == [(n, "8000") for n in services] and len(services) == 2
    lb = compose["services"]["lb"]
    assert any(v.startswith("./deploy/nginx/genloop.conf:") for v in lb["volumes"])


def k8s_docs() -> list[dict[str, Any]]:
    return [
        d
        for p in sorted((ROOT / "deploy/k8s").glob("*.yaml"))
        for d in yaml.safe_load_all(p.read_text())
        if d
    ]


def test_kubernetes_pod_serves_the_registry_ref_and_answers_its_probes(
    here: Here, replicas: list[Replica]
) -> None:
    from genloop.workspace import Workspace, registry

    docs = k8s_docs()
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    secret = next(d for d in docs if d["kind"] == "Secret")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == [secret["metadata"]["name"]]
    filled = secret["stringData"] | {"GENLOOP_SECRET_KEY": SECRET_KEY}  # the CHANGE-ME
    env = dockerfile()[1] | filled | {e["name"]: e["value"] for e in container["env"]}
    assert env["GENLOOP_MODELS"] == "chat@production"
    with Workspace.open(here.home, database_url=here.pg_url) as ws:
        registry.promote(ws, "chat@1", "production")
    pod_proc = here.start([*dockerfile()[0][:1], *container["args"]], env)
    try:
        pod_proc.wait_ready()
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["http"] == int(container["args"][container["args"].index("--port") + 1])
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            get = container[probe]["httpGet"]
            assert get["port"] == "http"
            r = httpx.get(pod_proc.url + get["path"])  # as the kubelet calls it: no key
            assert r.status_code == 200 and "chat" not in r.text
    finally:
        pod_proc.stop()
    grace = pod["terminationGracePeriodSeconds"]
    from genloop.config import ServeConfig

    assert grace >= 5 + ServeConfig().drain_timeout_s + 5  # preStop + drain + close
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    pods_metrics = [
        m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"
    ]
    assert pods_metrics == ["genloop_num_requests_waiting"]
    # the Prometheus adapter rule maps genloop's own gauge to that name
    rule = yaml.safe_load((ROOT / "deploy/prometheus-adapter/values.yaml").read_text())
    rule = rule["rules"]["custom"][0]
    assert (
        re.sub(
            rule["name"]["matches"],
            rule["name"]["as"].replace("${1}", r"\1"),
            "genloop:num_requests_waiting",
        )
        == pods_metrics[0]
    )


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"GENLOOP_MODELS": "nope@production"}, "no model named 'nope'"),
        (
            {"GENLOOP_DATABASE_URL": "postgresql+psycopg://genloop:wrong@127.0.0.1:1/x"},
            "cannot use the catalog database",
        ),
        ({"GENLOOP_MODEL_DIR": "/nonexistent/model"}, "GENLOOP_MODEL_DIR"),
        ({"GENLOOP_DATABASE_URL": "bad credentials"}, 'role "nosuchuser" does not exist'),
    ],
)
def test_a_bad_start_is_one_line_and_a_nonzero_exit(
    here: Here, change: dict[str, str], expect: str
) -> None:
    command, env, _ = compose_service("genloop-1")
    if change.get("GENLOOP_DATABASE_URL") == "bad credentials":  # the real server, a bad user
        url = make_url(here.pg_url).set(username="nosuchuser", password="wrong")
        change = {"GENLOOP_DATABASE_URL": url.render_as_string(hide_password=False)}
    base = {"GENLOOP_MODEL_DIR": "", "GENLOOP_MODELS": "chat"}
    proc = here.start(command, env, override=base | change)
    out = proc.output()
    assert proc.proc.returncode not in (0, None)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0] and "Traceback" not in out, out
    assert "wrong" not in out  # the password stays out of the log
