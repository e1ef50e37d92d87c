"""Functional correctness of generated code: pass@k on HumanEval-style tasks, top to bottom.

    1. tasks        JSONL lines ``{"task_id", "prompt", "test", "entry_point",
                    "canonical_solution"?}`` (the HumanEval layout; ``.jsonl.gz`` too)
    2. generate     ``num_samples`` completions per prompt (one, copied, when decoding is
                    greedy), cut at the first line that starts a new top-level statement
    3. check        each distinct completion runs with its task's tests in the sandbox
                    (``prompt + completion + test + check(entry_point)``), a few at once
    4. score        pass@k per task with the unbiased estimator, averaged over tasks;
                    outcomes counted as passed / failed / timeout / error

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): with
``n`` samples of which ``c`` pass, the chance that at least one of ``k`` drawn without
replacement passes is ``1 - C(n-c, k) / C(n, k)``, computed as a product so that large
``n`` does not overflow.
"""

from __future__ import annotations

import gzip
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from genloop.data.jsonl import parse_jsonl
from genloop.errors import GenloopError
from genloop.evaluate.results import SuiteResult
from genloop.evaluate.sandbox import SandboxResult, run_python

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# a completion ends where a new top-level statement starts (HumanEval's stop sequences)
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
OUTCOMES = ("passed", "failed", "timeout", "error")
GENERATION_BATCH = 8
SHOWN_SAMPLES = 3  # of each kind (passed, not passed) kept for the report
STDERR_SHOWN = 400  # characters of a failing sample's stderr kept for the report

GenerateFn = Callable[[list[str]], list[str]]  # prompts → one completion each


@dataclass(frozen=True)
class Task:
    """One function to complete: ``prompt`` (signature + docstring), ``test`` defining
    ``check(candidate)``, the name of the function to check, and a reference solution."""

    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str | None = None


def load_tasks(path: Path | str) -> list[Task]:
    """Read a task file; a bad line is named with what is wrong with it."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise GenloopError(f"code task file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GenloopError(f"cannot read code task file {path}: {e}") from None
    tasks: list[Task] = []
    seen: set[str] = set()
    for _lineno, where, row in parse_jsonl(lines, path):
        task = _task_from_row(row, where)
        if task.task_id in seen:
            raise GenloopError(f"{where}: task_id {task.task_id!r} appears twice")
        seen.add(task.task_id)
        tasks.append(task)
    if not tasks:
        raise GenloopError(f"code task file {path} holds no tasks")
    return tasks


def _task_from_row(row: object, where: str) -> Task:
    if not isinstance(row, dict):
        raise GenloopError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("task_id", "prompt", "test", "entry_point") if k not in row]
    if missing:
        raise GenloopError(f"{where}: missing {', '.join(missing)}")
    for key in ("task_id", "prompt", "test", "entry_point"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise GenloopError(f"{where}: {key} must be a non-empty string")
    solution = row.get("canonical_solution")
    if solution is not None and not isinstance(solution, str):
        raise GenloopError(f"{where}: canonical_solution must be a string")
    if not row["entry_point"].isidentifier():
        raise GenloopError(f"{where}: entry_point {row['entry_point']!r} is not a Python name")
    if "def check(" not in row["test"]:
        raise GenloopError(f"{where}: test must define check(candidate)")
    return Task(
        task_id=row["task_id"],
        prompt=row["prompt"],
        test=row["test"],
        entry_point=row["entry_point"],
        canonical_solution=solution,
    )


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` passed.

    ``1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)``.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 ≤ c ≤ n and 1 ≤ k ≤ n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every draw of k holds a passing sample
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def truncate_completion(text: str, stop: Sequence[str] = STOP_SEQUENCES) -> str:
    """The completion up to the first stop sequence (the function body, not what follows)."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def build_program(task: Task, completion: str) -> str:
    """The script the sandbox runs: the completed function, its tests, and the check."""
    return f"{task.prompt}{completion}\n{task.test}\ncheck({task.entry_point})\n"


def check_completion(
    task: Task, completion: str, *, timeout_s: float, memory_mb: int
) -> SandboxResult:
    """Run ``completion`` against the task's tests in the sandbox."""
    return run_python(build_program(task, completion), timeout_s=timeout_s, memory_mb=memory_mb)


