"""The Prometheus scrape configuration and the Grafana dashboard name only metrics that
recloop (or Ray Serve) exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from recloop.config import PROJECT_ROOT
from recloop.monitor import METRICS_DOC
from recloop.prometheus import SD_FILE, prometheus_config
from recloop.stack import isolated_config

DASHBOARD = PROJECT_ROOT / "infra" / "grafana" / "recloop.json"


def _exported() -> set[str]:
    """Every series name recloop exports: the snapshot's (counters with ``_total``) and
    the Ray metrics of the router and the ingestor (``ray_`` prefix; a histogram's
    ``_bucket``, ``_count`` and ``_sum``)."""
    from actors.ingestor import FRESHNESS
    from serving.metrics import LATENCY, REQUESTS

    names = {f"{n}_total" if kind == "counter" else n for n, (kind, _) in METRICS_DOC.items()}
    names.add(f"ray_{REQUESTS}_total")
    for hist in (LATENCY, FRESHNESS):
        names |= {f"ray_{hist}_{s}" for s in ("bucket", "count", "sum")}
    return names


def test_the_grafana_dashboard_queries_only_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    known = _exported()
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\b((?:ray_)?(?:recloop|serve)_[a-z_]+)\b", expr))
        assert names, expr
        used |= names
        unknown = {n for n in names if not n.startswith("ray_serve_") and n not in known}
        assert not unknown, (expr, unknown)
    # The headline: one latency quantile over every router replica.
    assert any("sum by (le) (rate(ray_recloop_serving_latency_ms_bucket" in e for e in exprs)
    assert {"ray_recloop_serving_requests_total", "recloop_training_rounds_total"} <= used
    # Every panel reads the dashboard's datasource variable (import and provisioning).
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource"}
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"] if "targets" in p)


def test_the_scrape_config_reads_rays_service_discovery_and_the_dashboard(tmp_path: Path):
    cfg = isolated_config(tmp_path)
    conf = prometheus_config(cfg, scrape_s=1.4)
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    assert conf["global"]["scrape_interval"] == "1s"
    (sd,) = jobs["ray"]["file_sd_configs"]
    assert sd["files"] == [str(cfg.home / "ray" / SD_FILE)]
    assert jobs["recloop"]["metrics_path"] == "/dashboard/metrics"
    assert jobs["recloop"]["static_configs"] == [
        {"targets": [f"{cfg.ray.host}:{cfg.ray.serve_port}"]}
    ]
