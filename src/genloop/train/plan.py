"""``genloop plan``: which model to train, sized from the objective, the data and a budget.

    1. the family: the one the objective trains (``lm``, ``sft``, ``dpo`` → ``causal_lm``)
    2. the data: the tokens in the dataset version's train split (prepared on demand)
    3. the candidates: every preset, and the config's own architecture when it sets one
    4. the rule: a compute-optimal model sees about 20 tokens per parameter (Hoffmann et
       al. 2022, "Chinchilla"), so N parameters want D = 20·N tokens, D / tokens available
       epochs of this data
    5. this machine: a few real training steps of each candidate, after a warm-up, with the
       loop's own model builder, optimizer, precision and loss on random tokens of the
       dataset's vocabulary and sequence length → tokens/s (so hours for D) and peak memory
    6. the pick: the largest candidate whose D fits the budget and needs at most
       ``max_epochs`` epochs (repeating data beyond ~4 epochs pays off less and less,
       Muennighoff et al. 2023); else the smallest, with what it falls short of

Nothing is written to the catalog except the dataset version that step 2 may prepare.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.errors import ConfigError, GenloopError
from genloop.workspace.workspace import Workspace

if TYPE_CHECKING:
    import torch

    from genloop.config import GenloopConfig

TOKENS_PER_PARAM = 20.0  # Chinchilla's compute-optimal ratio
MAX_EPOCHS = 4.0
CONFIG_CANDIDATE = "config"  # the config's own architecture, when it sets one


@dataclass
class Candidate:
    """One model size, what the rule asks of it and what this machine measured."""

    name: str
    architecture: dict[str, Any]  # model-section keys: preset + overrides
    params: int
    rule_tokens: int  # tokens_per_param × params
    epochs: float  # rule_tokens / tokens available (inf without data)
    configured: bool = False  # the size the config asks for
    tokens_per_s: float | None = None
    step_seconds: float | None = None  # one optimizer step, measured
    hours: float | None = None  # rule_tokens at the measured tokens/s
    peak_memory_mb: float | None = None  # above the process before the candidate was built
    fits_budget: bool = False
    fits_data: bool = False

    @property
    def fits(self) -> bool:
        return self.fits_budget and self.fits_data


@dataclass
class PlanResult:
    family: str
    objective: str
    dataset: str  # NAME@VERSION
    tokens_available: int  # train split
    vocab_size: int
    seq_len: int
    tokens_per_step: int  # batch_size × grad_accum × seq_len
    budget_hours: float
    tokens_per_param: float
    max_epochs: float
    device: str
    precision: str  # what the loop's autocast runs in on this device: bf16 or fp32
    candidates: list[Candidate]
    recommended: str | None
    suggested_max_steps: int | None  # for its rule tokens, or what the budget allows if less
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for c, d in zip(self.candidates, out["candidates"], strict=True):
            d["fits"] = c.fits
            if not math.isfinite(c.epochs):
                d["epochs"] = None  # JSON has no infinity
        return out


def plan(
    ws: Workspace,
    cfg: GenloopConfig,
    budget_hours: float,
    measure_steps: int = 3,
    *,
    presets: Sequence[str] | None = None,
    candidates: Mapping[str, Mapping[str, Any]] | None = None,
    tokens_per_param: float = TOKENS_PER_PARAM,
    max_epochs: float = MAX_EPOCHS,
    warmup_steps: int = 1,
    max_seconds: float | None = None,
    root: Path | None = None,
) -> PlanResult:
    """Recommend a family and size for ``cfg`` within ``budget_hours`` on this machine.

    ``candidates`` maps names to architectures in model-section keys (``preset`` plus
    overrides); by default every preset, and ``config`` when the config overrides the
    architecture. ``presets`` keeps only the named ones. Each is measured for
    ``measure_steps`` optimizer steps after ``warmup_steps`` (fewer once ``max_seconds``
    of measuring have passed, but at least one). ``root`` resolves the data section's
    relative paths, as for ``genloop data prepare``.
    """
    from genloop.train import distributed
    from genloop.train.loop import compute_dtype, seed_everything

    if budget_hours <= 0:
        raise ConfigError(f"the budget must be a positive number of hours (got {budget_hours})")
    if measure_steps < 1 or warmup_steps < 0:
        raise ConfigError(
            f"need measure_steps ≥ 1 and warmup_steps ≥ 0 (got {measure_steps}, {warmup_steps})"
        )
    if tokens_per_param <= 0 or max_epochs <= 0:
        raise ConfigError(
            f"tokens_per_param and max_epochs must be positive "
            f"(got {tokens_per_param}, {max_epochs})"
        )
    t = cfg.train
    family = _family(cfg)
    dataset, tokens, vocab, tokenizer_dir = _data(ws, cfg, root)
    seq_len = cfg.tokenizer.seq_len
    tokens_per_step = t.batch_size * t.grad_accum * seq_len
    chosen = _candidates(cfg, candidates, presets, vocab, tokens, tokens_per_param)

    device = distributed.pick_device(t.device)
    precision = compute_dtype(t.precision, device)
    for c in chosen:  # smallest first: memory freed by one is reused by the next
        seed_everything(t.seed)
        tps, step_s, mem = measure(
            ws,
            cfg,
            c.architecture,
            tokenizer_dir,
            device,
            steps=measure_steps,
            warmup_steps=warmup_steps,
            max_seconds=max_seconds,
        )
        c.tokens_per_s, c.step_seconds, c.peak_memory_mb = tps, step_s, mem
        c.hours = c.rule_tokens / tps / 3600
        c.fits_budget = c.hours <= budget_hours
        c.fits_data = c.epochs <= max_epochs
    pick, reasons = recommend(chosen, budget_hours, max_epochs, tokens)
    reasons.insert(0, _family_reason(cfg.train.objective, family))
    return PlanResult(
        family=family,
        objective=t.objective,
        dataset=dataset,
        tokens_available=tokens,
        vocab_size=vocab,
        seq_len=seq_len,
        tokens_per_step=tokens_per_step,
        budget_hours=budget_hours,
        tokens_per_param=tokens_per_param,
        max_epochs=max_epochs,
        device=str(device),
        precision=precision,
        candidates=chosen,
        recommended=pick.name if pick else None,
        suggested_max_steps=_suggested_steps(pick, budget_hours, tokens_per_step),
        reasons=reasons,
    )


def recommend(
    candidates: Sequence[Candidate], budget_hours: float, max_epochs: float, tokens: int
) -> tuple[Candidate | None, list[str]]:
    """The largest candidate that fits the budget and the data, and why (in words)."""
    if not candidates:
        return None, ["no candidates to choose from"]
    by_size = sorted(candidates, key=lambda c: c.params)
    fitting = [c for c in by_size if c.fits]
    reasons: list[str] = []
    if fitting:
        pick = fitting[-1]
        reasons.append(
            f"{pick.name}: {pick.params:,} parameters want {pick.rule_tokens:,} tokens, "
            f"{pick.epochs:.2g} epochs of the {tokens:,} available (≤ {max_epochs:g}), "
            f"in {format_hours(pick.hours)} at {pick.tokens_per_s:,.0f} tokens/s "
            f"(budget {format_hours(budget_hours)})"
        )
        for bigger in by_size[by_size.index(pick) + 1 :]:
            reasons.append(
                f"{bigger.name} is larger but {_shortfall(bigger, budget_hours, max_epochs)}"
            )
        return pick, reasons
    pick = by_size[0]
    reasons.append(
        f"no candidate fits; the smallest, {pick.name}, "
        f"{_shortfall(pick, budget_hours, max_epochs)}"
    )
    if not pick.fits_budget and pick.tokens_per_s:
        seen = pick.tokens_per_s * budget_hours * 3600
        reasons.append(
            f"in the budget {pick.name} sees {seen:,.0f} tokens, "
            f"{seen / pick.params:.2g} per parameter: under-trained by the rule; "
            "a longer budget or a faster device would help"
        )
    if not pick.fits_data:
        largest = tokens * max_epochs / (pick.rule_tokens / pick.params)
        reasons.append(
            f"the data supports about {largest:,.0f} parameters at ≤ {max_epochs:g} epochs: "
            "more data, or a smaller architecture (model.n_layer, model.n_embd overrides)"
        )
    return pick, reasons


def measure(
    ws: Workspace,
    cfg: GenloopConfig,
    architecture: Mapping[str, Any],
    tokenizer_dir: Path | None,
    device: torch.device,
    *,
    steps: int = 3,
    warmup_steps: int = 1,
    max_seconds: float | None = None,
) -> tuple[float, float, float]:
    """Tokens/s, seconds per optimizer step and peak memory (MiB) of real training steps.

    The model comes from the text families' ``build_model`` (as the loop builds it), the
    optimizer from the loop's ``make_optimizer``, the precision from its autocast rule and
    the loss from the ``lm`` objective, on random token windows of ``cfg.tokenizer.seq_len``;
    each step accumulates ``train.grad_accum`` micro-batches of ``train.batch_size`` and
    clips as configured.
    """
    import torch

    from genloop.models.presets import ARCHITECTURE_KEYS
    from genloop.train.loop import _autocast, make_optimizer
    from genloop.train.objectives import LanguageModeling
    from genloop.train.text import build_model

    t = cfg.train
    model_cfg = cfg.model.model_copy(
        update={k: architecture.get(k) for k in ("preset", *ARCHITECTURE_KEYS)}
    )
    seq_len = cfg.tokenizer.seq_len
    objective = LanguageModeling(
        Path(), seq_len, t.batch_size, t.seed, device, t.label_smoothing, t.z_loss
    )
    autocast = _autocast(t.precision, device)
    peak = PeakMemory(device)
    with peak:
        model, model_config, _ = build_model(ws, model_cfg, tokenizer_dir, device, seq_len=seq_len)
        vocab = int(model_config["vocab_size"])
        optimizer = make_optimizer(
            model, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas, device=device
        )
        generator = torch.Generator().manual_seed(t.seed)
        x = torch.randint(0, vocab, (t.batch_size, seq_len + 1), generator=generator)
        batch = {"input_ids": x[:, :-1].to(device), "targets": x[:, 1:].to(device)}
        model.train()
        timed, started = 0, 0.0
        for i in range(warmup_steps + steps):
            if i == warmup_steps:
                _sync(device)
                started = time.perf_counter()
            for _ in range(t.grad_accum):
                with autocast:
                    loss, _ = objective.loss(model, batch)
                peak.sample()  # the activations are all held here
                (loss / t.grad_accum).backward()  # type: ignore[no-untyped-call]
                peak.sample()
            if t.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            peak.sample()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup_steps:
                timed += 1
                if max_seconds is not None:
                    _sync(device)
                    if time.perf_counter() - started > max_seconds:
                        break
        _sync(device)
        seconds = time.perf_counter() - started
        if not math.isfinite(float(loss.detach())):
            raise GenloopError(f"the loss of {dict(architecture)} is not finite on random tokens")
        del model, optimizer, batch, loss
    step_s = seconds / timed
    return t.batch_size * t.grad_accum * seq_len / step_s, step_s, peak.mb


def default_candidates(cfg: GenloopConfig) -> dict[str, dict[str, Any]]:
    """Every preset, plus ``config`` when the model section overrides the architecture."""
    from genloop.models.presets import PRESETS
    from genloop.train.text import architecture

    out: dict[str, dict[str, Any]] = {name: {"preset": name} for name in PRESETS}
    m = cfg.model
    overrides = architecture(m)
    if overrides:
        out[CONFIG_CANDIDATE] = {"preset": m.preset or "tiny", **overrides}
    return out


# ----------------------------------------------------------------------------- helpers


def _family(cfg: GenloopConfig) -> str:
    m, objective = cfg.model, cfg.train.objective
    if objective not in ("lm", "sft", "dpo", "span_corruption"):  # text: the checks below
        raise GenloopError(
            f"genloop plan sizes text models; train.objective {objective!r} trains an image "
            "family, whose size is set by model.base_channels and model.latent_dim"
        )
    if m.base_model is not None:
        raise GenloopError(
            f"genloop plan sizes models trained from scratch; model.base_model "
            f"({m.base_model}) fixes the size. Remove it to plan a model from scratch"
        )
    if m.family != "causal_lm":
        raise GenloopError(
            f"genloop plan measures the causal_lm family; model.family is {m.family!r}. "
            "Set model.family: causal_lm to plan a decoder-only model"
        )
    return "causal_lm"


def _family_reason(objective: str, family: str) -> str:
    what = {
        "lm": "next-token prediction on packed token shards",
        "sft": "prompt → response pairs with the loss on the response (chat template)",
        "dpo": "preference pairs; a DPO step costs about twice an lm step, plus the "
        "reference model's forward",
    }[objective]
    return f"family {family}: objective {objective} ({what}) trains a decoder-only model"


def _data(
    ws: Workspace, cfg: GenloopConfig, root: Path | None
) -> tuple[str, int, int, Path | None]:
    """The dataset's ref, its train tokens, the vocabulary size and the tokenizer folder."""
    from genloop.workspace.datasets import resolve_dataset

    if cfg.train.dataset is not None:
        dataset = resolve_dataset(ws, cfg.train.dataset)
    elif cfg.data is not None:
        from genloop.data.prepare import prepare_dataset

        dataset, _ = prepare_dataset(ws, cfg.data, cfg.tokenizer, root=root)
    else:
        raise GenloopError("nothing to plan for: set train.dataset or add a data section")
    stats = dataset.stats
    split = stats.get("splits", {}).get("train", {})
    tokens = split.get("tokens", stats.get("tokens"))
    if not isinstance(tokens, int):
        raise GenloopError(
            f"dataset {dataset.ref} has no token count; give it a tokenizer section and "
            "prepare it again"
        )
    data_dir = ws.store.open_verified(dataset.artifact)
    tokenizer_dir = data_dir / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise GenloopError(f"dataset {dataset.ref} has no tokenizer; text models need one")
    from genloop.data.tokenizer import load_tokenizer

    vocab = int(load_tokenizer(tokenizer_dir).get_vocab_size())
    return dataset.ref, tokens, vocab, tokenizer_dir


