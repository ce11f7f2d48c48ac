"""The ingestor's state for one Kafka partition: the feedback join and the user features.

Impressions and interactions are keyed by user id, and both topics have the same number
of partitions, so a session's impression and its feedback share a partition number and
one ingestor owns both. Per partition it keeps:

- open sessions (an impression waiting for its feedback), closed when every position has
  feedback (``complete``), when the user's own event clock passes the impression time plus
  the join window (``window``), or after ``max_wait_s`` of wall time without either once
  nothing is left to read (``wait``: traffic stopped, so the clock stands still). A
  user's clock is the smaller of the newest event times read for that user from the two
  topics: one topic may be read ahead of the other, and its newer times say nothing about
  what the other still holds. The clock is per user, not per partition, because a user's
  events come from one client in order, while a partition mixes clients whose clocks
  disagree: a simulation running in virtual time a day ahead, or one client whose clock
  says year 9999, would otherwise close every other user's sessions before their
  feedback arrived;
- feedback that arrived before its impression (out of order), held for the window; then
  it is an orphan (``missing-impression``);
- recently closed sessions with the event ids of their feedback, for two windows of the
  user's clock (or of wall time, for a user who does not come back): feedback for one of
  them is a duplicate (same event id) or late (an orphan with reason ``late``);
- each user's recent history (clicked items, oldest first) and running counts, and each
  item's counts for this partition.

Everything here is plain data and deterministic given the order of records (apart from
``wait`` closes and the wall-time expiry of closed sessions), so it is saved with each
lake commit and restored after a crash or a rebalance; features pushed from it are
absolute values, which makes a replay harmless. A commit saves a *delta* (``encode``:
only the sessions, users, items and clocks changed since the previous commit, a removed
one as null) and every ``snapshot_every`` commits the whole state; ``load`` applies
either, so a restore is the last snapshot followed by the deltas after it. Each saved
state also lists, in full, what is not yet in the Feast online store (``pending``):
users whose history or counters and items whose counters changed since their last
push, so a crash re-pushes everything unpushed whatever the push cadence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgspec

from recloop.events import FastImpression, FastInteraction, Impression, Interaction

STAT_FIELDS = ("impressions", "clicks", "watch_time_s", "likes", "follows")
USER_FIELDS = (
    "history",
    "history_len",
    "history_base_ms",
    "stats_base_ms",
    "last_event_ms",
    *STAT_FIELDS,
)
# The keyed parts of a partition's state: a delta holds the keys changed in each.
PARTS = ("open", "waiting", "recent", "clocks", "users", "items")


@dataclass
class Feedback:
    event_id: str
    event_time_ms: int
    position: int
    item_id: int
    clicked: bool
    watch_time_s: float
    liked: bool
    followed: bool
    record_ts_ms: int
    held_wall_ms: int = 0  # when it started waiting for its impression (wall clock)
    arm: str = ""
    model_version: str = ""
    user_id: int = 0
    request_id: str = ""
    context: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, ev: Interaction | FastInteraction, record_ts_ms: int) -> Feedback:
        return cls(
            event_id=ev.event_id,
            event_time_ms=ev.event_time_ms,
            position=ev.position,
            item_id=ev.item_id,
            clicked=ev.clicked,
            watch_time_s=ev.watch_time_s,
            liked=ev.liked,
            followed=ev.followed,
            record_ts_ms=record_ts_ms,
            arm=ev.arm,
            model_version=ev.model_version,
            user_id=ev.user_id,
            request_id=ev.request_id,
            context=dict(ev.context),
        )


@dataclass
class OpenSession:
    event_id: str
    request_id: str
    user_id: int
    arm: str
    model_version: str
    event_time_ms: int
    items: list[int]
    scores: list[float]
    record_ts_ms: int
    opened_wall_ms: int
    feedback: dict[int, Feedback] = field(default_factory=dict)  # by position
    context: dict[str, str] = field(default_factory=dict)  # the request's tags

    @property
    def complete(self) -> bool:
        return len(self.feedback) >= len(self.items)


@dataclass
class Counts:
    """Running counts of a user or an item (``STAT_FIELDS``)."""

    impressions: int = 0
    clicks: int = 0
    watch_time_s: float = 0.0
    likes: int = 0
    follows: int = 0

    def add(self, impressions: int, feedback: list[Feedback]) -> None:
        """Count ``impressions`` shown items and the signals of their ``feedback``."""
        self.impressions += impressions
        for fb in feedback:
            self.clicks += int(fb.clicked)
            self.watch_time_s += fb.watch_time_s
            self.likes += int(fb.liked)
            self.follows += int(fb.followed)


@dataclass
class UserState(Counts):
    history: list[int] = field(default_factory=list)
    history_len: int = 0  # items ever appended (the Feast feature of that name)
    # Sessions at or before these event times are already in the pushed features this
    # user started from (history and stats are pushed separately, so one base each).
    history_base_ms: int = -1
    stats_base_ms: int = -1
    last_event_ms: int = -1


@dataclass
class Closed:
    """A session ready for the lake (``history`` is filled when users are updated)."""

    session: OpenSession
    closed_by: str
    history: list[int] | None = None


@dataclass
class Counters:
    impressions: int = 0
    interactions: int = 0
    joined: int = 0
    duplicates: int = 0
    late: int = 0
    missing_impression: int = 0
    out_of_order: int = 0
    closed_complete: int = 0
    closed_window: int = 0
    closed_wait: int = 0

    def add(self, other: Counters) -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)


class PartitionState:
    def __init__(self, partition: int, window_ms: int, max_wait_s: float, history_len: int):
        self.partition = partition
        self.window_ms = int(window_ms)
        self.max_wait_ms = int(max_wait_s * 1000)
        self.history_len = history_len
        self.pseq = 0  # commits of this partition so far
        self.offsets: dict[str, int] = {}  # topic -> next offset to read
        self.newest_ms = {"impressions": -1, "interactions": -1}  # per topic
        self.open: dict[str, OpenSession] = {}  # by request id
        self.waiting: dict[str, list[Feedback]] = {}  # feedback ahead of its impression
        # closed, by request id: (event time, feedback ids, user, wall time of the close)
        self.recent: dict[str, tuple[int, list[str], int, int]] = {}
        self.clocks: dict[int, list[int]] = {}  # user -> newest [impression, interaction] ms
        self.users: dict[int, UserState] = {}
        self.items: dict[int, Counts] = {}
        # Keys changed since the last commit, per part of ``PARTS`` (what a delta holds).
        self.touched: dict[str, set] = {k: set() for k in PARTS}
        # Not yet in the online store: users whose history / counters, items whose
        # counters changed since they were last pushed (saved in full with each commit).
        self.pending_history: set[int] = set()
        self.pending_stats: set[int] = set()
        self.pending_items: set[int] = set()
        self.force_snapshot = False  # the next commit saves everything
        self.counters = Counters()

    # ------------------------------------------------------------------ records in
    @property
    def watermark_ms(self) -> int:
        """The partition's event time (for the item features' timestamps and reports; the
        join itself runs on each user's clock)."""
        return min(self.newest_ms.values())

    def user_clock_ms(self, user: int) -> int:
        """How far ``user``'s events have been read on both topics (-1: not on both)."""
        c = self.clocks.get(user)
        return min(c) if c else -1

    def _advance(self, topic: str, user: int, t: int) -> None:
        if t > self.newest_ms[topic]:
            self.newest_ms[topic] = t
        c = self.clocks.get(user)
        if c is None:
            c = self.clocks[user] = [-1, -1]
        k = 0 if topic == "impressions" else 1
        if t > c[k]:
            c[k] = t
            self.touched["clocks"].add(user)

    def on_impression(
        self, ev: Impression | FastImpression, record_ts_ms: int, wall_ms: int
    ) -> None:
        self._advance("impressions", ev.user_id, ev.event_time_ms)
        rid = ev.request_id
        if rid in self.open or rid in self.recent:
            self.counters.duplicates += 1
            return
        self.counters.impressions += 1
        ordered = sorted(ev.items, key=lambda it: it.position)
        s = OpenSession(
            ev.event_id,
            rid,
            ev.user_id,
            ev.arm,
            ev.model_version,
            ev.event_time_ms,
            [it.item_id for it in ordered],
            [float(it.score) for it in ordered],
            record_ts_ms,
            wall_ms,
            context=dict(ev.context),
        )
        self.open[rid] = s
        self.touched["open"].add(rid)
        held = self.waiting.pop(rid, None)
        if held is not None:
            self.touched["waiting"].add(rid)
            for fb in held:
                self._join(s, fb)

    def on_interaction(
        self, ev: Interaction | FastInteraction, record_ts_ms: int, wall_ms: int = 0
    ) -> Feedback | None:
        """Join or hold the feedback; returns it when it is late (an orphan to write)."""
        self._advance("interactions", ev.user_id, ev.event_time_ms)
        fb = Feedback.of(ev, record_ts_ms)
        fb.held_wall_ms = wall_ms
        rid = ev.request_id
        if rid in self.open:
            s = self.open[rid]
            if fb.position in s.feedback or fb.position >= len(s.items):
                self.counters.duplicates += 1
                return None
            self.counters.interactions += 1
            self._join(s, fb)
            self.touched["open"].add(rid)
            return None
        if rid in self.recent:
            if fb.event_id in self.recent[rid][1]:
                self.counters.duplicates += 1
                return None
            self.counters.interactions += 1
            self.counters.late += 1
            self.recent[rid][1].append(fb.event_id)
            self.touched["recent"].add(rid)
            return fb
        held = self.waiting.setdefault(rid, [])
        if any(h.event_id == fb.event_id or h.position == fb.position for h in held):
            self.counters.duplicates += 1
            return None
        self.counters.interactions += 1
        self.counters.out_of_order += 1
        held.append(fb)
        self.touched["waiting"].add(rid)
        return None

    def _join(self, s: OpenSession, fb: Feedback) -> None:
        if fb.position in s.feedback or fb.position >= len(s.items):
            self.counters.duplicates += 1
            return
        s.feedback[fb.position] = fb
        self.counters.joined += 1

    # ------------------------------------------------------------------ closing
    def waits_expired(self, wall_ms: int) -> bool:
        return any(
            wall_ms - s.opened_wall_ms >= self.max_wait_ms for s in self.open.values()
        ) or any(
            wall_ms - h.held_wall_ms >= self.max_wait_ms for hs in self.waiting.values() for h in hs
        )

    def close_due(
        self, wall_ms: int, caught_up: bool = True
    ) -> tuple[list[Closed], list[tuple[Feedback, str]]]:
        """Sessions to close now, and held feedback that timed out (orphans). A session
        closes by ``wait`` only when ``caught_up`` (nothing left to read in Kafka for this
        partition): a consumer that is behind has not seen the feedback yet."""
        touched = self.touched
        closed: list[Closed] = []
        for rid, s in list(self.open.items()):
            if s.complete:
                why = "complete"
            elif self.user_clock_ms(s.user_id) >= s.event_time_ms + self.window_ms:
                why = "window"
            elif caught_up and wall_ms - s.opened_wall_ms >= self.max_wait_ms:
                why = "wait"
            else:
                continue
            del self.open[rid]
            ids = [f.event_id for f in s.feedback.values()]
            self.recent[rid] = (s.event_time_ms, ids, s.user_id, wall_ms)
            touched["open"].add(rid)
            touched["recent"].add(rid)
            setattr(self.counters, f"closed_{why}", getattr(self.counters, f"closed_{why}") + 1)
            closed.append(Closed(s, why))
        # In event-time order, whatever order the open sessions are in (a restored delta
        # lists them in no particular order): a user's sessions closing together are
        # applied oldest first, so each one's history holds the clicks of those before it.
        closed.sort(key=lambda c: (c.session.event_time_ms, c.session.request_id))
        orphans: list[tuple[Feedback, str]] = []
        for rid, held in list(self.waiting.items()):
            newest = max(h.event_time_ms for h in held)
            waited = wall_ms - max(h.held_wall_ms for h in held) >= self.max_wait_ms
            passed = self.user_clock_ms(held[0].user_id) >= newest + self.window_ms
            if passed or (caught_up and waited):
                del self.waiting[rid]
                touched["waiting"].add(rid)
                self.counters.missing_impression += len(held)
                orphans.extend((h, "missing-impression") for h in held)
        keep = 2 * self.window_ms
        for rid, (t, _, user, closed_wall) in list(self.recent.items()):
            if self.user_clock_ms(user) - t > keep or wall_ms - closed_wall > keep:
                del self.recent[rid]
                touched["recent"].add(rid)
        # A clock is needed while its user has something open, held or recently closed.
        active = {s.user_id for s in self.open.values()}
        active.update(held[0].user_id for held in self.waiting.values())
        active.update(user for _, _, user, _ in self.recent.values())
        for user in [u for u in self.clocks if u not in active]:
            del self.clocks[user]
            touched["clocks"].add(user)
        return closed, orphans

    def apply(self, c: Closed) -> None:
        """Fill the session's history and update user and item counts (once)."""
        s = c.session
        u = self.users.setdefault(s.user_id, UserState())
        c.history = list(u.history)
        clicked = [s.items[p] for p in sorted(s.feedback) if s.feedback[p].clicked]
        fbs = list(s.feedback.values())
        by_item = {s.items[fb.position]: [fb] for fb in fbs}
        for item in s.items:
            self.items.setdefault(item, Counts()).add(1, by_item.get(item, []))
        self.touched["items"].update(s.items)
        self.pending_items.update(s.items)
        t = s.event_time_ms
        if t > u.history_base_ms:
            u.history = (u.history + clicked)[-self.history_len :]
            u.history_len += len(clicked)
        u.last_event_ms = max(u.last_event_ms, t)
        self.touched["users"].add(s.user_id)
        self.pending_history.add(s.user_id)
        self.pending_stats.add(s.user_id)
        if t > u.stats_base_ms:
            u.add(len(s.items), fbs)

    # ------------------------------------------------------------------ persistence
    def encode(self, full: bool) -> dict[str, Any]:
        """The state as JSON-able data: all of it (``full``, a snapshot) or the keys
        changed since ``committed`` was last called (a delta; a removed key is null).
        Offsets, clocks' high marks, counters and what is pending are always whole."""

        def session_json(s: OpenSession) -> dict[str, Any]:
            out = {k: v for k, v in vars(s).items() if k != "feedback"}
            out["feedback"] = [vars(f) for f in s.feedback.values()]
            return out

        def waiting_json(held: list[Feedback]) -> list[dict[str, Any]]:
            return [vars(f) for f in held]

        def user_json(u: UserState) -> list[Any]:
            return [getattr(u, k) for k in USER_FIELDS]

        def item_json(c: Counts) -> list[Any]:
            return [c.impressions, c.clicks, c.watch_time_s, c.likes, c.follows]

        codecs = {
            "open": (self.open, session_json),
            "waiting": (self.waiting, waiting_json),
            "recent": (self.recent, list),
            "clocks": (self.clocks, list),
            "users": (self.users, user_json),
            "items": (self.items, item_json),
        }
        out: dict[str, Any] = {
            "partition": self.partition,
            "full": full,
            "pseq": self.pseq,
            "offsets": self.offsets,
            "newest_ms": self.newest_ms,
            "counters": vars(self.counters),
            "pending": {
                "history": sorted(self.pending_history),
                "stats": sorted(self.pending_stats),
                "items": sorted(self.pending_items),
            },
        }
        for part, (data, enc) in codecs.items():
            keys = data.keys() if full else self.touched[part]
            out[part] = {str(k): (enc(data[k]) if k in data else None) for k in keys}
        return out

    def committed(self) -> None:
        """What was changed is saved: the next delta starts from here."""
        for keys in self.touched.values():
            keys.clear()

    def load(self, data: dict[str, Any], items_only: bool = False) -> None:
        """Apply a saved state: a snapshot replaces everything, a delta updates the keys
        it holds. ``items_only``: the items' counts alone (another member's partition)."""
        full = bool(data.get("full", True))
        replace = set(data.get("replace", ()))  # parts a delta holds whole

        def merge(target: dict, part: str, key: Any, dec: Any) -> None:
            if full or part in replace:
                target.clear()
            for k, v in data.get(part, {}).items():
                kk = key(k)
                if v is None:
                    target.pop(kk, None)
                else:
                    target[kk] = dec(v)

        merge(self.items, "items", int, lambda v: Counts(*v))
        if items_only:
            return

        def session(raw: dict[str, Any]) -> OpenSession:
            fbs = [Feedback(**f) for f in raw["feedback"]]
            s = OpenSession(**{k: v for k, v in raw.items() if k != "feedback"})
            s.feedback = {f.position: f for f in fbs}
            return s

        self.pseq = int(data["pseq"])
        self.offsets = {k: int(v) for k, v in data["offsets"].items()}
        self.newest_ms = {k: int(v) for k, v in data["newest_ms"].items()}
        self.counters = Counters(**data.get("counters", {}))
        merge(self.open, "open", str, session)
        merge(self.waiting, "waiting", str, lambda v: [Feedback(**f) for f in v])
        merge(self.recent, "recent", str, lambda r: (int(r[0]), list(r[1]), int(r[2]), int(r[3])))
        merge(self.clocks, "clocks", int, lambda c: [int(c[0]), int(c[1])])
        merge(
            self.users, "users", int, lambda v: UserState(**dict(zip(USER_FIELDS, v, strict=True)))
        )
        pending = data.get("pending", {})
        self.pending_history = {int(u) for u in pending.get("history", [])}
        self.pending_stats = {int(u) for u in pending.get("stats", [])}
        self.pending_items = {int(i) for i in pending.get("items", [])}
        self.committed()


