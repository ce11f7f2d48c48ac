"""The ingestor's per-partition join and feature state, without Kafka or Feast."""

from __future__ import annotations

import json

import pyarrow as pa

from actors.ingest_state import (
    PartitionState,
    UserState,
    orphan_row,
    session_row,
    state_bytes,
)
from recloop.events import Impression, Interaction, ServedItem
from recloop.lake import ORPHANS, SCHEMAS, Entry, Lake

WINDOW = 60_000


def impression(rid: str, user: int, t: int, items=(11, 12, 13), context=None) -> Impression:
    return Impression(
        event_time_ms=t,
        request_id=rid,
        user_id=user,
        arm="online",
        model_version="v1",
        items=[ServedItem(item_id=i, position=p, score=-float(p)) for p, i in enumerate(items)],
        context=context or {},
    )


def feedback(rid: str, user: int, t: int, pos: int, item: int, clicked=True, eid=None):
    return Interaction(
        event_id=eid or f"{rid}-{pos}",
        event_time_ms=t,
        request_id=rid,
        user_id=user,
        item_id=item,
        position=pos,
        arm="online",
        model_version="v1",
        clicked=clicked,
        watch_time_s=30.0 if clicked else 0.0,
        liked=clicked and pos == 0,
        context={"run": "r1"},
    )


def state() -> PartitionState:
    return PartitionState(0, WINDOW, max_wait_s=3600, history_len=4)


def test_complete_session_closes_and_updates_features():
    st = state()
    st.on_impression(impression("a", 7, 1000), 5, 0)
    for pos, item in enumerate((11, 12, 13)):
        st.on_interaction(feedback("a", 7, 1100 + pos, pos, item, clicked=pos != 1), 6)
    closed, orphans = st.close_due(0)
    assert [c.closed_by for c in closed] == ["complete"] and not orphans
    st.apply(closed[0])
    row = session_row(closed[0])
    assert row["history"] == [] and row["clicked"] == [True, False, True]
    assert row["clicks"] == 2 and row["session_watch_s"] == 60.0 and row["likes"] == 1
    assert row["record_ts_ms"] == 6 and json.loads(row["context"]) == {"run": "r1"}
    u = st.users[7]
    # The request's tags (what a context model reads) join the feedback's in the row.
    st.on_impression(impression("b", 8, 2000, context={"surface": "home", "run": "x"}), 7, 0)
    st.on_interaction(feedback("b", 8, 2100, 0, 11), 8)
    rows = [session_row(c) for c in st.close_due(10**12)[0]]
    assert json.loads(rows[0]["context"]) == {"surface": "home", "run": "r1"}
    assert u.history == [11, 13] and u.impressions == 3 and u.clicks == 2 and u.likes == 1
    assert st.items[12].impressions == 1 and st.items[12].clicks == 0
    assert st.pending_history == st.pending_stats == {7} and st.pending_items == {11, 12, 13}
    assert st.touched["users"] == {7} and st.touched["items"] == {11, 12, 13}


