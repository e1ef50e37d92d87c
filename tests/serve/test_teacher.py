"""Teachers for augmentation: a genloop model in process, and an OpenAI-compatible upstream
— here a real genloop server on loopback serving the same tiny model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from genloop.data.pairs import read_pairs, write_pairs_dataset
from genloop.errors import ConfigError, GenloopError
from genloop.pipeline.augment import augment_text
from genloop.serve.teacher import (
    Teacher,
    TeacherReply,
    TeacherRequest,
    TeacherSettings,
    check_upstream_url,
    load_engine_teacher,
    open_teacher,
    upstream_teacher,
)
from genloop.workspace import Workspace, init_workspace

from .conftest import LiveServer, make_keys, running_server, serve_config
from .test_upstream import dead_url

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY_ENV = "GENLOOP_TEST_TEACHER_KEY"
PROMPTS = ["The cat sat on", "Rain fell on the quiet town", "def add(a, b):"]


@pytest.fixture(scope="module")
def keys(module_ws: Workspace) -> dict[str, str]:
    return make_keys(module_ws)


@pytest.fixture(scope="module")
def server(module_ws: Workspace, keys: dict[str, str]) -> Iterator[LiveServer]:
    with running_server(module_ws, serve_config(), keys) as s:
        yield s


def ask(teacher: Teacher, prompts: list[str]) -> list[TeacherReply]:
    async def run() -> list[TeacherReply]:
        await teacher.start()
        try:
            requests = [TeacherRequest(str(i), p, seed=100 + i) for i, p in enumerate(prompts)]
            return await teacher.generate(requests)
        finally:
            await teacher.close()

    return asyncio.run(run())


@pytest.mark.parametrize("chat", [False, True])
def test_an_upstream_answers_as_the_model_does_in_process(
    server: LiveServer,
    module_ws: Workspace,
    keys: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    chat: bool,
) -> None:
    monkeypatch.setenv(KEY_ENV, keys["generate"])
    settings = TeacherSettings(max_tokens=6, temperature=1.0, chat=chat)  # sampled, seeded
    remote = ask(upstream_teacher(server.url, "tiny", settings, key_env=KEY_ENV), PROMPTS)
    local = ask(load_engine_teacher(module_ws, "tiny@1", settings, device="cpu"), PROMPTS)
    assert [r.error for r in remote] == [None] * 3
    assert [r.text for r in remote] == [r.text for r in local]
    assert all(r.text for r in remote)


def test_paraphrases_through_an_upstream_carry_its_lineage(
    server: LiveServer,
    keys: dict[str, str],
    model_dirs: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, keys["generate"])
    ws = init_workspace(tmp_path / "ws")
    try:
        rows = [
            {"text": f"Review {i}: the story was {w} and kind", "label": w}
            for i, w in enumerate(["warm", "cold", "bright", "dark"])
        ]
        tok = model_dirs[0]  # the model directory holds its tokenizer
        write_pairs_dataset(ws, "notes", "classification", rows, tokenizer_dir=tok, val_fraction=0)
        teacher = upstream_teacher(
            server.url + "/", "tiny", TeacherSettings(max_tokens=8), key_env=KEY_ENV
        )
        result = augment_text(ws, "notes", "paraphrase", teacher=teacher, min_chars=1)
        assert result.generated == 4
        assert result.kept + sum(result.dropped.values()) == result.generated
        data = ws.store.open_verified(result.version.artifact)
        made = [r for r in read_pairs(data, "train", "classification") if "meta" in r]
        assert made and len(made) == result.kept
        for row in made:
            lineage = row["meta"]["augment"]
            assert lineage["teacher"] == {"upstream": server.url + "/v1", "model": "tiny"}
            assert lineage["prompt"].endswith("\nRewritten:") and isinstance(lineage["seed"], int)
        assert result.version.lineage["teacher"]["upstream"] == server.url + "/v1"
        assert keys["generate"] not in str(result.version.lineage)  # the key goes nowhere
    finally:
        ws.close()


def test_a_refused_key_a_dead_server_or_an_unknown_model_stop_the_run(
    server: LiveServer, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = TeacherSettings(max_tokens=2)
    monkeypatch.setenv(KEY_ENV, keys["feedback"])  # a key without the generate scope
    with pytest.raises(GenloopError, match=rf"refused the key \(HTTP 403.*set \${KEY_ENV}"):
        ask(upstream_teacher(server.url, "tiny", settings, key_env=KEY_ENV), ["Hi"])
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(GenloopError, match=r"refused the key \(HTTP 401"):
        ask(upstream_teacher(server.url, "tiny", settings, key_env=KEY_ENV), ["Hi"])
    monkeypatch.setenv(KEY_ENV, keys["generate"])
    with pytest.raises(GenloopError, match="answered 404 for model 'nope'"):
        ask(upstream_teacher(server.url, "nope", settings, key_env=KEY_ENV), ["Hi"])
    with pytest.raises(GenloopError, match="could not be reached"):
        ask(upstream_teacher(dead_url(), "tiny", settings, key_env=KEY_ENV), ["Hi"])


def test_what_an_upstream_url_and_the_teacher_options_may_be() -> None:
    assert check_upstream_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert check_upstream_url("https://gpu.example/v1/") == "https://gpu.example/v1"
    for url, message in [
        ("ftp://host/v1", "must be an http"),
        ("http://user:secret@host/v1", "must not hold credentials"),
        ("http://host/v1?key=secret", "must not hold a query"),
        ("not a url", "must be an http"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_upstream_url(url)
    settings = TeacherSettings()
    assert open_teacher(None, settings) is None
    with pytest.raises(ConfigError, match="not both"):
        open_teacher(None, settings, model="tiny", upstream="http://h/v1")
    with pytest.raises(ConfigError, match="needs --upstream-model"):
        open_teacher(None, settings, upstream="http://h/v1")
    with pytest.raises(ConfigError, match="goes with --upstream"):
        open_teacher(None, settings, upstream_model="m")
