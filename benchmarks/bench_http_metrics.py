"""What counting every response costs: a FastAPI app with genloop's HTTP metrics layer
(``genloop.serve.http_metrics.HttpMetricsMiddleware``) next to the same app without it.

Both apps have one route with a path parameter (``/v1/models/{model}``, answering a small
JSON body) and genloop's error handlers; requests go straight into the ASGI app (no
sockets), so the figure is the layer's own cost, not the network's. Each request carries a
bearer key. The mix is 90 % answers of 200 and 10 % 404s from the route (refusals: they
are also queued for the request log, here a bounded in-memory queue drained by nobody, so
the drops are counted too). The runs alternate between the two apps and each figure is the
best of ``--repeat`` runs, because the machine may be shared. Ends with one JSON line.

    python benchmarks/bench_http_metrics.py [--quick] [--repeat R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import time
from typing import Any

from fastapi import FastAPI

from genloop.errors import NotFoundError
from genloop.monitor.metrics import ServingMetrics
from genloop.monitor.usage import RequestRecord
from genloop.serve.errors import install_error_handlers
from genloop.serve.http_metrics import HttpMetricsMiddleware

KEY = b"Bearer gl_" + b"A" * 43


class BoundedLog:
    """The request log's bounded queue, with nobody writing (the worst case: a flood)."""

    def __init__(self, size: int = 10_000) -> None:
        self.queue: queue.Queue[RequestRecord] = queue.Queue(size)
        self.dropped = 0

    def submit_rejected(self, record: RequestRecord) -> bool:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            return False
        return True


def build(with_metrics: bool) -> Any:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/v1/models/{model}")
    async def model(model: str) -> dict[str, str]:
        if model == "nosuch":
            raise NotFoundError(f"no model {model}")
        return {"id": model, "object": "model"}

    if with_metrics:
        app.add_middleware(
            HttpMetricsMiddleware,
            metrics=ServingMetrics(),
            routes=lambda: ["/v1/models/{model}"],
            rejected_log=BoundedLog(),
        )
    return app


async def run(app: Any, n: int) -> float:
    """Microseconds per request over ``n`` requests."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    started = time.perf_counter()
    for i in range(n):
        name = "nosuch" if i % 10 == 9 else "tiny"
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": f"/v1/models/{name}",
            "raw_path": f"/v1/models/{name}".encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"bench"), (b"authorization", KEY)],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        await app(scope, receive, send)
    elapsed = time.perf_counter() - started
    assert statuses.count(404) == n // 10 and statuses.count(200) == n - n // 10
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke check)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per app; the best counts")
    args = parser.parse_args()
    n = 5_000 if args.quick else 50_000
    plain, counted = build(False), build(True)
    asyncio.run(run(plain, 500))  # warm both (imports, route compilation)
    asyncio.run(run(counted, 500))
    best_plain = best_counted = float("inf")
    for _ in range(args.repeat):
        best_plain = min(best_plain, asyncio.run(run(plain, n)))
        best_counted = min(best_counted, asyncio.run(run(counted, n)))
    figures = {
        "requests": n,
        "http_metrics_us_per_request": round(best_counted, 2),
        "baseline_us_per_request": round(best_plain, 2),
        "overhead_us_per_request": round(best_counted - best_plain, 2),
        "ratio_vs_baseline": round(best_counted / best_plain, 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
