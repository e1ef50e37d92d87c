"""``genloop eval``: evaluate a model version and store the result, top to bottom.

    1. the suites     checked before anything is loaded
    2. the model      ``registry.resolve`` + the verified artifact directory
    3. the dataset    ``--dataset``, else the version the model was trained on
    4. load           the model and tokenizer, once for every suite
    5. run            each suite from the same seed, so their order changes nothing
    6. store          an ``evaluations`` row, ``evaluations/<id>`` (results.json with the
                      per-sample values, report.md, report.html) and the headline metrics
                      merged into the model version's ``metrics``

Other families run their own suites in place of steps 4-5 (``FAMILY_SUITES``): image
models (vae, gan, diffusion) the ``image`` (FID/KID/IS, conditional accuracy) and
``augment`` suites of ``evaluate/image.py``; masked_lm models the ``mlm``,
``classification`` and ``token_classification`` suites of ``evaluate/encoders.py`` and the
``retrieval`` suite (recall@k and MRR against TF-IDF) of ``evaluate/retrieval.py`` (by
default the one of their head; ``retrieval`` for an embedding model); clip models the
``clip`` suite of ``evaluate/clip_metrics.py``; captioning models the ``captioning`` suite
(BLEU, attribute accuracy) of ``evaluate/captioning.py``; text_to_image models the ``t2i``
suite (compositional accuracy, CLIP score) of ``evaluate/text_to_image.py``.

The same model version, dataset version, settings and seed give the same numbers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import genloop
from genloop.config import EvalConfig
from genloop.errors import ConfigError, GenloopError
from genloop.evaluate.record import EvaluationRecord
from genloop.evaluate.results import SuiteResult
from genloop.evaluate.store import save_evaluation
from genloop.models.family import IMAGE_FAMILIES
from genloop.workspace import registry
from genloop.workspace.workspace import Workspace

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from genloop.workspace.datasets import DatasetVersionInfo

ProgressFn = Callable[[str, int, int], None]  # (suite, its number from 1, number of suites)

RUNNABLE = ("perplexity", "generation", "code", "bias", "lm_eval")
IMAGE_SUITES = ("image", "augment")  # see evaluate/image.py
CLIP_SUITES = ("clip",)  # see evaluate/clip_metrics.py
CAPTION_SUITES = ("captioning",)  # see evaluate/captioning.py
T2I_SUITES = ("t2i",)  # see evaluate/text_to_image.py
ENCODER_SUITES = ("mlm", "classification", "token_classification")  # evaluate/encoders.py
RETRIEVAL_SUITES = ("retrieval",)  # see evaluate/retrieval.py
NEEDS_DATASET = (
    "perplexity",
    "generation",
    *IMAGE_SUITES,
    *CLIP_SUITES,
    *CAPTION_SUITES,
    *T2I_SUITES,
    *ENCODER_SUITES,
    *RETRIEVAL_SUITES,
)
TEXT_FAMILIES = ("causal_lm", "seq2seq")
# the suites each family can run, and (non-text families) the ones it runs by default
FAMILY_SUITES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(TEXT_FAMILIES, RUNNABLE),
    **dict.fromkeys(IMAGE_FAMILIES, IMAGE_SUITES),
    "clip": CLIP_SUITES,
    "captioning": CAPTION_SUITES,
    "text_to_image": T2I_SUITES,
    "masked_lm": (*ENCODER_SUITES, *RETRIEVAL_SUITES),
}
DEFAULT_SUITES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(IMAGE_FAMILIES, ("image",)),
    "clip": CLIP_SUITES,
    "captioning": CAPTION_SUITES,
    "text_to_image": T2I_SUITES,
}
PERPLEXITY_BATCH = 8
GENERATION_BATCH = 8
PREFIX_CHARS = 200  # characters of a test document given as the prompt …
CONTINUATION_CHARS = 100  # … and of its continuation used as the reference


@dataclass
class Context:
    """What every suite runner gets: the loaded model and where its inputs are."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cfg: EvalConfig
    data_dir: Path | None
    dataset: DatasetVersionInfo | None