def evaluate_code(
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None,
    tasks: Sequence[Task],
    *,
    num_samples: int,
    k: Sequence[int],
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    timeout_s: float,
    memory_mb: int,
    generate_fn: GenerateFn | None = None,
    workers: int | None = None,
) -> SuiteResult:
    """pass@k of the model on ``tasks``, with outcome counts and a few samples.

    ``generate_fn`` (prompts → completions) replaces the model, for tests and for other
    generators; by default the model and tokenizer generate with the given settings.
    ``workers`` is how many sandboxes run at once (default: up to 4, one per CPU).
    """
    if not tasks:
        raise GenloopError("no code tasks to evaluate")
    if num_samples < 1:
        raise GenloopError(f"num_samples must be at least 1, not {num_samples}")
    bad = [x for x in k if not 1 <= x <= num_samples]
    if not k or bad:
        raise GenloopError(f"every k must be between 1 and num_samples ({num_samples}); got {k}")
    greedy = temperature == 0
    generate = generate_fn or _model_generate(
        model,
        tokenizer,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )

    # 2. generate: greedy decoding gives the same text every time, so ask once per task
    copies = 1 if greedy else num_samples
    prompts = [task.prompt for task in tasks for _ in range(copies)]
    raw = generate(prompts)
    if len(raw) != len(prompts):
        raise GenloopError(f"the generator returned {len(raw)} completions for {len(prompts)}")
    completions = [  # (tasks, num_samples)
        [truncate_completion(raw[t * copies + s % copies]) for s in range(num_samples)]
        for t in range(len(tasks))
    ]

    # 3. check each distinct (task, completion) once
    distinct = sorted({(t, c) for t, row in enumerate(completions) for c in row})

    def check(item: tuple[int, str]) -> SandboxResult:
        t, completion = item
        return check_completion(tasks[t], completion, timeout_s=timeout_s, memory_mb=memory_mb)

    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        outcomes = dict(zip(distinct, pool.map(check, distinct), strict=True))

    # 4. score
    counts: Counter[str] = Counter()
    passed_per_task: list[int] = []
    for t, row in enumerate(completions):
        statuses = [outcomes[(t, c)].status for c in row]
        counts.update(statuses)
        passed_per_task.append(statuses.count("passed"))
    per_sample = {f"pass@{x}": [pass_at_k(num_samples, c, x) for c in passed_per_task] for x in k}
    metrics = {name: float(np.mean(values)) for name, values in per_sample.items()}
    metrics.update({outcome: float(counts[outcome]) for outcome in OUTCOMES})
    layers = next(iter(outcomes.values())).layers
    return SuiteResult(
        suite="code",
        metrics=metrics,
        per_sample=per_sample,
        samples=_shown_samples(tasks, completions, outcomes),
        settings={
            "num_tasks": len(tasks),
            "num_samples": num_samples,
            "k": list(k),
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "batch_size": GENERATION_BATCH,
            "stop": list(STOP_SEQUENCES),
            "timeout_s": timeout_s,
            "memory_mb": memory_mb,
            "sandbox_layers": list(layers),
            "task_ids": [task.task_id for task in tasks],
        },
    )


def _model_generate(
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> GenerateFn:
    if model is None or tokenizer is None:
        raise GenloopError("evaluate_code needs a model and tokenizer, or a generate_fn")

    def generate(prompts: list[str]) -> list[str]:
        from genloop.evaluate.generate import generate_texts

        return generate_texts(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            batch_size=GENERATION_BATCH,
            stop=list(STOP_SEQUENCES),
        )

    return generate


def _shown_samples(
    tasks: Sequence[Task],
    completions: list[list[str]],
    outcomes: dict[tuple[int, str], SandboxResult],
) -> list[dict[str, Any]]:
    """The first few passing and the first few other samples, for the report."""
    shown: list[dict[str, Any]] = []
    kept = Counter[bool]()
    for t, row in enumerate(completions):
        for completion in dict.fromkeys(row):
            result = outcomes[(t, completion)]
            ok = result.status == "passed"
            if kept[ok] < SHOWN_SAMPLES:
                kept[ok] += 1
                shown.append(
                    {
                        "task_id": tasks[t].task_id,
                        "prompt": tasks[t].prompt,
                        "completion": completion,
                        "status": result.status,
                        "seconds": result.seconds,
                        "stderr_tail": result.stderr_tail[-STDERR_SHOWN:] if not ok else "",
                    }
                )
    return shown
