"""The Kafka ingestor: impressions + feedback → Feast (online) and the lake, exactly once.

    recloop ingest                     # in the foreground, until Ctrl-C (progress every 5 s)
    recloop ingest --consumers 2 --detach   # long-lived actors of the stack's Ray cluster
    recloop ingest --until-idle 10     # stop after 10 s without records (tests, benchmarks)

A member of the consumer group ``ingest.group_id`` on ``recloop.impressions`` and
``recloop.interactions`` (range assignment: partition p of both topics goes to the same
member, which is where one user's impression and feedback are). Per micro-batch:

1. records are validated, each parsed once (invalid ones go to ``recloop.dlq`` with the
   reason, durably, before anything after them is committed), deduplicated and joined
   per partition (``actors.ingest_state``);
2. orphan feedback is appended to the lake's orphans table (Delta Lake; it counts once
   the commit point below lands, and is rolled back at the next start otherwise);
3. one state file holds every changed partition's state as a delta (a full snapshot
   every ``snapshot_every`` commits of a partition) with the offsets it covers, written
   and fsynced; then one commit of the sessions table adds the closed sessions and
   records the writer's progress (its seq as a Delta application transaction, the
   offsets and the state file in the commit's metadata): the commit point;
4. the touched users' history is pushed to the Feast online store (serving reads it per
   request); user and item counters are pushed every ``stats_push_s`` (and when the
   ingestor stops or gives a partition away). Values are absolute and come from
   committed state only, so the online store only ever holds committed state;
5. the offsets are committed to Kafka too (for lag monitoring; the lake is the truth).

Micro-batches adapt: while the consumer is behind, the record target doubles with each
flush (``batch_events`` up to ``batch_max_events``), so a backlog costs few flushes;
once it has caught up, a flush follows ``flush_min_s`` after the first unflushed record
(or three times the recent flush time, if that is longer), so features are fresh
without flushes taking more than about a third of the time; ``flush_interval_s`` bounds
the wait in any case.

After a crash anywhere in 2–5 the ingestor resumes from its last commit point: orphan
rows and state files written after it are removed, the state is restored (the last
snapshot, then the deltas after it), everything the state lists as not yet pushed
(users and items changed since their last push, saved with each commit) is pushed
again, and the consumer seeks to the committed offsets. So every event lands in the
lake exactly once and the Feast counters match the lake. Metrics: records/s, consumer
lag, and feature freshness (the record's Kafka timestamp, i.e. when the event was
produced, to its user's history being pushed into the online store).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from actors.ingest_state import (
    STAT_FIELDS,
    USER_FIELDS,
    Closed,
    Counters,
    Counts,
    Feedback,
    PartitionState,
    UserState,
    orphan_row,
    session_row,
    state_bytes,
)
from recloop.config import StackConfig
from recloop.lake import ORPHANS, SCHEMAS, SESSIONS, Entry, Lake, fsync_dir, write_atomic
from recloop.ray_head import ingestor_actor_name as actor_name
from recloop.topics import IMPRESSIONS, INTERACTIONS

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
TOPICS = (IMPRESSIONS.name, INTERACTIONS.name)
# "<point>:<n>": exit at the n-th flush that carries closed sessions past ``point``. Only
# such flushes count: how many flushes merely move offsets depends on the order in which
# the broker hands out the two topics, which no test controls.
CRASH_ENV = "RECLOOP_INGEST_CRASH"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(max(ms, 0) / 1000, UTC)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return float(v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))])


class Ingestor:
    def __init__(self, cfg: StackConfig, index: int = 0, say: Progress = print) -> None:
        self.cfg = cfg
        self.ic = cfg.ingest
        self.index = index
        self.writer = f"ingestor-{index}"
        self.say = say
        self.lake = Lake(cfg.lake_dir)
        removed = self.lake.remove_uncommitted(self.writer)
        if removed:
            say(f"{self.writer}: rolled back {removed} uncommitted row(s) of an earlier run")
        self.seq = self.lake.last_seq(self.writer)
        self._remove_uncommitted_state()
        self.states: dict[int, PartitionState] = {}
        self.changed: set[int] = set()
        self.outbox: list[tuple[int, Closed]] = []
        self.orphans: list[tuple[Feedback, str]] = []
        self.unflushed = 0
        self.first_unflushed: float | None = None
        self.last_flush = time.monotonic()
        self.last_stats_push = time.monotonic()
        self.last_upkeep = time.monotonic()
        self.records = 0
        self.flushes = 0
        self.started = time.monotonic()
        self.freshness_ms: deque[float] = deque(maxlen=20_000)
        # Called with each push's freshness figures (ms): the actor's Ray histogram.
        self.on_freshness: Callable[[list[float]], None] | None = None
        self.flush_s: deque[float] = deque(maxlen=1000)
        self.flush_records: deque[int] = deque(maxlen=1000)
        # Seconds spent in each phase of the work (poll, fold, and the flush's steps):
        # where an ingestor's time goes, in its stats and the ingest benchmark.
        self.phase_s: Counter[str] = Counter()
        self.retired = Counters()  # counters of partitions given away
        self.last_lag: dict[str, int] = {}
        self._unpushed: list[int] = []  # newest record time of committed, unpushed sessions
        self.feast_rows = 0
        self.pushes = {"history": 0, "stats": 0}
        self.assigned: list[int] = []  # partitions of the latest assignment
        self.last_error: str | None = None
        # Adaptive micro-batches (see the module doc).
        self.target_batch = self.ic.batch_events
        self.caught_up = True  # the last poll left nothing behind it
        self._flush_ewma_s = 0.0
        # The work clock: from the first record in hand to the last flush that did work.
        self.first_record_at: float | None = None
        self.last_commit_at: float | None = None
        self.tail_s = 0.0  # flush time after the last commit (final counter pushes)
        self._store: Any = None
        self._writer: Any = None  # features.store.OnlineWriter, made on first use
        self._reader: Any = None  # features.store.OnlineReader, made on first use
        self._consumer: Any = None
        self._foreign: dict[int, tuple[int, PartitionState]] = {}  # p -> (pseq, items)
        self._docs: dict[str, dict[str, Any]] = {}  # state files read (they never change)
        self._fatal: str | None = None
        self._crash = self._parse_crash(os.environ.get(CRASH_ENV))
        self._crash_seen: dict[str, int] = {}

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phase_s[phase] += time.perf_counter() - t

    def _remove_uncommitted_state(self) -> None:
        """State files of this writer newer than its last commit (a crash before it)."""
        d = self.lake.state_dir
        if not d.is_dir():
            return
        for f in d.glob(f"{self.writer}-*.json"):
            seq = f.stem.rsplit("-", 1)[-1]
            if seq.isdigit() and int(seq) > self.seq:
                f.unlink(missing_ok=True)

    # ------------------------------------------------------------------ plumbing
    @staticmethod
    def _parse_crash(spec: str | None) -> tuple[str, int] | None:
        if not spec:
            return None
        point, _, n = spec.partition(":")
        return point, int(n or 1)

    def _maybe_crash(self, point: str, sessions: int) -> None:
        if self._crash is None or self._crash[0] != point or not sessions:
            return
        self._crash_seen[point] = self._crash_seen.get(point, 0) + 1
        if self._crash_seen[point] >= self._crash[1]:
            print(f"{self.writer}: injected crash at {point}", file=sys.stderr, flush=True)
            os._exit(17)

    @property
    def store(self) -> Any:
        if self._store is None:
            from features.store import open_store

            self._store = open_store(self.cfg)
        return self._store

    def _new_state(self, p: int) -> PartitionState:
        return PartitionState(p, self.ic.join_window_ms, self.ic.max_wait_s, self.ic.history_len)

    # ------------------------------------------------------------------ state restore
    def _partition_entries(self, p: int) -> list[tuple[int, Entry]]:
        key = str(p)
        found = [
            (int(e.partitions[key]["pseq"]), e) for e in self.lake.entries() if key in e.partitions
        ]
        return sorted(found, key=lambda x: x[0])

    def _state_doc(self, rel: str, p: int) -> dict[str, Any]:
        """Partition ``p``'s saved state in the state file ``rel`` (files are written
        once, so the parsed ones are kept, a few at a time)."""
        doc = self._docs.get(rel)
        if doc is None:
            path = self.lake.root / rel
            if path.is_dir():  # a state of the layout before one file per commit
                return _legacy_state(path)
            doc = json.loads(path.read_bytes())["partitions"]
            if len(self._docs) >= 8:
                self._docs.pop(next(iter(self._docs)))
            self._docs[rel] = doc
        return doc[str(p)]

    def restore(self, p: int, items_only: bool = False) -> PartitionState:
        """Partition ``p``'s state as of its last lake commit (fresh if it has none): its
        last snapshot, then every delta after it. What it lists as not yet pushed to the
        online store is pushed with the next flush (values are absolute)."""
        st = self._new_state(p)
        chain = self._partition_entries(p)
        if not chain:
            return st
        start = max(
            (i for i, (_, e) in enumerate(chain) if e.partitions[str(p)]["snapshot"]), default=0
        )
        for _, e in chain[start:]:
            st.load(self._state_doc(e.partitions[str(p)]["state"], p), items_only=items_only)
        last = self.lake.root / chain[-1][1].partitions[str(p)]["state"]
        if not items_only and last.is_dir():
            st.force_snapshot = True  # an earlier layout: start a chain of this one at once
        return st

    # ------------------------------------------------------------------ rebalance
    def _on_revoked(self, revoked: list[Any]) -> None:
        parts = {tp.partition for tp in revoked}
        if not parts:
            return
        try:
            self.flush(push_stats=True)
        except Exception as exc:  # the next owner resumes from the last commit anyway
            self.last_error = f"flush on revoke: {exc!r}"
            log.warning("%s: %s", self.writer, self.last_error)
        for p in parts:
            st = self.states.pop(p, None)
            if st is not None:
                self.retired.add(st.counters)
        self.outbox = [(p, c) for p, c in self.outbox if p not in parts]
        self.say(f"{self.writer}: gave up partition(s) {sorted(parts)}")

    def _on_assigned(self, assigned: list[Any]) -> dict[Any, int]:
        """Restore each assigned partition's state; returns where to read each topic
        partition from (the offsets of its last lake commit)."""
        self.assigned = sorted({tp.partition for tp in assigned})
        starts: dict[Any, int] = {}
        by_part: dict[int, dict[str, Any]] = {}
        for tp in assigned:
            by_part.setdefault(tp.partition, {})[tp.topic] = tp
        for p, tps in sorted(by_part.items()):
            if set(tps) != set(TOPICS):
                self._fatal = (
                    f"{self.writer}: partition {p} of {sorted(set(TOPICS) - set(tps))} went to "
                    f"another member: impressions and interactions need the same partition "
                    f"count and range assignment for the join"
                )
                return starts
            if p in self.states:
                continue
            st = self.restore(p)
            self.states[p] = st
            for topic, tp in tps.items():
                if topic in st.offsets:
                    starts[tp] = int(st.offsets[topic])
            where = ", ".join(f"{t.split('.')[-1]}@{o}" for t, o in sorted(st.offsets.items()))
            self.say(
                f"{self.writer}: partition {p} assigned, resuming from "
                f"{where or 'the group offsets'} ({len(st.users)} users, {len(st.open)} open)"
            )
        return starts

    # ------------------------------------------------------------------ records
    def handle(self, records: list[Any]) -> None:
        if not records:
            return
        wall = _now_ms()
        states = self.states
        changed = self.changed
        imp_topic = IMPRESSIONS.name
        for r in records:
            st = states.get(r.partition)
            if st is None:  # never drop a record: stop before its offset is committed
                raise RuntimeError(
                    f"{self.writer}: record of partition {r.partition} without its state "
                    f"({self._fatal or 'assignment not restored'})"
                )
            if r.topic == imp_topic:
                st.on_impression(r.event, r.timestamp_ms, wall)
            else:
                late = st.on_interaction(r.event, r.timestamp_ms, wall)
                if late is not None:
                    self.orphans.append((late, "late"))
            changed.add(r.partition)
        self.records += len(records)
        self.unflushed += len(records)
        if self.first_unflushed is None:
            self.first_unflushed = time.monotonic()
        if self.first_record_at is None:
            self.first_record_at = time.monotonic()

    def _lagging(self, polled: int) -> bool:
        """Whether records are left to read: a full poll, or a position behind the end
        of its partition as the last fetch saw it (no request to the broker)."""
        if polled >= self.ic.batch_events:
            return True
        if self._consumer is None:
            return False
        c = self._consumer
        try:
            for tp in c.assignment():
                hw = c.highwater(tp)
                if hw is not None and (pos := c.position(tp)) is not None and pos < hw:
                    return True
        except Exception:  # a rebalance in progress: say behind, the bound still holds
            return True
        return False

    def idle_delay_s(self) -> float:
        """How long a caught-up consumer lets records wait for a flush: ``flush_min_s``,
        or three flush times if flushes are slower (they take at most ~1/3 of the time)."""
        return min(self.ic.flush_interval_s, max(self.ic.flush_min_s, 3 * self._flush_ewma_s))

    def due(self) -> bool:
        if self.unflushed >= self.target_batch:
            return True
        now = time.monotonic()
        if self.first_unflushed is not None:
            age = now - self.first_unflushed
            if age >= self.ic.flush_interval_s:
                return True
            return self.caught_up and age >= self.idle_delay_s()
        if self._stats_pending() and now - self.last_stats_push >= self.ic.stats_push_s:
            return True  # counters of earlier flushes (or of a restore) wait for their push
        # Nothing new, but open sessions may have come due (window or wait).
        waiting = any(st.open or st.waiting for st in self.states.values())
        return waiting and now - self.last_flush >= self.ic.flush_interval_s

    # ------------------------------------------------------------------ flush
    def _bootstrap_users(self, users: dict[int, list[int]]) -> None:
        """Users seen for the first time start from what the online store holds."""
        todo = sorted({u for u, ps in users.items() for p in ps if u not in self.states[p].users})
        if not todo:
            return
        if self._reader is None:
            from features.store import OnlineReader

            self._reader = OnlineReader(self.store)
        hist = self._reader.read(
            "user_history", todo, ["item_ids", "history_len", "history_until_ms"]
        )
        stats = self._reader.read("user_stats", todo, [*STAT_FIELDS, "stats_until_ms"])

        def col(row: dict[str, Any], name: str, default: Any) -> Any:
            v = row[name]
            return default if v is None else v

        for u, h, s in zip(todo, hist, stats, strict=True):
            st = UserState(
                history=[int(x) for x in col(h, "item_ids", [])],
                history_len=int(col(h, "history_len", 0)),
                history_base_ms=int(col(h, "history_until_ms", -1)),
                stats_base_ms=int(col(s, "stats_until_ms", -1)),
                impressions=int(col(s, "impressions", 0)),
                clicks=int(col(s, "clicks", 0)),
                watch_time_s=float(col(s, "watch_time_s", 0.0)),
                likes=int(col(s, "likes", 0)),
                follows=int(col(s, "follows", 0)),
            )
            st.last_event_ms = max(st.history_base_ms, st.stats_base_ms)
            for p in users[u]:
                self.states[p].users.setdefault(u, st)

    def _item_totals(self, items: set[int]) -> dict[int, Counts]:
        """Counts summed over every partition: owned ones from memory, others from the
        lake (their last commit)."""
        totals = {i: Counts() for i in items}
        states = list(self.states.values())
        if self._consumer is not None:
            known = self._consumer.partitions(IMPRESSIONS.name)
            for p in sorted(set(known) - set(self.states)):
                chain = self._partition_entries(p)
                if not chain:
                    continue
                pseq = chain[-1][0]
                if self._foreign.get(p, (-1, None))[0] != pseq:
                    self._foreign[p] = (pseq, self.restore(p, items_only=True))
                states.append(self._foreign[p][1])
        for st in states:
            for i in items:
                c = st.items.get(i)
                if c is not None:
                    t = totals[i]
                    for k in STAT_FIELDS:
                        setattr(t, k, getattr(t, k) + getattr(c, k))
        return totals

    def _stats_pending(self) -> bool:
        return any(st.pending_stats or st.pending_items for st in self.states.values())

    def _write(self, source: str, rows: list[dict[str, Any]]) -> None:
        """Rows to a push source: straight to the online store, or through Feast's push
        when the offline store gets them too (``ingest.offline_push``)."""
        if self.ic.offline_push:
            import pandas as pd

            from features.store import push

            push(self.store, source, pd.DataFrame(rows), offline=True)
            return
        if self._writer is None:
            from features.store import OnlineWriter

            self._writer = OnlineWriter(self.store)
        self._writer.write(source, rows)

    def _push_history(self) -> int:
        """Every owned user whose history changed since its last push (every flush)."""
        pushed = [(st, set(st.pending_history)) for st in self.states.values()]
        rows = [
            {
                "user_id": u,
                "item_ids": s.history,
                "history_len": s.history_len,
                "history_until_ms": s.last_event_ms,
                "event_timestamp": _ts(s.last_event_ms),
            }
            for st, us in pushed
            for u in sorted(us)
            if (s := st.users.get(u)) is not None
        ]
        if rows:
            self._write("user_history_push", rows)
            self.pushes["history"] += 1
        for st, us in pushed:
            st.pending_history -= us
        return len(rows)

    def _push_stats(self, wall_ms: int) -> int:
        """Every owned user's and item's counters changed since their last push."""
        pushed = [(st, set(st.pending_stats), set(st.pending_items)) for st in self.states.values()]
        users = [
            {
                "user_id": u,
                **{k: getattr(s, k) for k in STAT_FIELDS},
                "stats_until_ms": s.last_event_ms,
                "event_timestamp": _ts(s.last_event_ms),
            }
            for st, us, _ in pushed
            for u in sorted(us)
            if (s := st.users.get(u)) is not None
        ]
        if users:
            self._write("user_stats_push", users)
        dirty_items = set().union(*(its for _, _, its in pushed))
        items: list[dict[str, Any]] = []
        if dirty_items:
            totals = self._item_totals(dirty_items)
            # Totals over every partition, as of this push: stamped with the wall clock,
            # not an event time. A client's clock (year 9999, say) would otherwise stamp
            # everyone's item rows, and a store that keeps the newest stamp (Redis) would
            # then refuse every later push of those items.
            now = _ts(wall_ms)
            items = [
                {"item_id": i, **vars(totals[i]), "event_timestamp": now} for i in sorted(totals)
            ]
            self._write("item_stats_push", items)
        if users or items:
            self.pushes["stats"] += 1
        for st, us, its in pushed:
            st.pending_stats -= us
            st.pending_items -= its
        self.last_stats_push = time.monotonic()
        return len(users) + len(items)

    def flush(self, push_stats: bool = False) -> Entry | None:
        """Close what is due; commit it to the lake (files, state, offsets); push the
        changed users' history to Feast (and the counters when they are due, or
        ``push_stats``); commit the offsets to Kafka. Safe to call again after it
        raised: nothing is applied twice, and what was not pushed is pushed then."""
        if not self.states:
            return None
        t0 = self.last_flush = time.monotonic()
        wall = _now_ms()
        lagging = not self.caught_up
        n = self.unflushed
        # Positions first: every record before them has been folded into the state (the
        # dead-lettered ones included, so they are not read again).
        consumer = self._consumer
        positions: dict[int, dict[str, int]] = {}
        with self._timed("flush:close"):
            if consumer is not None:
                for tp in consumer.assignment():
                    if tp.partition in self.states and (pos := consumer.position(tp)) is not None:
                        positions.setdefault(tp.partition, {})[tp.topic] = pos
            for p, pos in positions.items():
                if any(self.states[p].offsets.get(t) != o for t, o in pos.items()):
                    self.changed.add(p)
            behind = self._behind(wall)
            for p, st in self.states.items():
                closed, orphans = st.close_due(wall, caught_up=p not in behind)
                self.outbox.extend((p, c) for c in closed)
                self.orphans.extend(orphans)
                if closed or orphans:
                    self.changed.add(p)
        entry = None
        if self.changed or self.outbox or self.orphans:
            entry = self._commit_lake(positions)
        self.unflushed, self.first_unflushed = 0, None
        # Bigger batches while behind (few flushes for a backlog), the base size after.
        self.target_batch = (
            min(self.ic.batch_max_events, self.target_batch * 2)
            if lagging
            else self.ic.batch_events
        )
        with self._timed("flush:push"):
            pushed = self._push_pending(wall, push_stats)
        t1 = time.monotonic()
        if entry is not None:
            self.flushes += 1
            self.flush_s.append(t1 - t0)
            self.flush_records.append(n)
            self._flush_ewma_s = 0.8 * self._flush_ewma_s + 0.2 * (t1 - t0)
            if consumer is not None:
                with self._timed("flush:kafka"):
                    self._commit_kafka(entry.partitions)
            self.last_commit_at, self.tail_s = time.monotonic(), 0.0
        elif pushed:
            self.tail_s += t1 - t0
        return entry

    def _commit_lake(self, positions: dict[int, dict[str, int]]) -> Entry:
        """Orphans to their table, then one state file with every changed partition's
        state (a delta, or a snapshot) and the offsets, fsynced, then the commit of the
        sessions table that adds the closed sessions and makes all of it count."""
        users: dict[int, list[int]] = {}
        with self._timed("flush:apply"):
            for p, c in self.outbox:
                if c.history is None:
                    users.setdefault(c.session.user_id, []).append(p)
            self._bootstrap_users(users)
            for p, c in self.outbox:
                if c.history is None:
                    self.states[p].apply(c)

        seq = self.seq + 1
        sync: set[Any] = set()
        with self._timed("flush:rows"):
            rows = [session_row(c) for _, c in self.outbox]
            sessions = pa.Table.from_pylist(rows, SCHEMAS[SESSIONS])
            orphans = pa.Table.from_pylist(
                [orphan_row(f, why) for f, why in self.orphans], SCHEMAS[ORPHANS]
            )
        # Sessions wait for the commit point; orphans are appended to their table now
        # (rolled back at the next start unless the commit point lands).
        with self._timed("flush:files"):
            files = self.lake.write_files(SESSIONS, sessions, self.writer, seq)
            files += self.lake.write_files(ORPHANS, orphans, self.writer, seq)
        self._maybe_crash("after-files", sessions.num_rows)

        with self._timed("flush:state"):
            parts: dict[str, dict[str, Any]] = {}
            docs: dict[str, dict[str, Any]] = {}
            rel = f"{self.lake.state_dir.name}/{self.writer}-{seq:08d}.json"
            for p in sorted(self.changed):
                st = self.states[p]
                pseq = st.pseq + 1
                snapshot = pseq == 1 or pseq % self.ic.snapshot_every == 0 or st.force_snapshot
                doc = st.encode(full=snapshot)
                doc["pseq"] = pseq
                doc["offsets"] = {**st.offsets, **positions.get(p, {})}
                docs[str(p)] = doc
                parts[str(p)] = {
                    "pseq": pseq,
                    "offsets": doc["offsets"],
                    "state": rel,
                    "snapshot": snapshot,
                    "watermark_ms": st.watermark_ms,
                }
            if docs:
                data = {"writer": self.writer, "seq": seq, "partitions": docs}
                write_atomic(self.lake.root / rel, state_bytes(data), sync)
            for d in sorted(sync):
                fsync_dir(d)
        entry = Entry(
            writer=self.writer,
            seq=seq,
            committed_at_ms=_now_ms(),
            files=files,
            partitions=parts,
            counts={"sessions": sessions.num_rows, "orphans": orphans.num_rows},
        )
        with self._timed("flush:commit"):
            self.lake.commit(entry)
        self._maybe_crash("after-commit", sessions.num_rows)

        # Committed: the in-memory view moves on (the Feast push follows).
        self.seq = seq
        for p in self.changed:
            st = self.states[p]
            st.pseq = parts[str(p)]["pseq"]
            st.offsets = parts[str(p)]["offsets"]
            st.force_snapshot = False
            st.committed()
        for _, c in self.outbox:
            s = c.session
            self._unpushed.append(
                max([s.record_ts_ms, *(f.record_ts_ms for f in s.feedback.values())])
            )
        self.outbox, self.orphans = [], []
        self.changed = set()
        return entry

    def _push_pending(self, wall_ms: int, push_stats: bool = False) -> bool:
        """Push the users whose history changed (committed sessions only: the online
        store only ever holds committed state, so a user first seen after a crash
        starts from values that do not include what the lake does not), and the
        counters when due. Returns whether anything was pushed."""
        rows = self._push_history()
        pushed_ms = _now_ms()
        sessions = len(self._unpushed)
        fresh = [pushed_ms - ts for ts in self._unpushed]
        self.freshness_ms.extend(fresh)
        if self.on_freshness is not None and fresh:
            self.on_freshness(fresh)
        self._unpushed = []
        stats_due = time.monotonic() - self.last_stats_push >= self.ic.stats_push_s
        if (push_stats or stats_due) and self._stats_pending():
            rows += self._push_stats(wall_ms)
        self.feast_rows += rows
        self._maybe_crash("after-feast", sessions)
        return rows > 0

    def _behind(self, wall_ms: int) -> set[int]:
        """Partitions with records still unread, among those with an open session that
        waited ``max_wait_s`` (asking the broker only then)."""
        if self._consumer is None:
            return set()
        parts = {p for p, st in self.states.items() if st.waits_expired(wall_ms)}
        if not parts:
            return set()
        c = self._consumer
        tps = [tp for tp in c.assignment() if tp.partition in parts]
        ends = c.end_offsets(tps)
        return {tp.partition for tp in tps if (c.position(tp) or 0) < ends[tp]}

    def _commit_kafka(self, parts: dict[str, dict[str, Any]]) -> None:
        offsets = {
            (topic, int(p)): int(off)
            for p, rec in parts.items()
            for topic, off in rec["offsets"].items()
        }
        try:
            self._consumer.commit_offsets(offsets)
        except Exception as exc:  # a rebalance in progress: the lake holds the offsets
            self.last_error = f"kafka commit: {exc!r}"

    # ------------------------------------------------------------------ metrics
    def lag(self, exact: bool = True) -> dict[str, int] | None:
        """Records not yet read, per topic; None when the broker does not answer (it is
        restarting, say): the consumer reconnects by itself, and nothing is idle then.
        Not ``exact``: against the partitions' ends as the last fetch saw them (no
        request to the broker; the progress line's figure)."""
        if self._consumer is None:
            return {}
        c = self._consumer
        tps = c.assignment()
        if not tps:
            return {}
        ends: dict[Any, int] = {}
        if not exact:
            ends = {tp: hw for tp in tps if (hw := c.highwater(tp)) is not None}
        if len(ends) < len(tps):
            try:
                ends = c.end_offsets(tps)
            except Exception as exc:  # KafkaTimeoutError and friends: the broker is away
                self.last_error = f"lag: {exc!r}"[:500]
                return None
        out: dict[str, int] = {}
        for tp in tps:
            key = tp.topic.split(".")[-1]
            pos = c.position(tp)
            behind = 0 if pos is None else max(0, int(ends[tp]) - pos)
            out[key] = out.get(key, 0) + behind
        return out

    def stats(self) -> dict[str, Any]:
        counters = Counters()
        counters.add(self.retired)
        for st in self.states.values():
            counters.add(st.counters)
        elapsed = max(1e-9, time.monotonic() - self.started)
        fresh = list(self.freshness_ms)
        dlq = self._consumer.stats.dead_lettered if self._consumer is not None else 0
        work = None
        if self.first_record_at is not None and self.last_commit_at is not None:
            work = max(1e-9, self.last_commit_at - self.first_record_at + self.tail_s)
        return {
            "writer": self.writer,
            "partitions": sorted(self.states),
            "records": self.records,
            "records_per_s": self.records / elapsed,
            "flushes": self.flushes,
            "seq": self.seq,
            "dead_lettered": dlq,
            **vars(counters),
            "open_sessions": sum(len(st.open) for st in self.states.values()),
            "lag": self.last_lag,  # measured by the consuming thread (see run)
            "freshness_p50_ms": _pct(fresh, 0.5),
            "freshness_p99_ms": _pct(fresh, 0.99),
            "flush_p50_s": _pct(list(self.flush_s), 0.5),
            "phase_s": {k: round(v, 3) for k, v in sorted(self.phase_s.items())},
            "flush_records_p50": _pct([float(n) for n in self.flush_records], 0.5),
            "flush_records_max": max(self.flush_records, default=None),
            "pushes": dict(self.pushes),
            "feast_rows": self.feast_rows,
            "last_error": self.last_error,
            "elapsed_s": elapsed,
            # First record in hand → last commit (plus the pushes that followed it).
            "work_s": work,
            "work_records_per_s": self.records / work if work else None,
        }

    # ------------------------------------------------------------------ loop
    def warm_up(self) -> None:
        """Open the online store and read from it once, before the first record: the
        first open imports Feast and loads its registry (seconds). A store that does not
        answer now is retried by the flushes."""
        try:
            self.store.get_online_features(
                features=["user_history:item_ids"], entity_rows=[{"user_id": 0}]
            )
        except Exception as exc:
            self.last_error = f"feast warm-up: {exc!r}"[:500]
            log.warning("%s: %s", self.writer, self.last_error)
        from recloop.priority import settle_heap

        settle_heap()  # the imports' heap out of the collector's walks (see there)

    def run(
        self,
        stop: threading.Event | None = None,
        until_idle_s: float | None = None,
        progress_s: float | None = None,
    ) -> dict[str, Any]:
        """Consume until ``stop`` is set, or ``until_idle_s`` without records and with no
        session left open."""
        from recloop.kafka_io import event_consumer

        stop = stop or threading.Event()
        progress_s = self.ic.progress_s if progress_s is None else progress_s
        self.warm_up()
        self._consumer = event_consumer(
            self.ic.client,
            self.cfg.kafka.bootstrap,
            list(TOPICS),
            group_id=self.ic.group_id,
            client_id=self.writer,
            on_assigned=self._on_assigned,
            on_revoked=self._on_revoked,
            range_assignment=True,
            fast=True,  # msgspec twins of the contracts: parsing was a fifth of a drain
            max_poll_records=self.ic.batch_events,
            max_partition_fetch_bytes=self.ic.fetch_partition_bytes,
            session_timeout_ms=6000,  # a crashed member is noticed in seconds
            heartbeat_interval_ms=1000,
        )
        last_record = time.monotonic()
        last_progress = time.monotonic()
        backoff = 1.0
        poll_errors = self._consumer.errors
        try:
            while not stop.is_set():
                try:
                    t_poll = time.perf_counter()
                    records = self._consumer.poll(timeout_ms=200)
                    # Polls that returned records (fetch and parse), apart from those that
                    # waited in vain: with records left behind the last poll (starved:
                    # the fetch had not come back) or not (the group's join, idle spells)
                    empty = "poll:empty" if self.caught_up else "poll:starved"
                    self.phase_s["poll" if records else empty] += time.perf_counter() - t_poll
                except poll_errors as exc:  # the broker is away: the client reconnects
                    self.last_error = f"poll: {exc!r}"[:500]
                    self.say(f"{self.writer}: poll failed, retrying in {backoff:.0f} s: {exc!r}")
                    if stop.wait(backoff):
                        break
                    backoff = min(30.0, backoff * 2)
                    continue
                if self._fatal:
                    raise RuntimeError(self._fatal)
                with self._timed("fold"):
                    self.handle(records)
                self.caught_up = not self._lagging(len(records))
                if records:
                    last_record = time.monotonic()
                if self.due():
                    try:
                        self.flush()
                        backoff = 1.0
                    except Exception as exc:  # Feast or disk away: keep state, try again
                        self.last_error = f"flush: {exc!r}"[:500]
                        self.say(
                            f"{self.writer}: flush failed, retrying in {backoff:.0f} s: {exc!r}"
                        )
                        if stop.wait(backoff):
                            break
                        backoff = min(30.0, backoff * 2)
                if self._upkeep_due():
                    self.upkeep()
                if time.monotonic() - last_progress >= (progress_s or 5.0):
                    # The consumer is not thread-safe: lag is measured here, in the
                    # consuming thread, and ``stats`` (any thread) reports the last one.
                    last_progress = time.monotonic()
                    lag = self.lag(exact=False)
                    if lag is not None:
                        self.last_lag = lag
                    if progress_s:
                        self.say(self.progress_line())
                if (
                    until_idle_s is not None
                    and self.states  # assigned: the group join takes a few seconds
                    and time.monotonic() - last_record >= until_idle_s
                    and (lag := self.lag()) is not None
                    and not sum(lag.values())
                ):
                    self.last_lag = lag
                    self.flush(push_stats=True)
                    if not any(st.open or st.waiting for st in self.states.values()):
                        break
            self.flush(push_stats=True)
        finally:
            self._consumer.close()
        return self.stats()

    def _upkeep_due(self) -> bool:
        every = self.ic.compact_every_s
        return self.index == 0 and every > 0 and time.monotonic() - self.last_upkeep >= every

    def upkeep(self) -> None:
        """Compact the lake's tables and vacuum them (the first ingestor does it for the
        group). A failure (a commit that raced it, say) is reported and tried next time:
        the tables stay correct, only bigger."""
        self.last_upkeep = time.monotonic()
        try:
            compacted = self.lake.compact()
            vacuumed = self.lake.vacuum(self.ic.vacuum_retention_h)
        except Exception as exc:
            self.last_error = f"lake upkeep: {exc!r}"[:500]
            self.say(f"{self.writer}: lake upkeep failed, trying again later: {exc!r}")
            return
        took = time.monotonic() - self.last_upkeep
        merged = sum(c["files_removed"] for c in compacted.values())
        self.say(
            f"{self.writer}: lake upkeep in {took:.1f} s: {merged} small files compacted, "
            f"{sum(vacuumed.values())} old files vacuumed"
        )

    def progress_line(self) -> str:
        s = self.stats()
        p50, p99 = s["freshness_p50_ms"], s["freshness_p99_ms"]
        fresh = "freshness -" if p50 is None else f"freshness p50 {p50:.0f} ms p99 {p99:.0f} ms"
        lag = sum(s["lag"].values()) if s["lag"] else 0
        return (
            f"{self.writer}: {s['records']} records ({s['records_per_s']:.0f}/s), "
            f"{s['closed_complete'] + s['closed_window'] + s['closed_wait']} sessions, "
            f"{s['open_sessions']} open, dup {s['duplicates']}, late {s['late']}, "
            f"dlq {s['dead_lettered']}, lag {lag}, {fresh}, commits {s['seq']}"
        )


