"""The loop at a glance: one snapshot of every part, for ``recloop status``, the dashboard,
the Prometheus endpoint and the demo's report.

A :class:`Monitor` collects a snapshot of the running loop::

    {
     "t": unix s,
     "arms": {arm: {"share", "learning", "version"}},              # registry + experiment
     "online": {arm: {"sessions", "swt", "vtr", "ltr", "wtr",      # the lake's sessions
                      "recent": {"window_s", "sessions", "swt", ...}}},
     "ingest": {"lag", "records", "records_per_s", "freshness_p50_ms", "freshness_p99_ms",
                "dead_lettered", "lake_sessions"},                  # the ingestor actors
     "training": {arm: {"round", "status", "version", "rounds", "promoted", "rejected",
                        "ntp_loss", "dpo_loss", "reward_auc", "feedback_age_s",
                        "feedback_to_serving_s", "running"}},       # rounds.jsonl, registry
     "dpo": {"offered", "processed", "emitted", "dropped", "queue", "cpu_s_per_request"},
     "serving": {"requests", "errors", "requests_per_s", "latency_ms": {p50, p90, p99, n}},
     "errors": {section: reason},                                   # parts that did not answer
    }

Online metrics come from the sessions the ingestor has landed in the lake (feedback
joined to what was served), read incrementally; ``recent`` covers the sessions whose
records arrived in the last ``window_s`` seconds of wall-clock time. Every section is
collected on its own: a part that is down leaves its section ``None`` and a reason in
``errors``, never a failed snapshot.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Any

from recloop.config import StackConfig
from recloop.ray_head import NAMESPACE, ingestor_actor_name

RATES = {"vtr": "clicks", "ltr": "likes", "wtr": "follows"}  # metric: its numerator
FIELDS = ("items", "watch_s", "clicks", "likes", "follows")  # summed per arm


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 6) if den > 0 else None


def _metrics(sessions: int, t: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {"sessions": sessions, "swt": _ratio(t["watch_s"], sessions)}
    for name, col in RATES.items():
        out[name] = _ratio(t[col], t["items"])
    return out


class _OnlineTally:
    """Per-arm session metrics from the lake, read incrementally by commit marks."""

    def __init__(self, lake_dir: Any, window_s: float) -> None:
        from recloop.lake import Lake

        self.lake = Lake(lake_dir)
        self.window_s = window_s
        self.marks: dict[str, int] = {}
        self.total: dict[str, dict[str, float]] = {}  # arm: sessions and FIELDS' sums
        self.recent: dict[str, collections.deque] = {}  # arm: (record_ts_ms, FIELDS values)
        self.sessions = 0

    def update(self) -> dict[str, Any]:
        from recloop.lake import SESSIONS, Lake

        entries = self.lake.new_entries(self.marks)
        if entries:
            cols = ["arm", "items", "session_watch_s", "clicks", "likes", "follows"]
            rows = self.lake.read(SESSIONS, entries, columns=[*cols, "record_ts_ms"])
            for r in rows.to_pylist():
                vals = (
                    len(r["items"] or []),
                    r["session_watch_s"] or 0.0,
                    r["clicks"],
                    r["likes"],
                    r["follows"],
                )
                t = self.total.setdefault(r["arm"], dict.fromkeys(("sessions", *FIELDS), 0))
                t["sessions"] += 1
                for k, v in zip(FIELDS, vals, strict=True):
                    t[k] += v
                self.recent.setdefault(r["arm"], collections.deque()).append(
                    (r["record_ts_ms"], vals)
                )
            self.sessions += rows.num_rows
            self.marks = Lake.advance(self.marks, entries)
        cutoff = time.time() * 1000 - self.window_s * 1000
        out: dict[str, Any] = {}
        for arm, t in sorted(self.total.items()):
            q = self.recent[arm]
            while q and q[0][0] < cutoff:
                q.popleft()
            sums = [sum(col) for col in zip(*(v for _, v in q), strict=True)] or [0] * len(FIELDS)
            recent = _metrics(len(q), dict(zip(FIELDS, sums, strict=True)))
            out[arm] = {
                **_metrics(t["sessions"], t),
                "recent": {"window_s": self.window_s, **recent},
            }
        return out


def dpo_counts(stats: dict[str, Any]) -> dict[str, Any]:
    """The DPO sampler's ``stats`` as the snapshot's ``dpo`` section."""
    c = stats["counts"]
    return {
        "offered": c["offered"],
        "processed": c["processed"],
        "emitted": c["emitted"],
        "dropped": c["dropped_full"],
        "queue": stats.get("queue"),
        "cpu_s_per_request": stats.get("cpu_s_per_request"),
    }


class Monitor:
    """Collects snapshots of the loop (``collect``), keeping the last ``keep``."""

    def __init__(self, cfg: StackConfig, window_s: float = 60.0, keep: int = 720) -> None:
        self.cfg = cfg
        self.history: collections.deque[dict] = collections.deque(maxlen=keep)
        self.lock = threading.Lock()
        self._online = _OnlineTally(cfg.lake_dir, window_s)
        self._prev_requests: tuple[float, int] | None = None
        self._fresh: dict[str, dict[str, Any]] = {}  # arm: freshness() of its version

    # ------------------------------------------------------------------ sections
    def _arms(self) -> dict[str, Any]:
        from recloop.experiment import load_experiment
        from recloop.registry import open_registry

        reg = open_registry(self.cfg)
        out = {}
        for spec in load_experiment(self.cfg.serve.experiment).arms:
            try:
                version = reg.current(spec.name)
            except Exception:  # the arm is not in the registry yet
                version = None
            out[spec.name] = {
                "share": spec.share,
                "learning": spec.learning,
                "version": version,
            }
        return out

    def _ingest(self) -> dict[str, Any]:
        import ray

        stats = []
        for i in range(self.cfg.ingest.consumers):
            try:
                actor = ray.get_actor(ingestor_actor_name(i), namespace=NAMESPACE)
            except ValueError:
                continue
            stats.append(ray.get(actor.stats.remote(), timeout=10))
        # Each actor's lag: records behind the end, per partition it owns.
        lags = [
            sum(s["lag"].values()) if isinstance(s["lag"], dict) else s["lag"]
            for s in stats
            if s.get("lag") is not None
        ]
        fresh50 = [s["freshness_p50_ms"] for s in stats if s.get("freshness_p50_ms") is not None]
        fresh99 = [s["freshness_p99_ms"] for s in stats if s.get("freshness_p99_ms") is not None]
        return {
            "consumers": len(stats),
            "lag": sum(lags) if lags else None,
            "records": sum(s["records"] for s in stats),
            "records_per_s": sum(s["records_per_s"] for s in stats) if stats else None,
            "freshness_p50_ms": max(fresh50) if fresh50 else None,
            "freshness_p99_ms": max(fresh99) if fresh99 else None,
            "dead_lettered": sum(s.get("dead_lettered", 0) for s in stats),
            "lake_sessions": self._online.sessions,
        }

    def _training(self, arms: dict[str, Any]) -> dict[str, Any]:
        from recloop.train_state import freshness, load_state, read_rounds

        out: dict[str, Any] = {}
        for arm, info in arms.items():
            if info["learning"] == "frozen":
                continue
            rounds = [r for r in read_rounds(self.cfg, arm) if r.get("round") is not None]
            last = rounds[-1] if rounds else {}
            losses = (last.get("losses") or [{}])[-1]
            rm = last.get("reward_model") or {}
            auc = (rm.get("holdout") or {}).get("auc") or {}
            entry = {
                "round": last.get("round"),
                "status": last.get("status"),
                "version": last.get("version"),
                "rounds": len(rounds),
                "promoted": sum(1 for r in rounds if r.get("status") == "promoted"),
                "rejected": sum(1 for r in rounds if r.get("status") == "rejected"),
                "ntp_loss": losses.get("ntp_loss"),
                "dpo_loss": losses.get("dpo_loss"),
                "reward_auc": auc.get("vtr") if isinstance(auc, dict) else None,
                "running": bool(load_state(self.cfg, arm).get("in_progress")),
                "feedback_age_s": None,
                "feedback_to_serving_s": None,
            }
            version = info["version"]
            if version is not None:
                # A version's newest record and promotion never change: read them once
                # (``freshness`` verifies the checkpoint's files).
                if self._fresh.get(arm, {}).get("version") != version:
                    self._fresh[arm] = freshness(self.cfg, arm)
                f = self._fresh[arm]
                rec_ts = f.get("newest_record_ts_ms")
                entry["feedback_age_s"] = time.time() - rec_ts / 1000 if rec_ts else None
                entry["feedback_to_serving_s"] = f.get("feedback_to_serving_s")
            out[arm] = entry
        return out

    def _dpo(self) -> dict[str, Any] | None:
        import ray

        try:
            actor = ray.get_actor(self.cfg.serve.dpo_actor, namespace=NAMESPACE)
        except ValueError:
            return None
        return dpo_counts(ray.get(actor.stats.remote(), timeout=10))

    def _serving(self, now: float) -> dict[str, Any]:
        import requests

        url = f"http://{self.cfg.ray.host}:{self.cfg.ray.serve_port}/stats"
        st = requests.get(url, timeout=10).json()
        router = st["router"]
        rate = None
        if self._prev_requests is not None and now > self._prev_requests[0]:
            rate = (router["ok"] - self._prev_requests[1]) / (now - self._prev_requests[0])
            rate = round(max(0.0, rate), 3)
        self._prev_requests = (now, router["ok"])
        return {
            "requests": router["ok"],
            "errors": router["errors"],
            "requests_per_s": rate,
            "latency_ms": st.get("latency_ms") or {"p50": None, "p90": None, "p99": None, "n": 0},
        }

    # ------------------------------------------------------------------ collect
    def collect(self) -> dict[str, Any]:
        """One snapshot; appended to ``history``."""
        from recloop.ray_head import connect

        now = time.time()
        snap: dict[str, Any] = {"t": round(now, 3), "errors": {}}

        def section(name: str, fn, *args) -> Any:
            try:
                return fn(*args)
            except Exception as exc:  # a part that is down: its section stays empty
                snap["errors"][name] = f"{type(exc).__name__}: {exc}"[:300]
                return None

        section("ray", connect, self.cfg)
        snap["arms"] = section("arms", self._arms) or {}
        snap["online"] = section("online", self._online.update)
        snap["ingest"] = section("ingest", self._ingest)
        snap["training"] = section("training", self._training, snap["arms"])
        snap["dpo"] = section("dpo", self._dpo)
        snap["serving"] = section("serving", self._serving, now)
        snap = _finite(snap)
        with self.lock:
            self.history.append(snap)
        return snap

    def since(self, t: float | None = None) -> list[dict]:
        with self.lock:
            return [s for s in self.history if t is None or s["t"] > t]

    def latest(self) -> dict | None:
        with self.lock:
            return self.history[-1] if self.history else None

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Collect every ``interval_s`` until ``stop`` is set."""
        while not stop.is_set():
            started = time.monotonic()
            self.collect()
            stop.wait(max(0.5, interval_s - (time.monotonic() - started)))