def evaluate_model(
    ws: Workspace,
    ref: str,
    *,
    dataset: str | None = None,
    suites: Sequence[str] | None = None,
    cfg: EvalConfig | None = None,
    progress: ProgressFn | None = None,
    device: str = "auto",
) -> EvaluationRecord:
    """Run ``suites`` (default: ``cfg.suites``) on model version ``ref`` and store the result.

    ``dataset`` is a dataset ref (``NAME`` or ``NAME@VERSION``); without one the model's
    own training dataset is used. ``device`` is ``auto`` (CUDA when present), ``cpu``,
    ``cuda`` or ``cuda:N``.
    """
    cfg = cfg or EvalConfig()
    # 1. the suites (non-text families default to their own: image, clip, captioning)
    info = registry.resolve(ws, ref)
    if not suites and info.family in DEFAULT_SUITES and cfg.suites == EvalConfig().suites:
        suites = list(DEFAULT_SUITES[info.family])
    elif not suites and info.family == "masked_lm" and cfg.suites == EvalConfig().suites:
        from genloop.evaluate.encoders import default_suites

        suites = default_suites(ws.store.path(info.artifact))  # the head's suite
    chosen = check_suites(list(suites) if suites else list(cfg.suites))
    _check_family(info, chosen)
    if "lm_eval" in chosen:  # a bad task file is an error before anything loads
        from genloop.evaluate.harness import check_task_files

        check_task_files(cfg.lm_eval_tasks)

    # 2. the model version, its files verified against their manifest
    model_dir = ws.store.open_verified(info.artifact)

    # 3. the dataset version: named, or the model's lineage
    ds = _dataset(ws, dataset, info, chosen)
    data_dir = ws.store.open_verified(ds.artifact) if ds is not None else None
    device = _device(device)

    results: list[SuiteResult] = []
    if info.family == "clip":  # 4-5. retrieval, zero-shot, CLIP score (evaluate/clip_metrics.py)
        from genloop.evaluate.clip_metrics import run_clip_suites

        assert ds is not None and data_dir is not None  # _dataset() made sure
        _seed_everything(cfg.seed)
        results = run_clip_suites(ws, info, model_dir, ds, data_dir, chosen, cfg, device, progress)
    elif info.family == "captioning":  # 4-5. BLEU, attribute accuracy (evaluate/captioning.py)
        from genloop.evaluate.captioning import run_captioning_suite

        assert ds is not None and data_dir is not None  # _dataset() made sure
        if progress is not None:
            progress("captioning", 1, 1)
        _seed_everything(cfg.seed)
        results = [run_captioning_suite(model_dir, data_dir, ds.ref, cfg, device)]
    elif info.family == "text_to_image":  # 4-5. composition, CLIP (evaluate/text_to_image.py)
        from genloop.evaluate.text_to_image import run_t2i_suite

        assert ds is not None and data_dir is not None  # _dataset() made sure
        _seed_everything(cfg.seed)
        results = [run_t2i_suite(ws, info, model_dir, ds, data_dir, cfg, device, progress)]
    elif info.family == "masked_lm":  # 4-5. heads (evaluate/encoders.py), retrieval vs TF-IDF
        from genloop.evaluate.encoders import run_encoder_suites
        from genloop.evaluate.retrieval import run_retrieval_suite

        assert ds is not None and data_dir is not None  # _dataset() made sure
        _seed_everything(cfg.seed)
        heads = [s for s in chosen if s in ENCODER_SUITES]
        if heads:
            results = run_encoder_suites(model_dir, data_dir, ds, heads, cfg, device, progress)
        if "retrieval" in chosen:
            if progress is not None:
                progress("retrieval", len(chosen), len(chosen))
            _seed_everything(cfg.seed)
            results.append(run_retrieval_suite(model_dir, data_dir, ds.ref, cfg, device))
    elif info.family in IMAGE_FAMILIES:  # 4-5. FID/KID/IS, augmentation (evaluate/image.py)
        from genloop.evaluate.image import run_image_suites

        assert ds is not None and data_dir is not None  # _dataset() made sure
        _seed_everything(cfg.seed)
        results = run_image_suites(ws, info, model_dir, ds, data_dir, chosen, cfg, device, progress)
    else:
        # 4. the model, loaded once
        from genloop.evaluate.generate import load_model_for_eval

        model, tokenizer = load_model_for_eval(model_dir, device)
        ctx = Context(model=model, tokenizer=tokenizer, cfg=cfg, data_dir=data_dir, dataset=ds)

        # 5. the suites, each from the same seed
        for i, suite in enumerate(chosen, 1):
            if progress is not None:
                progress(suite, i, len(chosen))
            _seed_everything(cfg.seed)
            results.append(RUNNERS[suite](ctx))

    # 6. store: the row, the artifact with the reports, the model's metrics
    settings = {
        "model": info.ref,
        "dataset": ds.ref if ds is not None else None,
        "device": device,
        "genloop_version": genloop.__version__,
        **cfg.model_dump(mode="json", exclude={"suites"}),
        "suites": {r.suite: r.settings for r in results},
    }
    return save_evaluation(
        ws, info.id, ds.id if ds is not None else None, results, settings=settings
    )


