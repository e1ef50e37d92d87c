"""``genloop quickstart``: the whole loop on a fresh machine, nothing downloaded.

It runs the embedded pipeline (``quickstart.yaml``: the python-stdlib corpus → a BPE
tokenizer and a small code model → perplexity, BLEU/ROUGE and pass@k → int8 → gate →
production), then shows what training changed against the same architecture freshly
initialised (same seed): held-out perplexity, and the completions both write for the
openings of a few held-out functions (a ``def`` line and its docstring from the test
split, never trained on). The command creates an admin key for the server it starts
afterwards.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from genloop.config import GenloopConfig, parse_config
from genloop.pipeline.runner import PipelineResult, Report, run_pipeline
from genloop.workspace import Workspace, registry

# --quick: a few dozen files and steps, for CI and a first look (a minute or two)
QUICK = [
    "data.sources.0.max_files=60",
    "data.dedup.near=false",
    "tokenizer.vocab_size=1024",
    "tokenizer.seq_len=128",
    "train.max_steps=40",
    "train.warmup_steps=4",
    "train.eval_every=20",
    "train.checkpoint_every=40",
    "eval.max_samples=8",
    "eval.max_new_tokens=16",
    "eval.num_samples=1",
    "eval.k=[1]",
]


# The completions shown: this many held-out prompts, this many new tokens each, sampled
# at a low temperature from a fixed seed (greedy decoding of a model this small repeats
# one line over and over; sampling shows what it learned, and the run stays repeatable).
SAMPLE_PROMPTS = 3
SAMPLE_NEW_TOKENS = 48
SAMPLE_TEMPERATURE = 0.6
SAMPLE_TOP_P = 0.9


@dataclass(frozen=True)
class Sample:
    """One held-out prompt and what the trained and the untrained model write after it."""

    source: str  # where the prompt comes from: "path/in/stdlib.py:Class.method"
    prompt: str
    trained: str
    untrained: str


@dataclass
class QuickstartResult:
    pipeline: PipelineResult
    model: str
    perplexity: float | None
    untrained_perplexity: float | None
    samples: list[Sample]

    @property
    def improvement(self) -> float | None:
        if self.perplexity is None or self.untrained_perplexity is None:
            return None
        return self.untrained_perplexity / self.perplexity


def quickstart_config(*, quick: bool = False, overrides: list[str] | None = None) -> GenloopConfig:
    import yaml

    text = resources.files("genloop.pipeline").joinpath("quickstart.yaml").read_text()
    data: dict[str, Any] = yaml.safe_load(text)
    return parse_config(
        data, [*(QUICK if quick else []), *(overrides or [])], source="the quickstart pipeline"
    )


def run_quickstart(
    ws: Workspace,
    cfg: GenloopConfig,
    *,
    report: Report | None = None,
    progress: Callable[[str], None] | None = None,
) -> QuickstartResult:
    from genloop.evaluate.generate import load_model_for_eval

    result = run_pipeline(ws, cfg, report=report, progress=progress)
    outputs = {o.stage: o.outputs for o in result.stages}
    model = result.model
    assert model is not None
    dataset_id = int(outputs["data"]["dataset_version_id"])
    trained_ppl = _perplexity(ws, model, dataset_id)

    # the same architecture, freshly initialised from the training seed
    if progress is not None:
        progress("the untrained model: held-out perplexity and completions")
    data_dir = _data_dir(ws, dataset_id)
    untrained = fresh_model(ws, cfg, str(outputs["train"]["model"]))
    untrained_ppl = _heldout_perplexity(untrained, cfg, data_dir)

    # what each writes after the openings of held-out functions (the served model: production)
    trained, tokenizer = load_model_for_eval(
        ws.store.open_verified(registry.resolve(ws, model).artifact)
    )
    prompts = held_out_prompts(data_dir / "docs" / f"{cfg.eval.split}.jsonl", SAMPLE_PROMPTS)
    texts = [p.prompt for p in prompts]
    after_training = _complete(trained, tokenizer, texts, cfg.eval.seed)
    before_training = _complete(untrained, tokenizer, texts, cfg.eval.seed)
    samples = [
        Sample(p.source, p.prompt, a, b)
        for p, a, b in zip(prompts, after_training, before_training, strict=True)
    ]
    return QuickstartResult(result, model, trained_ppl, untrained_ppl, samples)


def _perplexity(ws: Workspace, model: str, dataset_id: int) -> float | None:
    from genloop.evaluate.store import latest_metrics

    view = latest_metrics(ws, registry.resolve(ws, model).id, dataset_id)
    value = view.metrics.get("perplexity") if view is not None else None
    return float(value) if isinstance(value, (int, float)) else None


def _data_dir(ws: Workspace, dataset_id: int) -> Path:
    from genloop.workspace.datasets import get_dataset_version

    return ws.store.open_verified(get_dataset_version(ws, dataset_id).artifact)


def fresh_model(ws: Workspace, cfg: GenloopConfig, model: str) -> Any:
    """``model``'s architecture with fresh weights, initialised from the training seed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = ws.store.open_verified(registry.resolve(ws, model).artifact)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    torch.manual_seed(cfg.train.seed)
    net = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    return net.eval()


