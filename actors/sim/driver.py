"""``recloop simulate``: drive a run file's simulated traffic through the running stack.

1. deploy the run's experiment (its arms get their models: the seed or a baseline);
2. load the hidden user-response model (fitted on the data on first use);
3. give every simulated user without an online history their real one (Feast push);
4. note the end offsets of the event topics, start ``shards`` simulator actors, show
   progress until they finish, note the end offsets again;
5. write the run folder ``<home>/sim/runs/<run_id>/``: ``manifest.json`` (config, data
   policy, offsets, throughput) and ``ledger.parquet`` (one row per session, with the
   hidden model's expected and oracle values, which never leave the simulator's side).

``recloop analyze`` reads the run's events back from Kafka between those offsets.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from actors.sim.runfile import RunFile, SimulationConfig, load_run
from recloop.config import PROJECT_ROOT, StackConfig

Progress = Callable[[str], None]
INTERACTIONS = "recloop.interactions"
IMPRESSIONS = "recloop.impressions"


def runs_dir(cfg: StackConfig) -> Path:
    return cfg.home / "sim" / "runs"


def resolve_run(cfg: StackConfig, run: str | None) -> Path:
    """The run folder for a run id, a path, or the latest run (None / 'latest')."""
    root = runs_dir(cfg)
    if run in (None, "latest"):
        latest = root / "LATEST"
        if not latest.exists():
            raise FileNotFoundError(f"no simulation run under {root}: run `recloop simulate`")
        run = latest.read_text().strip()
    path = Path(run) if Path(run).is_dir() else root / run
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"{path} is not a simulation run (no manifest.json)")
    return path


def user_model_dir(cfg: StackConfig, sim: SimulationConfig, data: Any, say: Progress) -> Path:
    """The fitted hidden model for the configured data; fitted and saved on first use."""
    import hashlib

    from actors.sim.user_model import HiddenUserModel

    if sim.user_model:
        path = Path(sim.user_model)
        if not path.exists():
            raise FileNotFoundError(f"simulation.user_model {path} does not exist")
        return path
    kind = sim.user_model_kind
    tag = hashlib.sha256(data.source.encode()).hexdigest()[:10]
    path = cfg.home / "sim" / "user_model" / f"{tag}-{kind}"
    if not (path / "model.json").exists():
        say(f"fitting the {kind} hidden user model on {data.summary()} (once; saved to {path})")
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread: bit-for-bit the same model for the same seed
        try:
            model = HiddenUserModel.fit(data, progress=say, kind=kind)
        finally:
            torch.set_num_threads(threads)
        model.save(path)
        r = model.report
        say(f"hidden user model: {json.dumps(_brief(r))}")
    return path


def _brief(report: dict) -> dict:
    brief = {k: v for k, v in report.items() if "auc" in k or k.startswith("n_")}
    brief["kind"] = report.get("kind", "static")
    return brief


def seed_histories(cfg: StackConfig, pop: Any, say: Progress) -> int:
    """Push the real history of every simulated user the online store has none for (its
    last ``HISTORY_LEN`` items, as the ingestor keeps it)."""
    from datetime import UTC, datetime

    from features.definitions import HISTORY_LEN
    from features.store import open_store, push

    store = open_store(cfg)
    users = [int(u) for u in pop.user_ids]
    known = store.get_online_features(
        features=["user_history:item_ids"], entity_rows=[{"user_id": u} for u in users]
    ).to_dict()["item_ids"]
    missing = [u for u, items in zip(users, known, strict=True) if not items]
    if not missing:
        return 0
    rows = []
    for u in missing:
        items = pop.histories[u][-HISTORY_LEN:]
        last = pop.history_times_ms[u][-1] / 1000
        rows.append(
            {
                "user_id": u,
                "item_ids": items,
                "history_len": len(pop.histories[u]),
                "event_timestamp": datetime.fromtimestamp(last, UTC),
            }
        )
    push(store, "user_history_push", pd.DataFrame(rows))
    say(f"Feast: pushed the real histories of {len(missing)} simulated users")
    return len(missing)


def _shard_actor():
    import ray

    from actors.sim.simulator import run_shard

    @ray.remote(max_concurrency=2)  # one thread runs the shard, one answers progress()
    class SimulatorShard:
        def __init__(self) -> None:
            self.simulator: Any = None

        def run(self, *args: Any) -> dict:
            return run_shard(*args, on_start=self._started)

        def _started(self, simulator: Any) -> None:
            self.simulator = simulator

        def progress(self) -> dict | None:
            return None if self.simulator is None else self.simulator.progress.snapshot()

    return SimulatorShard


def _line(snaps: list[dict], total: int) -> str:
    done = sum(s["done"] for s in snaps)
    failed = sum(s["failed"] for s in snaps)
    events = sum(s["events"] for s in snaps)
    rps = sum(s["requests_per_s"] for s in snaps)
    eps = sum(s["events_per_s"] for s in snaps)
    vh = max(s["virtual_s"] for s in snaps) / 3600
    lag = max(s["max_lag_s"] for s in snaps)
    pct = 100.0 * done / max(total, 1)
    return (
        f"{done}/{total} sessions ({pct:.0f}%), {events} events, {failed} failed, "
        f"{rps:.1f} req/s, {eps:.0f} events/s, virtual {vh:.1f} h, max lag {lag:.1f} s"
    )


def simulate(
    cfg: StackConfig,
    run_path: str | Path,
    say: Progress = print,
    deploy: bool = True,
    overrides: dict[str, Any] | None = None,
    learn: bool = True,
) -> dict[str, Any]:
    """Run the file's simulation against the running stack; returns the manifest.
    ``overrides`` replace keys of the file's ``simulation:`` section. With ``learn``
    (default) the learning arms are trained during the run (``start_learning``)."""
    import ray

    from actors.sim.simulator import Population, schedule
    from recloop.data import load
    from recloop.kafka_io import end_offsets
    from recloop.ray_head import connect

    run: RunFile = load_run(run_path, overrides)
    sim = run.simulation
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, experiment=run.path))
    connect(cfg)
    if deploy:
        from serving.api import serve_up

        serve_up(cfg, progress=say)
    data = load(cfg.data)
    model_dir = user_model_dir(cfg, sim, data, say)
    pop = Population.from_data(data, sim.users, sim.seed)
    total = len(schedule(pop, sim))
    say(
        f"{len(pop.user_ids)} users, {total} sessions over {sim.duration_s / 3600:.1f} virtual "
        f"hours at speed-up {sim.speedup:g} ({sim.shards} shard(s), {sim.concurrency} in "
        f"flight each); policy: {run.experiment.policy_statement()}"
    )
    if sim.seed_histories:
        seed_histories(cfg, pop, say)

    t0_ms = sim.start_ms if sim.start_ms is not None else int(time.time() * 1000)
    run_id = f"{run.experiment.name}-s{sim.seed}-{time.strftime('%Y%m%dT%H%M%S')}"
    url = f"http://{cfg.ray.host}:{cfg.ray.serve_port}/recommend"
    preflight(url, int(pop.user_ids[0]))
    learners = start_learning(cfg, run, say) if learn else {}
    try:
        start = {t: end_offsets(cfg.kafka.bootstrap, t) for t in (INTERACTIONS, IMPRESSIONS)}
        stats0 = service_stats(url)
        started = time.time()
        Shard = _shard_actor()
        actors = [
            Shard.options(num_cpus=sim.shard_cpus, name=f"simulator-{run_id}-{i}").remote()
            for i in range(sim.shards)
        ]
        args = (cfg.to_dict(), sim.to_dict(), run_id, t0_ms, str(model_dir), url)
        refs = [a.run.remote(*args, i, sim.shards) for i, a in enumerate(actors)]
        say(f"run {run_id}: simulating")
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=sim.progress_every_s)
            snaps = [s for s in ray.get([a.progress.remote() for a in actors]) if s]
            if snaps and pending:
                say(_line(snaps, total))
        results = ray.get(refs)
        for a in actors:
            ray.kill(a)
        finished = time.time()
        unlogged = wait_impressions_logged(url, say)
    except BaseException:
        stop_learning(cfg, run, learners, say)  # no trainer outlives a failed run
        raise
    learning = stop_learning(cfg, run, learners, say, since_s=started, drain_s=sim.drain_s)
    end = {t: end_offsets(cfg.kafka.bootstrap, t) for t in (INTERACTIONS, IMPRESSIONS)}
    service = _stats_delta(stats0, service_stats(url))
    degraded = service.get("features", {})
    if degraded.get("errors") or degraded.get("skipped"):
        say(
            f"warning: {degraded.get('errors', 0)} feature lookups failed and "
            f"{degraded.get('skipped', 0)} were skipped (store backing off): those users got "
            "sessions without their history"
        )

    lost = service.get("impressions", {})
    if lost.get("dropped") or lost.get("failed"):
        say(
            f"warning: {lost.get('dropped', 0)} impressions were dropped (buffer full) and "
            f"{lost.get('failed', 0)} refused by Kafka: their sessions will not reach the lake"
        )

    summaries = [r["summary"] for r in results]
    ledger = pd.DataFrame([row for r in results for row in r["ledger"]])
    ledger = ledger.sort_values(["t_ms", "user_id"], kind="stable").reset_index(drop=True)
    wall = finished - started
    totals = {
        "sessions": int(len(ledger)),
        "ok": int(sum(s["ok"] for s in summaries)),
        "failed": int(sum(s["failed"] for s in summaries)),
        "events_sent": int(sum(s["events_sent"] for s in summaries)),
        "requests_per_s": round(len(ledger) / wall, 2),
        "events_per_s": round(sum(s["events_sent"] for s in summaries) / wall, 1),
        "max_lag_s": max(s["max_lag_s"] for s in summaries),
        "statuses": _merge([s["statuses"] for s in summaries]),
    }
    manifest = {
        "run_id": run_id,
        "run_file": str(run.path),
        "experiment": run.experiment.model_dump(),
        "policy": run.experiment.policy_statement(),
        "simulation": sim.to_dict(),
        "analysis": run.analysis,
        "data": data.source,
        "user_model": str(model_dir),
        "url": url,
        "t0_ms": t0_ms,
        "started_at": started,
        "finished_at": finished,
        "wall_s": round(wall, 2),
        "offsets": {t: {"start": start[t], "end": end[t]} for t in start},
        "service": service,  # the router's /stats counters over the run
        "impressions_pending": unlogged,  # not in Kafka when the run ended (None: unknown)
        "totals": totals,
        "shards": summaries,
        "learning": learning,  # per learning arm: the rounds trained and versions promoted
    }
    out = runs_dir(cfg) / run_id
    out.mkdir(parents=True, exist_ok=True)
    ledger.to_parquet(out / "ledger.parquet", index=False)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    (runs_dir(cfg) / "LATEST").write_text(run_id)
    say(
        f"run {run_id}: {totals['sessions']} sessions ({totals['failed']} failed), "
        f"{totals['events_sent']} events in {wall:.1f} s = {totals['requests_per_s']} req/s, "
        f"{totals['events_per_s']} events/s; saved to {out}"
    )
    return manifest


def start_learning(cfg: StackConfig, run: RunFile, say: Progress) -> dict[str, Any]:
    """For an experiment with learning arms: the ingestor actors (Kafka → Feast + lake)
    and one ``recloop train`` process per learning arm, trained by the data policy."""
    import subprocess
    import sys

    import yaml

    arms = [a.name for a in run.experiment.arms if a.learning != "frozen"]
    if not arms:
        return {}
    from actors.ingestor import start_actors

    start_actors(cfg, say)
    ipa = [a.name for a in run.experiment.arms if a.learning == "online-ipa"]
    if ipa:  # the DPO sample server mines pairs from the mirrored share of their traffic
        from actors.dpo_sampler import start_sampler

        start_sampler(cfg, ipa, say)
    tdir = cfg.home / "train"
    tdir.mkdir(parents=True, exist_ok=True)
    conf = tdir / "stack.yaml"
    conf.write_text(yaml.safe_dump(cfg.to_dict()))
    procs = {}
    for arm in arms:
        cmd = [sys.executable, "-m", "pipelines.continuous", "--config", str(conf), "--arm", arm]
        cmd += ["--data-policy", run.experiment.data_policy]
        if arm in ipa:
            cmd.append("--dpo")
        log = open(tdir / f"{arm}.log", "ab")  # noqa: SIM115 (closed in stop_learning)
        procs[arm] = (subprocess.Popen(cmd, stdout=log, stderr=log, cwd=PROJECT_ROOT), log)
        say(f"arm {arm}: continuous training started (log {tdir / f'{arm}.log'})")
    return procs


def stop_learning(
    cfg: StackConfig,
    run: RunFile,
    procs: dict,
    say: Progress,
    since_s: float = 0.0,
    drain_s: float = 0.0,
) -> dict[str, Any]:
    """Stop the trainers; what each learning arm trained and promoted during the run
    (rounds completed after ``since_s``, wall clock). With ``drain_s``, each trainer is
    stopped as soon as it is between rounds, waiting at most that long."""
    import signal

    from recloop.registry import open_registry
    from recloop.train_state import load_state, read_rounds

    out: dict[str, Any] = {}
    reg = open_registry(cfg)
    deadline = time.monotonic() + drain_s
    states = {arm: load_state(cfg, arm) for arm in procs}
    # The round each busy arm is in: done once the completed round count passes it.
    busy = {a: int(st["round"]) for a, st in states.items() if st.get("in_progress") and drain_s}
    if busy:
        say(f"traffic done; letting the round(s) in progress finish ({', '.join(sorted(busy))})")

    def between_rounds(arm: str) -> bool:
        st = load_state(cfg, arm)
        return not st.get("in_progress") or int(st["round"]) > busy[arm]

    pending = dict(procs)
    while pending:  # every trainer gets SIGINT once it is between rounds (or time is up)
        for arm, (proc, _) in list(pending.items()):
            running = proc.poll() is None
            if (
                not running
                or arm not in busy
                or time.monotonic() >= deadline
                or between_rounds(arm)
            ):
                if running:
                    proc.send_signal(signal.SIGINT)  # between rounds: it exits at once
                del pending[arm]
        if pending:
            time.sleep(1.0)
    for arm, (proc, log) in procs.items():
        try:
            proc.wait(120)
        except Exception:
            proc.kill()
        log.close()
        rounds = [r for r in read_rounds(cfg, arm) if r.get("completed_at_ms", 0) >= since_s * 1000]
        promoted = [h for h in reg.history(arm) if h.get("action") == "promote"]
        out[arm] = {"rounds": rounds, "promotions": promoted, "exit_code": proc.returncode}
        say(
            f"arm {arm}: {len(rounds)} training round(s), "
            f"{sum(1 for r in rounds if r.get('promoted'))} promoted; serving {reg.current(arm)}"
        )
    if procs and any(a.learning == "online-ipa" for a in run.experiment.arms):
        from actors.dpo_sampler import stop_sampler  # started by start_learning

        try:
            out["dpo_sampler"] = stop_sampler(cfg, say)  # its counters over the run
        except Exception as exc:
            say(f"warning: the DPO sampler did not stop cleanly: {exc}")
    return out


def preflight(url: str, user_id: int, timeout_s: float = 60.0) -> None:
    """One request before the run (not part of it): a service that cannot answer stops
    the run here with its reason, instead of failing every session."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            resp = requests.post(url, json={"user_id": user_id}, timeout=30)
            if resp.status_code == 200:
                return
            reason = f"HTTP {resp.status_code}: {resp.text[:300]}"
        except requests.RequestException as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise ConnectionError(f"the service at {url} does not answer ({reason})")
        time.sleep(1.0)


