"""Metrics scraped by a real Prometheus server (Debian's ``prometheus``, ``make
system-deps``): the router's latency histogram from two replicas adds up in a PromQL
quantile, the loop's snapshot metrics come from ``/dashboard/metrics``, and the ingestor
actors' freshness histogram from Ray's metrics agent."""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from recloop.config import StackConfig
from tests.conftest import experiment_service

pytestmark = pytest.mark.integration

EXPERIMENT = """
experiment:
  name: metrics
  salt: metrics-1
  arms:
    - {name: solo, share: 1.0, lineage: solo, replicas: 2}
"""
REQUESTS = 60
LAT = "ray_recloop_serving_latency_ms"


def _wait(prom, expr: str, ok, timeout_s: float = 150.0) -> list[dict]:
    """Query ``expr`` until ``ok(result)`` holds (Ray's agents export every few seconds,
    Prometheus scrapes every second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = prom.query(expr)
        if ok(got) or time.monotonic() > deadline:
            return got
        time.sleep(2)


def _within(buckets: list[dict], bound_s: float) -> float:
    """The count of a summed histogram's bucket ``le = bound_s`` (cumulative), 0 when
    Prometheus has no such series yet."""
    return sum(float(x["value"][1]) for x in buckets if float(x["metric"]["le"]) == bound_s)


def _router_replicas(app: str) -> set[str]:
    """The replica ids (Serve's ``replica`` label) of the application's live Router
    replicas, from their actor names (``SERVE_REPLICA::<app>#Router#<id>``)."""
    from ray.util.state import list_actors

    names = [a.name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)]
    prefix = f"SERVE_REPLICA::{app}#Router#"
    return {n.removeprefix(prefix) for n in names if n and n.startswith(prefix)}


def test_a_latency_quantile_over_two_router_replicas_from_a_real_prometheus(
    ray_driver: StackConfig, synthetic_checkpoints, tmp_path
):
    from actors.api import start_ingestors, stop_ingestors
    from recloop.procs import free_port
    from recloop.prometheus import INSTALL_HINT, Prometheus, targets
    from serving.metrics import LATENCY_BUCKETS_MS

    if shutil.which("prometheus") is None:
        pytest.fail(f"no prometheus binary: {INSTALL_HINT}")
    with experiment_service(
        ray_driver, tmp_path, EXPERIMENT, synthetic_checkpoints[0], topology="inline"
    ) as (cfg, base):
        with Prometheus(cfg, port=free_port(), scrape_s=1) as prom:
            prom.start(print)

            def post(u: int) -> tuple[float, dict]:
                t = time.perf_counter()
                r = requests.post(f"{base}/recommend", json={"user_id": u}, timeout=60)
                assert r.status_code == 200, r.text
                return (time.perf_counter() - t) * 1000, {"user_id": u, **r.json()}

            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(post, range(REQUESTS)))
            client_ms = sorted(ms for ms, _ in answers)

            # This deployment's two Router replicas (the stack's Ray agents still export
            # the series of replicas that earlier tests deployed and deleted).
            ours = _router_replicas(cfg.serve.app_name)
            assert len(ours) == 2, ours
            mine = f'replica=~"{"|".join(ours)}"'
            # Both replicas answered, and their counts add up to every request.
            per_replica = _wait(
                prom,
                f"sum by (replica) ({LAT}_count{{{mine}}})",
                lambda r: sum(float(x["value"][1]) for x in r) >= REQUESTS,
            )
            seen = {x["metric"]["replica"]: float(x["value"][1]) for x in per_replica}
            print(f"requests per replica, as Prometheus has them: {seen}")
            print({t["labels"].get("job"): t["health"] for t in targets(prom.url)})
            assert set(seen) == ours and all(v > 0 for v in seen.values()), seen
            assert sum(seen.values()) == REQUESTS
            ok = prom.query(f'sum(ray_recloop_serving_requests_total{{outcome="ok",{mine}}})')
            assert float(ok[0]["value"][1]) == REQUESTS

            # One quantile over both replicas' histograms.
            q = prom.query(f"histogram_quantile(0.99, sum by (le) ({LAT}_bucket{{{mine}}}))")
            p99 = float(q[0]["value"][1])
            # The router's time is part of the client's; the estimate interpolates in a
            # bucket, so it stays below the bucket bound above the slowest request.
            bound = next((b for b in LATENCY_BUCKETS_MS if b >= client_ms[-1]), math.inf)
            print(f"router p99 over 2 replicas {p99:.1f} ms; client max {client_ms[-1]:.1f} ms")
            assert 0 < p99 <= bound

            # The loop's snapshot, from the dashboard's /dashboard/metrics.
            arms = _wait(prom, "recloop_arm_share", lambda r: bool(r))
            assert {x["metric"]["arm"]: float(x["value"][1]) for x in arms} == {"solo": 1.0}

            # The ingestor actor's freshness histogram: feedback on every served item
            # closes the sessions, and each one's push is observed. A new consumer group
            # reads the topics from the start, so the sessions of every earlier test in the
            # run are observed too, minutes old in a long run; this test's own sessions are
            # the ones within a minute of their events.
            _feedback(cfg, [body for _, body in answers])
            icfg = dataclasses.replace(
                cfg,
                ingest=dataclasses.replace(
                    cfg.ingest, group_id=f"prom-{time.time_ns()}", lake_dir=tmp_path / "lake"
                ),
            )
            buckets = "sum by (le) (ray_recloop_ingest_freshness_seconds_bucket)"
            try:
                start_ingestors(icfg, print)
                fresh = _wait(prom, buckets, lambda r: _within(r, 60.0) >= REQUESTS)
                assert _within(fresh, 60.0) >= REQUESTS, fresh
                q = prom.query(f"histogram_quantile(0.5, {buckets})")
                p50 = float(q[0]["value"][1])
                print(
                    f"freshness over the ingestor actors: p50 {p50:.2f} s; "
                    f"{_within(fresh, 60.0):.0f} pushes within 60 s of their events, "
                    f"{_within(fresh, math.inf):.0f} in all"
                )
                assert p50 > 0
            finally:
                stop_ingestors(icfg, print)


def _feedback(cfg: StackConfig, answers: list[dict]) -> None:
    """An interaction (not clicked) for every item of every answered request."""
    from recloop.events import Interaction
    from recloop.kafka_io import EventProducer

    now = int(time.time() * 1000)
    with EventProducer(cfg.kafka.bootstrap) as prod:
        for a in answers:
            for item in a["items"]:
                prod.send(
                    Interaction(
                        event_time_ms=now,
                        request_id=a["request_id"],
                        user_id=a["user_id"],
                        item_id=item["item_id"],
                        position=item["position"],
                        arm=a["arm"],
                        model_version=a["model_version"],
                        clicked=False,
                        watch_time_s=0.0,
                    )
                )
        prod.flush()
