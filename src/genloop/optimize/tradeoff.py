"""The trade-off report: every variant of a model measured side by side on this machine.

For each variant (the model named and the versions descended from it):

- ``file_mb``: the weight files (safetensors, or the ONNX graph and its data);
- ``peak_mem_mb``: the rise of the process's peak resident memory while loading the
  variant and running the workload (Linux: ``VmHWM`` reset through ``/proc/self/clear_refs``;
  with ``isolate`` each variant runs in a fresh process, which measures it cleanly);
- ``latency_ms_p50`` / ``p99``: one request at batch 1, a prompt of ``prompt_len`` random
  tokens then ``new_tokens`` greedy tokens with the cache; ``prefill_ms_p50`` its first
  pass and ``decode_ms_p50`` a later step;
- ``tokens_per_s``: generated tokens per second for ``throughput_batch`` such requests at
  once;
- quality: ``perplexity`` on the dataset's test split (the windows ``genloop eval`` uses,
  capped at ``ppl_windows``), measured for every variant, ONNX ones included, and any
  metric the catalog holds for the version (``pass@1``, ``bleu``, ``fid``… from
  ``genloop eval``); deltas are percentages against the model named.

A budget (``ppl+3%``, ``pass@1-1%``, ``fid+5%``, or an absolute ``ppl+0.5``) keeps the
variants whose quality is within it; :func:`pick` takes the fastest of them (lowest
``latency_ms_p50``).

All variants run the same prompts with the same threads; numbers are of this machine at
this moment, so compare them within one report.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.errors import ConfigError, GenloopError

if TYPE_CHECKING:
    from genloop.workspace.registry import ModelVersionInfo
    from genloop.workspace.workspace import Workspace

LOWER_IS_BETTER = ("perplexity", "nll", "loss", "val_loss", "val_ppl", "fid", "kid")
HIGHER_IS_BETTER = (
    "bleu",
    "sentence_bleu",
    "rouge1",
    "rouge2",
    "rougeL",
    "exact_match",
    "accuracy",
    "inception_score",
)
ALIASES = {"ppl": "perplexity", "is": "inception_score"}
_PASS_AT = re.compile(r"^pass@\d+$")
_BUDGET = re.compile(r"^\s*([A-Za-z][\w@.-]*)\s*([+-])\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx.data", ".data")


# ------------------------------------------------------------------------------ budget


@dataclass(frozen=True)
class Budget:
    """How much worse than the parent a variant may be on one quality metric."""

    metric: str  # canonical name: perplexity, pass@1, fid, …
    delta: float  # allowed worsening (≥ 0), a percentage when ``relative``
    relative: bool
    higher_is_better: bool
    text: str

    def limit(self, parent: float) -> float:
        """The worst value still within budget."""
        step = abs(parent) * self.delta / 100 if self.relative else self.delta
        return parent - step if self.higher_is_better else parent + step

    def allows(self, parent: float, value: float) -> bool:
        limit = self.limit(parent)
        # a hair of tolerance: a variant equal to its parent is always within budget
        eps = 1e-9 * max(1.0, abs(limit))
        return value >= limit - eps if self.higher_is_better else value <= limit + eps


def metric_direction(metric: str) -> bool:
    """True when higher is better for ``metric``; a GenloopError for an unknown one."""
    if metric in LOWER_IS_BETTER:
        return False
    if metric in HIGHER_IS_BETTER or _PASS_AT.match(metric):
        return True
    known = ", ".join(["ppl", *LOWER_IS_BETTER, "pass@K", *HIGHER_IS_BETTER])
    raise ConfigError(f"unknown budget metric {metric!r} (known: {known})")


def parse_budget(text: str) -> Budget:
    """``ppl+3%`` → perplexity may rise 3%; ``pass@1-1%`` → pass@1 may fall 1%."""
    match = _BUDGET.match(text or "")
    if match is None:
        raise ConfigError(
            f"cannot read the budget {text!r}: write METRIC+N% or METRIC-N% (a relative "
            "change) or METRIC+N (absolute), e.g. ppl+3%, pass@1-1%, fid+5%"
        )
    name, sign, number, pct = match.groups()
    metric = ALIASES.get(name.lower(), name if name.startswith("pass@") else name.lower())
    higher = metric_direction(metric)
    if higher and sign == "+":
        raise ConfigError(f"a {metric} budget says how far it may fall: write {name}-{number}{pct}")
    if not higher and sign == "-":
        raise ConfigError(f"a {metric} budget says how far it may rise: write {name}+{number}{pct}")
    return Budget(metric, float(number), pct == "%", higher, text.strip())


# ----------------------------------------------------------------------------- measure


@dataclass
class Workload:
    """What every variant runs (the same for all of them within a report)."""

    prompt_len: int = 64
    new_tokens: int = 16
    repeats: int = 10
    warmup: int = 2
    throughput_batch: int = 4
    ppl_windows: int = 32
    ppl_batch: int = 8
    threads: int | None = None  # None: torch's current setting
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt_len", "new_tokens", "repeats", "throughput_batch", "ppl_windows"):
            if getattr(self, name) < 1:
                raise GenloopError(f"workload {name} must be at least 1")
        if self.new_tokens < 2:
            raise GenloopError("workload new_tokens must be at least 2 (a prefill and a step)")


def weight_files_mb(model_dir: Path) -> float:
    total = sum(
        p.stat().st_size
        for p in Path(model_dir).iterdir()
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )
    return total / 2**20


def measure_dir(
    model_dir: Path,
    workload: Workload,
    *,
    token_dir: Path | None = None,
    seq_len: int | None = None,
) -> dict[str, Any]:
    """Load the variant in ``model_dir`` and measure it in this process (see module doc)."""
    import numpy as np
    import torch

    from genloop.models.pretrained import variant_format

    if workload.threads is not None:
        torch.set_num_threads(workload.threads)
    fmt = variant_format(model_dir)
    _preload()  # imports are not the variant's memory
    rss_before = _rss_kib()
    _reset_peak()
    runner = load_runner(model_dir, threads=workload.threads)
    vocab = runner.vocab_size
    gen = torch.Generator().manual_seed(workload.seed)

    def prompt(batch: int) -> Any:
        return torch.randint(0, vocab, (batch, workload.prompt_len), generator=gen)

    # latency at batch 1: warm-up requests, then the measured ones
    totals, prefills, decodes = [], [], []
    for i in range(workload.warmup + workload.repeats):
        total, prefill, steps = timed_request(runner, prompt(1), workload.new_tokens)
        if i >= workload.warmup:
            totals.append(total)
            prefills.append(prefill)
            decodes.extend(steps)
    # throughput: a batch of requests at once, best of a few runs
    tput = 0.0
    for _ in range(3):
        total, _, _ = timed_request(runner, prompt(workload.throughput_batch), workload.new_tokens)
        tput = max(tput, workload.throughput_batch * workload.new_tokens / total)
    peak = _peak_kib()
    out: dict[str, Any] = {
        "format": fmt,
        "file_mb": weight_files_mb(model_dir),
        "peak_mem_mb": None if peak is None else max(0, peak - rss_before) / 1024,
        "latency_ms_p50": 1e3 * float(np.percentile(totals, 50)),
        "latency_ms_p99": 1e3 * float(np.percentile(totals, 99)),
        "prefill_ms_p50": 1e3 * float(np.percentile(prefills, 50)),
        "decode_ms_p50": 1e3 * float(np.percentile(decodes, 50)),
        "tokens_per_s": tput,
        "threads": torch.get_num_threads(),
        "perplexity": None,
    }
    if token_dir is not None and seq_len is not None:
        out["perplexity"] = runner_perplexity(
            runner,
            token_dir,
            "test",
            seq_len,
            max_windows=workload.ppl_windows,
            batch_size=workload.ppl_batch,
        )
    return out


def load_runner(model_dir: Path, *, threads: int | None = None) -> Any:
    """An :class:`~genloop.optimize.onnx.OnnxCausalLM` or a ``TorchCausalLM`` (same forward)."""
    from genloop.models.pretrained import variant_format
    from genloop.optimize.onnx import OnnxCausalLM, TorchCausalLM

    if variant_format(model_dir) == "onnx":
        return OnnxCausalLM(model_dir, threads=threads)
    from transformers.utils import logging as hf_logging

    from genloop.models.pretrained import load_pretrained

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no bars in reports
    return TorchCausalLM(load_pretrained(model_dir, device="cpu"))


def timed_request(runner: Any, prompt: Any, new_tokens: int) -> tuple[float, float, list[float]]:
    """Greedy generation of ``new_tokens``: (total s, prefill s, each later step's s)."""
    import torch

    b, t = prompt.shape
    start = time.perf_counter()
    logits, past = runner.forward(prompt)
    mask = torch.ones(b, t, dtype=torch.long)
    token = logits[:, -1].argmax(-1, keepdim=True)
    prefill = time.perf_counter() - start
    steps = []
    for _ in range(new_tokens - 1):
        s = time.perf_counter()
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
        logits, past = runner.forward(token, mask, past=past)
        token = logits[:, -1].argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - s)
    return time.perf_counter() - start, prefill, steps