def _legacy_state(d: Any) -> dict[str, Any]:
    """A partition state saved in the layout before one state file per commit (a folder
    of ``state.json``, ``users.parquet`` and ``items.parquet``) in today's form: its JSON
    part was always whole, its users and items a delta unless it was a snapshot; what it
    changed is what may not have been pushed."""
    raw = json.loads((d / "state.json").read_text())
    users = pq.read_table(d / "users.parquet").to_pylist()
    items = pq.read_table(d / "items.parquet").to_pylist()
    recent = {rid: list(r) + [-1, 0][len(r) - 2 :] for rid, r in raw["recent"].items()}
    return {
        "full": False,
        "replace": ["open", "waiting", "recent", "clocks"],
        "pseq": raw["pseq"],
        "offsets": raw["offsets"],
        "newest_ms": raw["newest_ms"],
        "counters": raw.get("counters", {}),
        "open": {s["request_id"]: s for s in raw["open"]},
        "waiting": raw["waiting"],
        "recent": recent,
        "clocks": raw.get("clocks", {}),
        "users": {str(u["user_id"]): [u[k] for k in USER_FIELDS] for u in users},
        "items": {str(i["item_id"]): [i[k] for k in STAT_FIELDS] for i in items},
        "pending": {
            "history": [u["user_id"] for u in users],
            "stats": [u["user_id"] for u in users],
            "items": [i["item_id"] for i in items],
        },
    }