def check_suites(suites: list[str]) -> list[str]:
    """The suites in the order given, without repeats; unknown or unrunnable ones refused."""
    known = (
        *RUNNABLE,
        *IMAGE_SUITES,
        *CLIP_SUITES,
        *CAPTION_SUITES,
        *T2I_SUITES,
        *ENCODER_SUITES,
        *RETRIEVAL_SUITES,
    )
    if not suites:
        raise ConfigError(f"no suite to run; choose from: {', '.join(known)}")
    out: list[str] = []
    for suite in suites:
        if suite not in known:
            raise ConfigError(f"unknown suite {suite!r}; choose from: {', '.join(known)}")
        if suite not in out:
            out.append(suite)
    return out


def _check_family(info: registry.ModelVersionInfo, suites: list[str]) -> None:
    """Each family runs its own suites (``FAMILY_SUITES``); the first one it cannot run is
    named, with the ones it can."""
    allowed = FAMILY_SUITES.get(info.family)
    if allowed is None:
        raise GenloopError(f"{info.ref} is a {info.family} model, which genloop cannot evaluate")
    for suite in suites:
        if suite in allowed:
            continue
        if suite in RUNNABLE:
            raise GenloopError(
                f"{info.ref} is a {info.family} model; the {suite} suite needs a text model "
                f"({info.family} models run: {', '.join(allowed)})"
            )
        families = [f for f, runs in FAMILY_SUITES.items() if suite in runs]
        raise GenloopError(
            f"the {suite} suite is for the {', '.join(families)} families; {info.ref} is a "
            f"{info.family} model (it runs: {', '.join(allowed)})"
        )


def _dataset(
    ws: Workspace, ref: str | None, info: registry.ModelVersionInfo, suites: list[str]
) -> DatasetVersionInfo | None:
    from genloop.workspace.datasets import get_dataset_version, resolve_dataset

    if ref is not None:
        return resolve_dataset(ws, ref)
    if info.dataset_version_id is not None:
        return get_dataset_version(ws, info.dataset_version_id)
    needing = [s for s in suites if s in NEEDS_DATASET]
    if needing:
        raise GenloopError(
            f"{info.ref} records no training dataset, and the {' and '.join(needing)} "
            "suite needs one: give --dataset NAME[@VERSION]"
        )
    return None


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GenloopError(f"device {device!r} asked for, but CUDA is not available")
    return device


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _require_data(ctx: Context) -> tuple[Path, DatasetVersionInfo]:
    assert ctx.data_dir is not None and ctx.dataset is not None  # _dataset() made sure
    return ctx.data_dir, ctx.dataset