def runner_perplexity(
    runner: Any,
    token_dir: Path,
    split: str,
    seq_len: int,
    *,
    max_windows: int | None = None,
    batch_size: int = 8,
) -> float:
    """Perplexity over the split's windows, chosen as ``evaluate.text.perplexity`` does."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from genloop.data.pack import TokenDataset

    ds = TokenDataset(token_dir, split, seq_len)
    n = len(ds)
    if n == 0:
        raise GenloopError(
            f"split {split!r} has {ds.num_tokens} tokens: too few for one window of {seq_len + 1}"
        )
    if ds.vocab_size > runner.vocab_size:
        raise GenloopError(
            f"split {split!r} was tokenized with a {ds.vocab_size}-token vocabulary, larger "
            f"than the model's {runner.vocab_size}: not this model's tokenizer"
        )
    m = n if max_windows is None else min(n, max_windows)
    windows = (np.arange(m, dtype=np.int64) * n) // m
    nll: list[float] = []
    with torch.no_grad():
        for start in range(0, m, batch_size):
            pairs = [ds[int(i)] for i in windows[start : start + batch_size]]
            x = torch.from_numpy(np.stack([p[0] for p in pairs]))
            y = torch.from_numpy(np.stack([p[1] for p in pairs]))
            logits, _ = runner.forward(x)
            ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
            nll.extend(ce.view_as(y).mean(dim=1).tolist())
    return math.exp(float(np.mean(nll)))


def _preload() -> None:
    import onnxruntime  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import genloop.optimize.onnx
    import genloop.optimize.quantize  # noqa: F401


def _status_kib(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _rss_kib() -> int:
    rss = _status_kib("VmRSS")
    if rss is not None:
        return rss
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _reset_peak() -> None:
    """Reset the peak resident size (Linux ≥ 4.0); elsewhere the peak includes the past."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_kib() -> int | None:
    peak = _status_kib("VmHWM")
    if peak is not None:
        return peak
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def measure_isolated(
    model_dir: Path,
    workload: Workload,
    *,
    token_dir: Path | None = None,
    seq_len: int | None = None,
    timeout_s: float = 1800,
) -> dict[str, Any]:
    """:func:`measure_dir` in a fresh Python process (clean peak memory, no shared caches)."""
    import torch

    # the same threads as this process (a fresh one would take every core)
    threads = workload.threads or torch.get_num_threads()
    args = {
        "model_dir": str(model_dir),
        "workload": asdict(workload) | {"threads": threads},
        "token_dir": None if token_dir is None else str(token_dir),
        "seq_len": seq_len,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "genloop.optimize.tradeoff", json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise GenloopError(f"measuring {model_dir} failed: {last}")
    result: dict[str, Any] = json.loads(lines[-1])
    if "error" in result:
        raise GenloopError(result["error"])
    return result


def _main(argv: list[str]) -> int:
    """``python -m genloop.optimize.tradeoff ARGS_JSON``: one isolated measurement."""
    args = json.loads(argv[0])
    try:
        result = measure_dir(
            Path(args["model_dir"]),
            Workload(**args["workload"]),
            token_dir=None if args["token_dir"] is None else Path(args["token_dir"]),
            seq_len=args["seq_len"],
        )
    except GenloopError as exc:
        result = {"error": str(exc)}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


# ------------------------------------------------------------------------------ report


@dataclass
class VariantResult:
    ref: str
    transform: str  # "parent", "int8-dynamic", "prune-0.3", "onnx", "onnx-int8", …
    parent: str | None
    format: str = "torch"
    file_mb: float | None = None
    peak_mem_mb: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None
    prefill_ms_p50: float | None = None
    decode_ms_p50: float | None = None
    tokens_per_s: float | None = None
    perplexity: float | None = None
    quality: dict[str, float | None] = field(default_factory=dict)
    delta_pct: dict[str, float | None] = field(default_factory=dict)
    speedup: float | None = None  # parent latency / this latency
    within_budget: bool | None = None
    error: str | None = None


@dataclass
class TradeoffReport:
    model: str  # the ref the deltas are against
    dataset: str | None
    workload: dict[str, Any]
    machine: dict[str, Any]
    variants: list[VariantResult]
    budget: str | None = None
    picked: str | None = None
    promoted: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> tuple[list[str], list[list[Any]]]:
        """A table: one row per variant."""
        columns = [
            "variant",
            "transform",
            "file MB",
            "peak MB",
            "p50 ms",
            "p99 ms",
            "tok/s",
            "ppl",
            "Δppl %",
            "speedup",
        ]
        if self.budget:
            columns.append("in budget")
        rows = []
        for v in self.variants:
            row: list[Any] = [
                v.ref + (" ✓" if v.ref == self.picked else ""),
                v.transform,
                _fmt(v.file_mb, 1),
                _fmt(v.peak_mem_mb, 0),
                _fmt(v.latency_ms_p50, 1),
                _fmt(v.latency_ms_p99, 1),
                _fmt(v.tokens_per_s, 1),
                _fmt(v.perplexity, 3),
                _fmt(v.delta_pct.get("perplexity"), 2, signed=True),
                None if v.speedup is None else f"{v.speedup:.2f}×",
            ]
            if self.budget:
                row.append(v.error or {True: "yes", False: "no", None: "n/a"}[v.within_budget])
            rows.append(row)
        return columns, rows

    def to_markdown(self) -> str:
        columns, rows = self.rows()
        w = self.workload
        lines = [
            f"# Trade-off report: {self.model}",
            "",
            f"Measured on {self.machine.get('cpu')} with {self.machine.get('threads')} "
            f"thread(s) (torch {self.machine.get('torch')}, onnxruntime "
            f"{self.machine.get('onnxruntime')}). Latency: one request of "
            f"{w.get('prompt_len')} prompt + {w.get('new_tokens')} new tokens, "
            f"{w.get('repeats')} times; throughput: {w.get('throughput_batch')} such requests "
            f"at once; perplexity: {self.dataset or 'no dataset'}, test split, up to "
            f"{w.get('ppl_windows')} windows.",
            "",
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
        ]
        lines += ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]
        if self.budget:
            lines += ["", f"budget {self.budget}: picked {self.picked or 'nothing'}"]
        if self.promoted:
            lines.append(f"promoted: {self.promoted}")
        return "\n".join(lines) + "\n"


