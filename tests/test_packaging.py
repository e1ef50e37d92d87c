"""The deployment files users copy: they parse, and they say what the server needs.

``docker build`` runs only where a Docker engine answers; everything else is checked on
the files themselves.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kubernetes_manifests_probe_health_and_ready() -> None:
    docs = [d for p in sorted((ROOT / "deploy/k8s").glob("*.yaml")) for d in load_all(p)]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "Secret"} <= kinds
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert any(e.get("secretRef", {}).get("name") == "genloop" for e in container["envFrom"])
    # every label selector matches the pod template
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    # the grace period outlasts the server's default drain
    from genloop.config import ServeConfig

    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > ServeConfig().drain_timeout_s


def test_compose_runs_replicas_on_postgres_and_redis() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "genloop-1", "genloop-2", "lb"} <= services.keys()
    for name in ("genloop-1", "genloop-2"):
        env = services[name]["environment"]
        assert env["GENLOOP_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["GENLOOP_REDIS_URL"].startswith("redis://redis:")
        assert "GENLOOP_SECRET_KEY" in env
        assert services[name]["command"][0] == "entrypoint"


def test_dockerfile_serves_as_an_unprivileged_user() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in text and "base-cuda" in text
    assert "torch==2.13.0" in text and "USER 10001" in text
    assert 'CMD ["entrypoint"' in text and "/health" in text


def test_workflows_run_make_test_and_gate_before_promoting() -> None:
    ci = yaml.safe_load((ROOT / ".github/workflows/ci.yml").read_text())
    steps = ci["jobs"]["test"]["steps"]
    assert any(s.get("run") == "make test" for s in steps)
    release = yaml.safe_load((ROOT / ".github/workflows/model-release.yml").read_text())
    runs = [s.get("run", "") for s in release["jobs"]["release"]["steps"]]
    gate = next(i for i, r in enumerate(runs) if "--to gate" in r)
    deploy = next(i for i, r in enumerate(runs) if "--from deploy" in r)
    assert gate < deploy  # a failing gate step stops the job before promotion


def test_ci_entry_point_calls_make_test() -> None:
    assert "make test" in (ROOT / ".ci/run").read_text()


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_build_where_an_engine_exists() -> None:
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("no Docker engine answers")
    subprocess.run(["docker", "build", "-t", "genloop-test", str(ROOT)], check=True, timeout=3600)