def _heldout_perplexity(net: Any, cfg: GenloopConfig, data_dir: Path) -> float | None:
    """Perplexity on the split and windows the eval stage measured the trained model on."""
    from genloop.evaluate.text import perplexity

    result = perplexity(
        net,
        data_dir / "tokens",
        cfg.eval.split,
        cfg.tokenizer.seq_len,
        max_windows=cfg.eval.max_samples,
    )
    value = result.metrics.get("perplexity")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _complete(model: Any, tokenizer: Any, prompts: list[str], seed: int) -> list[str]:
    from genloop.evaluate.generate import generate_texts

    return generate_texts(
        model,
        tokenizer,
        prompts,
        max_new_tokens=SAMPLE_NEW_TOKENS,
        temperature=SAMPLE_TEMPERATURE,
        top_p=SAMPLE_TOP_P,
        seed=seed,
    )


# ------------------------------------------------------------------ held-out prompts


@dataclass(frozen=True)
class Prompt:
    source: str  # "path/in/corpus.py:Class.method"
    prompt: str
    method: bool


def held_out_prompts(docs_jsonl: Path, count: int) -> list[Prompt]:
    """The openings of ``count`` held-out functions: the ``def`` line and its docstring.

    Why these: a signature and a one-line docstring say what the body should do, and the
    body is the kind of code the corpus is full of (indentation, ``self.``, ``return``,
    the names from the signature), so a reader can judge a completion at a glance.
    Candidates are functions and methods (no decorators) with a one-line ``def``, a
    one-line docstring and a short body (2 to 6 statements); methods come first, then
    the ``count`` picked are spread evenly over them in file order, so the choice is
    fixed for a dataset version. The prompt ends right after the docstring's closing
    quotes: the tokenizer merges a line break with the next line's indentation, so the
    model starts where training text goes on, with that token.
    """
    found = list(_openings(docs_jsonl))
    methods = [p for p in found if p.method]
    candidates = methods if len(methods) >= count else found
    if len(candidates) <= count:
        return candidates
    step = len(candidates) / count
    return [candidates[int(step * i + step / 2)] for i in range(count)]


def _openings(docs_jsonl: Path) -> Iterator[Prompt]:
    for line in docs_jsonl.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        text, doc_id = row["text"], str(row.get("id", ""))
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines()
        for node in tree.body:
            inner = node.body if isinstance(node, ast.ClassDef) else [node]
            for fn in inner:
                if isinstance(fn, ast.FunctionDef) and (prompt := _opening(fn, lines)):
                    where = f"{node.name}.{fn.name}" if fn is not node else fn.name
                    method = fn is not node
                    yield Prompt(f"{doc_id}:{where}", prompt, method)


def _opening(fn: ast.FunctionDef, lines: list[str]) -> str | None:
    """The source from ``def`` to the docstring's end, when ``fn`` qualifies."""
    doc = fn.body[0]
    if (
        fn.decorator_list
        or not 2 <= len(fn.body) - 1 <= 6
        or not isinstance(doc, ast.Expr)
        or not isinstance(doc.value, ast.Constant)
        or not isinstance(doc.value.value, str)
        or not doc.lineno == doc.end_lineno == fn.lineno + 1  # one-line def and docstring
        or len(lines[doc.lineno - 1]) > 100
    ):
        return None
    return "\n".join(lines[fn.lineno - 1 : doc.lineno])
