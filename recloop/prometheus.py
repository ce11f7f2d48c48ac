"""A Prometheus server that scrapes the stack: Ray's metrics agents and recloop's own.

    recloop prometheus                 # in the foreground until Ctrl-C, UI on :9090
    recloop prometheus --port 9091 --scrape-s 5

Two scrape jobs:

* ``ray``: every node's Ray metrics agent, found through the service-discovery file Ray's
  head writes (``<ray temp dir>/prom_metrics_service_discovery.json``, kept current as
  nodes join and leave). It carries Ray's system metrics, Serve's ``ray_serve_*`` and
  recloop's own Ray metrics: the router's ``ray_recloop_serving_requests_total`` and
  ``ray_recloop_serving_latency_ms`` histogram (``serving.metrics``);
* ``recloop``: the loop's snapshot at ``/dashboard/metrics`` on the Serve proxy (arms,
  online metrics from the lake, ingest, training rounds, the DPO sampler).

The binary is Debian's ``prometheus`` (``make system-deps``), or ``--binary``. Its data
lives under ``<home>/prometheus``. On a Ray cluster that already runs Prometheus, point it
at the same two targets instead (``prometheus_config`` shows how), and import the Grafana
dashboard in ``infra/grafana/``.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recloop.config import ConfigError, StackConfig
from recloop.procs import port_open, spawn, terminate

INSTALL_HINT = "run `make system-deps` (installs Debian's prometheus), or pass --binary"
SD_FILE = "prom_metrics_service_discovery.json"


def find_binary(binary: str | None = None) -> str:
    path = binary or shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(path).is_file():
        raise ConfigError(f"no Prometheus binary at {path}: {INSTALL_HINT}")
    return path


def service_discovery_file(cfg: StackConfig) -> Path:
    """Where Ray's head lists the metrics agents of the stack's nodes."""
    return cfg.home / "ray" / SD_FILE


def prometheus_config(cfg: StackConfig, scrape_s: float = 5.0) -> dict[str, Any]:
    """The scrape configuration for the stack of ``cfg`` (YAML is a superset of JSON,
    so Prometheus reads this dict written as JSON)."""
    interval = f"{max(1, round(scrape_s))}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": "ray",
                "file_sd_configs": [
                    {"files": [str(service_discovery_file(cfg))], "refresh_interval": interval}
                ],
            },
            {
                "job_name": "recloop",
                "metrics_path": "/dashboard/metrics",
                "static_configs": [{"targets": [f"{cfg.ray.host}:{cfg.ray.serve_port}"]}],
            },
        ],
    }


class Prometheus:
    """A Prometheus server for the stack of ``cfg``, on ``port``."""

    def __init__(
        self, cfg: StackConfig, port: int = 9090, scrape_s: float = 5.0, binary: str | None = None
    ) -> None:
        self.cfg = cfg
        self.port = port
        self.scrape_s = scrape_s
        self.binary = binary
        self.dir = cfg.home / "prometheus"
        self.pid_file = cfg.run_dir / "prometheus.pid"
        self.log_file = cfg.logs_dir / "prometheus.log"
        self.proc: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.cfg.ray.host}:{self.port}"

    def start(self, progress: Callable[[str], None] = lambda _: None, timeout_s: float = 60) -> str:
        binary = find_binary(self.binary)
        if port_open(self.cfg.ray.host, self.port):
            raise ConfigError(f"{self.cfg.ray.host}:{self.port} is taken: pass another --port")
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "prometheus.yml"
        conf.write_text(json.dumps(prometheus_config(self.cfg, self.scrape_s), indent=2))
        argv = [
            binary,
            f"--config.file={conf}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address={self.cfg.ray.host}:{self.port}",
            "--storage.tsdb.retention.time=2d",
        ]
        self.proc = spawn(argv, self.log_file, self.pid_file)
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Prometheus exited with {self.proc.returncode}; see {self.log_file}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"Prometheus not ready in {timeout_s:.0f} s; see {self.log_file}"
                )
            time.sleep(0.3)
        progress(f"prometheus: {self.url} (config {conf}, log {self.log_file})")
        return self.url

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc.pid, timeout_s=15, group=True)
            self.proc = None
        self.pid_file.unlink(missing_ok=True)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        return query(self.url, expr)

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def query(base_url: str, expr: str, timeout_s: float = 10) -> list[dict[str, Any]]:
    """Prometheus' HTTP query API: the result of an instant query of ``expr``."""
    url = f"{base_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus query {expr!r} failed: {body}")
    return body["data"]["result"]


def targets(base_url: str) -> list[dict[str, Any]]:
    """The active scrape targets and their health."""
    with urllib.request.urlopen(f"{base_url}/api/v1/targets", timeout=10) as r:
        return json.loads(r.read())["data"]["activeTargets"]
