"""The service's own metrics, through Ray Serve's metrics API (``ray.serve.metrics``).

Each Router replica counts its requests and observes their latency in a histogram; Ray's
metrics agent on every node exports them in the Prometheus format (names prefixed
``ray_``, with Serve's ``deployment``, ``replica`` and ``application`` labels), beside
Serve's built-in ``ray_serve_*`` metrics. Histograms add up across replicas and nodes, so
a quantile over the whole service is one PromQL expression::

    histogram_quantile(0.99, sum by (le) (rate(ray_recloop_serving_latency_ms_bucket[1m])))

Prometheus finds every node's exporter in Ray's service-discovery file
(``<ray temp dir>/prom_metrics_service_discovery.json``); ``recloop prometheus`` writes a
configuration that reads it (see ``recloop.prometheus``).
"""

from __future__ import annotations

# Router latency buckets, milliseconds: features + generation + logging of one request.
# Fine where the service lives (10-300 ms here) and wide enough for a stalled replica.
LATENCY_BUCKETS_MS = (
    2.5, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 250, 300, 400, 500, 750,
    1000, 1500, 2000, 3000, 5000, 10000,
)  # fmt: skip

REQUESTS = "recloop_serving_requests"
LATENCY = "recloop_serving_latency_ms"


class RouterMetrics:
    """A Router replica's request counter (by arm and outcome) and latency histogram (by
    arm). Made inside the replica: Serve adds its labels there."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter(
            REQUESTS,
            description="requests the router answered (outcome ok) or failed (error), per arm",
            tag_keys=("arm", "outcome"),
        )
        self.latency = Histogram(
            LATENCY,
            description="router latency of answered requests (features, generation, logging)",
            boundaries=list(LATENCY_BUCKETS_MS),
            tag_keys=("arm",),
        )

    def ok(self, arm: str, latency_ms: float) -> None:
        self.requests.inc(1, tags={"arm": arm, "outcome": "ok"})
        self.latency.observe(latency_ms, tags={"arm": arm})

    def error(self, arm: str) -> None:
        self.requests.inc(1, tags={"arm": arm, "outcome": "error"})