# --------------------------------------------------------------------------- as Ray actors
# Kafka record → Feast online store, seconds: sub-second when caught up, tens under load.
FRESHNESS = "recloop_ingest_freshness_seconds"
FRESHNESS_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60, 120, 300)


def freshness_histogram(writer: str) -> Callable[[list[float]], None]:
    """A Ray histogram of the actor's feature freshness (``recloop_ingest_freshness_
    seconds``, exported by Ray's metrics agent as ``ray_recloop_ingest_freshness_seconds``
    with a ``writer`` label): it adds up over ingestor actors, which a quantile per actor
    would not."""
    from ray.util.metrics import Histogram

    hist = Histogram(
        FRESHNESS,
        description="Kafka record (its producer's timestamp) to its user's history pushed "
        "into the online store",
        boundaries=list(FRESHNESS_BUCKETS_S),
        tag_keys=("writer",),
    )
    hist.set_default_tags({"writer": writer})

    def observe(values_ms: list[float]) -> None:
        for v in values_ms:
            hist.observe(max(0.0, v) / 1000)

    return observe


def _actor_class():
    import ray

    @ray.remote(max_concurrency=2)
    class IngestorActor:
        def __init__(self, cfg: dict, index: int) -> None:
            from recloop import priority

            stack = StackConfig.from_dict(cfg)
            # Below serving's priority on a shared machine (threads started later, the
            # consumer's included, inherit it).
            applied = priority.apply(stack)
            print(f"{actor_name(index)}: background priority {applied}", flush=True)
            self.ing = Ingestor(stack, index, say=lambda m: print(m, flush=True))
            self.ing.on_freshness = freshness_histogram(self.ing.writer)
            self.stop_event = threading.Event()

        def run(self) -> dict:
            return self.ing.run(self.stop_event)

        def stats(self) -> dict:
            return self.ing.stats()

        def stop(self) -> None:
            self.stop_event.set()

    return IngestorActor


