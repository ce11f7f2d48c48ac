"""The ingestor on the real broker and Feast store: exactly once through crashes.

Events of this test use their own user ids and request-id prefix; the topics are the
stack's, so other tests' events are ingested too and the assertions look at ours only.
The ingestor runs as a subprocess (``python -m actors.ingestor``) so a crash is a real
process exit in the middle of a flush.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

from recloop.config import PROJECT_ROOT, StackConfig
from recloop.events import DeadLetter, Impression, Interaction, ServedItem
from recloop.lake import ORPHANS, SESSIONS, Lake

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USERS = range(910_000, 910_012)
ITEMS = 5


def _session(prefix: str, user: int, k: int, t: int) -> tuple[Impression, list[Interaction]]:
    rid = f"{prefix}-{user}-{k}"
    items = [1 + (user * 7 + k * 3 + p) % 40 for p in range(ITEMS)]
    items = list(dict.fromkeys(items))
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
        clicked = (user + k + p) % 3 == 0
        fbs.append(
            Interaction(
                event_id=f"{rid}-{p}",
                event_time_ms=t + 1000 * (p + 1),
                request_id=rid,
                user_id=user,
                item_id=i,
                position=p,
                arm="online",
                model_version="v1",
                clicked=clicked,
                watch_time_s=10.0 * (p + 1) if clicked else 0.0,
                liked=clicked and p == 0,
                followed=clicked and k == 1,
            )
        )
    return imp, fbs


def client() -> str:
    """The Kafka client the ingestor tests run on: ``ingest.client``'s default, or
    RECLOOP_TEST_INGEST_CLIENT (to run them on the other one)."""
    from recloop.config import IngestConfig

    return os.environ.get("RECLOOP_TEST_INGEST_CLIENT") or IngestConfig.client


def _config(stack: StackConfig, tmp: Path, prefix: str, **ingest) -> StackConfig:
    """The stack with this test's own consumer group and lake, and quick flushes."""
    values = dict(
        client=client(),
        group_id=f"ingest-{prefix}",
        lake_dir=tmp / "lake",
        flush_interval_s=0.3,
        join_window_ms=10 * 60_000,
        max_wait_s=2.0,
        progress_s=0,
    )
    values.update(ingest)
    return dataclasses.replace(stack, ingest=dataclasses.replace(stack.ingest, **values))


