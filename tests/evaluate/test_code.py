"""Code evaluation: the pass@k estimator against its closed form, task files, and
evaluate_code end to end through the sandbox with stand-in generators."""

from __future__ import annotations

import gzip
import json
import sys
from fractions import Fraction
from math import comb
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from genloop.errors import GenloopError
from genloop.evaluate.code import (
    STOP_SEQUENCES,
    GenerateFn,
    Task,
    build_program,
    check_completion,
    evaluate_code,
    load_tasks,
    pass_at_k,
    truncate_completion,
)
from genloop.evaluate.results import SuiteResult

BUNDLED = Path(__file__).parents[2] / "src" / "genloop" / "evaluate" / "data" / "code_tasks.jsonl"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")


# ---------------------------------------------------------------- pass@k


@st.composite
def n_c_k(draw: st.DrawFn) -> tuple[int, int, int]:
    n = draw(st.integers(1, 300))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


@given(n_c_k())
def test_pass_at_k_matches_the_closed_form(nck: tuple[int, int, int]) -> None:
    n, c, k = nck
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_edge_cases() -> None:
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k: every draw of 3 holds a pass
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the pass fraction
    assert pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)


def test_pass_at_k_is_stable_for_large_n() -> None:
    value = pass_at_k(100_000, 1, 1000)
    assert value == pytest.approx(0.01)
    assert 0 <= pass_at_k(100_000, 50, 99_000) <= 1


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_refuses_impossible_counts(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="need"):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------- completions and programs


def test_completions_stop_where_a_new_top_level_statement_starts() -> None:
    body = "    return a + b\n"
    for stop in STOP_SEQUENCES:
        assert truncate_completion(body + stop + "rest") == body
    assert truncate_completion(body) == body
    # an indented comment or nested def stays: it is inside the function
    nested = "    # add\n    def inner():\n        return 1\n    return inner()\n"
    assert truncate_completion(nested) == nested


def test_the_program_runs_the_tests_on_the_entry_point() -> None:
    task = Task("t/0", "def f(x):\n", "def check(candidate):\n    assert candidate(1) == 2\n", "f")
    program = build_program(task, "    return x + 1\n")
    assert program == (
        "def f(x):\n    return x + 1\n\n"
        "def check(candidate):\n    assert candidate(1) == 2\n\ncheck(f)\n"
    )


# ---------------------------------------------------------------- task files


def test_the_bundled_tasks_load() -> None:
    tasks = load_tasks(BUNDLED)
    assert len(tasks) == 20
    assert len({t.task_id for t in tasks}) == 20
    for task in tasks:
        assert task.canonical_solution
        assert f"def {task.entry_point}(" in task.prompt
        assert '"""' in task.prompt  # a docstring says what to write


def write_lines(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {
    "task_id": "a/0",
    "prompt": "def f():\n",
    "test": "def check(c):\n  pass\n",
    "entry_point": "f",
}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([GOOD, "{not json"], r"tasks.jsonl:2: not valid JSON"),
        ([GOOD, "", ["a", "list"]], r"tasks.jsonl:3: expected a JSON object, got list"),
        ([{**GOOD, "test": None}], r"tasks.jsonl:1: test must be a non-empty string"),
        ([{k: v for k, v in GOOD.items() if k != "prompt"}], r":1: missing prompt"),
        ([GOOD, GOOD], r":2: task_id 'a/0' appears twice"),
        ([{**GOOD, "entry_point": "not a name"}], r":1: entry_point 'not a name' is not"),
        ([{**GOOD, "test": "assert True"}], r":1: test must define check\(candidate\)"),
        ([{**GOOD, "canonical_solution": 3}], r":1: canonical_solution must be a string"),
        ([], r"holds no tasks"),
    ],
)
def test_a_bad_task_file_names_the_line(tmp_path: Path, rows: list[object], message: str) -> None:
    path = write_lines(tmp_path / "tasks.jsonl", rows)
    with pytest.raises(GenloopError, match=message):
        load_tasks(path)


def test_a_missing_task_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GenloopError, match="does not exist"):
        load_tasks(tmp_path / "nope.jsonl")


def test_gzipped_task_files_load(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(GOOD) + "\n")
    assert load_tasks(path) == [Task("a/0", "def f():\n", GOOD["test"], "f", None)]


# ---------------------------------------------------------------- evaluate_code


def by_prompt(tasks: list[Task], answer: dict[str, str] | None = None) -> dict[str, str]:
    return {t.prompt: (answer or {}).get(t.task_id, t.canonical_solution or "") for t in tasks}


def evaluate(tasks: list[Task], generate: GenerateFn | None, **kwargs: Any) -> SuiteResult:
    settings: dict[str, Any] = {
        "num_samples": 1,
        "k": [1],
        "temperature": 0.0,
        "top_p": 1.0,
        "max_new_tokens": 64,
        "seed": 0,
        "timeout_s": 5.0,
        "memory_mb": 256,
    }
    settings.update(kwargs)
    return evaluate_code(None, None, tasks, generate_fn=generate, **settings)


