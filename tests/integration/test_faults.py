"""Fault injection on real parts: the Kafka broker killed and restarted during traffic.

Each test brings up what it breaks on its own ports and home (a broker of its own, a
Feast store of its own), so the session stack that other tests share is never touched.
Every fault is bounded (timeouts everywhere) and loopback only. Each test records what
it measured through ``fault_record``; ``python -m benchmarks.faults`` runs this module
and renders the records as the table of docs/operations.md ("Faults survived").
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from recloop.config import StackConfig
from tests.conftest import broker_and_feast
from tests.integration.test_ingest import _session, client

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

USERS = range(920_000, 920_040)


@pytest.fixture(scope="module")
def own_stack() -> Iterator[StackConfig]:
    """A broker and a Feast store of this module's own (no Ray: nothing here needs it)."""
    with broker_and_feast("flt") as cfg:
        yield cfg


def _kill_broker(cfg: StackConfig) -> int:
    from recloop.broker import KafkaBroker

    broker = KafkaBroker(cfg)
    pid = broker.pid()
    assert pid is not None, "the broker is not running"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    broker.pid_file.unlink(missing_ok=True)
    return pid


def test_broker_killed_and_restarted_during_traffic_loses_and_duplicates_nothing(
    own_stack: StackConfig, tmp_path, fault_record
) -> None:
    """kill -9 of the broker while producers send and the ingestor consumes: producers
    retry, the ingestor rejoins its group, and the lake holds every session exactly
    once with all of its feedback; the topics hold every event exactly once."""
    from actors.ingestor import Ingestor
    from recloop.broker import KafkaBroker
    from recloop.kafka_io import EventProducer, end_offsets, read_range
    from recloop.lake import SESSIONS, Lake
    from recloop.topics import IMPRESSIONS, INTERACTIONS

    cfg = dataclasses.replace(
        own_stack,
        ingest=dataclasses.replace(
            own_stack.ingest,
            client=client(),
            group_id=f"faults-{uuid.uuid4().hex[:6]}",
            lake_dir=tmp_path / "lake",
            flush_interval_s=0.3,
            join_window_ms=10 * 60_000,
            max_wait_s=60.0,  # nothing closes by wall time: every session must be complete
            progress_s=0,
        ),
    )
    prefix = f"brk-{uuid.uuid4().hex[:6]}"
    starts = {t: end_offsets(cfg.kafka.bootstrap, t) for t in (IMPRESSIONS.name, INTERACTIONS.name)}
    t0 = int(time.time() * 1000) - 600_000
    rounds = 6
    plan = [_session(prefix, u, k, t0 + k * 60_000 + u) for k in range(rounds) for u in USERS]

    stop = threading.Event()
    ingestor = Ingestor(cfg, 0, lambda _: None)
    ing_out: dict = {}
    ing = threading.Thread(target=lambda: ing_out.update(ingestor.run(stop=stop)), daemon=True)
    ing.start()

    futures: list = []
    acked_at: list[float] = []
    sent_at: list[float] = []
    killed = threading.Event()
    restarted: dict[str, float] = {}

    def produce() -> None:
        with EventProducer(cfg.kafka.bootstrap, client_id="faults") as prod:
            for i, (imp, fbs) in enumerate(plan):
                for ev in (imp, *fbs):
                    f = prod.send(ev)
                    f.add_callback(lambda _md: acked_at.append(time.monotonic()))
                    futures.append(f)
                sent_at.append(time.monotonic())
                if i == len(plan) // 3:
                    killed.set()
                time.sleep(0.02)
            prod.flush(timeout_s=180)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    assert killed.wait(120), "the producer did not get a third of the way"
    pid = _kill_broker(cfg)
    down_at = time.monotonic()
    time.sleep(3.0)  # traffic keeps coming while the broker is down
    broker = KafkaBroker(cfg)
    broker.start()
    restarted["at"] = time.monotonic()
    producer.join(240)
    assert not producer.is_alive(), "the producer did not finish"

    failed = [f for f in futures if f.failed()]
    assert not failed, f"{len(failed)} sends failed, first: {failed[0].exception!r}"
    first_ack_after = min((t for t in acked_at if t >= restarted["at"]), default=None)
    assert first_ack_after is not None

    # The topics hold every event once (the idempotent producer dropped its retries).
    for topic, want in (
        (IMPRESSIONS.name, {imp.event_id for imp, _ in plan}),
        (INTERACTIONS.name, {fb.event_id for _, fbs in plan for fb in fbs}),
    ):
        events, invalid = read_range(
            cfg.kafka.bootstrap, topic, starts[topic], end_offsets(cfg.kafka.bootstrap, topic)
        )
        ids = [e.event_id for e in events if e.event_id in want]
        assert not invalid and len(ids) == len(want) and set(ids) == want, topic

    # The lake gets every session exactly once, each with all its feedback.
    lake = Lake(cfg.lake_dir)
    want_rids = {imp.request_id for imp, _ in plan}
    deadline = time.monotonic() + 180
    rows: list[dict] = []
    while time.monotonic() < deadline:
        rows = [r for r in lake.read(SESSIONS).to_pylist() if r["request_id"] in want_rids]
        if len(rows) >= len(want_rids):
            break
        time.sleep(1.0)
    stop.set()
    ing.join(60)
    rids = [r["request_id"] for r in rows]
    assert len(rids) == len(set(rids)) == len(want_rids), (len(rids), len(set(rids)))
    sizes = {imp.request_id: len(imp.items) for imp, _ in plan}
    assert all(r["n_feedback"] == sizes[r["request_id"]] for r in rows)
    assert ing_out.get("open_sessions", 0) == 0

    events_sent = len(futures)
    rate = len(plan) / (sent_at[-1] - sent_at[0])
    fault_record(
        fault="Kafka broker kill -9 and restart during traffic",
        load=f"{len(plan)} sessions, {events_sent} events at ~{rate:.0f} sessions/s",
        survived=True,
        produced=events_sent,
        landed=sum(1 + r["n_feedback"] for r in rows),
        recovery_s=round(first_ack_after - down_at, 2),
        detail=f"broker pid {pid} killed; down {restarted['at'] - down_at:.1f} s incl. restart; "
        f"first ack {first_ack_after - restarted['at']:.2f} s after it answered again",
    )