def service_stats(url: str) -> dict:
    """The service's counters (router, feature lookups, impressions); {} if unreachable."""
    import requests

    try:
        return requests.get(url.rsplit("/", 1)[0] + "/stats", timeout=10).json()
    except (requests.RequestException, ValueError):
        return {}


def wait_impressions_logged(url: str, say: Progress, timeout_s: float = 60.0) -> int | None:
    """Wait until the router has handed every impression it served to Kafka (they are
    sent off the request path, so the last ones may still be queued when the users are
    done); say so when it has not after ``timeout_s``. Returns how many are still
    pending (None: the service does not say)."""
    deadline = time.monotonic() + timeout_s
    while True:
        imp = service_stats(url).get("impressions", {})
        pending = imp.get("pending")
        if not pending:  # (None: a service without the counter, no wait)
            return pending
        if time.monotonic() > deadline:
            say(
                f"warning: {pending} impressions still waiting for Kafka after {timeout_s:.0f} s "
                f"(last error: {imp.get('last_error')})"
            )
            return pending
        time.sleep(0.2)


def _stats_delta(before: dict, after: dict) -> dict:
    """after - before for the numeric counters of /stats (one router replica)."""
    out: dict[str, dict] = {}
    for part, counts in after.items():
        if part == "latency_ms":  # a recent window's percentiles, not counters
            out[part] = dict(counts)
        elif isinstance(counts, dict):
            prev = before.get(part, {})
            out[part] = {
                k: v - prev.get(k, 0)
                for k, v in counts.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
    return out


def _merge(dicts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out