def _run(cfg_path: Path, crash: str | None, out: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("RECLOOP_INGEST_CRASH", None)
    if crash:
        env["RECLOOP_INGEST_CRASH"] = crash
    cmd = [sys.executable, "-m", "actors.ingestor", "--config", str(cfg_path), "--until-idle", "4"]
    if out is not None:
        cmd += ["--json", str(out)]
    return subprocess.run(
        cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.faults
def test_exactly_once_through_crashes(stack: StackConfig, tmp_path: Path, fault_record) -> None:
    from features.store import open_store
    from recloop.kafka_io import EventProducer, end_offsets, read_range

    prefix = f"it-{uuid.uuid4().hex[:8]}"
    cfg = _config(stack, tmp_path, prefix, batch_events=25, snapshot_every=3)
    cfg_path = tmp_path / "stack.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    dlq_start = end_offsets(cfg.kafka.bootstrap, "recloop.dlq")

    t0 = int(time.time() * 1000) - 3_600_000
    sessions = {u: [_session(prefix, u, k, t0 + k * 120_000 + u) for k in range(3)] for u in USERS}
    expected: dict[str, Impression] = {}
    with EventProducer(cfg.kafka.bootstrap) as prod:

        def send(k_range: range) -> None:
            for u in USERS:
                for k in k_range:
                    imp, fbs = sessions[u][k]
                    expected[imp.request_id] = imp
                    if u == USERS[0] and k == 0:  # feedback ahead of its impression
                        prod.send(fbs[0])
                        prod.send(imp)
                        rest = fbs[1:]
                    else:
                        prod.send(imp)
                        rest = fbs
                    for fb in rest:
                        prod.send(fb)
            prod.flush()

        send(range(0, 2))
        prod.send(sessions[USERS[1]][0][1][2])  # a duplicate of one piece of feedback
        bad = json.dumps({"user_id": USERS[2], "clicked": "maybe", "tag": prefix}).encode()
        prod.send_raw("recloop.interactions", bad, key=str(USERS[2]).encode())
        prod.flush()

        crashes = 0
        # Crash in the middle of a flush that closes sessions: after its orphans were
        # appended (before the commit point: rolled back at the restart), then after the
        # Feast push (committed, Kafka's offsets not).
        for crash in ("after-files:1", "after-feast:1"):
            r = _run(cfg_path, crash)
            assert r.returncode == 17, r.stderr[-3000:]
            assert "injected crash" in r.stderr
            crashes += 1

        # A clean run to the end of what was sent: every session so far is closed and
        # committed, so the feedback below is late for a session the ingestor remembers
        # (read in one run with its session's own records, it would be a duplicate).
        r = _run(cfg_path, None)
        assert r.returncode == 0, r.stderr[-3000:]
        send(range(2, 3))
        # Late feedback: its session closed long ago (its user's clock is past it).
        late = sessions[USERS[3]][0][1][0].model_copy(
            update={"event_id": f"{prefix}-late", "event_time_ms": t0 + 700_000}
        )
        prod.send(late)
        mover = _session(prefix, USERS[3], 9, t0 + 2 * 3_600_000)[0]
        expected[mover.request_id] = mover  # moves its user's clock; gets no feedback
        prod.send(mover)
        prod.flush()
        r = _run(cfg_path, "after-commit:1")  # crash after the commit, before Kafka's
        assert r.returncode == 17, r.stderr[-3000:]
        crashes += 1
    r = _run(cfg_path, None, tmp_path / "stats.json")
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((tmp_path / "stats.json").read_text())

    lake = Lake(cfg.lake_dir)
    table = lake.read(SESSIONS)
    ours = table.filter(pc.starts_with(table.column("request_id"), prefix)).to_pylist()
    ids = [r["request_id"] for r in ours]
    assert sorted(ids) == sorted(expected), "every impression exactly once"
    by_id = {r["request_id"]: r for r in ours}
    for rid, imp in expected.items():
        row = by_id[rid]
        if rid.endswith("-9"):
            continue  # no feedback was sent for it
        assert row["n_feedback"] == len(imp.items), (rid, row["closed_by"])
        assert row["items"] == [it.item_id for it in imp.items]
    orphans = lake.read(ORPHANS).to_pylist()
    assert [o["event_id"] for o in orphans if o["event_id"].startswith(prefix)] == [late.event_id]
    assert stats["open_sessions"] == 0  # the dead letter is checked on its topic below
    # Where its time went: this last run waited for records, flushed and committed
    phases = stats["phase_s"]
    for phase in ("poll:empty", "flush:close", "flush:commit"):
        assert phases.get(phase, 0) > 0, phases

    # The malformed record is in the dead-letter topic with its reason.
    letters, _ = read_range(
        cfg.kafka.bootstrap,
        "recloop.dlq",
        dlq_start,
        end_offsets(cfg.kafka.bootstrap, "recloop.dlq"),
    )
    mine = [d for d in letters if isinstance(d, DeadLetter) and prefix.encode() in d.raw_value]
    assert mine and "invalid Interaction" in mine[0].reason

    # Feast holds exactly what the lake says, per user (the crashes pushed some of these
    # sessions before their commit: absolute values make the replays harmless).
    store = open_store(cfg)
    feats = store.get_online_features(
        features=[
            "user_stats:impressions",
            "user_stats:clicks",
            "user_stats:watch_time_s",
            "user_stats:likes",
            "user_stats:follows",
            "user_history:item_ids",
        ],
        entity_rows=[{"user_id": u} for u in USERS],
    ).to_dict()
    for i, u in enumerate(USERS):
        rows = sorted((r for r in ours if r["user_id"] == u), key=lambda r: r["event_time_ms"])
        assert feats["impressions"][i] == sum(len(r["items"]) for r in rows), u
        assert feats["clicks"][i] == sum(r["clicks"] for r in rows), u
        assert feats["watch_time_s"][i] == pytest.approx(sum(r["session_watch_s"] for r in rows))
        assert feats["likes"][i] == sum(r["likes"] for r in rows)
        assert feats["follows"][i] == sum(r["follows"] for r in rows)
        clicked = [it for r in rows for it, c in zip(r["items"], r["clicked"], strict=True) if c]
        assert list(feats["item_ids"][i] or []) == clicked[-cfg.ingest.history_len :], u
        # each session's lake history is what the user had before it
        for k, r in enumerate(rows):
            before = [
                it for q in rows[:k] for it, c in zip(q["items"], q["clicked"], strict=True) if c
            ]
            assert r["history"] == before[-cfg.ingest.history_len :]
    sent = len(expected) + sum(
        len(imp.items) for rid, imp in expected.items() if not rid.endswith("-9")
    )
    fault_record(
        fault="ingestor killed mid-flush (after the orphans append, after the Feast push, "
        "after the lake commit)",
        load=f"{len(expected)} sessions of {len(USERS)} users, a duplicate, a late and a "
        "malformed event",
        survived=True,
        produced=sent,
        landed=sum(1 + r["n_feedback"] for r in ours),
        detail=f"{crashes} crashes (os._exit) and restarts; every session once in the lake, "
        "Feast equal to the lake per user",
    )


def test_two_consumers_split_the_partitions_and_rebalances_lose_nothing(
    stack: StackConfig, tmp_path: Path
) -> None:
    """Members of one group while traffic flows: one member alone, a second joins (the
    group rebalances), both own some partitions, the first leaves (it rebalances again).
    The lake holds every session exactly once, whoever owned its partition."""
    import threading

    from actors.ingestor import Ingestor
    from recloop.kafka_io import EventProducer

    prefix = f"two-{uuid.uuid4().hex[:8]}"
    cfg = _config(stack, tmp_path, prefix)
    t0 = int(time.time() * 1000) - 600_000
    expected = {}
    lake = Lake(cfg.lake_dir)

    def produce(users: range) -> None:
        with EventProducer(cfg.kafka.bootstrap) as prod:
            for u in users:
                imp, fbs = _session(prefix, u, 0, t0 + u % 1000)
                expected[imp.request_id] = imp
                prod.send(imp)
                for fb in fbs:
                    prod.send(fb)
            prod.flush()

    def landed() -> list[str]:
        table = lake.read(SESSIONS, columns=["request_id"])
        return [r for r in table.column("request_id").to_pylist() if r.startswith(prefix)]

    def wait_all(timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while len(set(landed())) < len(expected) and time.monotonic() < deadline:
            time.sleep(1)

    members = [Ingestor(cfg, i, print) for i in range(2)]
    stops = [threading.Event() for _ in members]
    threads = [
        threading.Thread(target=m.run, args=(stop,), daemon=True)
        for m, stop in zip(members, stops, strict=True)
    ]
    produce(range(920_000, 920_020))
    threads[0].start()  # alone: owns every partition
    wait_all()
    threads[1].start()  # joins: the group rebalances while sessions keep coming
    produce(range(920_020, 920_040))
    wait_all()
    deadline = time.monotonic() + 60
    while not (members[0].assigned and members[1].assigned) and time.monotonic() < deadline:
        time.sleep(0.5)
    owned = [set(m.assigned) for m in members]
    assert owned[0] and owned[1] and not owned[0] & owned[1], owned
    stops[0].set()  # leaves: its partitions move to the other member
    threads[0].join(60)
    produce(range(920_040, 920_060))
    wait_all()
    time.sleep(2)  # the last flushes
    stops[1].set()
    threads[1].join(60)
    got = landed()
    assert len(expected) == 60
    assert sorted(got) == sorted(expected)  # each once: nothing lost, nothing twice
    assert {e.writer for e in lake.entries()} == {"ingestor-0", "ingestor-1"}