def _candidates(
    cfg: GenloopConfig,
    given: Mapping[str, Mapping[str, Any]] | None,
    keep: Sequence[str] | None,
    vocab: int,
    tokens: int,
    tokens_per_param: float,
) -> list[Candidate]:
    from genloop.models.presets import ARCHITECTURE_KEYS, spec_from_config

    pool = {k: dict(v) for k, v in (given or default_candidates(cfg)).items()}
    if keep is not None:
        unknown = [k for k in keep if k not in pool]
        if unknown:
            raise ConfigError(
                f"unknown candidate {', '.join(map(repr, unknown))} (valid: {', '.join(pool)})"
            )
        pool = {k: pool[k] for k in keep}
    if not pool:
        raise ConfigError("no candidates to plan for")
    out = []
    configured_arch = default_candidates(cfg).get(
        CONFIG_CANDIDATE, {"preset": cfg.model.preset or "tiny"}
    )
    for name, arch in pool.items():
        spec_cfg = {k: v for k, v in arch.items() if k in ("preset", *ARCHITECTURE_KEYS)}
        spec_cfg.setdefault("context_length", max(cfg.tokenizer.seq_len, 64))
        params = spec_from_config({**spec_cfg, "vocab_size": vocab}).num_parameters()
        rule = math.ceil(tokens_per_param * params)
        out.append(
            Candidate(
                name=name,
                architecture=arch,
                params=params,
                rule_tokens=rule,
                epochs=rule / tokens if tokens > 0 else math.inf,
                configured=arch == configured_arch,
            )
        )
    return sorted(out, key=lambda c: c.params)