def _finite(x: Any) -> Any:
    """``x`` with NaN and infinities as None (JSON has neither)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


# --------------------------------------------------------------------------- Prometheus
# The loop's state as the snapshot holds it, for ``/dashboard/metrics``. Per-request
# figures are not here: the router's request counter and latency histogram are Ray
# metrics of each replica (``serving.metrics``), and the ingestor's freshness histogram
# one of each ingestor actor (``actors.ingestor``), exported by Ray's metrics agents as
# ``ray_recloop_*``, so that they add up over replicas and nodes.
METRICS_DOC: dict[str, tuple[str, str]] = {
    # name: (type, help); labels are listed in docs/demo.md
    "recloop_arm_info": (
        "gauge",
        "1 for the version each arm serves (labels arm, version, learning)",
    ),
    "recloop_arm_share": ("gauge", "share of traffic of each arm"),
    "recloop_online_sessions": ("gauge", "sessions landed in the lake, per arm and window"),
    "recloop_online_session_watch_seconds": (
        "gauge",
        "mean session watch time, per arm and window",
    ),
    "recloop_online_view_rate": ("gauge", "views per item shown, per arm and window"),
    "recloop_online_like_rate": ("gauge", "likes per item shown, per arm and window"),
    "recloop_online_follow_rate": ("gauge", "follows per item shown, per arm and window"),
    "recloop_ingest_lag_records": ("gauge", "records behind the end of recloop.interactions"),
    "recloop_ingest_records": ("counter", "records ingested by the ingestor actors"),
    "recloop_ingest_dead_lettered": ("counter", "records sent to the dead-letter topic"),
    "recloop_training_rounds": ("counter", "training rounds completed, per arm and status"),
    "recloop_training_ntp_loss": ("gauge", "next-token loss of the last round's last epoch"),
    "recloop_training_dpo_loss": ("gauge", "DPO loss of the last round's last epoch"),
    "recloop_reward_model_view_auc": ("gauge", "held-out view AUC of the last reward model"),
    "recloop_feedback_age_seconds": ("gauge", "age of the newest feedback the serving model saw"),
    "recloop_dpo_requests": ("counter", "mirrored requests at the DPO sampler, per state"),
    "recloop_dpo_queue": ("gauge", "requests waiting in the DPO sampler's queue"),
}


def _samples(snap: dict[str, Any]) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The snapshot's values per metric of ``METRICS_DOC``, with their labels (values
    that are None or not finite are left out)."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {k: [] for k in METRICS_DOC}

    def put(name: str, value: Any, **labels: Any) -> None:
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, int | float) and math.isfinite(value):
            samples[name].append(({k: str(v) for k, v in labels.items()}, float(value)))

    for arm, a in (snap.get("arms") or {}).items():
        put("recloop_arm_info", 1, arm=arm, version=a.get("version") or "", learning=a["learning"])
        put("recloop_arm_share", a.get("share"), arm=arm)
    for arm, o in (snap.get("online") or {}).items():
        for window, vals in (("all", o), ("recent", o.get("recent") or {})):
            put("recloop_online_sessions", vals.get("sessions"), arm=arm, window=window)
            put("recloop_online_session_watch_seconds", vals.get("swt"), arm=arm, window=window)
            for m, name in (("vtr", "view"), ("ltr", "like"), ("wtr", "follow")):
                put(f"recloop_online_{name}_rate", vals.get(m), arm=arm, window=window)
    ing = snap.get("ingest") or {}
    put("recloop_ingest_lag_records", ing.get("lag"))
    put("recloop_ingest_records", ing.get("records"))
    put("recloop_ingest_dead_lettered", ing.get("dead_lettered"))
    for arm, t in (snap.get("training") or {}).items():
        for status in ("promoted", "rejected"):
            put("recloop_training_rounds", t.get(status), arm=arm, status=status)
        put("recloop_training_ntp_loss", t.get("ntp_loss"), arm=arm)
        put("recloop_training_dpo_loss", t.get("dpo_loss"), arm=arm)
        put("recloop_reward_model_view_auc", t.get("reward_auc"), arm=arm)
        put("recloop_feedback_age_seconds", t.get("feedback_age_s"), arm=arm)
    dpo = snap.get("dpo") or {}
    for state in ("offered", "processed", "emitted", "dropped"):
        put("recloop_dpo_requests", dpo.get(state), state=state)
    put("recloop_dpo_queue", dpo.get("queue"))
    return samples


class SnapshotCollector:
    """A ``prometheus_client`` collector of one snapshot's metrics (``METRICS_DOC``)."""

    def __init__(self, snap: dict[str, Any] | None) -> None:
        self.snap = snap or {}

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        kinds = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}
        for name, samples in _samples(self.snap).items():
            kind, doc = METRICS_DOC[name]
            keys = list(dict.fromkeys(k for labels, _ in samples for k in labels))
            family = kinds[kind](name, doc, labels=keys)
            for labels, value in samples:
                family.add_metric([labels.get(k, "") for k in keys], value)
            yield family


