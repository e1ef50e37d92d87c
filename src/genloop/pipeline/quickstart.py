"""``genloop quickstart``: the whole loop on a fresh machine, nothing downloaded.

It runs the embedded pipeline (``quickstart.yaml``: the python-stdlib corpus → a BPE
tokenizer and a ``tiny`` code model → perplexity, BLEU/ROUGE and pass@k → int8 → gate →
production), measures how much training lowered held-out perplexity against the same
model untrained, and creates an admin key for the server the command starts afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


@dataclass
class QuickstartResult:
    pipeline: PipelineResult
    model: str
    perplexity: float | None
    untrained_perplexity: float | None

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
    result = run_pipeline(ws, cfg, report=report, progress=progress)
    outputs = {o.stage: o.outputs for o in result.stages}
    model = result.model
    assert model is not None
    dataset_id = int(outputs["data"]["dataset_version_id"])
    trained = _perplexity(ws, model, dataset_id)
    untrained = untrained_perplexity(ws, cfg, str(outputs["train"]["model"]), dataset_id)
    return QuickstartResult(result, model, trained, untrained)


def _perplexity(ws: Workspace, model: str, dataset_id: int) -> float | None:
    from genloop.evaluate.store import latest_metrics

    view = latest_metrics(ws, registry.resolve(ws, model).id, dataset_id)
    value = view.metrics.get("perplexity") if view is not None else None
    return float(value) if isinstance(value, (int, float)) else None


def untrained_perplexity(
    ws: Workspace, cfg: GenloopConfig, model: str, dataset_id: int
) -> float | None:
    """Held-out perplexity of ``model``'s architecture freshly initialised (same seed)."""
    import torch

    from genloop.evaluate.text import perplexity
    from genloop.workspace.datasets import get_dataset_version

    info = registry.resolve(ws, model)
    data_dir = ws.store.open_verified(get_dataset_version(ws, dataset_id).artifact)
    torch.manual_seed(cfg.train.seed)
    net = _fresh_like(ws.store.open_verified(info.artifact))
    net.eval()
    result = perplexity(
        net,
        data_dir / "tokens",
        cfg.eval.split,
        cfg.tokenizer.seq_len,
        max_windows=cfg.eval.max_samples,
    )
    value = result.metrics.get("perplexity")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _fresh_like(model_dir: Path) -> Any:
    """The model in ``model_dir``'s architecture with fresh random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    return AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
