"""Prometheus metrics of a serving process, named after vLLM's under a ``genloop:`` prefix.

Every series carries ``model_name`` and ``model_version`` labels (``""`` when a model has
no version, e.g. one routed upstream). Two sources feed them, and each figure has exactly
one source, so nothing is counted twice:

- the engine, through the :class:`~genloop.serve.engine.types.EngineObserver` hooks
  (called from the engine's thread; each is a couple of dictionary lookups and one
  ``observe``): queue time, time to first token, inter-token latency, and the per-request
  prompt and generation length histograms;
- the HTTP layer, through :meth:`ServingMetrics.request_finished` once per API response
  (engine-served or routed upstream): requests by status, successes by finish reason,
  prompt and generation token totals, end-to-end latency as the client saw it; and
  :meth:`ServingMetrics.error` for errors by type.

``genloop:requests_total`` counts only requests that reached a model. Every response the
server sends, refused ones included (401, 404, 413, 422, 429 …, and answers from the
request limits before any route ran), is counted once more, without model labels, by the
outermost ASGI layer (:mod:`genloop.serve.http_metrics`) through
:meth:`ServingMetrics.http_response`: ``http_requests_total`` and
``http_request_duration_seconds`` by route *template* (``/v1/models/{model_id}``; any path
no route matched is ``unmatched``), method and status, and ``auth_failures_total`` by the
presented key's public prefix (``missing`` / ``malformed`` when there is none; the first
:data:`MAX_KEY_PREFIX_LABELS` prefixes get a series each, later ones share ``other``, so a
key-guessing flood cannot grow the series without bound).

=============================================  =========  ===================================
name                                           type       meaning
=============================================  =========  ===================================
genloop:num_requests_running                   gauge      requests in the engine's batch
genloop:num_requests_waiting                   gauge      requests queued for a slot
genloop:requests_total{status}                 counter    API responses by HTTP status
genloop:request_success_total{finished_reason} counter    completed requests (stop, length …)
genloop:prompt_tokens_total                    counter    prompt tokens of finished requests
genloop:generation_tokens_total                counter    generated tokens
genloop:request_errors_total{type}             counter    errors by type
genloop:time_to_first_token_seconds            histogram  submit → first token
genloop:inter_token_latency_seconds            histogram  gap between consecutive tokens
genloop:e2e_request_latency_seconds            histogram  request received → response done
genloop:request_queue_time_seconds             histogram  submit → scheduled into the batch
genloop:request_prompt_tokens                  histogram  prompt length per engine request
genloop:request_generation_tokens              histogram  generated length per engine request
genloop:model_loads_total                      counter    model versions loaded
genloop:model_swaps_total                      counter    live swaps (alias moved)
genloop:http_requests_total{route,method,      counter    every HTTP response, refused ones too
  status,reason}
genloop:http_request_duration_seconds{route,   histogram  request received → last body byte
  method,status}
genloop:auth_failures_total{key_prefix}        counter    401 answers by the key's public prefix
genloop:request_log_dropped_total{kind}        counter    records the request log had no room for
genloop:alerts_open{kind,severity}             gauge      unresolved alerts in the catalog
genloop:gpu_memory_used_bytes{device}          gauge      CUDA memory allocated (GPU only)
genloop:gpu_memory_reserved_bytes{device}      gauge      CUDA memory reserved (GPU only)
genloop:gpu_utilization_perc{device}           gauge      GPU busy % (GPU with NVML only)
process_*                                      various    CPU seconds, resident memory …
=============================================  =========  ===================================

``inter_token_latency_seconds`` is vLLM's current name for what it formerly called
``time_per_output_token_seconds``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "genloop:"
LABELS = ("model_name", "model_version")

# vLLM's buckets, extended down to the millisecond for small models on a CPU.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
# every HTTP answer, from a 0.1 ms refusal to a long stream
HTTP_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
HTTP_LABELS = ("route", "method", "status")
MAX_KEY_PREFIX_LABELS = 100  # distinct key prefixes with a series of their own
AUTH_FIXED_LABELS = frozenset({"missing", "malformed", "other"})


class FinishedCounts(Protocol):
    """What this module reads of a finished request (the engine's ``Finished``)."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...


class EngineLoad(Protocol):
    """What this module reads of an engine's stats (the engine's ``EngineStats``)."""

    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...


StatsFn = Callable[[], EngineLoad]


def _version(version: int | None) -> str:
    return "" if version is None else str(version)


class _PerModel:
    """The labelled children of one (model, version): resolved once, reused per token."""

    def __init__(self, m: ServingMetrics, model: str, version: str) -> None:
        self.queue = m.queue_time.labels(model, version)
        self.ttft = m.ttft.labels(model, version)
        self.itl = m.itl.labels(model, version)
        self.prompt_len = m.prompt_len.labels(model, version)
        self.generation_len = m.generation_len.labels(model, version)
        self.e2e = m.e2e.labels(model, version)
        self.prompt_tokens = m.prompt_tokens.labels(model, version)
        self.generation_tokens = m.generation_tokens.labels(model, version)


class ServingMetrics:
    """The ``/metrics`` of one server. Each instance has its own registry by default."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        def name(short: str) -> str:
            return PREFIX + short

        self.running = Gauge(
            name("num_requests_running"), "Requests in the engine's batch.", LABELS, registry=r
        )
        self.waiting = Gauge(
            name("num_requests_waiting"), "Requests waiting for a batch slot.", LABELS, registry=r
        )
        self.requests = Counter(
            name("requests"), "API responses by HTTP status.", (*LABELS, "status"), registry=r
        )
        self.success = Counter(
            name("request_success"),
            "Completed requests by finish reason.",
            (*LABELS, "finished_reason"),
            registry=r,
        )
        self.prompt_tokens = Counter(
            name("prompt_tokens"), "Prompt tokens of finished requests.", LABELS, registry=r
        )
        self.generation_tokens = Counter(
            name("generation_tokens"), "Generated tokens.", LABELS, registry=r
        )
        self.errors = Counter(
            name("request_errors"), "Request errors by type.", (*LABELS, "type"), registry=r
        )
        self.ttft = Histogram(
            name("time_to_first_token_seconds"),
            "Time from submission to the first generated token.",
            LABELS,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            name("inter_token_latency_seconds"),
            "Time between consecutive generated tokens of a request.",
            LABELS,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            name("e2e_request_latency_seconds"),
            "Time from receiving a request to finishing its response.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            name("request_queue_time_seconds"),
            "Time a request waited before joining the batch.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_len = Histogram(
            name("request_prompt_tokens"),
            "Prompt length per engine request.",
            LABELS,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.generation_len = Histogram(
            name("request_generation_tokens"),
            "Generated length per engine request.",
            LABELS,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.loads = Counter(name("model_loads"), "Model versions loaded.", LABELS, registry=r)
        self.swaps = Counter(
            name("model_swaps"),
            "Live swaps to a new model version (labels: the new version).",
            LABELS,
            registry=r,
        )
        self.http_requests = Counter(
            name("http_requests"),
            "Every HTTP response, refused ones included, by route template and status.",
            (*HTTP_LABELS, "reason"),
            registry=r,
        )
        self.http_duration = Histogram(
            name("http_request_duration_seconds"),
            "Time from receiving a request to sending the last byte of its response.",
            HTTP_LABELS,
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.auth_failures = Counter(
            name("auth_failures"),
            "Requests refused with 401, by the presented key's public prefix.",
            ("key_prefix",),
            registry=r,
        )
        self.log_dropped = Counter(
            name("request_log_dropped"),
            "Request records not written because the request log's queue was full.",
            ("kind",),
            registry=r,
        )
        ProcessCollector(registry=r)
        r.register(_GpuCollector())
        self._alerts = _AlertsCollector()
        r.register(self._alerts)
        self._children: dict[tuple[str, str], _PerModel] = {}
        self._lock = threading.Lock()
        self._watched: dict[tuple[str, str], StatsFn] = {}
        self._key_prefixes: set[str] = set()
        # (route, method, status, reason) → its counter and histogram children; bounded, as
        # routes are templates and methods and statuses few
        self._http_children: dict[tuple[str, str, int, str], tuple[Any, Any]] = {}

    def _for(self, model: str, version: int | None) -> _PerModel:
        key = (model, _version(version))
        children = self._children.get(key)
        if children is None:
            with self._lock:
                children = self._children.get(key)
                if children is None:
                    children = _PerModel(self, *key)
                    self._children[key] = children
        return children

    # ------------------------------------------------------------ EngineObserver hooks

    def on_queued(self, model: str, version: int | None) -> None:
        """A request entered the engine's queue (the gauges come from the engine's stats)."""

    def on_scheduled(self, model: str, version: int | None, queue_s: float) -> None:
        self._for(model, version).queue.observe(queue_s)

    def on_first_token(self, model: str, version: int | None, ttft_s: float) -> None:
        self._for(model, version).ttft.observe(ttft_s)

    def on_token(self, model: str, version: int | None, gap_s: float) -> None:
        self._for(model, version).itl.observe(gap_s)

    def on_finished(
        self, model: str, version: int | None, finished: FinishedCounts, e2e_s: float
    ) -> None:
        children = self._for(model, version)
        children.prompt_len.observe(finished.prompt_tokens)
        children.generation_len.observe(finished.completion_tokens)

    # ------------------------------------------------------------------- HTTP layer

    def request_finished(
        self,
        model: str,
        version: int | None,
        status: int,
        finish_reason: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        e2e_s: float,
    ) -> None:
        """One API response was sent (any endpoint; streamed ones when the stream ends)."""
        v = _version(version)
        self.requests.labels(model, v, str(status)).inc()
        children = self._for(model, version)
        children.e2e.observe(e2e_s)
        if status < 400:
            self.success.labels(model, v, finish_reason or "stop").inc()
            children.prompt_tokens.inc(prompt_tokens)
            children.generation_tokens.inc(completion_tokens)

    def error(self, model: str, error_type: str, version: int | None = None) -> None:
        """One failed request; ``error_type`` is a short stable word (``timeout``, ``busy``,
        ``engine``, ``invalid_request`` …), never a message."""
        self.errors.labels(model, _version(version), error_type).inc()

    def http_response(
        self, route: str, method: str, status: int, reason: str, seconds: float
    ) -> None:
        """One HTTP response was sent, whatever it was (``reason``: ``""`` below 400, else a
        short stable word); ``seconds`` until its last byte."""
        key = (route, method, status, reason)
        children = self._http_children.get(key)
        if children is None:  # labels() takes a lock and builds a tuple: once per series
            code = str(status)
            children = (
                self.http_requests.labels(route, method, code, reason),
                self.http_duration.labels(route, method, code),
            )
            self._http_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def auth_failure(self, key_prefix: str) -> str:
        """One 401; returns the label it was counted under (``key_prefix`` itself, or
        ``other`` once :data:`MAX_KEY_PREFIX_LABELS` prefixes have a series)."""
        label = key_prefix
        if label not in AUTH_FIXED_LABELS and label not in self._key_prefixes:
            with self._lock:
                if len(self._key_prefixes) < MAX_KEY_PREFIX_LABELS:
                    self._key_prefixes.add(label)
                elif label not in self._key_prefixes:
                    label = "other"
        self.auth_failures.labels(label).inc()
        return label

    def log_dropped_record(self, kind: str) -> None:
        """A request record was dropped (``kind``: ``rejected``), the request log being full."""
        self.log_dropped.labels(kind).inc()

    def model_loaded(self, model: str, version: int | None) -> None:
        self.loads.labels(model, _version(version)).inc()

    def model_swapped(self, model: str, old_version: int | None, new_version: int | None) -> None:
        self.swaps.labels(model, _version(new_version)).inc()
        old = (model, _version(old_version))
        if old_version == new_version:  # reloaded in place: its gauges stay
            return
        with self._lock:
            self._watched.pop(old, None)
        for gauge in (self.running, self.waiting):  # the old version serves nothing now
            with contextlib.suppress(KeyError):
                gauge.remove(*old)

    def set_engine_stats(self, model: str, version: int | None, running: int, waiting: int) -> None:
        v = _version(version)
        self.running.labels(model, v).set(running)
        self.waiting.labels(model, v).set(waiting)

    def watch_engine(self, model: str, version: int | None, stats: StatsFn) -> None:
        """Read the running/waiting gauges from ``stats()`` (e.g. ``engine.stats``) at
        every scrape; :meth:`model_swapped` or :meth:`unwatch_engine` stops it."""
        with self._lock:
            self._watched[(model, _version(version))] = stats

    def unwatch_engine(self, model: str, version: int | None) -> None:
        with self._lock:
            self._watched.pop((model, _version(version)), None)

    def watch_alerts(self, counts: Callable[[], dict[tuple[str, str], int]]) -> None:
        """Show ``counts()`` (unresolved alerts by kind and severity, already counted: it
        is called at each scrape, on the event loop) as ``genloop:alerts_open``."""
        self._alerts.counts = counts

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for ``GET /metrics``."""
        with self._lock:
            watched = list(self._watched.items())
        for (model, version), stats_fn in watched:
            try:
                stats = stats_fn()
            except Exception:  # an engine being torn down must not fail the scrape
                log.debug("no stats from %s@%s", model, version, exc_info=True)
                continue
            self.running.labels(model, version).set(stats.running)
            self.waiting.labels(model, version).set(stats.waiting)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# present only on a machine with CUDA (what a dashboard may also ask for)
