"""Ingestion throughput, consumer lag and feature freshness on a real broker and Feast.

Starts its own stack (temporary home, free ports, the shared jar cache), then:

1. backlog: produces S sessions (one impression + one interaction per shown item) for 943
   users and 1682 items, then times the ingestor draining them into Feast + the lake
   (sustained records/s), beside a bare consumer of the same client reading the same records
   with no processing in the same run, polling and fetching as the ingestor does
   (``ingest.batch_events`` records per poll, ``ingest.fetch_partition_bytes``; the ratio is
   the figure to compare across machines). Both clocks start at the same point, the first
   record in hand (the group join and the opening of the Feast store come before it), and
   stop when the last record is read (bare) or committed with its features pushed, counters
   included (ingestor). Both are timed five times, each drain right after its bare read (a
   lake and consumer group of its own each time), and the medians compared: a run lasts a
   second or two, so one run is at the mercy of whatever else the machine does (bare reads
   of the same records have differed by 2x within one run);
2. live: a producer sends sessions at a fixed rate while the ingestor runs; the group's
   lag (end offsets minus committed offsets, sampled each second) and the freshness of
   the features (Kafka timestamp of the newest record of a session → its user's history
   pushed to the online store, which serving reads per request) are recorded.

Each Kafka client of ``--clients`` (``ingest.client``: kafka-python, confluent) is
measured the same way: its bare reads and drains interleaved with the other's, then
live (a fresh lake and group that start at the topics' ends, so one client's live
records are not the next one's backlog).

    make bench-ingest           # or: .venv/bin/python -m benchmarks.ingest
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SESSION = 10


def _say(msg: str) -> None:
    print(f"[bench-ingest {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sessions(n: int, seed: int, t0_ms: int, prefix: str):
    """n sessions: (impression, interactions) with MovieLens-sized ids."""
    from recloop.events import Impression, Interaction, ServedItem

    rng = random.Random(seed)
    for k in range(n):
        user = rng.randint(1, 943)
        items = rng.sample(range(1, 1683), SESSION)
        t = t0_ms + k * 50
        rid = f"{prefix}-{k}"
        imp = Impression(
            event_time_ms=t,
            request_id=rid,
            user_id=user,
            arm="online",
            model_version="v1",
            items=[ServedItem(item_id=i, position=p, score=-p) for p, i in enumerate(items)],
        )
        fbs = []
        for p, i in enumerate(items):
            clicked = rng.random() < 0.3
            fbs.append(
                Interaction(
                    event_time_ms=t + 1000 * (p + 1),
                    request_id=rid,
                    user_id=user,
                    item_id=i,
                    position=p,
                    arm="online",
                    model_version="v1",
                    clicked=clicked,
                    watch_time_s=rng.uniform(10, 300) if clicked else 0.0,
                    liked=clicked and rng.random() < 0.2,
                )
            )
        yield imp, fbs


RUNS = 5  # bare reads and ingestor drains of the backlog, per client


def raw_read(bootstrap: str, topics: list[str], expected: int, client: str, ingest: Any) -> float:
    """Seconds for a bare consumer of ``client`` to read ``expected`` records of
    ``topics``, from the first record in hand to the last; it polls and fetches as the
    ingestor does (``ingest``: batch_events records per poll, fetch_partition_bytes)."""
    if client == "confluent":
        return _raw_read_confluent(bootstrap, topics, expected, ingest)
    from kafka import KafkaConsumer

    c = KafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=f"raw-{time.time_ns()}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=ingest.batch_events,
        max_partition_fetch_bytes=ingest.fetch_partition_bytes,
    )
    n, started, ended = 0, None, None
    deadline = time.monotonic() + 300
    while n < expected and time.monotonic() < deadline:
        got = c.poll(timeout_ms=500)
        if got and started is None:
            started = time.perf_counter()
        n += sum(len(v) for v in got.values())
        ended = time.perf_counter()
    c.close(autocommit=False)
    return (ended or 0.0) - (started or 0.0)


def _raw_read_confluent(bootstrap: str, topics: list[str], expected: int, ingest: Any) -> float:
    from confluent_kafka import Consumer

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"raw-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "max.partition.fetch.bytes": ingest.fetch_partition_bytes,
        }
    )
    c.subscribe(topics)
    n, started, ended = 0, None, None
    deadline = time.monotonic() + 300
    while n < expected and time.monotonic() < deadline:
        got = c.consume(ingest.batch_events, 0.5)
        if got and started is None:
            started = time.perf_counter()
        n += sum(1 for m in got if m.error() is None)
        ended = time.perf_counter()
    c.close()
    return (ended or 0.0) - (started or 0.0)


def start_at_end(bootstrap: str, group: str, topics: list[str]) -> None:
    """Commit the topics' ends for ``group``: a member with no lake state starts there."""
    from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition

    from recloop.kafka_io import end_offsets

    ends = {
        TopicPartition(t, p): OffsetAndMetadata(off, "", -1)
        for t in topics
        for p, off in end_offsets(bootstrap, t).items()
    }
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        c.commit(ends)
    finally:
        c.close(autocommit=False)


