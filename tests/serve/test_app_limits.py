"""Limits and protections of a live server: body and header sizes, concurrency, prompt
and generation bounds, per-key rate limits, guardrails, CORS and TLS."""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest

from genloop.workspace import Workspace

from .conftest import (
    LiveServer,
    auth,
    make_keys,
    running_server,
    serve_config,
    wait_for_request_row,
)


def completion(c: httpx.Client, **kw: object) -> httpx.Response:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4} | kw
    return c.post("/v1/completions", json=body)


@pytest.fixture(scope="module")
def small(module_ws: Workspace) -> object:
    """A server with small limits."""
    cfg = serve_config(
        max_body_bytes=4096,
        max_header_bytes=2048,
        max_prompt_tokens=16,
        max_tokens=64,
        max_n=2,
        max_stop=1,
        max_concurrent_requests=2,
    )
    with running_server(module_ws, cfg, make_keys(module_ws)) as s:
        yield s


def test_body_over_the_limit_is_413_declared_or_streamed(small: LiveServer) -> None:
    with small.client(small.keys["client"]) as c:
        big = json.dumps({"model": "tiny", "prompt": "x" * 5000})
        r = c.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks() -> object:  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b" " * 1000

        r = c.post(
            "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 413


def test_headers_over_the_limit_are_refused(small: LiveServer) -> None:
    with small.client(small.keys["client"]) as c:
        r = c.get("/v1/models", headers={"X-Pad": "a" * 2500})
        assert r.status_code == 431 and "headers" in r.json()["error"]["message"]
        assert c.get("/v1/models").status_code == 200
    # far beyond: uvicorn's h11 stops reading (400, never a 500 or a hang)
    host, port = small.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n")
        assert s.recv(100).split(b" ")[1] in (b"400", b"431")


def test_request_bounds_name_the_field(small: LiveServer) -> None:
    with small.client(small.keys["client"]) as c:
        cases = {
            "prompt": {"prompt": "word " * 40},
            "max_tokens": {"max_tokens": 65},
            "n": {"n": 3},
            "stop": {"stop": ["a", "b"]},
        }
        for param, extra in cases.items():
            r = completion(c, **extra)
            assert r.status_code == 400, (param, r.text)
            assert r.json()["error"]["param"] == param, r.text
        r = c.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi " * 40}]},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert completion(c, prompt="hi").status_code == 200


def test_malformed_bodies_are_400_not_500(small: LiveServer) -> None:
    with small.client(small.keys["client"]) as c:
        for body in (b"{bad json", b"[]", b'"x"', b"null", b'{"model": 1, "prompt": []}'):
            r = c.post(
                "/v1/completions", content=body, headers={"Content-Type": "application/json"}
            )
            assert r.status_code == 400, (body, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = completion(c, unknown_field=1)
        assert r.status_code == 400 and r.json()["error"]["param"] == "unknown_field"
        r = completion(c, prompt=[10**12])
        assert r.status_code == 400


def test_concurrency_limit_answers_503_with_retry_after(small: LiveServer) -> None:
    host, port = small.url.removeprefix("http://").split(":")
    held = []
    try:
        for _ in range(2):  # two requests in progress: their bodies never finish arriving
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + small.keys["client"].encode() + b"\r\n"
                b"Content-Length: 1000\r\n\r\n{"
            )
            held.append(s)
        time.sleep(0.3)
        with small.client(small.keys["client"]) as c:
            r = c.get("/v1/models")
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "service_unavailable"
            assert c.get("/health").status_code == 200  # liveness is exempt
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    with small.client(small.keys["client"]) as c:
        assert c.get("/v1/models").status_code == 200


def test_rate_limits_per_key_answer_429_with_retry_after(served_ws: Workspace) -> None:
    cfg = serve_config(rate_limit={"requests_per_min": 3, "tokens_per_min": None})
    keys = make_keys(served_ws)
    with running_server(served_ws, cfg, keys) as s:
        with s.client(keys["client"]) as c:
            codes = [c.get("/v1/models").status_code for _ in range(4)]
            assert codes == [200, 200, 200, 429]
            r = c.get("/v1/models")
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert 1 <= int(r.headers["retry-after"]) <= 20
        with s.client(keys["generate"]) as other:  # another key has its own budget
            assert other.get("/v1/models").status_code == 200
    cfg = serve_config(rate_limit={"requests_per_min": None, "tokens_per_min": 40})
    with running_server(served_ws, cfg, keys) as s, s.client(keys["client"]) as c:
        # greedy, so the completion's length does not depend on the draw (a sampled one may
        # stop at an early end-of-text and leave the bucket full)
        first = completion(c, max_tokens=30, prompt="Hello there", temperature=0)
        assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 30
        # the 30 generated tokens were charged after the fact: the bucket is short now
        r = completion(c, max_tokens=5, prompt="Hello there, how are you today?")
        assert r.status_code == 429 and "tokens" in r.json()["error"]["message"]


def test_guardrails_refuse_blocked_prompts_and_cut_runaway_repetition(
    served_ws: Workspace,
) -> None:
    cfg = serve_config()
    cfg = cfg.model_copy(
        update={
            "security": cfg.security.model_copy(
                update={
                    "guardrails": cfg.security.guardrails.model_copy(
                        update={"blocklist_input": ["forbidden"], "max_repetition": 4}
                    )
                }
            )
        }
    )
    keys = make_keys(served_ws)
    with running_server(served_ws, cfg, keys) as s, s.client(keys["client"]) as c:
        r = completion(c, prompt="this is FORBIDDEN text")
        assert r.status_code == 400 and r.json()["error"]["code"] == "content_refused"
        # the tiny random model repeats "cat" forever: the guard cuts it
        r = completion(c, prompt="The cat", max_tokens=400, temperature=0)
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert r.json()["usage"]["completion_tokens"] < 400
        row = wait_for_request_row(served_ws, r.json()["id"])
        assert "repetition" in row.flags


def test_cors_is_off_by_default_and_follows_the_config(served_ws: Workspace) -> None:
    keys = make_keys(served_ws)
    origin = {"Origin": "https://app.example"}
    with running_server(served_ws, serve_config(), keys) as s, s.client(keys["client"]) as c:
        r = c.get("/v1/models", headers=origin)
        assert "access-control-allow-origin" not in r.headers
    cfg = serve_config(cors_origins=["https://app.example"])
    with running_server(served_ws, cfg, keys) as s, s.client(keys["client"]) as c:
        r = c.get("/v1/models", headers=origin)
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        pre = c.options(
            "/v1/completions",
            headers=origin
            | {
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert pre.status_code == 200
        evil = c.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in evil.headers


def _self_signed(dirpath: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = dirpath / "cert.pem", dirpath / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_serves_https_only(served_ws: Workspace, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    cfg = serve_config(ssl_certfile=str(cert), ssl_keyfile=str(key))
    keys = make_keys(served_ws)
    with running_server(served_ws, cfg, keys) as s:
        assert s.url.startswith("https://")
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as c:
            assert c.get(s.url + "/health").json() == {"status": "ok"}
            r = c.post(
                s.url + "/v1/completions",
                headers=auth(keys["client"]),
                json={"model": "tiny", "prompt": "Hi", "max_tokens": 2},
            )
            assert r.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(s.url.replace("https://", "http://") + "/health", timeout=5)