GPU_GAUGES = (
    PREFIX + "gpu_memory_used_bytes",
    PREFIX + "gpu_memory_reserved_bytes",
    PREFIX + "gpu_utilization_perc",
)


class _GpuCollector(Collector):
    """CUDA memory and utilization, when torch is already loaded and sees a GPU.

    It never imports torch itself: a process serving only upstream models stays light.
    """

    def collect(self) -> Iterator[Any]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        used_name, reserved_name, util_name = GPU_GAUGES
        used = GaugeMetricFamily(used_name, "CUDA memory allocated by tensors.", labels=["device"])
        reserved = GaugeMetricFamily(
            reserved_name,
            "CUDA memory reserved by the caching allocator.",
            labels=["device"],
        )
        util = GaugeMetricFamily(util_name, "GPU busy percentage (NVML).", labels=["device"])
        have_util = False
        for i in range(torch.cuda.device_count()):
            used.add_metric([str(i)], float(torch.cuda.memory_allocated(i)))
            reserved.add_metric([str(i)], float(torch.cuda.memory_reserved(i)))
            try:
                util.add_metric([str(i)], float(torch.cuda.utilization(i)))
                have_util = True
            except Exception:  # no pynvml / NVML: memory only  # noqa: S110
                pass
        yield used
        yield reserved
        if have_util:
            yield util


class _AlertsCollector(Collector):
    """``genloop:alerts_open{kind,severity}`` from the monitor's last count of open alerts."""

    def __init__(self) -> None:
        self.counts: Callable[[], dict[tuple[str, str], int]] | None = None

    def collect(self) -> Iterator[Any]:
        if self.counts is None:
            return
        family = GaugeMetricFamily(
            PREFIX + "alerts_open",
            "Unresolved alerts in the catalog, by kind and severity.",
            labels=["kind", "severity"],
        )
        for (kind, severity), n in sorted(self.counts().items()):
            family.add_metric([kind, severity], float(n))
        yield family