def _client_cfg(cfg: Any, client: str, tag: str) -> Any:
    """``cfg`` with ``client``'s own consumer group and lake."""
    import dataclasses

    return dataclasses.replace(
        cfg,
        ingest=dataclasses.replace(
            cfg.ingest,
            client=client,
            group_id=f"{cfg.ingest.group_id}-{tag}-{client}",
            lake_dir=Path(cfg.home) / f"lake-{tag}-{client}",
        ),
    )


@contextlib.contextmanager
def gc_clock() -> Iterator[dict[str, Any]]:
    """Seconds the cyclic garbage collector ran while the block ran, per generation, and
    how many collections (``gc.callbacks``)."""
    out: dict[str, Any] = {"gen0": 0.0, "gen1": 0.0, "gen2": 0.0, "collections": [0, 0, 0]}
    began: list[float] = []

    def clock(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began.append(time.perf_counter())
        elif began:
            gen = info["generation"]
            out[f"gen{gen}"] += time.perf_counter() - began.pop()
            out["collections"][gen] += 1

    gc.callbacks.append(clock)
    try:
        yield out
    finally:
        gc.callbacks.remove(clock)
        for g in range(3):
            out[f"gen{g}"] = round(out[f"gen{g}"], 3)


def backlog_run(cfg: Any, client: str, tag: str) -> dict[str, Any]:
    """One drain of the backlog by the ingestor of ``client`` (a lake and consumer group
    of its own, named by ``tag``)."""
    from actors.ingestor import Ingestor
    from recloop.lake import Lake

    cfg = _client_cfg(cfg, client, tag)
    load_before = os.getloadavg()[0]
    ing = Ingestor(cfg, 0, _say)
    started = time.perf_counter()
    with gc_clock() as gc_s:
        stats = ing.run(until_idle_s=2.0, progress_s=5.0)
    wall_s = time.perf_counter() - started
    work_s = stats["work_s"]
    rows = Lake(cfg.lake_dir).read("sessions", columns=["event_id"]).num_rows
    return {
        "records_ingested": stats["records"],
        "sessions_in_lake": rows,
        "ingest_s": round(work_s, 2),
        "records_per_s": round(stats["records"] / work_s, 1),
        "sessions_per_s": round(rows / work_s, 1),
        "run_s_with_join_and_idle": round(wall_s, 2),
        "flushes": stats["flushes"],
        "flush_p50_s": stats["flush_p50_s"],
        "flush_records_p50": stats["flush_records_p50"],
        "flush_records_max": stats["flush_records_max"],
        "pushes": stats["pushes"],
        # Where the drain's time went: poll (fetch + parse), fold (sessions assembled),
        # and each step of the flushes.
        "phase_s": stats["phase_s"],
        # The cyclic collector's time during the run (in any phase), per generation.
        "gc_s": gc_s,
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def backlog(client: str, records: int, raws: list[float], runs: list[dict]) -> dict[str, Any]:
    """The median ingestor drain of ``runs`` against the median bare read of ``raws``;
    each run followed its own bare read, so the pairs saw the same moment of the machine."""
    raw_rates = [records / s for s in raws]
    rates = [r["records_per_s"] for r in runs]
    median = sorted(range(len(runs)), key=lambda i: rates[i])[len(runs) // 2]
    raw_median = sorted(raw_rates)[len(raw_rates) // 2]
    return {
        "client": client,
        "records": records,
        **runs[median],
        "records_per_s_runs": rates,
        "raw_consumer_records_per_s": round(raw_median, 1),
        "raw_consumer_records_per_s_runs": [round(r, 1) for r in raw_rates],
        "ratio_to_raw_consumer": round(rates[median] / raw_median, 4),
        "ratio_to_raw_consumer_pairs": [
            round(r / b, 4) for r, b in zip(rates, raw_rates, strict=True)
        ],
        "clocks": "first record in hand -> last record read (raw) / last commit and "
        "pushes (ingestor)",
    }


def live(cfg: Any, client: str, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """The ingestor of ``client`` while a producer sends ``rate`` sessions/s."""
    from kafka.admin import KafkaAdminClient

    from actors.ingestor import TOPICS, Ingestor
    from recloop.kafka_io import EventProducer

    cfg = _client_cfg(cfg, client, "live")
    boot = cfg.kafka.bootstrap
    start_at_end(boot, cfg.ingest.group_id, list(TOPICS))
    admin = KafkaAdminClient(bootstrap_servers=boot)
    stop = threading.Event()
    ing = Ingestor(cfg, 0, _say)
    runner = threading.Thread(target=lambda: ing.run(stop, progress_s=10.0), daemon=True)
    runner.start()
    time.sleep(6)  # the group join
    lags: list[int] = []
    sent = 0
    gen = sessions(int(rate * seconds) + 10, seed, int(time.time() * 1000), f"l{seed}")
    started = time.monotonic()
    next_sample = started + 1.0
    with EventProducer(boot) as prod:
        for k, (imp, fbs) in enumerate(gen):
            due = started + k / rate
            while time.monotonic() < due:
                if time.monotonic() >= next_sample:
                    lags.append(group_lag(admin, boot, cfg.ingest.group_id, list(TOPICS)))
                    next_sample += 1.0
                time.sleep(0.005)
            now = int(time.time() * 1000)
            prod.send(imp.model_copy(update={"event_time_ms": now}))
            for fb in fbs:
                prod.send(fb.model_copy(update={"event_time_ms": now + 1}))
            sent += 1 + len(fbs)
            if time.monotonic() - started >= seconds:
                break
        prod.flush()
    live_s = time.monotonic() - started
    time.sleep(3)
    stop.set()
    runner.join(60)
    st = ing.stats()
    admin.close()
    lags_sorted = sorted(lags) or [0]
    return {
        "client": client,
        "target_sessions_per_s": rate,
        "records_sent": sent,
        "records_ingested": st["records"],
        "seconds": round(live_s, 1),
        "records_per_s_offered": round(sent / live_s, 1),
        "lag_records_p50": lags_sorted[len(lags_sorted) // 2],
        "lag_records_max": lags_sorted[-1],
        "freshness_p50_ms": st["freshness_p50_ms"],
        "freshness_p99_ms": st["freshness_p99_ms"],
        "flush_p50_s": st["flush_p50_s"],
        "flushes": st["flushes"],
        "flush_records_p50": st["flush_records_p50"],
        "pushes": st["pushes"],
        "batch": {
            "events": cfg.ingest.batch_events,
            "max_events": cfg.ingest.batch_max_events,
            "min_s": cfg.ingest.flush_min_s,
            "interval_s": cfg.ingest.flush_interval_s,
            "stats_push_s": cfg.ingest.stats_push_s,
        },
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def group_lag(admin: Any, bootstrap: str, group: str, topics: list[str]) -> int:
    from recloop.kafka_io import end_offsets

    committed = admin.list_group_offsets({group: None}).get(group, {})
    lag = 0
    for t in topics:
        for p, end in end_offsets(bootstrap, t).items():
            off = next(
                (o.offset for tp, o in committed.items() if tp.topic == t and tp.partition == p), 0
            )
            lag += max(0, end - max(off, 0))
    return lag


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sessions", type=int, default=20000, help="backlog sessions (11 records each)"
    )
    ap.add_argument("--rate", type=float, default=60.0, help="live sessions per second")
    ap.add_argument("--live-s", type=float, default=60.0, help="0: the backlog alone")
    ap.add_argument(
        "--clients", default="kafka-python,confluent", help="Kafka clients to measure (comma)"
    )
    ap.add_argument("--runs", type=int, default=RUNS, help="bare reads and drains per client")
    ap.add_argument("--out", type=Path, default=RESULTS / "ingest.json")
    args = ap.parse_args()

    from actors.ingestor import TOPICS
    from recloop.kafka_io import CLIENTS, EventProducer
    from recloop.stack import Stack, isolated_config

    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    unknown = sorted(set(clients) - set(CLIENTS))
    if unknown:
        ap.error(f"unknown client(s) {unknown}; of {CLIENTS}")
    home = Path(tempfile.mkdtemp(prefix="rl-bi-", dir="/tmp"))
    cfg = isolated_config(home)
    stack = Stack(cfg)
    out: dict[str, Any] = {
        "machine": platform.platform(),
        "session_len": SESSION,
        "clients": clients,
        # What both the ingestor and the bare consumer poll and fetch
        "consumer": {
            "max_poll_records": cfg.ingest.batch_events,
            "fetch_partition_bytes": cfg.ingest.fetch_partition_bytes,
        },
    }
    try:
        stack.up(_say)
        boot = cfg.kafka.bootstrap
        t0 = int(time.time() * 1000) - 3_600_000
        records = 0
        started = time.perf_counter()
        with EventProducer(boot) as prod:
            for imp, fbs in sessions(args.sessions, 0, t0, "b"):
                prod.send(imp)
                for fb in fbs:
                    prod.send(fb)
                records += 1 + len(fbs)
            prod.flush()
        produce_s = time.perf_counter() - started
        _say(f"backlog: {records} records produced in {produce_s:.1f} s")

        raws: dict[str, list[float]] = {c: [] for c in clients}
        runs: dict[str, list[dict]] = {c: [] for c in clients}
        for i in range(args.runs):  # interleaved: each drain right after its bare read
            for c in clients:
                raws[c].append(raw_read(boot, list(TOPICS), records, c, cfg.ingest))
                runs[c].append(backlog_run(cfg, c, f"backlog{i}"))
                _say(
                    f"backlog ({c}, run {i + 1}/{args.runs}): bare {records / raws[c][-1]:,.0f} "
                    f"records/s, ingestor {runs[c][-1]['records_per_s']:,.0f} records/s"
                )
        out["backlog"] = {c: backlog(c, records, raws[c], runs[c]) for c in clients}
        for c in clients:
            _say(f"backlog ({c}): {json.dumps(out['backlog'][c])}")
        out["live"] = {}
        for k, c in enumerate(clients if args.live_s > 0 else []):  # 0: backlog only
            out["live"][c] = live(cfg, c, args.rate, args.live_s, seed=1 + k)
            _say(f"live ({c}): {json.dumps(out['live'][c])}")
    finally:
        stack.down(_say)
        shutil.rmtree(home, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
