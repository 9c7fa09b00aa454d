"""What the server tells its operators: Prometheus metrics (requests by API, model, version
and status; latencies; model-call batch sizes), in Prometheus's text format through
prometheus-client, and an access log on stderr in Uvicorn's format."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

METRICS_PATH = "/monitoring/prometheus/metrics"  # TF Serving's usual path
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's metrics, in a registry of their own (one per application)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cnnmnist_requests",
            "Requests answered, by API (rest, grpc), model, version and status",
            ("api", "model", "version", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "cnnmnist_request_latency_seconds",
            "Time from a request's arrival to its answer, by API and model",
            ("api", "model"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "cnnmnist_batch_size",
            "Images per model call (requests that arrive together are joined)",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )

    def answered(self, api: str, model: str, version: str, status: str, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(api, model, version, status).inc()
        self.latency.labels(api, model).observe(seconds)

    def page(self) -> tuple[bytes, str]:
        """The metrics in Prometheus's text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Observe:
    """ASGI middleware: every HTTP request counted and timed (`metrics`), and written to the
    server's log (`write`) when `access_log` is on. The model and version come from the
    response's x-model-name and x-model-version headers (set by the routes that use one)."""

    def __init__(
        self,
        app,
        metrics: Metrics,
        access_log: bool,
        write: Callable[[str], None],
    ) -> None:
        self.app, self.metrics, self.access_log, self.write = app, metrics, access_log, write

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        seen: dict[str, str] = {}

        async def watching(message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = str(message["status"])
                for key, value in message.get("headers", []):
                    if key in (b"x-model-name", b"x-model-version"):
                        seen[key.decode()] = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, watching)
        finally:
            status = seen.get("status", "500")
            self.metrics.answered(
                "rest",
                seen.get("x-model-name", ""),
                seen.get("x-model-version", ""),
                status,
                time.perf_counter() - started,
            )
            if self.access_log:
                client = scope.get("client") or ("-", 0)
                query = scope.get("query_string", b"").decode("latin-1")
                path = scope["path"] + (f"?{query}" if query else "")
                self.write(
                    f'{client[0]}:{client[1]} - "{scope["method"]} {path} '
                    f'HTTP/{scope.get("http_version", "1.1")}" {status}'
                )