@linux_only
def test_every_canonical_solution_passes_in_the_sandbox() -> None:
    """Validates the bundled task set: each reference solution passes its own tests …"""
    tasks = load_tasks(BUNDLED)
    solutions = by_prompt(tasks)
    result = evaluate(tasks, lambda prompts: [solutions[p] for p in prompts])
    failing = [s for s in result.samples if s["status"] != "passed"]
    assert result.metrics["pass@1"] == 1.0, failing
    assert result.metrics["passed"] == 20
    assert result.per_sample["pass@1"] == [1.0] * 20


@linux_only
def test_a_do_nothing_completion_fails_every_task() -> None:
    """… and the tests are not vacuous: a body that returns None passes none of them."""
    tasks = load_tasks(BUNDLED)
    result = evaluate(tasks, lambda prompts: ["    return None\n"] * len(prompts))
    assert result.metrics["pass@1"] == 0.0
    assert result.metrics["failed"] == 20


@linux_only
def test_sampled_completions_give_pass_at_k_per_task() -> None:
    tasks = load_tasks(BUNDLED)[:3]
    solutions = by_prompt(tasks)
    calls: list[list[str]] = []

    def half_right(prompts: list[str]) -> list[str]:
        calls.append(prompts)
        # per task: right, wrong, right, wrong
        return [solutions[p] if i % 2 == 0 else "    return None\n" for i, p in enumerate(prompts)]

    result = evaluate(tasks, half_right, num_samples=4, k=[1, 2, 4], temperature=0.8)
    assert len(calls) == 1 and len(calls[0]) == 12  # four samples of each of three prompts
    metrics = result.metrics
    assert metrics["pass@1"] == pytest.approx(0.5)
    assert metrics["pass@2"] == pytest.approx(1 - 1 / 6)
    assert metrics["pass@4"] == 1.0
    assert (metrics["passed"], metrics["failed"]) == (6, 6)
    assert result.per_sample["pass@1"] == [0.5, 0.5, 0.5]
    settings = result.settings
    assert settings["num_samples"] == 4 and settings["temperature"] == 0.8
    assert "rlimits" in settings["sandbox_layers"]
    kinds = [s["status"] for s in result.samples]
    assert kinds.count("passed") == 3 and kinds.count("failed") == 3


@linux_only
def test_greedy_decoding_asks_once_per_task() -> None:
    tasks = load_tasks(BUNDLED)[:2]
    solutions = by_prompt(tasks)
    calls: list[list[str]] = []

    def generate(prompts: list[str]) -> list[str]:
        calls.append(prompts)
        return [solutions[p] for p in prompts]

    result = evaluate(tasks, generate, num_samples=5, k=[1, 5], temperature=0.0)
    assert calls == [[t.prompt for t in tasks]]
    assert result.metrics["pass@5"] == 1.0
    assert result.metrics["passed"] == 10


@linux_only
def test_timeouts_and_errors_are_counted_apart_from_failures() -> None:
    tasks = load_tasks(BUNDLED)[:4]
    answers = {
        tasks[0].task_id: "    while True:\n        pass\n",
        tasks[1].task_id: "    x = bytearray(10 * 2**30)\n",
        tasks[2].task_id: "    return None\n",
    }
    table = by_prompt(tasks, answers)
    result = evaluate(tasks, lambda prompts: [table[p] for p in prompts], timeout_s=1.0)
    metrics = result.metrics
    assert {k: metrics[k] for k in ("passed", "failed", "timeout", "error")} == {
        "passed": 1,
        "failed": 1,
        "timeout": 1,
        "error": 1,
    }
    assert metrics["pass@1"] == 0.25


@linux_only
def test_the_same_generations_give_the_same_numbers() -> None:
    tasks = load_tasks(BUNDLED)[:3]
    solutions = by_prompt(tasks)

    def generate(prompts: list[str]) -> list[str]:
        return [solutions[p] for p in prompts]

    first = evaluate(tasks, generate, num_samples=2, k=[1, 2], temperature=0.5)
    second = evaluate(tasks, generate, num_samples=2, k=[1, 2], temperature=0.5)
    assert first.metrics == second.metrics
    assert first.per_sample == second.per_sample


@linux_only
def test_check_completion_runs_one_completion() -> None:
    task = load_tasks(BUNDLED)[0]
    right = check_completion(task, task.canonical_solution or "", timeout_s=5, memory_mb=256)
    assert right.status == "passed"
    wrong = check_completion(task, "    return 0\n", timeout_s=5, memory_mb=256)
    assert wrong.status == "failed"
    assert "AssertionError" in wrong.stderr_tail


def test_bad_settings_are_refused_before_generating() -> None:
    tasks = load_tasks(BUNDLED)[:1]

    def never(prompts: list[str]) -> list[str]:
        raise AssertionError("must not generate")

    with pytest.raises(GenloopError, match="every k"):
        evaluate(tasks, never, num_samples=2, k=[3])
    with pytest.raises(GenloopError, match="no code tasks"):
        evaluate([], never)
    with pytest.raises(GenloopError, match="a model and tokenizer, or a generate_fn"):
        evaluate(tasks, None)


def test_a_generator_that_returns_the_wrong_count_is_an_error() -> None:
    tasks = load_tasks(BUNDLED)[:2]
    with pytest.raises(GenloopError, match="returned 1 completions for 2"):
        evaluate(tasks, lambda prompts: ["    return 1\n"])