def _shortfall(c: Candidate, budget_hours: float, max_epochs: float) -> str:
    problems = []
    if not c.fits_budget:
        problems.append(
            f"needs {format_hours(c.hours)} for its {c.rule_tokens:,} tokens "
            f"(budget {format_hours(budget_hours)})"
        )
    if not c.fits_data:
        problems.append(f"wants {c.epochs:.3g} epochs of the data (> {max_epochs:g})")
    return " and ".join(problems) or "fits"


def _suggested_steps(pick: Candidate | None, budget_hours: float, per_step: int) -> int | None:
    """Optimizer steps for the rule's tokens, or for what the budget allows if that is less."""
    if pick is None:
        return None
    tokens = float(pick.rule_tokens)
    if pick.tokens_per_s:
        tokens = min(tokens, pick.tokens_per_s * budget_hours * 3600)
    return max(1, math.ceil(tokens / per_step))


def format_hours(h: float | None) -> str:
    """Hours as seconds, minutes, hours or days, whichever reads best."""
    if h is None:
        return "?"
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.1f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h / 24:.1f} days"


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory (MiB) used inside ``with``, above what was in use when it began.

    CUDA: ``max_memory_allocated``. CPU: the resident set size, read at each ``sample()``
    (the caller samples where usage peaks: after a forward pass, a backward pass and an
    optimizer step; a sampling thread would take CPU time from the training threads),
    after a collection and a heap trim at the start, so memory the previous candidate freed
    is not counted against this one.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb = 0.0
        self._before = 0
        self._peak = 0

    def __enter__(self) -> PeakMemory:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _trim_heap()
            self._before = self._peak = _rss_bytes() or 0
        return self

    def sample(self) -> None:
        if self.device.type != "cuda":
            self._peak = max(self._peak, _rss_bytes() or 0)

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.type == "cuda":
            self._peak = torch.cuda.max_memory_allocated(self.device)
        self.mb = max(self._peak - self._before, 0) / 2**20


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    """The resident set size now (Linux); None where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS reflects what is in use."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)