def test_out_of_order_duplicates_late_and_missing():
    st = state()
    # feedback before its impression is held, then joined
    st.on_interaction(feedback("a", 7, 1100, 0, 11), 1)
    st.on_impression(impression("a", 7, 1000), 1, 0)
    assert st.counters.out_of_order == 1 and len(st.open["a"].feedback) == 1
    # a duplicate (same position) is dropped and counted
    st.on_interaction(feedback("a", 7, 1100, 0, 11, eid="other"), 1)
    st.on_impression(impression("a", 7, 1000), 1, 0)
    assert st.counters.duplicates == 2
    # another user's events, however far ahead, do not close it (its user's clock does)
    st.on_impression(impression("b", 8, 1000 + WINDOW), 1, 0)
    st.on_interaction(feedback("b", 8, 1000 + WINDOW, 0, 11), 1)
    assert st.close_due(0)[0] == []
    # its user's next impression alone does not move that clock (the feedback topic may be
    # read behind) ...
    st.on_impression(impression("a2", 7, 1000 + WINDOW), 1, 0)
    assert st.close_due(0)[0] == []
    # ... both topics do: closed with the feedback it has
    st.on_interaction(feedback("a2", 7, 1000 + WINDOW, 0, 11), 1)
    closed, _ = st.close_due(0)
    assert [(c.session.request_id, c.closed_by) for c in closed] == [("a", "window")]
    # feedback for a closed session: late (an orphan), and its replay is a duplicate
    late = st.on_interaction(feedback("a", 7, 1000 + WINDOW, 2, 13), 1)
    assert late is not None and st.counters.late == 1
    assert st.on_interaction(feedback("a", 7, 1000 + WINDOW, 2, 13), 1) is None
    assert st.counters.duplicates == 3
    # feedback whose impression never comes: an orphan once the window has passed
    st.on_interaction(feedback("zz", 9, 2000 + WINDOW, 0, 5), 1)
    st.on_impression(impression("c", 9, 3000 + 2 * WINDOW), 1, 0)
    st.on_interaction(feedback("c", 9, 3000 + 2 * WINDOW, 0, 11), 1)
    _, orphans = st.close_due(0)
    assert [(f.request_id, why) for f, why in orphans] == [("zz", "missing-impression")]
    rows = pa.Table.from_pylist([orphan_row(f, w) for f, w in orphans], SCHEMAS[ORPHANS])
    assert rows.column("reason").to_pylist() == ["missing-impression"]


def test_one_client_far_ahead_in_time_closes_no_one_elses_session():
    """A simulation in virtual time days ahead, or a client whose clock says year 9999,
    shares the partition with everyone else: their sessions still wait for their
    feedback, and the closed-session memory still classifies it."""
    from recloop.events import MAX_EVENT_TIME_MS

    st = state()
    st.on_impression(impression("a", 7, 1000), 1, 0)
    st.on_interaction(feedback("a", 7, 1001, 0, 11), 1)
    for t in (1000 + 2 * 86_400_000, MAX_EVENT_TIME_MS):
        st.on_impression(impression(f"far-{t}", 8, t), 1, 0)
        st.on_interaction(feedback(f"far-{t}", 8, t, 0, 11), 1)
    # only the far user's own earlier session closes, by its own clock; a stays open
    closed, _ = st.close_due(0)
    assert [(c.session.request_id, c.closed_by) for c in closed] == [("far-172801000", "window")]
    assert set(st.open) == {"a", f"far-{MAX_EVENT_TIME_MS}"}
    for pos, item in ((1, 12), (2, 13)):
        st.on_interaction(feedback("a", 7, 1002, pos, item), 1)
    closed, _ = st.close_due(0)
    assert [(c.session.request_id, c.closed_by) for c in closed] == [("a", "complete")]
    # a replay of a's feedback is still known as a duplicate, not a missing impression
    assert st.on_interaction(feedback("a", 7, 1002, 2, 13), 1) is None
    assert st.counters.duplicates == 1 and not st.waiting


def test_closed_sessions_expire_by_their_users_clock_or_by_wall_time():
    st = state()
    st.on_impression(impression("a", 7, 1000), 1, 0)
    st.on_impression(impression("b", 8, 1000), 1, 0)
    for rid, user in (("a", 7), ("b", 8)):
        for pos, item in enumerate((11, 12, 13)):
            st.on_interaction(feedback(rid, user, 1001, pos, item), 1)
    assert len(st.close_due(0)[0]) == 2
    assert set(st.recent) == {"a", "b"} and set(st.clocks) == {7, 8}
    # user 7 comes back more than two windows later: a expires, b (user 8 is away) stays
    later = 1002 + 2 * WINDOW
    st.on_impression(impression("a2", 7, later), 1, 0)
    st.on_interaction(feedback("a2", 7, later, 0, 11), 1)
    st.close_due(0)
    assert set(st.recent) == {"b"}
    # two windows of wall time later b expires too, and user 8's clock goes with it
    st.close_due(2 * WINDOW + 1)
    assert "b" not in st.recent and 8 not in st.clocks and 7 in st.clocks  # a2 is open


