"""The live dashboard: a Serve application at ``/dashboard`` next to the service.

One replica runs a :class:`recloop.monitor.Monitor` that snapshots the loop every
``serve.dashboard_interval_s`` seconds (arms and versions, online metrics per arm from
the lake, ingest lag and feature freshness, training rounds, the DPO sampler, serving
latency and throughput) and keeps the last hour of them. Routes:

    GET /dashboard               the page (serving/dashboard.html: charts that update live)
    GET /dashboard/api/history   {"snapshots": [...], "interval_s"}; ?since=<unix s> for newer ones
    GET /dashboard/api/snapshot  the newest snapshot
    GET /dashboard/metrics       the newest snapshot in the Prometheus text format

It is deployed with the service (``recloop serve``, ``recloop simulate``, ``recloop
demo``) unless ``serve.dashboard`` is false, as a second application of the same
declarative Serve config, so promotions that redeploy the service leave it running.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, PlainTextResponse
from ray import serve

from recloop.config import StackConfig

APP_NAME = "recloop-dashboard"
ROUTE = "/dashboard"
PAGE = Path(__file__).with_name("dashboard.html")
KEEP = 720  # snapshots kept: an hour at the default interval

api = FastAPI(title="recloop dashboard", docs_url=None, redoc_url=None)


@serve.deployment(name="Dashboard", num_replicas=1)
@serve.ingress(api)
class Dashboard:
    def __init__(self, config_dict: dict) -> None:
        from recloop.monitor import Monitor

        self.cfg = StackConfig.from_dict(config_dict)
        self.interval_s = self.cfg.serve.dashboard_interval_s
        self.monitor = Monitor(self.cfg, keep=KEEP)
        self.html = PAGE.read_text()
        self.stop = threading.Event()
        threading.Thread(
            target=self.monitor.run, args=(self.stop, self.interval_s), daemon=True
        ).start()

    def __del__(self) -> None:
        self.stop.set()

    @api.get("/", response_class=HTMLResponse)
    def page(self) -> HTMLResponse:
        return HTMLResponse(self.html, headers={"Cache-Control": "no-store"})

    @api.get("/api/history")
    def history(self, since: float | None = Query(None, description="unix seconds")) -> dict:
        return {"snapshots": self.monitor.since(since), "interval_s": self.interval_s}

    @api.get("/api/snapshot")
    def snapshot(self) -> dict:
        return self.monitor.latest() or {}

    @api.get("/metrics", response_class=PlainTextResponse)
    def metrics(self) -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST

        from recloop.monitor import prometheus_text

        return PlainTextResponse(
            prometheus_text(self.monitor.latest()), media_type=CONTENT_TYPE_LATEST
        )


def app_builder(args: dict[str, Any]):
    """Entry point of the dashboard's application: ``config_dict`` (what ``deploy``
    sends), or a run file (``config``) and dotted ``overrides``, as the service's."""
    if args.get("config_dict"):
        return Dashboard.bind(args["config_dict"])
    from recloop.config import load_config

    cfg = load_config(args.get("config"), overrides=args.get("overrides") or {})
    return Dashboard.bind(dashboard_config(cfg))


def dashboard_config(cfg: StackConfig) -> dict:
    """What the dashboard is given: the service's sections and the ingest keys it reads.
    Every process that deploys (trainers promoting too) derives the same, so a promotion
    does not restart the dashboard (Serve restarts an application whose args change)."""
    from serving.app import service_config

    conf = service_config(cfg)
    conf["ingest"] = {"consumers": cfg.ingest.consumers, "lake_dir": str(cfg.lake_dir)}
    return conf


def dashboard_app_config(cfg: StackConfig) -> dict:
    """The dashboard's entry in the declarative Serve config (``deploy`` fills in the
    config itself)."""
    return {
        "name": APP_NAME,
        "route_prefix": ROUTE,
        "import_path": "serving.dashboard:app_builder",
        "args": {"config": None, "overrides": {}},
        "deployments": [
            {"name": "Dashboard", "ray_actor_options": {"num_cpus": cfg.serve.dashboard_cpus}}
        ],
    }
