"""Prometheus metrics move after the observations an engine and the HTTP layer make."""

from __future__ import annotations

import threading

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from genloop.monitor.metrics import ServingMetrics
from genloop.serve.engine.types import EngineObserver, EngineStats, Finished


def samples(m: ServingMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: ServingMetrics, name: str, **labels: str) -> float:
    return samples(m).get((name, frozenset(labels.items())), 0.0)


TINY = {"model_name": "tiny", "model_version": "3"}


def serve_one(m: ServingMetrics, completion_tokens: int = 4) -> None:
    """What the engine and the HTTP layer report for one request of tiny@3."""
    m.on_queued("tiny", 3)
    m.on_scheduled("tiny", 3, 0.002)
    m.on_first_token("tiny", 3, 0.015)
    for _ in range(completion_tokens - 1):
        m.on_token("tiny", 3, 0.004)
    finished = Finished("stop", prompt_tokens=7, completion_tokens=completion_tokens, text="abcd")
    m.on_finished("tiny", 3, finished, 0.03)
    m.request_finished("tiny", 3, 200, "stop", 7, completion_tokens, 0.031)


def test_it_is_an_engine_observer() -> None:
    observer: EngineObserver = ServingMetrics()  # mypy checks the protocol here
    assert callable(observer.on_token)


def test_counters_and_histograms_move_after_requests() -> None:
    m = ServingMetrics()
    assert value(m, "genloop:prompt_tokens_total", **TINY) == 0
    serve_one(m)
    serve_one(m, completion_tokens=6)
    assert value(m, "genloop:prompt_tokens_total", **TINY) == 14
    assert value(m, "genloop:generation_tokens_total", **TINY) == 10
    assert value(m, "genloop:request_success_total", **TINY, finished_reason="stop") == 2
    assert value(m, "genloop:requests_total", **TINY, status="200") == 2
    assert value(m, "genloop:time_to_first_token_seconds_count", **TINY) == 2
    assert value(m, "genloop:time_to_first_token_seconds_sum", **TINY) == 0.03
    assert value(m, "genloop:inter_token_latency_seconds_count", **TINY) == 3 + 5
    # the 4 ms gaps fall in the 5 ms bucket, not the 2.5 ms one
    assert value(m, "genloop:inter_token_latency_seconds_bucket", **TINY, le="0.005") == 8
    assert value(m, "genloop:inter_token_latency_seconds_bucket", **TINY, le="0.0025") == 0
    assert value(m, "genloop:e2e_request_latency_seconds_count", **TINY) == 2
    assert value(m, "genloop:request_queue_time_seconds_count", **TINY) == 2
    assert value(m, "genloop:request_generation_tokens_sum", **TINY) == 10
    assert value(m, "genloop:request_prompt_tokens_count", **TINY) == 2


def test_failed_requests_count_as_errors_not_successes() -> None:
    m = ServingMetrics()
    m.request_finished("tiny", 3, 503, None, 7, 0, 0.5)
    m.error("tiny", "busy", version=3)
    m.error("tiny", "busy", version=3)
    m.error("up", "timeout")
    assert value(m, "genloop:requests_total", **TINY, status="503") == 1
    assert value(m, "genloop:request_success_total", **TINY, finished_reason="stop") == 0
    assert value(m, "genloop:prompt_tokens_total", **TINY) == 0
    assert value(m, "genloop:request_errors_total", **TINY, type="busy") == 2
    errs = {"model_name": "up", "model_version": "", "type": "timeout"}
    assert value(m, "genloop:request_errors_total", **errs) == 1


def test_gauges_loads_and_swaps() -> None:
    m = ServingMetrics()
    m.model_loaded("tiny", 3)
    m.set_engine_stats("tiny", 3, running=2, waiting=5)
    assert value(m, "genloop:num_requests_running", **TINY) == 2
    assert value(m, "genloop:num_requests_waiting", **TINY) == 5

    stats = EngineStats(running=1, waiting=0, max_batch_size=8, max_queue=64)
    m.watch_engine("tiny", 4, lambda: stats)
    v4 = {"model_name": "tiny", "model_version": "4"}
    assert value(m, "genloop:num_requests_running", **v4) == 1  # read at scrape time
    m.model_loaded("tiny", 4)
    m.model_swapped("tiny", 3, 4)
    s = samples(m)
    assert s[("genloop:model_loads_total", frozenset(TINY.items()))] == 1
    assert s[("genloop:model_loads_total", frozenset(v4.items()))] == 1
    assert s[("genloop:model_swaps_total", frozenset(v4.items()))] == 1
    # the old version's gauges are gone, not frozen at their last value
    assert ("genloop:num_requests_running", frozenset(TINY.items())) not in s


def test_process_metrics_and_separate_registries() -> None:
    a, b = ServingMetrics(), ServingMetrics()
    serve_one(a)
    assert value(a, "process_resident_memory_bytes") > 0
    assert value(a, "process_cpu_seconds_total") >= 0
    assert value(b, "genloop:prompt_tokens_total", **TINY) == 0  # a's requests are a's


def test_observer_hooks_are_thread_safe() -> None:
    m = ServingMetrics()

    def worker() -> None:
        for _ in range(500):
            m.on_token("tiny", 3, 0.001)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert value(m, "genloop:inter_token_latency_seconds_count", **TINY) == 2000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_is_exported_when_there_is_a_gpu() -> None:
    m = ServingMetrics()
    x = torch.ones(1024, 1024, device="cuda")  # 4 MiB
    used = value(m, "genloop:gpu_memory_used_bytes", device="0")
    assert used >= x.numel() * 4
    assert value(m, "genloop:gpu_memory_reserved_bytes", device="0") >= used


def test_http_responses_and_auth_failures_have_bounded_labels() -> None:
    from genloop.monitor.metrics import MAX_KEY_PREFIX_LABELS, ServingMetrics

    m = ServingMetrics()
    m.http_response("/v1/models/{model}", "GET", 404, "not_found", 0.002)
    m.http_response("/v1/models/{model}", "GET", 200, "", 0.004)
    labels = [m.auth_failure(f"gl_{i:08d}") for i in range(MAX_KEY_PREFIX_LABELS + 20)]
    assert labels[:MAX_KEY_PREFIX_LABELS] == [f"gl_{i:08d}" for i in range(100)]
    assert set(labels[MAX_KEY_PREFIX_LABELS:]) == {"other"}
    assert m.auth_failure("missing") == "missing"  # the fixed labels are always there
    assert m.auth_failure("gl_00000003") == "gl_00000003"  # a prefix already seen keeps its own
    text = m.render()[0].decode()
    assert (
        'genloop:http_requests_total{method="GET",reason="not_found",'
        'route="/v1/models/{model}",status="404"} 1.0' in text
    )
    assert 'genloop:auth_failures_total{key_prefix="other"} 20.0' in text
    assert text.count("genloop:auth_failures_total{") == MAX_KEY_PREFIX_LABELS + 2