def _seq_len(ctx: Context) -> int:
    """The dataset's packing length, capped at the model's context."""
    assert ctx.dataset is not None
    tok = ctx.dataset.stats.get("tokenizer") or (ctx.dataset.config.get("tokenizer") or {})
    seq_len = tok.get("seq_len") if isinstance(tok, dict) else None
    if not isinstance(seq_len, int):
        raise GenloopError(
            f"dataset {ctx.dataset.ref} records no tokenizer seq_len; prepare it with a "
            "tokenizer section to evaluate perplexity"
        )
    context = getattr(ctx.model.config, "max_position_embeddings", None)
    return min(seq_len, context) if isinstance(context, int) else seq_len


# ---------------------------------------------------------------------------------------
# the suites: each takes the context and returns a SuiteResult
# ---------------------------------------------------------------------------------------


def run_perplexity(ctx: Context) -> SuiteResult:
    from genloop.evaluate.text import perplexity

    data_dir, dataset = _require_data(ctx)
    tokens = data_dir / "tokens"
    if not tokens.is_dir():
        raise GenloopError(
            f"dataset {dataset.ref} has no token shards; prepare it with a tokenizer "
            "section to evaluate perplexity"
        )
    return perplexity(
        ctx.model,
        tokens,
        ctx.cfg.split,
        _seq_len(ctx),
        batch_size=PERPLEXITY_BATCH,
        max_windows=ctx.cfg.max_samples,
    )


def run_generation(ctx: Context) -> SuiteResult:
    from genloop.evaluate.text import continuation_pairs, evaluate_generation

    data_dir, dataset = _require_data(ctx)
    docs = data_dir / "docs" / f"{ctx.cfg.split}.jsonl"
    if not docs.is_file():
        raise GenloopError(
            f"dataset {dataset.ref} has no {ctx.cfg.split} split; choose another with "
            "--set eval.split=val (or test)"
        )
    c = ctx.cfg
    pairs = continuation_pairs(docs, c.max_samples, PREFIX_CHARS, CONTINUATION_CHARS, c.seed)
    return evaluate_generation(
        ctx.model,
        ctx.tokenizer,
        pairs,
        max_new_tokens=c.max_new_tokens,
        temperature=c.temperature,
        top_p=c.top_p,
        seed=c.seed,
        batch_size=GENERATION_BATCH,
    )


def run_code(ctx: Context) -> SuiteResult:
    from genloop.evaluate.code import evaluate_code, load_tasks

    c = ctx.cfg
    tasks = load_tasks(c.tasks_path or demo_tasks_path())
    if c.max_samples is not None:  # the first N tasks, as for documents and pairs
        tasks = tasks[: c.max_samples]
    return evaluate_code(
        ctx.model,
        ctx.tokenizer,
        tasks,
        num_samples=c.num_samples,
        k=list(c.k),
        temperature=c.temperature,
        top_p=c.top_p,
        max_new_tokens=c.max_new_tokens,
        seed=c.seed,
        timeout_s=c.timeout_s,
        memory_mb=c.sandbox_memory_mb,
    )


def run_bias(ctx: Context) -> SuiteResult:
    from genloop.evaluate.bias import bias_probe

    c = ctx.cfg
    return bias_probe(
        ctx.model,
        ctx.tokenizer,
        c.bias_suite_path,
        max_new_tokens=c.max_new_tokens,
        seed=c.seed,
        temperature=c.temperature,
        top_p=c.top_p,
    )


def run_lm_eval(ctx: Context) -> SuiteResult:
    from genloop.evaluate.harness import run_harness_tasks

    c = ctx.cfg
    return run_harness_tasks(
        ctx.model, ctx.tokenizer, c.lm_eval_tasks, limit=c.max_samples, seed=c.seed
    )


def demo_tasks_path() -> Path:
    """The code tasks shipped with genloop (simple Python function completions)."""
    return Path(__file__).parent / "data" / "code_tasks.jsonl"


RUNNERS: dict[str, Callable[[Context], SuiteResult]] = {
    "perplexity": run_perplexity,
    "generation": run_generation,
    "code": run_code,
    "bias": run_bias,
    "lm_eval": run_lm_eval,
}