def session_row(c: Closed) -> dict[str, Any]:
    """A ``sessions`` lake row (see ``recloop.lake.SCHEMAS``)."""
    s = c.session
    n = len(s.items)
    got = s.feedback
    feedback = [False] * n
    clicked = [False] * n
    watch = [0.0] * n
    liked = [False] * n
    followed = [False] * n
    last_ms, record_ts, fb_context = 0, s.record_ts_ms, None
    for p in range(n):
        f = got.get(p)
        if f is None:
            continue
        feedback[p] = True
        clicked[p], watch[p], liked[p], followed[p] = (
            bool(f.clicked),
            f.watch_time_s,
            bool(f.liked),
            bool(f.followed),
        )
        last_ms = max(last_ms, f.event_time_ms)
        record_ts = max(record_ts, f.record_ts_ms)
        if fb_context is None and f.context:
            fb_context = f.context
    # The request's tags (entry point, device: what a context model reads), then the
    # feedback's (e.g. the simulation run).
    context = {**s.context, **fb_context} if fb_context else s.context
    return {
        "event_id": s.event_id,
        "request_id": s.request_id,
        "user_id": s.user_id,
        "arm": s.arm,
        "model_version": s.model_version,
        "event_time_ms": s.event_time_ms,
        "history": c.history or [],
        "items": s.items,
        "scores": s.scores,
        "feedback": feedback,
        "clicked": clicked,
        "watch_time_s": watch,
        "liked": liked,
        "followed": followed,
        "n_feedback": len(got),
        "clicks": sum(clicked),
        "session_watch_s": float(sum(watch)),
        "likes": sum(liked),
        "follows": sum(followed),
        "last_feedback_ms": last_ms,
        "record_ts_ms": record_ts,
        "closed_by": c.closed_by,
        "context": json.dumps(context, sort_keys=True) if context else "{}",
    }


def orphan_row(fb: Feedback, reason: str) -> dict[str, Any]:
    return {
        "event_id": fb.event_id,
        "request_id": fb.request_id,
        "user_id": fb.user_id,
        "item_id": fb.item_id,
        "position": fb.position,
        "arm": fb.arm,
        "model_version": fb.model_version,
        "event_time_ms": fb.event_time_ms,
        "clicked": fb.clicked,
        "watch_time_s": fb.watch_time_s,
        "liked": fb.liked,
        "followed": fb.followed,
        "record_ts_ms": fb.record_ts_ms,
        "reason": reason,
    }


def state_bytes(doc: dict[str, Any]) -> bytes:
    """A commit's state file: ``doc`` as JSON (what ``json.dumps`` writes, read back
    equal by ``json.loads``; tests/unit/test_ingest_state.py checks both agree), written
    by msgspec: ``json.dumps`` of the states was a twentieth of a backlog drain."""
    return msgspec.json.encode(doc)