def prometheus_text(snap: dict[str, Any] | None) -> str:
    """``snap`` in the Prometheus text exposition format, by ``prometheus_client``."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snap))
    return generate_latest(registry).decode()


# --------------------------------------------------------------------------- terminal view
def _f(v: Any, fmt: str = ".3f", none: str = "–") -> str:
    return none if v is None else format(v, fmt)


def format_snapshot(snap: dict[str, Any]) -> str:
    """The terminal view of ``recloop status --watch``."""
    lines = [f"recloop loop at {time.strftime('%H:%M:%S', time.localtime(snap['t']))}"]
    online = snap.get("online") or {}
    training = snap.get("training") or {}
    lines.append(
        f"  {'arm':<12} {'share':>5} {'version':<34} {'sessions':>8} {'swt(s)':>7} "
        f"{'view':>6} {'like':>6}  {'round':<18} {'fb age(s)':>9}"
    )
    for arm, a in (snap.get("arms") or {}).items():
        o = online.get(arm) or {}
        r = o.get("recent") or {}
        t = training.get(arm)
        rnd = f"{t['round']} {t['status']}" if t and t.get("round") else ("–" if t else "frozen")
        lines.append(
            f"  {arm:<12} {a['share']:>5.2f} {(a.get('version') or '–')[:34]:<34} "
            f"{o.get('sessions', 0):>8} {_f(r.get('swt', o.get('swt')), '.1f'):>7} "
            f"{_f(r.get('vtr'), '.3f'):>6} {_f(r.get('ltr'), '.3f'):>6}  {rnd:<18} "
            f"{_f(t.get('feedback_age_s') if t else None, '.0f'):>9}"
        )
    sv = snap.get("serving") or {}
    lat = sv.get("latency_ms") or {}
    lines.append(
        f"  serving: {sv.get('requests', '–')} requests ({sv.get('errors', '–')} errors), "
        f"{_f(sv.get('requests_per_s'), '.1f')} req/s, latency p50 {_f(lat.get('p50'), '.0f')} "
        f"ms, p99 {_f(lat.get('p99'), '.0f')} ms"
    )
    ing = snap.get("ingest") or {}
    fresh = ing.get("freshness_p99_ms")
    lines.append(
        f"  ingest: {ing.get('records', '–')} records, lag {_f(ing.get('lag'), 'd')}, "
        f"freshness p99 {_f(fresh / 1000 if fresh is not None else None, '.1f')} s, "
        f"{ing.get('dead_lettered', '–')} dead-lettered, {ing.get('lake_sessions', '–')} "
        "sessions in the lake"
    )
    dpo = snap.get("dpo")
    if dpo:
        lines.append(
            f"  dpo sampler: {dpo['offered']} offered, {dpo['processed']} processed, "
            f"{dpo['emitted']} pairs, {dpo['dropped']} dropped, queue {dpo['queue']}"
        )
    for name, reason in (snap.get("errors") or {}).items():
        lines.append(f"  ({name}: {reason})")
    return "\n".join(lines)
