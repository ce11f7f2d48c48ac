"""The local stack: Kafka + a Ray head (with Serve's HTTP proxy) + the Feast store.

``up`` starts what is not running and returns when every part answers; ``status`` gives
one line per part; ``down`` stops what ``up`` started and checks nothing is left behind.
Parts the user runs elsewhere (``kafka.bootstrap_servers``, ``ray.address``) are used,
never started or stopped.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from recloop.broker import KafkaBroker, probe
from recloop.config import PROJECT_ROOT, StackConfig, load_config
from recloop.procs import port_open, processes_matching
from recloop.ray_head import RayHead, connect
from recloop.topics import TOPICS, ensure_topics

Progress = Callable[[str], None]


@dataclass
class PartStatus:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{self.name:<6} {'ok  ' if self.ok else 'DOWN'}  {self.detail}"


class Stack:
    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.broker = KafkaBroker(cfg) if cfg.kafka.provisioned else None
        self.ray_head = RayHead(cfg) if cfg.ray.provisioned else None

    # ------------------------------------------------------------------ up
    def up(self, progress: Progress = print) -> dict[str, float]:
        """Start every part; returns seconds spent per part."""
        timings: dict[str, float] = {}
        self.cfg.home.mkdir(parents=True, exist_ok=True)

        t = time.monotonic()
        if self.broker is not None:
            progress(f"kafka: {self.broker.start(progress)}")
        elif not probe(self.cfg.kafka.bootstrap, 5.0):
            raise ConnectionError(
                f"no Kafka answers at kafka.bootstrap_servers={self.cfg.kafka.bootstrap}"
            )
        created = ensure_topics(self.cfg.kafka.bootstrap, TOPICS)
        progress(
            f"kafka: topics {', '.join(s.name for s in TOPICS)}"
            + (f" (created {len(created)})" if created else " (present)")
        )
        timings["kafka"] = time.monotonic() - t

        t = time.monotonic()
        if self.ray_head is not None:
            progress(f"ray: {self.ray_head.start(progress)}")
        self.start_serve(progress)
        timings["ray"] = time.monotonic() - t

        t = time.monotonic()
        from features import store as feature_store
        from recloop.data import load

        data = load(self.cfg.data)
        progress(f"data: {data.summary()}")
        feature_store.apply(self.cfg, data.users, progress)
        timings["feast"] = time.monotonic() - t
        return timings

    def start_serve(self, progress: Progress) -> None:
        """Start Serve's controller and HTTP proxy on the configured port (detached)."""
        r = self.cfg.ray
        if port_open(r.host, r.serve_port):
            progress(f"ray: Serve HTTP already listening on {r.host}:{r.serve_port}")
            return
        import ray
        from ray import serve

        connect(self.cfg)
        try:
            serve.start(
                proxy_location=self.cfg.serve.proxy_location,
                http_options={"host": r.host, "port": r.serve_port},
            )
        finally:
            ray.shutdown()
        progress(f"ray: Serve HTTP proxy on http://{r.host}:{r.serve_port}")

    # ------------------------------------------------------------------ status
    def status(self) -> list[PartStatus]:
        parts: list[PartStatus] = []
        if self.broker is not None:
            ok, detail = self.broker.status()
        else:
            meta = probe(self.cfg.kafka.bootstrap, 3.0)
            ok, detail = bool(meta), f"external Kafka at {self.cfg.kafka.bootstrap}"
        parts.append(PartStatus("kafka", ok, detail))

        if self.ray_head is not None:
            ok, detail = self.ray_head.status()
        else:
            host, _, port = self.cfg.ray.gcs_address.rpartition(":")
            ok = port_open(host, int(port))
            detail = f"external Ray at {self.cfg.ray.gcs_address}"
        parts.append(PartStatus("ray", ok, detail))
        parts.append(self._feast_status())
        return parts

    def _feast_status(self) -> PartStatus:
        """Read without importing Feast (its import alone takes ~10 s here)."""
        registry = self.cfg.feast_dir / "registry.db"
        if not registry.exists():
            return PartStatus("feast", False, f"not applied (no registry in {self.cfg.feast_dir})")
        if self.cfg.feast.online_store != "sqlite":
            return PartStatus(
                "feast", True, f"registry in {self.cfg.feast_dir}, Redis online store"
            )
        online = self.cfg.feast_dir / "online_store.db"
        try:
            with closing(sqlite3.connect(f"file:{online}?mode=ro", uri=True)) as db:
                tables = [
                    r[0]
                    for r in db.execute(
                        "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name"
                    )
                ]
                counts = {
                    t.removeprefix("recloop_"): db.execute(
                        f'SELECT COUNT(DISTINCT entity_key) FROM "{t}"'
                    ).fetchone()[0]
                    for t in tables
                }
        except sqlite3.Error as exc:
            return PartStatus("feast", False, f"online store {online} unreadable: {exc}")
        rows = ", ".join(f"{name} {n}" for name, n in counts.items())
        return PartStatus(
            "feast", bool(counts), f"SQLite online store in {self.cfg.feast_dir}: {rows} entities"
        )

    # ------------------------------------------------------------------ down
    def down(self, progress: Progress = print, purge: bool = False) -> list[str]:
        """Stop what ``up`` started; returns the markers of processes still alive
        (empty when nothing is left behind)."""
        if self.ray_head is not None:
            progress(f"ray: {self.ray_head.stop()}")
        if self.broker is not None:
            progress(f"kafka: {self.broker.stop()}")
        # What `up` starts names these folders on its command line; a command that merely
        # mentions the home (`recloop down --home ...`, a shell around it) does not count.
        markers = (self.cfg.home / "kafka", self.cfg.home / "ray")
        leftovers = [
            f"{p.pid}: {' '.join(p.cmdline())[:120]}"
            for m in markers
            for p in processes_matching(str(m))
        ]
        if purge:
            if self.broker is not None:
                self.broker.purge()
            for sub in ("feast", "ray", "run"):
                shutil.rmtree(self.cfg.home / sub, ignore_errors=True)
            progress(f"purged state under {self.cfg.home} (the jar cache stays)")
        return leftovers


def isolated_config(
    home: Path, cache_dir: Path | None = None, run_file: Path | None = None, **extra: object
) -> StackConfig:
    """A stack config on free ports under ``home`` (generated data unless overridden),
    sharing the jar cache, with ``run_file``'s ``stack:`` section when given: for tests,
    benchmarks and the demo, which bring up a stack of their own next to a running one."""
    from recloop.procs import free_port

    ports: set[int] = set()
    while len(ports) < 7:
        ports.add(free_port())
    kafka, controller, gcs, dash, client, agent, serve = sorted(ports)
    overrides: dict[str, object] = {
        "home": str(home),
        "cache_dir": str(cache_dir or PROJECT_ROOT / ".recloop" / "cache"),
        "kafka.port": kafka,
        "kafka.controller_port": controller,
        "ray.port": gcs,
        "ray.dashboard_port": dash,
        "ray.client_port": client,
        "ray.agent_listen_port": agent,
        "ray.serve_port": serve,
        "ray.num_cpus": 2,
        "data.synthetic": True,
        **extra,
    }
    return load_config(run_file, overrides=overrides, env={})
