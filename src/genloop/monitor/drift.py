"""Drift: is recent traffic, and what the model answers, still like what it was?

Per request, :func:`request_features` computes a few numbers when the request is logged
(``requests.params["features"]``), so monitoring never reads, let alone decrypts, text:

=============  ==========================================================================
prompt_len     prompt tokens
tokens         the prompt's token ids counted in ``TOKEN_BUCKETS`` hashed buckets (a
               fixed random projection of the unigram distribution: ids are not stored)
unk            prompt tokens the tokenizer could not cover: its unknown token, or, for
               byte-level BPE (no unknown token), a lone non-ASCII byte (text the learned
               merges never saw, e.g. another script) and ``<0xNN>`` byte-fallback pieces
output_len     generated tokens
repetition     1 − distinct/total 3-grams of the output (0: no repeats; near 1: a loop)
logprob        mean log-probability per generated token under the model, when known
refusal        the answer opens like a refusal ("I can't …", "I'm sorry, but …")
=============  ==========================================================================

The reference profile has two parts, stored as JSON in the artifact store
(``monitor/profiles/<model>``):

- **training**: the token distribution and unknown-token rate of (a sample of) the training
  split of the dataset version the model was trained on, plus its document lengths;
- **traffic**: the first ``monitor.reference_window`` requests after the profile was
  (re)set: prompt-length, output-length, repetition and log-probability histograms (bin
  edges at the reference's quantiles), token distribution and rates.

:meth:`DriftMonitor.check` compares the last ``monitor.window`` requests with it:

- PSI (population stability index, ``Σ (a − e)·ln(a / e)`` over bins) of each histogram,
  and of the unknown-token, refusal and guardrail-flag rates taken as two-bin
  distributions, against ``monitor.psi_threshold`` (0.1 is a moderate shift, 0.2 a major
  one);
- KL divergence ``KL(recent ‖ reference)`` of the token distribution against
  ``monitor.kl_threshold``; against the training data too, but that one only alerts when
  the first traffic window was itself close to the training data: prompts are shorter
  than documents and phrased differently, so they rarely match training text closely, and
  prompts that never did are not "drift".

Until the traffic reference is taken (the first ``reference_window`` requests), the recent
window is compared with the training data only, and only the unknown-token rate can alert
(traffic in a script or vocabulary the model never saw).

Scores go into a ``monitor`` run's metric series (``monitor:<model>``), so they can be
plotted over time; crossing a threshold raises a ``drift`` alert.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select

from genloop.errors import GenloopError, NotFoundError
from genloop.workspace import runs
from genloop.workspace.tables import RequestLog, utcnow
from genloop.workspace.workspace import Workspace

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from genloop.config import MonitorConfig

log = logging.getLogger(__name__)

PROFILE_FORMAT = 1
PROFILE_FILE = "profile.json"
TOKEN_BUCKETS = 64
NGRAM = 3
MAX_BINS = 10
MAX_PROFILE_DOCS = 2000  # training documents sampled for the training profile …
MAX_PROFILE_TOKENS = 2_000_000  # … and at most this many of their tokens
NUMERIC = ("prompt_len", "output_len", "repetition", "logprob")
RATES = ("unk_rate", "refusal_rate", "guardrail_rate")
REFUSAL_MARKERS = (
    "i can't",
    "i cannot",
    "i can not",
    "i won't",
    "i will not",
    "i'm sorry",
    "i am sorry",
    "i'm unable",
    "i am unable",
    "i'm not able to",
    "i am not able to",
    "as an ai",
    "sorry, but",
)
_WORD = re.compile(r"\w+|[^\w\s]")


# ------------------------------------------------------------------------ divergences


def _probs(counts: Sequence[float] | np.ndarray, smoothing: float = 0.5) -> np.ndarray:
    """Counts → probabilities with ``smoothing`` added to every bin (no zero bins)."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or np.any(c < 0):
        raise ValueError("counts must be a non-empty 1-D array of non-negative numbers")
    c = c + smoothing
    return np.asarray(c / c.sum())


def psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray) -> float:
    """Population stability index ``Σ (a − e)·ln(a / e)`` of two histograms (counts).

    Symmetric, ≥ 0; by convention < 0.1 is stable, 0.1-0.2 a moderate shift, > 0.2 a
    major one. Counts are smoothed by ½ per bin so an empty bin is finite.
    """
    e, a = _probs(expected), _probs(actual)
    if e.shape != a.shape:
        raise ValueError(f"histograms differ in size: {e.size} and {a.size} bins")
    return float(np.sum((a - e) * np.log(a / e)))


def kl_divergence(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """``KL(p ‖ q) = Σ p·ln(p / q)`` in nats, of two histograms (counts, smoothed by ½)."""
    pp, qq = _probs(p), _probs(q)
    if pp.shape != qq.shape:
        raise ValueError(f"histograms differ in size: {pp.size} and {qq.size} bins")
    return float(np.sum(pp * np.log(pp / qq)))


def quantile_edges(values: Sequence[float], bins: int) -> list[float]:
    """Bin edges for a reference sample: its minimum, the quantiles that cut it into
    ``bins`` equal parts, and just above its maximum (ties merged: fewer bins then).

    With :func:`histogram`, the outer bins hold values below everything and above
    everything the reference had: they are empty for it, so a window that lands there
    (a model that starts looping when it never did) scores high.
    """
    if len(values) == 0:
        return []
    arr = np.asarray(values, dtype=np.float64)
    inner = np.quantile(arr, np.linspace(0, 1, max(bins, 1) + 1)[1:-1])
    top = np.nextafter(arr.max(), np.inf)
    return [float(x) for x in np.unique(np.concatenate([[arr.min()], inner, [top]]))]


def histogram(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts of ``values`` in the bins ``(-inf, e0), [e0, e1), …, [e_last, inf)``."""
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(values), side="right")
    return [int(x) for x in np.bincount(idx, minlength=len(edges) + 1)]


def bernoulli_psi(expected: tuple[int, int], actual: tuple[int, int]) -> float:
    """PSI of two rates given as ``(hits, total)``."""
    (ek, en), (ak, an) = expected, actual
    return psi([ek, en - ek], [ak, an - ak])


# --------------------------------------------------------------------------- features


def token_buckets(ids: np.ndarray) -> np.ndarray:
    """Bucket of each token id: the top bits of a multiplicative (Knuth) hash."""
    h = (ids.astype(np.uint64) * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
    return np.asarray(h >> np.uint64(32 - int(math.log2(TOKEN_BUCKETS))), dtype=np.int64)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map, used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def unknown_mask(tokenizer_json: dict[str, Any], vocab: dict[str, int], size: int) -> np.ndarray:
    """Which ids count as "unknown" (see the module docstring), as a boolean array."""
    mask = np.zeros(size, dtype=bool)
    model = tokenizer_json.get("model") or {}
    unk = model.get("unk_token")
    if isinstance(unk, str) and unk in vocab:
        mask[vocab[unk]] = True
    byte_level = "ByteLevel" in json.dumps(
        [tokenizer_json.get("pre_tokenizer"), tokenizer_json.get("decoder")]
    )
    special = {t["id"] for t in tokenizer_json.get("added_tokens") or [] if t.get("special")}
    rare_bytes = set()
    if byte_level:
        to_char = _bytes_to_unicode()
        rare_bytes = {
            to_char[b] for b in range(256) if b >= 0x80 or (b < 0x20 and b not in (9, 10))
        }
    for token, i in vocab.items():
        if i >= size or i in special:
            continue
        if token in rare_bytes or _BYTE_FALLBACK.fullmatch(token):
            mask[i] = True
    return mask


class Featurizer:
    """A model's tokenizer, reduced to what drift monitoring needs."""

    def __init__(self, tokenizer: Tokenizer | None, unknown: np.ndarray) -> None:
        self.tokenizer = tokenizer
        self.unknown = unknown
        self.vocab_size = int(unknown.size)

    @classmethod
    def from_dir(cls, path: Path) -> Featurizer:
        """From a directory with a ``tokenizer.json`` (a model or dataset artifact)."""
        from tokenizers import Tokenizer

        file = path / "tokenizer.json"
        if not file.is_file():
            raise NotFoundError(f"{path}: no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(file))
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        data = json.loads(file.read_text(encoding="utf-8"))
        return cls(tokenizer, unknown_mask(data, vocab, size))

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None or not text:
            return []
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    def token_stats(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, int]:
        """(counts per bucket, unknown tokens) of ``ids``."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size == 0:
            return np.zeros(TOKEN_BUCKETS, dtype=np.int64), 0
        inside = arr[(arr >= 0) & (arr < self.vocab_size)]
        unk = int(self.unknown[inside].sum()) + int(arr.size - inside.size)
        return np.bincount(token_buckets(arr), minlength=TOKEN_BUCKETS), unk


def repetition(items: Sequence[Any], n: int = NGRAM) -> float:
    """1 − distinct/total n-grams of ``items`` (0 for fewer than n + 1 items)."""
    if len(items) <= n:
        return 0.0
    grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def is_refusal(text: str) -> bool:
    head = text.strip().lower().replace("’", "'")[:200]
    return any(marker in head for marker in REFUSAL_MARKERS)


def request_features(
    featurizer: Featurizer | None,
    *,
    prompt: str,
    response: str,
    prompt_tokens: int,
    completion_tokens: int,
    prompt_ids: Sequence[int] | None = None,
    output_ids: Sequence[int] | None = None,
    mean_logprob: float | None = None,
) -> dict[str, Any]:
    """The numbers stored with a request (``params["features"]``); no text, no ids."""
    out: dict[str, Any] = {
        "prompt_len": int(prompt_tokens),
        "output_len": int(completion_tokens),
        "refusal": is_refusal(response),
    }
    units: Sequence[Any] = output_ids if output_ids is not None else _WORD.findall(response)
    out["repetition"] = round(repetition(units), 4)
    if mean_logprob is not None and math.isfinite(mean_logprob):
        out["logprob"] = round(float(mean_logprob), 4)
    if featurizer is not None:
        ids = list(prompt_ids) if prompt_ids is not None else featurizer.encode(prompt)
        counts, unk = featurizer.token_stats(ids)
        out["tokens"] = {str(i): int(c) for i, c in enumerate(counts) if c}
        out["unk"] = unk
        out["n_tokens"] = len(ids)
        if not prompt_tokens:
            out["prompt_len"] = len(ids)
    return out


_featurizers: dict[tuple[str, str, int | None], Featurizer | None] = {}
_featurizers_lock = threading.Lock()
_MAX_FEATURIZERS = 16


def featurizer_for(ws: Workspace, model: str, version: int | None) -> Featurizer | None:
    """The (cached) featurizer of a registered model version; None for models genloop
    does not have (upstream ones) or without a text tokenizer."""
    key = (str(ws.root), model, version)
    with _featurizers_lock:
        if key in _featurizers:
            return _featurizers[key]
    from genloop.workspace import registry

    found: Featurizer | None = None
    try:
        info = registry.resolve(ws, f"{model}@{version}" if version is not None else model)
        found = Featurizer.from_dir(ws.store.path(info.artifact))
    except GenloopError:
        found = None
    except Exception as exc:  # an unreadable tokenizer must not fail request logging
        log.warning("no drift features for %s@%s: %s", model, version, exc)
        found = None
    with _featurizers_lock:
        if len(_featurizers) >= _MAX_FEATURIZERS:
            _featurizers.pop(next(iter(_featurizers)))
        _featurizers[key] = found
    return found


# --------------------------------------------------------------------------- profiles


@dataclass
class Window:
    """Aggregated features of a set of requests."""

    requests: int = 0
    numeric: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in NUMERIC})
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(TOKEN_BUCKETS, dtype=np.int64))
    unk: int = 0
    n_tokens: int = 0
    refusals: int = 0
    flagged: int = 0
    first_at: datetime | None = None
    last_at: datetime | None = None

    def add(self, features: dict[str, Any], flags: list[Any], at: datetime) -> None:
        self.requests += 1
        for key in NUMERIC:
            value = features.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                self.numeric[key].append(float(value))
        for bucket, count in (features.get("tokens") or {}).items():
            b = int(bucket)
            if 0 <= b < TOKEN_BUCKETS:
                self.tokens[b] += int(count)
        self.unk += int(features.get("unk") or 0)
        self.n_tokens += int(features.get("n_tokens") or 0)
        self.refusals += bool(features.get("refusal"))
        self.flagged += bool(flags)
        self.first_at = at if self.first_at is None else min(self.first_at, at)
        self.last_at = at if self.last_at is None else max(self.last_at, at)

    def rates(self) -> dict[str, tuple[int, int]]:
        return {
            "unk_rate": (self.unk, self.n_tokens),
            "refusal_rate": (self.refusals, self.requests),
            "guardrail_rate": (self.flagged, self.requests),
        }

    def profile(self) -> dict[str, Any]:
        """This window as a reference: histograms with bin edges at its quantiles."""
        bins = max(2, min(MAX_BINS, self.requests // 50))
        numeric = {}
        for key, values in self.numeric.items():
            if len(values) >= max(10, self.requests // 2):  # logprob may be missing
                edges = quantile_edges(values, bins)
                numeric[key] = {"edges": edges, "counts": histogram(values, edges)}
        return {
            "requests": self.requests,
            "since": self.first_at.isoformat() if self.first_at else None,
            "until": self.last_at.isoformat() if self.last_at else None,
            "numeric": numeric,
            "tokens": [int(x) for x in self.tokens],
            "rates": {k: list(v) for k, v in self.rates().items()},
        }


def training_profile(
    data_dir: Path, featurizer: Featurizer, *, max_docs: int = MAX_PROFILE_DOCS
) -> dict[str, Any]:
    """Token distribution, unknown rate and document lengths of a dataset's train split."""
    from genloop.data.pack import TokenDataset

    ds = TokenDataset(data_dir / "tokens", "train", seq_len=1)
    if ds.vocab_size > featurizer.vocab_size:
        raise GenloopError(
            f"{data_dir}: tokens use a vocabulary of {ds.vocab_size}, the model's tokenizer "
            f"has {featurizer.vocab_size}"
        )
    picks = np.unique(np.linspace(0, ds.num_docs - 1, min(max_docs, ds.num_docs)).astype(int))
    counts = np.zeros(TOKEN_BUCKETS, dtype=np.int64)
    unk = total = 0
    lengths: list[int] = []
    for d in picks:
        ids = ds.document(int(d))[:-1]  # without the end-of-document id prompts never have
        lengths.append(int(ids.size))
        c, u = featurizer.token_stats(ids)
        counts += c
        unk += u
        total += int(ids.size)
        if total >= MAX_PROFILE_TOKENS:
            break
    edges = quantile_edges(lengths, MAX_BINS)
    return {
        "documents": len(lengths),
        "tokens": [int(x) for x in counts],
        "rates": {"unk_rate": [unk, total]},
        "doc_len": {"edges": edges, "counts": histogram(lengths, edges)},
    }


def profile_key(model: str) -> str:
    from genloop.workspace.refs import check_name

    return f"monitor/profiles/{check_name(model)}"


def load_profile(ws: Workspace, model: str) -> dict[str, Any] | None:
    key = profile_key(model)
    if not ws.store.exists(key):
        return None
    path = ws.store.open_verified(key) / PROFILE_FILE
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data if data.get("format") == PROFILE_FORMAT else None


def save_profile(ws: Workspace, model: str, profile: dict[str, Any]) -> None:
    with ws.store.writer(profile_key(model), overwrite=True) as staging:
        text = json.dumps(profile, indent=1, allow_nan=False)
        (staging / PROFILE_FILE).write_text(text + "\n", encoding="utf-8")


def reset_profile(ws: Workspace, model: str) -> dict[str, Any]:
    """Start the reference over: the next ``reference_window`` requests become its traffic
    part, and the training part is taken again from the model's newest version."""
    profile = _new_profile(model)
    profile["traffic_since"] = utcnow().isoformat()
    save_profile(ws, model, profile)
    return profile


def _new_profile(model: str) -> dict[str, Any]:
    return {
        "format": PROFILE_FORMAT,
        "model": model,
        "training": None,
        "traffic": None,
        "traffic_since": None,
    }


def _requests(
    ws: Workspace,
    model: str,
    *,
    since: datetime | None,
    after: datetime | None = None,
    limit: int,
    newest: bool,
) -> Window:
    """The features of ``limit`` successful requests of ``model`` (oldest or newest)."""
    query = select(RequestLog.params, RequestLog.flags, RequestLog.created_at).where(
        RequestLog.model_name == model, RequestLog.status < 400
    )
    if since is not None:
        query = query.where(RequestLog.created_at >= since)
    if after is not None:
        query = query.where(RequestLog.created_at > after)
    order = RequestLog.created_at.desc() if newest else RequestLog.created_at.asc()
    window = Window()
    with ws.catalog.session() as s:
        for params, flags, at in s.execute(query.order_by(order).limit(limit)):
            features = (params or {}).get("features")
            if isinstance(features, dict):
                window.add(features, list(flags or []), at)
    return window


# ---------------------------------------------------------------------------- checks


@dataclass
class DriftReport:
    model: str
    status: str  # ok | drift | warming_up | no_traffic
    checked_at: datetime
    scores: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    drifted: list[str] = field(default_factory=list)
    reference_requests: int = 0
    recent_requests: int = 0
    alert_id: int | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checked_at"] = self.checked_at.isoformat()
        return d


class DriftMonitor:
    """Compares recent traffic with the reference profile of a model.

    The profile is read from the artifact store at every check (a small JSON file), so a
    ``genloop monitor profile --reset`` from another process takes effect at once.
    """

    def profile(self, ws: Workspace, cfg: MonitorConfig, model: str) -> dict[str, Any]:
        """The reference profile, completed (and saved) with what is available now."""
        profile = load_profile(ws, model) or _new_profile(model)
        changed = False
        if profile.get("training") is None and not profile.get("training_unavailable"):
            training = _training_part(ws, model)
            if training is None:
                profile["training_unavailable"] = True
            else:
                profile["training"] = training
            changed = True
        if profile.get("traffic") is None:
            since = profile.get("traffic_since")
            first = _requests(
                ws,
                model,
                since=datetime.fromisoformat(since) if since else None,
                limit=cfg.reference_window,
                newest=False,
            )
            if first.requests >= cfg.reference_window:
                profile["traffic"] = first.profile()
                changed = True
        if changed:
            save_profile(ws, model, profile)
        return profile

    def check(
        self, ws: Workspace, cfg: MonitorConfig, model: str, *, alert: bool = True
    ) -> DriftReport:
        """Score the last ``cfg.window`` requests of ``model``; alert on a crossed threshold."""
        profile = self.profile(ws, cfg, model)
        traffic = profile.get("traffic")
        training = profile.get("training")
        after = datetime.fromisoformat(traffic["until"]) if traffic else None
        if traffic is None and profile.get("traffic_since"):
            after = datetime.fromisoformat(profile["traffic_since"])
        recent = _requests(ws, model, since=None, after=after, limit=cfg.window, newest=True)
        report = DriftReport(
            model=model,
            status="ok",
            checked_at=utcnow(),
            thresholds={"psi": cfg.psi_threshold, "kl": cfg.kl_threshold},
            reference_requests=traffic["requests"] if traffic else 0,
            recent_requests=recent.requests,
        )
        needed = max(10, cfg.window // 5)
        if recent.requests < needed:
            report.status = "no_traffic"
            report.message = (
                f"{recent.requests} requests since the reference; a check needs {needed}"
            )
            return report
        scores, drifted = compare(traffic, training, recent, cfg)
        report.scores, report.drifted = scores, drifted
        if traffic is None:
            report.status = "warming_up"
            report.message = (
                f"the traffic reference is not taken yet ({cfg.reference_window} requests); "
                "compared with the training data only"
            )
        if drifted:
            report.status = "drift"
            parts = ", ".join(f"{k} = {scores[k]:.3f}" for k in drifted)
            report.message = f"{model}: recent traffic drifted from the reference ({parts})"
        _record_scores(ws, model, scores)
        if drifted and alert:
            from genloop.monitor.alerts import raise_alert

            report.alert_id = raise_alert(
                ws,
                "drift",
                report.message,
                {
                    "scores": scores,
                    "drifted": drifted,
                    "thresholds": report.thresholds,
                    "reference_requests": report.reference_requests,
                    "recent_requests": report.recent_requests,
                },
                severity="warning",
                source=model,
                webhook_url=cfg.webhook_url,
                dedup_key=f"drift:{model}:{','.join(drifted)}",
            )
        return report


def compare(
    traffic: dict[str, Any] | None,
    training: dict[str, Any] | None,
    recent: Window,
    cfg: MonitorConfig,
) -> tuple[dict[str, float], list[str]]:
    """The drift scores of ``recent`` and the names of those over their threshold."""
    scores: dict[str, float] = {}
    drifted: list[str] = []
    rates = recent.rates()
    has_tokens = recent.n_tokens > 0
    if traffic is not None:
        for key, ref in traffic["numeric"].items():
            values = recent.numeric.get(key) or []
            if len(values) >= max(10, recent.requests // 2):
                scores[f"psi_{key}"] = psi(ref["counts"], histogram(values, ref["edges"]))
        for key, (k, n) in traffic["rates"].items():
            if n and rates[key][1] and (key != "unk_rate" or has_tokens):
                scores[f"psi_{key}"] = bernoulli_psi((k, n), rates[key])
        if has_tokens and sum(traffic["tokens"]):
            scores["kl_tokens"] = kl_divergence(recent.tokens, traffic["tokens"])
    for name, value in scores.items():
        limit = cfg.kl_threshold if name.startswith("kl_") else cfg.psi_threshold
        if value > limit:
            drifted.append(name)
    if training is not None and has_tokens and sum(training["tokens"]):
        kl = kl_divergence(recent.tokens, training["tokens"])
        scores["kl_tokens_train"] = kl
        ref_kl = (
            kl_divergence(traffic["tokens"], training["tokens"])
            if traffic is not None and sum(traffic["tokens"])
            else 0.0
        )
        if traffic is not None:
            scores["kl_tokens_train_reference"] = ref_kl
            if kl > cfg.kl_threshold and ref_kl <= cfg.kl_threshold:
                drifted.append("kl_tokens_train")
        k, n = training["rates"]["unk_rate"]
        if n:
            scores["psi_unk_rate_train"] = bernoulli_psi((k, n), rates["unk_rate"])
            if traffic is None and scores["psi_unk_rate_train"] > cfg.psi_threshold:
                drifted.append("psi_unk_rate_train")
    return {k: round(v, 6) for k, v in scores.items()}, drifted


def _training_part(ws: Workspace, model: str) -> dict[str, Any] | None:
    """The training profile of the newest version of ``model`` (None when unavailable)."""
    from genloop.workspace import registry
    from genloop.workspace.datasets import get_dataset_version

    try:
        info = registry.resolve(ws, model)
    except GenloopError:
        return None
    if info.dataset_version_id is None:
        return None
    try:
        dv = get_dataset_version(ws, info.dataset_version_id)
        data_dir = ws.store.path(dv.artifact)
        if not (data_dir / "tokens" / "train.json").is_file():
            return None
        featurizer = Featurizer.from_dir(ws.store.path(info.artifact))
        part = training_profile(data_dir, featurizer)
    except GenloopError as exc:
        log.warning("no training profile for %s: %s", model, exc)
        return None
    part["dataset"] = f"{dv.name}@{dv.version}"
    part["model_version"] = info.version
    return part


def monitor_run_id(ws: Workspace, model: str) -> str:
    """The id of the ``monitor`` run whose metric series hold ``model``'s scores."""
    return runs.named_run(ws, kind="monitor", name=f"monitor:{model}")


def record_series(ws: Workspace, model: str, values: dict[str, float]) -> None:
    """Append one point per value to the model's monitor run (step = check number)."""
    runs.log_next(ws, monitor_run_id(ws, model), values)


def _record_scores(ws: Workspace, model: str, scores: dict[str, float]) -> None:
    if scores:
        record_series(ws, model, scores)


def series(
    ws: Workspace, model: str, *, since: datetime | None = None
) -> dict[str, list[tuple[datetime, float]]]:
    """A model's monitor series (drift scores, bias metrics): key → [(time, value)]."""
    return runs.timed_series(ws, kind="monitor", name=f"monitor:{model}", since=since)


def check_drift(ws: Workspace, cfg: MonitorConfig, model: str) -> DriftReport:
    """One drift check of ``model`` (``genloop monitor drift``)."""
    return DriftMonitor().check(ws, cfg, model)