def test_wait_closes_a_session_when_traffic_stops():
    st = PartitionState(0, WINDOW, max_wait_s=2.0, history_len=4)
    st.on_impression(impression("a", 7, 1000), 1, wall_ms=10_000)
    st.on_interaction(feedback("q", 7, 1000, 0, 11), 1, wall_ms=10_000)
    assert st.close_due(11_000) == ([], [])
    # not while the consumer is behind: the feedback may be unread
    assert st.close_due(12_000, caught_up=False) == ([], [])
    closed, orphans = st.close_due(12_000)
    assert [c.closed_by for c in closed] == ["wait"]
    assert [why for _, why in orphans] == ["missing-impression"]


def test_pushed_base_is_not_counted_twice():
    st = state()
    st.users[7] = UserState(history=[1, 11], history_len=2, history_base_ms=1000, stats_base_ms=-1)
    st.on_impression(impression("a", 7, 1000), 1, 0)
    for pos, item in enumerate((11, 12, 13)):
        st.on_interaction(feedback("a", 7, 1001, pos, item), 1)
    (c,), _ = st.close_due(0)
    st.apply(c)
    u = st.users[7]
    assert u.history == [1, 11]  # the session at t=1000 is in the pushed history already
    assert u.clicks == 3  # but not in the (empty) pushed stats


def _round_trip(doc: dict) -> dict:
    """What a commit writes and a restore reads: JSON bytes, no Python objects."""
    return json.loads(state_bytes(doc))


def test_state_files_are_what_json_dumps_would_write():
    st = state()
    _events(st)
    st.on_interaction(feedback("z", 9, 5000, 0, 11), 1)  # held: no impression yet
    for full in (True, False):
        doc = {"writer": "w", "seq": 3, "partitions": {"0": st.encode(full=full)}}
        assert json.loads(state_bytes(doc)) == json.loads(json.dumps(doc))


def _events(st: PartitionState) -> None:
    st.on_impression(impression("a", 7, 1000), 1, 0)
    st.on_interaction(feedback("a", 7, 1001, 0, 11), 1)
    st.on_interaction(feedback("q", 7, 1001, 0, 11), 1)
    st.on_impression(impression("b", 8, 1002), 1, 0)
    for pos, item in enumerate((11, 12, 13)):
        st.on_interaction(feedback("b", 8, 1003, pos, item), 1)
    (c,), _ = st.close_due(0)
    st.apply(c)
    st.offsets = {"recloop.impressions": 4, "recloop.interactions": 9}


def _same(a: PartitionState, b: PartitionState) -> None:
    assert a.encode(full=True) == b.encode(full=True)
    assert a.users == b.users and a.items == b.items and a.open == b.open
    assert a.recent == b.recent and a.waiting == b.waiting and a.clocks == b.clocks


def test_state_round_trips_through_json():
    st = state()
    _events(st)
    back = state()
    back.load(_round_trip(st.encode(full=True)))
    _same(back, st)
    # the restored state goes on exactly as the original would
    for s in (st, back):
        for pos, item in ((1, 12), (2, 13)):
            s.on_interaction(feedback("a", 7, 1010, pos, item), 1)
    assert [c.session.request_id for c in back.close_due(0)[0]] == ["a"]
    assert [c.session.request_id for c in st.close_due(0)[0]] == ["a"]
    assert back.counters == st.counters


