"""Property-based requests generated from the server's own OpenAPI schema (schemathesis):
whatever the inputs — valid by the schema, or deliberately not — the answer is never a
5xx, and every error keeps the OpenAI shape.

(The schemathesis pytest plugin's lazy fixture loader does not run under pytest 9, so the
operations are walked here and each gets a Hypothesis test of its own.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from genloop.workspace import Workspace

from .conftest import LiveServer, auth, make_keys, running_server, serve_config

EXAMPLES = 8  # per operation and mode: about 600 requests in all


class AdminKey:
    """An admin key, replaced if a generated request revokes it (DELETE /v1/admin/keys)."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.key = make_keys(ws)["admin"]

    def current(self) -> str:
        from genloop.errors import GenloopError
        from genloop.security.keys import clear_cache, create_key, verify_key

        clear_cache()
        try:
            verify_key(self.ws.catalog, self.key)
        except GenloopError:
            self.key = create_key(self.ws.catalog, name="fuzz", scopes=["admin"]).plaintext
        return self.key


@pytest.fixture(scope="module")
def fuzz_server(module_ws: Workspace) -> Iterator[tuple[LiveServer, AdminKey]]:
    cfg = serve_config(
        max_tokens=8,
        max_n=2,
        max_prompt_tokens=64,
        request_timeout_s=10,
        rate_limit={"requests_per_min": None, "tokens_per_min": None},
    )
    key = AdminKey(module_ws)
    with running_server(module_ws, cfg, make_keys(module_ws)) as s:
        yield s, key


def check(server: LiveServer, key: AdminKey, case: Any) -> None:
    response = case.call(base_url=server.url, headers=auth(key.current()), timeout=30)
    where = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, f"{where} → {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, where


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(fuzz_server: tuple[LiveServer, AdminKey], mode: GenerationMode) -> None:
    server, key = fuzz_server
    schema = schemathesis.openapi.from_dict(server.app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 35
    fuzzed = 0
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            check(server, key, case)

        try:
            run()
        except Unsatisfiable:  # nothing to break: an operation without parameters
            assert mode == GenerationMode.NEGATIVE
            continue
        fuzzed += 1
    assert fuzzed >= 25