def start_actors(cfg: StackConfig, say: Progress = print) -> list[Any]:
    """Start ``ingest.consumers`` detached ingestor actors (idempotent)."""
    import ray

    from recloop.ray_head import connect

    connect(cfg)
    cls = _actor_class()
    out = []
    for i in range(cfg.ingest.consumers):
        try:
            a = ray.get_actor(actor_name(i))
            say(f"{actor_name(i)} is running already")
        except ValueError:
            a = cls.options(
                name=actor_name(i),
                lifetime="detached",
                num_cpus=cfg.ingest.consumer_cpus,
                resources=cfg.ingest.consumer_resources or None,
            ).remote(cfg.to_dict(), i)
            a.run.remote()
            say(f"started {actor_name(i)} (detached actor, {cfg.ingest.consumer_cpus} CPU)")
        out.append(a)
    return out


def running_actors(cfg: StackConfig) -> dict[str, Any]:
    """The stack's ingestor actors that exist now, by name."""
    import ray

    from recloop.ray_head import connect

    connect(cfg)
    found = {}
    for i in range(64):
        try:
            found[actor_name(i)] = ray.get_actor(actor_name(i))
        except ValueError:
            continue
    return found


def stop_actors(cfg: StackConfig, say: Progress = print) -> int:
    import ray

    actors = running_actors(cfg)
    for name, a in actors.items():
        try:
            ray.get(a.stop.remote(), timeout=30)
        finally:
            ray.kill(a)
        say(f"stopped {name}")
    return len(actors)