def test_a_snapshot_then_deltas_restore_the_state_a_delta_holds_only_changes():
    st = state()
    _events(st)
    saved = [_round_trip(st.encode(full=True))]
    st.committed()
    assert st.encode(full=False)["users"] == {} and st.encode(full=False)["open"] == {}
    # a: completed and closed (removed from open, into recent); c opened; user 9 new
    for pos, item in ((1, 12), (2, 13)):
        st.on_interaction(feedback("a", 7, 1010, pos, item), 1)
    st.on_impression(impression("c", 9, 1020, items=(40, 41)), 1, 0)
    (c,), _ = st.close_due(0)
    st.apply(c)
    delta = st.encode(full=False)
    assert delta["open"] == {"a": None, "c": delta["open"]["c"]}  # a removed, c added
    assert set(delta["users"]) == {"7"} and set(delta["items"]) == {"11", "12", "13"}
    assert set(delta["recent"]) == {"a"} and "b" not in delta["recent"]
    saved.append(_round_trip(delta))
    st.committed()
    # expiry: b leaves recent (a delete in the next delta)
    st.close_due(2 * WINDOW + 1)
    saved.append(_round_trip(st.encode(full=False)))
    assert saved[-1]["recent"].get("b", "absent") is None
    back = state()
    for doc in saved:
        back.load(doc)
    _same(back, st)
    # what is not yet in the online store is saved with every commit, in full
    assert back.pending_history == {7, 8} and back.pending_items == {11, 12, 13}
    # items only (another member's partition, for item totals)
    items = state()
    for doc in saved:
        items.load(doc, items_only=True)
    assert items.items == st.items and not items.users and not items.open


def test_a_state_saved_in_the_earlier_layout_is_restored(tmp_path):
    """A lake written before one state file per commit (a folder per partition with
    state.json, users.parquet and items.parquet) resumes where it stopped; its next
    commit is a snapshot, and what it changed is pushed again."""
    import pyarrow.parquet as pq

    from actors.ingest_state import STAT_FIELDS, USER_FIELDS
    from actors.ingestor import Ingestor
    from recloop.config import StackConfig

    st = state()
    _events(st)
    st.pseq = 1
    full = st.encode(full=True)
    old = {
        "partition": 0,
        "pseq": 1,
        "offsets": full["offsets"],
        "newest_ms": full["newest_ms"],
        "open": list(full["open"].values()),
        "waiting": full["waiting"],
        "recent": {rid: r[:3] for rid, r in full["recent"].items()},  # oldest form
        "clocks": full["clocks"],
        "counters": full["counters"],
    }
    rel = "_state/p0/00000001"
    d = tmp_path / "lake" / rel
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps(old))
    users = [
        {"user_id": u, **dict(zip(USER_FIELDS, v, strict=True))} for u, v in full["users"].items()
    ]
    for u in users:
        u["user_id"] = int(u["user_id"])
    pq.write_table(pa.Table.from_pylist(users), d / "users.parquet")
    items = [
        {"item_id": int(i), **dict(zip(STAT_FIELDS, v, strict=True))}
        for i, v in full["items"].items()
    ]
    pq.write_table(pa.Table.from_pylist(items), d / "items.parquet")
    part = {"pseq": 1, "offsets": full["offsets"], "state": rel, "snapshot": True}
    Lake(tmp_path / "lake").commit(Entry("ingestor-0", 1, 5, [], {"0": part}, {}))

    cfg = StackConfig.from_dict(
        {"home": str(tmp_path / "home"), "ingest": {"lake_dir": str(tmp_path / "lake")}}
    )
    back = Ingestor(cfg, 0, lambda _: None).restore(0)
    assert back.users == st.users and back.items == st.items and back.open == st.open
    assert back.offsets == st.offsets and back.clocks == st.clocks and back.pseq == 1
    assert set(back.recent) == set(st.recent)  # a closing wall time it never kept: 0
    assert back.force_snapshot and back.pending_history == set(st.users)
    assert back.pending_items == set(st.items)


def test_sessions_closing_together_are_applied_oldest_first():
    """A restored state lists open sessions in no particular order: the later session
    (opened first here) still gets the earlier one's clicks in its history."""
    st = state()
    st.on_impression(impression("late", 7, 5000, items=(21, 22, 23)), 1, 0)
    st.on_impression(impression("early", 7, 1000), 1, 0)
    for pos, item in enumerate((11, 12, 13)):
        st.on_interaction(feedback("early", 7, 1100 + pos, pos, item, clicked=pos == 0), 1)
    closed, _ = st.close_due(10**9)  # "late" by wait, "early" complete
    assert [c.session.request_id for c in closed] == ["early", "late"]
    for c in closed:
        st.apply(c)
    assert [c.history for c in closed] == [[], [11]]