def _fmt(value: float | None, digits: int, *, signed: bool = False) -> str | None:
    if value is None:
        return None
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def lineage(ws: Workspace, ref: str) -> list[ModelVersionInfo]:
    """``ref`` and every version descended from it (any name), parents before children."""
    from genloop.workspace import registry

    root = registry.resolve(ws, ref)
    children: dict[str, list[ModelVersionInfo]] = {}
    for info in registry.list_models(ws):
        if info.parent is not None:
            children.setdefault(info.parent, []).append(info)
    out, queue = [], [root]
    while queue:
        info = queue.pop(0)
        out.append(info)
        queue.extend(sorted(children.get(info.ref, []), key=lambda i: (i.name, i.version)))
    return out


def tradeoff_report(
    ws: Workspace,
    ref: str,
    *,
    variants: list[ModelVersionInfo] | None = None,
    dataset: str | None = None,
    workload: Workload | None = None,
    budget: str | None = None,
    isolate: bool = True,
    progress: Any = None,
) -> TradeoffReport:
    """Measure ``ref`` and its variants (default: its whole lineage); pick within ``budget``.

    ``dataset`` (NAME[@VERSION]) gives the perplexity windows; default: the model's own
    training dataset. Without either, perplexity is left out (and a ppl budget refused).
    """
    from genloop.workspace import registry

    workload = workload or Workload()
    parsed = parse_budget(budget) if budget else None
    root = registry.resolve(ws, ref)
    chosen = variants if variants is not None else lineage(ws, ref)
    if not chosen or chosen[0].id != root.id:
        chosen = [root, *[v for v in chosen if v.id != root.id]]
    ds = _dataset(ws, dataset, root)
    token_dir, seq_len = _tokens(ws, ds) if ds is not None else (None, None)
    if parsed is not None and parsed.metric == "perplexity" and token_dir is None:
        raise GenloopError(
            f"{root.ref} records no dataset with token shards, so perplexity cannot be "
            "measured for the budget: give --dataset NAME[@VERSION]"
        )

    results: list[VariantResult] = []
    for i, info in enumerate(chosen):
        if progress is not None:
            progress(info.ref, i + 1, len(chosen))
        model_dir = ws.store.open_verified(info.artifact)
        result = VariantResult(
            ref=info.ref,
            transform="parent" if info.id == root.id else str(info.tags.get("optimize", "?")),
            parent=info.parent,
        )
        try:
            measure = measure_isolated if isolate else measure_dir
            measured = measure(model_dir, workload, token_dir=token_dir, seq_len=seq_len)
        except GenloopError as exc:
            if info.id == root.id:
                raise
            result.error = str(exc)
            results.append(result)
            continue
        for key in (
            "format",
            "file_mb",
            "peak_mem_mb",
            "latency_ms_p50",
            "latency_ms_p99",
            "prefill_ms_p50",
            "decode_ms_p50",
            "tokens_per_s",
            "perplexity",
        ):
            setattr(result, key, measured[key])
        result.quality = _quality(info, measured.get("perplexity"))
        results.append(result)

    base = results[0]
    for r in results:
        for name, value in r.quality.items():
            ref_value = base.quality.get(name)
            r.delta_pct[name] = (
                100.0 * (value - ref_value) / abs(ref_value)
                if value is not None and ref_value not in (None, 0)
                else None
            )
        if r.latency_ms_p50 and base.latency_ms_p50:
            r.speedup = base.latency_ms_p50 / r.latency_ms_p50

    report = TradeoffReport(
        model=root.ref,
        dataset=ds.ref if ds is not None else None,
        workload=asdict(workload),
        machine=_machine(workload),
        variants=results,
        budget=parsed.text if parsed else None,
    )
    if parsed is not None:
        picked = pick(report, parsed)
        report.picked = picked.ref
    return report