def status(cfg: StackConfig) -> dict[str, Any]:
    """Each running ingestor actor's metrics (lag, records/s, freshness) and the lake."""
    import ray

    actors = {}
    for name, a in running_actors(cfg).items():
        try:
            actors[name] = ray.get(a.stats.remote(), timeout=30)
        except Exception as exc:
            actors[name] = {"error": repr(exc)[:300]}
    return {"actors": actors, "lake": Lake(cfg.lake_dir).summary()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recloop ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="stack config or run file (YAML)")
    parser.add_argument("--home", help="state folder (default .recloop)")
    parser.add_argument("--consumers", type=int, help="members of the consumer group")
    parser.add_argument("--detach", action="store_true", help="run as actors of the stack")
    parser.add_argument("--stop", action="store_true", help="stop the detached actors")
    parser.add_argument(
        "--status", action="store_true", help="the running actors' metrics and the lake"
    )
    parser.add_argument("--until-idle", type=float, help="stop after this many idle seconds")
    parser.add_argument("--index", type=int, default=0, help="this consumer's index")
    parser.add_argument("--json", help="write the final stats to this file")
    args = parser.parse_args(argv)

    from recloop.config import load_config

    cfg = load_config(args.config, {"ingest.consumers": args.consumers, "home": args.home})

    def say(m: str) -> None:
        print(f"[ingest {time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)

    if args.stop:
        stop_actors(cfg, say)
        return 0
    if args.status:
        print(json.dumps(status(cfg), indent=2, default=str))
        return 0
    if args.detach:
        start_actors(cfg, say)
        return 0
    if cfg.ingest.consumers > 1:
        say("several consumers in one process: use --detach (actors), or --index per process")
        return 2
    from recloop import priority

    say(f"background priority: {priority.apply(cfg)}")
    ing = Ingestor(cfg, args.index, say)
    stop = threading.Event()
    try:
        stats = ing.run(stop, until_idle_s=args.until_idle)
    except KeyboardInterrupt:
        stop.set()
        stats = ing.stats()
    say(ing.progress_line())
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(stats, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
