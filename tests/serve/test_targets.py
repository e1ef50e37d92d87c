"""Cloud targets (``genloop serve --target``): each platform's contract driven as the
platform drives it, on a live server on loopback with a tiny model imported from the
platform's model directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from genloop.errors import ConfigError
from genloop.serve.targets import detect_target, import_model_dir, model_dir, target_routes
from genloop.workspace import Workspace, init_workspace

from ..tiny_encoders import build_bert, encoder_tokenizer
from .conftest import LiveServer, make_keys, serve_config

GREEDY = {"temperature": 0, "max_tokens": 4}


def _serve(ws: Workspace, target: str, env: dict[str, str]) -> Iterator[LiveServer]:
    """Import the model from the platform's directory, then serve it with the target."""
    from genloop.serve.app import create_app

    ref = import_model_dir(ws, model_dir(target, env))  # type: ignore[arg-type]
    routes = target_routes(ws, target, env)  # type: ignore[arg-type]
    cfg = serve_config(models=[ref])
    with LiveServer(create_app(ws, cfg, target=routes), cfg, make_keys(ws)) as server:
        yield server


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    ws = init_workspace(tmp_path_factory.mktemp("ws"))
    yield ws
    ws.close()


@pytest.fixture(scope="module")
def sagemaker(
    ws: Workspace, model_dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    # SageMaker mounts the model at /opt/ml/model; SM_MODEL_DIR points elsewhere in tests
    mounted = tmp_path_factory.mktemp("opt-ml") / "model"
    shutil.copytree(model_dirs[0], mounted)
    yield from _serve(ws, "sagemaker", {"SM_MODEL_DIR": str(mounted)})


@pytest.fixture(scope="module")
def vertex(ws: Workspace, model_dirs: tuple[Path, Path]) -> Iterator[LiveServer]:
    env = {
        "AIP_HTTP_PORT": "8080",
        "AIP_HEALTH_ROUTE": "/v1/endpoints/123/deployedModels/456",
        "AIP_PREDICT_ROUTE": "/v1/endpoints/123/deployedModels/456:predict",
        "AIP_STORAGE_URI": str(model_dirs[1]),
    }
    yield from _serve(ws, "vertex", env)


@pytest.fixture(scope="module")
def azureml(
    ws: Workspace, model_dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    # Azure mounts a registered model's folder inside $AZUREML_MODEL_DIR
    root = tmp_path_factory.mktemp("azureml-models")
    shutil.copytree(model_dirs[0], root / "tiny-chat")
    yield from _serve(ws, "azureml", {"AZUREML_MODEL_DIR": str(root)})


@pytest.fixture(scope="module")
def vertex_embeddings(
    ws: Workspace, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("vertex-enc")
    bert = build_bert(root / "enc", encoder_tokenizer(root / "tok"), context=32)
    yield from _serve(ws, "vertex", {"AIP_STORAGE_URI": f"file://{bert}"})


def test_detect_target_from_platform_environment() -> None:
    assert detect_target({"SM_MODEL_DIR": "/opt/ml/model"}) == "sagemaker"
    assert detect_target({"AIP_HTTP_PORT": "8080", "AIP_PREDICT_ROUTE": "/p"}) == "vertex"
    assert detect_target({"AZUREML_MODEL_DIR": "/var/azureml-app/models"}) == "azureml"
    assert detect_target({"HOME": "/root"}) is None
    assert detect_target({"GENLOOP_TARGET": "sagemaker"}) == "sagemaker"
    assert detect_target({"GENLOOP_TARGET": "none", "AZUREML_MODEL_DIR": "/m"}) is None


def test_sagemaker_ping_and_invocations(sagemaker: LiveServer) -> None:
    with sagemaker.client() as c:
        assert c.get("/ping").status_code == 200  # no key: SageMaker calls it
        one = c.post("/invocations", json={"prompt": "The cat"} | GREEDY)
        assert one.status_code == 200, one.text
        assert one.json()["finish_reason"] in ("length", "stop")
        assert one.json()["usage"]["completion_tokens"] <= 4
        batch = c.post(
            "/invocations",
            json={
                "instances": ["The cat", {"messages": [{"role": "user", "content": "Hi"}]}],
                "parameters": GREEDY,
            },
        )
        assert batch.status_code == 200, batch.text
        first, second = batch.json()["predictions"]
        assert first["text"] == one.json()["text"]  # greedy: same prompt, same text
        assert second["message"]["role"] == "assistant"
        plain = c.post("/invocations", content="The cat", headers={"Content-Type": "text/plain"})
        assert plain.status_code == 200, plain.text
        assert plain.json()["text"] != ""
    # the model served is the one imported from the mounted directory
    assert [m["id"] for m in sagemaker.state.models.listing()] == ["model@1"]


def test_sagemaker_bad_payloads_are_4xx_json(sagemaker: LiveServer) -> None:
    with sagemaker.client() as c:
        for body, status in (
            (b"{not json", 400),
            (b'{"instances": []}', 400),
            (b'{"instances": [{"prompt": "x", "temperature": 9}]}', 400),
            (b'{"instances": [{"prompt": "x", "messages": []}]}', 400),
            (b"[" + b'"x",' * 64 + b'"x"]', 400),  # a list is one instance, not a prompt
            (b'{"instances": [' + b'"x",' * 64 + b'"x"]}', 413),
            (b'{"instances": ["x", "y"], "parameters": {"n": 40}}', 413),
            (b'{"prompt": "x", "max_tokens": 100000000}', 400),
            (b'{"messages": [{"role": "wizard", "content": "x"}]}', 400),
        ):
            r = c.post("/invocations", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (body[:40], r.text)
            assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_vertex_contract(vertex: LiveServer) -> None:
    health = "/v1/endpoints/123/deployedModels/456"
    with vertex.client() as c:
        assert c.get(health).status_code == 200
        r = c.post(
            health + ":predict",
            json={"instances": [{"prompt": "Rain fell"}, "Hello"], "parameters": GREEDY},
        )
        assert r.status_code == 200, r.text
        predictions = r.json()["predictions"]
        assert len(predictions) == 2 and all(isinstance(p["text"], str) for p in predictions)
        bad = c.post(health + ":predict", json={"inputs": "Hello"})
        assert bad.status_code == 400
        assert "instances" in bad.json()["error"]
        bad = c.post(health + ":predict", json={"instances": [{"prompt": "x", "model": "y"}]})
        assert bad.status_code == 400 and "model" in bad.json()["error"]
        too_big = c.post(health + ":predict", content=b"x" * (2 << 20))  # over max_body_bytes
        assert too_big.status_code == 413 and "error" in too_big.json()
        # the genloop API is still there, behind its keys
        assert c.post("/v1/completions", json={"model": "x", "prompt": "a"}).status_code == 401


def test_azureml_contract(azureml: LiveServer) -> None:
    with azureml.client() as c:
        assert c.get("/").json() == {"status": "Healthy"}
        assert c.get("/ready").status_code == 200
        r = c.post("/score", json={"instances": [{"prompt": "The dog", "max_tokens": 3}]})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["usage"]["completion_tokens"] <= 3
        bad = c.post("/score", json={"instances": [42]})
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "BadRequest"
        assert "instances[0]" in bad.json()["error"]["message"]
    assert [m["id"] for m in azureml.state.models.listing()] == ["tiny-chat@1"]


def test_platform_calls_are_charged_to_the_platform_key(sagemaker: LiveServer) -> None:
    from genloop.security.keys import list_keys

    names = {k.name for k in list_keys(sagemaker.state.ws.catalog)}
    assert "platform-sagemaker" in names


def test_model_dir_errors_name_the_fix(tmp_path: Path, ws: Workspace) -> None:
    with pytest.raises(ConfigError, match="does not download"):
        model_dir("vertex", {"AIP_STORAGE_URI": "gs://bucket/model"})
    with pytest.raises(ConfigError, match="AZUREML_MODEL_DIR is not set"):
        model_dir("azureml", {})
    with pytest.raises(ConfigError, match="--model-dir"):
        import_model_dir(ws, tmp_path / "absent")


@pytest.mark.integration
def test_cli_serves_sagemaker_detected_from_environment(
    tmp_path: Path, model_dirs: tuple[Path, Path]
) -> None:
    """`genloop serve` with SageMaker's environment: imports /opt/ml/model, answers /ping."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {
        "GENLOOP_HOME": str(tmp_path / "ws"),
        "SM_MODEL_DIR": str(model_dirs[0]),
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    subprocess.run(
        [sys.executable, "-m", "genloop", "init"], env=env, check=True, capture_output=True
    )
    cmd = [sys.executable, "-m", "genloop", "serve", "--host", "127.0.0.1", "--set"]
    proc = subprocess.Popen(
        [*cmd, "serve.device=cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        r = httpx.post(
            f"http://127.0.0.1:{port}/invocations", json={"prompt": "Hi"} | GREEDY, timeout=30
        )
        assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode()
    assert b"imported" in out and b"sagemaker routes: /invocations, /ping" in out


def test_cli_bad_target_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from genloop.cli.main import app

    monkeypatch.setenv("GENLOOP_HOME", str(tmp_path / "ws"))
    r = CliRunner().invoke(app, ["serve", "--target", "lambda"])
    # a ConfigError: main() prints it as one line and exits non-zero
    assert r.exit_code != 0 and isinstance(r.exception, ConfigError)
    message = "--target (GENLOOP_TARGET) must be one of sagemaker, vertex, azureml, none"
    assert message in str(r.exception)


def test_vertex_embedding_model(vertex_embeddings: LiveServer) -> None:
    with vertex_embeddings.client() as c:
        r = c.post(
            "/predict",  # the default route outside Vertex
            json={"instances": ["a cat", {"input": "a dog"}], "parameters": {"dimensions": 8}},
        )
        assert r.status_code == 200, r.text
        vectors = [p["embedding"] for p in r.json()["predictions"]]
        assert [len(v) for v in vectors] == [8, 8] and vectors[0] != vectors[1]
        bad = c.post("/predict", json={"instances": [{"prompt": "a cat"}]})
        assert bad.status_code == 400 and "embedding model" in bad.json()["error"]


def test_a_restart_reuses_the_imported_version(
    tmp_path: Path, model_dirs: tuple[Path, Path]
) -> None:
    ws = init_workspace(tmp_path / "ws")
    try:
        mounted = tmp_path / "model"
        shutil.copytree(model_dirs[0], mounted)
        first = import_model_dir(ws, mounted)
        assert import_model_dir(ws, mounted) == first == "model@1"
        (mounted / "generation_config.json").write_text('{"max_new_tokens": 3}')
        assert import_model_dir(ws, mounted) == "model@2"  # other files: a new version
    finally:
        ws.close()