def pick(report: TradeoffReport, budget: Budget) -> VariantResult:
    """The fastest variant within ``budget`` (marks ``within_budget`` on each)."""
    base = report.variants[0]
    parent_value = base.quality.get(budget.metric)
    if parent_value is None:
        raise GenloopError(
            f"{base.ref} has no {budget.metric} to budget against; run 'genloop eval' with the "
            f"suite that measures it on {base.ref} and its variants"
        )
    fits = []
    for v in report.variants:
        value = v.quality.get(budget.metric)
        v.within_budget = None if v.error or value is None else budget.allows(parent_value, value)
        if v.within_budget and v.latency_ms_p50 is not None:
            fits.append(v)
    # the parent is always within its own budget, so there is at least one
    return min(fits, key=lambda v: (v.latency_ms_p50, v.file_mb or 0.0))


def _quality(info: ModelVersionInfo, perplexity: float | None) -> dict[str, float | None]:
    """The catalog's quality metrics of a version, with the perplexity measured here."""
    out: dict[str, float | None] = {}
    for name, value in info.metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if name in LOWER_IS_BETTER or name in HIGHER_IS_BETTER or _PASS_AT.match(name):
            out[name] = float(value)
    out["perplexity"] = perplexity  # measured the same way for every variant
    return out


def _dataset(ws: Workspace, ref: str | None, info: ModelVersionInfo) -> Any:
    from genloop.workspace.datasets import get_dataset_version, resolve_dataset

    if ref is not None:
        return resolve_dataset(ws, ref)
    if info.dataset_version_id is not None:
        return get_dataset_version(ws, info.dataset_version_id)
    return None


def _tokens(ws: Workspace, ds: Any) -> tuple[Path | None, int | None]:
    """The dataset's token shards and packing length; (None, None) when it has none."""
    data_dir = ws.store.open_verified(ds.artifact)
    tok = ds.stats.get("tokenizer") or (ds.config.get("tokenizer") or {})
    seq_len = tok.get("seq_len") if isinstance(tok, dict) else None
    if not (data_dir / "tokens").is_dir() or not isinstance(seq_len, int):
        return None, None
    return data_dir / "tokens", seq_len


def _machine(workload: Workload) -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": workload.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
