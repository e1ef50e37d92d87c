"""The ``lm_eval`` suite: lm-evaluation-harness tasks from local YAML files, in process.

Users who already describe their benchmarks in the harness's task format (a YAML with
``task``, ``dataset_path``, ``doc_to_text``, ``output_type``, ``metric_list`` …) run them
with ``genloop eval MODEL --lm-eval-tasks path/to/task.yaml``. The harness runs in this
process with its ``hf`` model wrapped around the model and tokenizer ``genloop eval``
already loaded (and verified against their manifest), so the numbers are the harness's own,
recorded like every other suite's: one metric per task and metric (``TASK/acc``), its
per-document values for ``genloop eval compare``'s confidence intervals, a few samples for
the report.

Nothing downloads. The task files are checked before the model loads (a missing file, a file
that is not a task YAML, or a ``dataset_path`` that names a hub dataset is a clear error), and
the run happens with the Hugging Face libraries in offline mode
(``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE``), so a task that would fetch anything fails
instead. Data comes from local files: ``dataset_path: json`` (or csv, parquet, text, arrow)
with ``dataset_kwargs.data_files``, or a local dataset directory. As with the harness itself,
a task YAML may run Python from its own folder (``!function utils.fn``): only run task files
you trust.

lm-evaluation-harness is an optional dependency (the ``dev`` extra has it); without it the
suite says what to install.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.errors import ConfigError, GenloopError
from genloop.evaluate.results import SuiteResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

INSTALL = "pip install 'lm-eval>=0.4.13,<0.5' tenacity"
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")
OFFLINE_ENV = (
    "HF_DATASETS_OFFLINE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_EVALUATE_OFFLINE",
)
SAMPLES_PER_TASK = 3  # examples kept for the report


def check_task_files(paths: Sequence[Path]) -> list[Path]:
    """The task YAML files, resolved; a :class:`ConfigError` naming the first bad one."""
    if not paths:
        raise ConfigError(
            "the lm_eval suite needs task files: give --lm-eval-tasks path/to/task.yaml "
            "(or eval.lm_eval_tasks)"
        )
    out = []
    for path in paths:
        path = Path(path).expanduser()
        if not path.exists():
            raise ConfigError(f"lm-eval task file {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"lm-eval task file {path} is not a file")
        if path.suffix not in (".yaml", ".yml"):
            raise ConfigError(f"lm-eval task file {path} is not a YAML file (.yaml or .yml)")
        spec = _read_yaml(path)
        if not any(key in spec for key in ("task", "group", "include")):
            raise ConfigError(
                f"{path} is not an lm-evaluation-harness task: it has no 'task' (or 'group') key"
            )
        dataset = spec.get("dataset_path")
        if isinstance(dataset, str) and dataset not in LOCAL_BUILDERS:
            local = Path(dataset).expanduser()
            if not local.is_absolute():
                local = path.parent / local if (path.parent / local).exists() else local
            if not local.exists():
                raise ConfigError(
                    f"{path}: dataset_path {dataset!r} is neither a local folder nor one of "
                    f"{', '.join(LOCAL_BUILDERS)} with data_files; genloop never downloads "
                    "data sets"
                )
        out.append(path.resolve())
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    """The YAML's top-level mapping; the harness's ``!function`` tags are read as text."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506  # safe loader
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"lm-eval task file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"lm-eval task file {path} does not hold a mapping of task settings")
    return data


def run_harness_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task_files: Sequence[Path],
    *,
    limit: int | None,
    seed: int,
    batch_size: int = 8,
) -> SuiteResult:
    """Run the harness's tasks on the loaded model; the result as an ``lm_eval`` suite."""
    paths = check_task_files(task_files)
    try:
        import lm_eval
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise GenloopError(
            f"the lm_eval suite needs lm-evaluation-harness ({exc.name} is missing): {INSTALL}"
        ) from None

    with offline():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            results = simple_evaluate(
                model=lm,
                tasks=[str(p) for p in paths],
                task_manager=TaskManager(include_defaults=False),
                limit=limit,
                log_samples=True,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except (KeyError, ValueError, FileNotFoundError, OSError) as exc:
            raise GenloopError(f"lm-evaluation-harness could not run the tasks: {exc}") from None
    if not results:
        raise GenloopError("lm-evaluation-harness returned no results")
    metrics, per_sample, samples = _collect(results)
    return SuiteResult(
        suite="lm_eval",
        metrics=metrics,
        per_sample=per_sample,
        samples=samples,
        settings={
            "tasks": [
                {"file": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                for p in paths
            ],
            "lm_eval_version": getattr(lm_eval, "__version__", None),
            "limit": limit,
            "seed": seed,
            "batch_size": batch_size,
            "n_samples": {t: n.get("effective") for t, n in results.get("n-samples", {}).items()},
        },
    )


def _collect(
    results: dict[str, Any],
) -> tuple[dict[str, float], dict[str, list[float]], list[dict[str, Any]]]:
    """The harness's answer as genloop records it: ``TASK/METRIC`` headline values (a filter
    other than ``none`` appended as ``TASK/METRIC,FILTER``), their per-document values, and a
    few samples."""
    metrics: dict[str, float] = {}
    names: dict[str, list[tuple[str, str]]] = {}  # task → (metric, filter)
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, int | float):
                continue
            metric, filt = key.split(",", 1)
            name = f"{task}/{metric}" if filt == "none" else f"{task}/{metric},{filt}"
            metrics[name] = float(value)
            names.setdefault(task, []).append((metric, filt))
    per_sample: dict[str, list[float]] = {}
    samples: list[dict[str, Any]] = []
    for task, docs in results.get("samples", {}).items():
        docs = sorted(docs, key=lambda d: d.get("doc_id", 0))
        for metric, filt in names.get(task, []):
            values = [d.get(metric) for d in docs if d.get("filter", "none") == filt]
            if values and all(isinstance(v, int | float) for v in values):
                name = f"{task}/{metric}" if filt == "none" else f"{task}/{metric},{filt}"
                per_sample[name] = [float(v) for v in values]
        for d in docs[:SAMPLES_PER_TASK]:
            samples.append(
                {
                    "task": task,
                    "doc_id": d.get("doc_id"),
                    "target": str(d.get("target"))[:500],
                    "response": str(d.get("filtered_resps"))[:500],
                }
            )
    return metrics, per_sample, samples


@contextmanager
def offline() -> Iterator[None]:
    """The Hugging Face libraries in offline mode for the block: the environment variables
    for what reads them later, and the flags ``datasets``, ``huggingface_hub`` and
    ``evaluate`` read once, at import, for what already imported them."""
    import sys

    saved_env = {key: os.environ.get(key) for key in OFFLINE_ENV}
    flags = [
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
        ("evaluate.config", "HF_EVALUATE_OFFLINE"),
    ]
    saved_flags = []
    for key in OFFLINE_ENV:
        os.environ[key] = "1"
    for module_name, flag in flags:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, flag):
            saved_flags.append((module, flag, getattr(module, flag)))
            setattr(module, flag, True)
    try:
        yield
    finally:
        for module, flag, value in saved_flags:
            setattr(module, flag, value)
        for key, old in saved_env.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
