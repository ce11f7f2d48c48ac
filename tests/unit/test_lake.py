"""The lake on Delta Lake: commit points, rollback of what a crash left uncommitted,
incremental reads by marks, upkeep, another engine reading the tables, and migration
from the layout before Delta."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recloop.lake import ORPHANS, SCHEMAS, SESSIONS, Entry, Lake, LakeError


def _sessions(ids: list[str], t0: int = 1_700_000_000_000) -> pa.Table:
    rows = [
        {
            "event_id": f"e-{rid}",
            "request_id": rid,
            "user_id": i,
            "arm": "a",
            "model_version": "v1",
            "event_time_ms": t0 + i * 3_600_000,  # an hour apart
            "items": [1, 2],
            "clicked": [True, False],
            "clicks": 1,
            "session_watch_s": 30.0,
            "record_ts_ms": t0 + i,
            "closed_by": "complete",
        }
        for i, rid in enumerate(ids)
    ]
    return pa.Table.from_pylist(rows, SCHEMAS[SESSIONS])


def _orphans(ids: list[str]) -> pa.Table:
    rows = [
        {"event_id": f"o-{i}", "request_id": i, "event_time_ms": 5, "record_ts_ms": 6} for i in ids
    ]
    return pa.Table.from_pylist(rows, SCHEMAS[ORPHANS])


def _commit(lake: Lake, writer: str, seq: int, sessions=(), orphans=(), at: int = 0) -> Entry:
    files = lake.write_files(SESSIONS, _sessions(list(sessions)), writer, seq)
    files += lake.write_files(ORPHANS, _orphans(list(orphans)), writer, seq)
    entry = Entry(writer, seq, at or seq, files, {"0": {"offsets": {"t": seq}}}, {})
    lake.commit(entry)
    return entry


def test_a_commit_point_makes_its_sessions_and_orphans_count_and_nothing_before(tmp_path):
    lake = Lake(tmp_path)
    files = lake.write_files(SESSIONS, _sessions(["a", "b"]), "ingestor-0", 1)
    assert (
        files[0]["rows"] == 2 and files[0]["max_event_ms"] - files[0]["min_event_ms"] == 3_600_000
    )
    lake.write_files(ORPHANS, _orphans(["x"]), "ingestor-0", 1)
    # Appended, but not committed: no reader sees it.
    assert lake.read(SESSIONS).num_rows == 0 and lake.read(ORPHANS).num_rows == 0
    assert lake.last_seq("ingestor-0") == 0
    lake.commit(Entry("ingestor-0", 1, 5, files, {"0": {"offsets": {"t": 9}}}, {}))
    assert Lake(tmp_path).last_seq("ingestor-0") == 1  # the Delta application transaction
    assert sorted(lake.read(SESSIONS).column("request_id").to_pylist()) == ["a", "b"]
    assert lake.read(ORPHANS).column("request_id").to_pylist() == ["x"]
    (entry,) = Lake(tmp_path).entries()  # the entry, read back from the commit metadata
    assert entry.partitions == {"0": {"offsets": {"t": 9}}} and entry.files == files
    with pytest.raises(LakeError, match="committed seq 1 already"):
        lake.commit(Entry("ingestor-0", 1, 5, [], {}, {}))


def test_rows_a_crash_left_before_the_commit_point_are_rolled_back_for_that_writer_only(
    tmp_path,
):
    lake = Lake(tmp_path)
    _commit(lake, "ingestor-0", 1, ["a"], ["x"])
    _commit(lake, "ingestor-1", 1, ["b"])
    lake.write_files(ORPHANS, _orphans(["late-0"]), "ingestor-0", 2)  # then a crash
    lake.write_files(ORPHANS, _orphans(["late-1"]), "ingestor-1", 2)  # another writer's
    restarted = Lake(tmp_path)
    assert restarted.remove_uncommitted("ingestor-0") == 1
    _commit(restarted, "ingestor-0", 2, ["c"], ["y"])  # the replay
    assert sorted(restarted.read(ORPHANS).column("request_id").to_pylist()) == ["x", "y"]
    # ingestor-1's uncommitted row stays on disk (its own restart rolls it back) and is
    # never read.
    assert restarted.remove_uncommitted("ingestor-1") == 1
    # A clean restart finds nothing to roll back and commits nothing.
    versions = {n: restarted._table(n).version() for n in (SESSIONS, ORPHANS)}
    assert Lake(tmp_path).remove_uncommitted("ingestor-0") == 0
    assert {n: restarted._table(n).version() for n in (SESSIONS, ORPHANS)} == versions


def test_incremental_reads_by_marks_return_each_commit_once_in_commit_order(tmp_path):
    lake = Lake(tmp_path)
    reader = Lake(tmp_path)  # a long-lived reader (the monitor, the trainer)
    _commit(lake, "ingestor-0", 1, ["a", "b"], at=10)
    _commit(lake, "ingestor-1", 1, ["c"], at=11)
    new = reader.new_entries({})
    assert [(e.writer, e.seq) for e in new] == [("ingestor-0", 1), ("ingestor-1", 1)]
    marks = Lake.advance({}, new)
    _commit(lake, "ingestor-0", 2, [], ["z"], at=12)  # a flush without sessions commits too
    _commit(lake, "ingestor-0", 3, ["d"], at=13)
    new = reader.new_entries(marks)
    assert [e.seq for e in new] == [2, 3]
    table = reader.read(SESSIONS, new, columns=["request_id"], with_commit=True)
    assert table.to_pylist() == [{"request_id": "d", "writer": "ingestor-0", "seq": 3}]
    # Whole reads follow the order of the entries asked for.
    back = reader.read(SESSIONS, list(reversed(reader.entries())), columns=["request_id"])
    assert back.column("request_id").to_pylist() == ["c", "d", "a", "b"]
    assert reader.new_entries(Lake.advance(marks, new)) == []
    assert reader.newest_event_ms(SESSIONS) == 1_700_000_000_000 + 3_600_000


def test_compaction_and_vacuum_keep_every_row_and_another_engine_reads_the_table(tmp_path):
    import polars as pl

    lake = Lake(tmp_path)
    for seq in range(1, 7):
        _commit(lake, "ingestor-0", seq, [f"s{seq}-{i}" for i in range(3)], [f"o{seq}"])
    before = sorted(lake.read(SESSIONS).column("request_id").to_pylist())
    out = lake.compact()
    assert out[SESSIONS]["files_removed"] >= 6 and out[SESSIONS]["files_added"] == 1
    gone = lake.vacuum(retention_hours=0)
    assert gone[SESSIONS] >= 6  # the small files compaction replaced
    again = Lake(tmp_path)
    assert sorted(again.read(SESSIONS).column("request_id").to_pylist()) == before
    assert [e.seq for e in again.entries()] == list(range(1, 7))
    assert again.last_seq("ingestor-0") == 6
    # Polars reads the sessions table through its own Delta reader.
    df = pl.read_delta(str(tmp_path / SESSIONS))
    assert df.height == 18 and sorted(df["request_id"].to_list()) == before
    assert set(df["writer"].unique().to_list()) == {"ingestor-0"}


def _legacy_lake(root) -> None:
    """A lake in the layout before Delta: Parquet files and a ``_log`` of entries."""
    (root / "_log").mkdir(parents=True)
    for seq, ids in ((1, ["a", "b"]), (2, ["c"])):
        rel = f"sessions/date=2023-11-14/hour=22/ingestor-0-{seq:08d}.parquet"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_sessions(ids), root / rel)
        entry = {
            "writer": "ingestor-0",
            "seq": seq,
            "committed_at_ms": seq,
            "files": [{"table": SESSIONS, "path": rel, "rows": len(ids)}],
            "partitions": {"0": {"pseq": seq, "state": f"_state/ingestor-0-{seq:08d}.json"}},
            "counts": {"sessions": len(ids)},
        }
        (root / "_log" / f"ingestor-0-{seq:08d}.json").write_text(json.dumps(entry))
    rel = "orphans/date=2023-11-14/hour=22/ingestor-0-00000002.parquet"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(_orphans(["x"]), root / rel)
    log = json.loads((root / "_log" / "ingestor-0-00000002.json").read_text())
    log["files"].append({"table": ORPHANS, "path": rel, "rows": 1})
    (root / "_log" / "ingestor-0-00000002.json").write_text(json.dumps(log))


def test_a_lake_of_the_earlier_layout_says_to_migrate_and_migrates_commit_by_commit(tmp_path):
    _legacy_lake(tmp_path)
    with pytest.raises(LakeError, match="recloop lake migrate"):
        Lake(tmp_path).read(SESSIONS)
    assert Lake(tmp_path).migrate() == {"commits": 2, SESSIONS: 3, ORPHANS: 1}
    lake = Lake(tmp_path)
    assert sorted(lake.read(SESSIONS).column("request_id").to_pylist()) == ["a", "b", "c"]
    assert lake.read(ORPHANS).column("request_id").to_pylist() == ["x"]
    assert lake.last_seq("ingestor-0") == 2  # the ingestor resumes after seq 2
    assert [e.partitions["0"]["pseq"] for e in lake.entries()] == [1, 2]
    assert (tmp_path / "_pre_delta" / "_log").is_dir()  # the old files are kept


def test_the_first_ingestor_compacts_and_vacuums_the_lake_on_its_schedule(tmp_path):
    import time

    from actors.ingestor import Ingestor
    from recloop.config import StackConfig

    lake = Lake(tmp_path / "lake")
    for seq in range(1, 5):
        _commit(lake, "ingestor-0", seq, [f"s{seq}"], [f"o{seq}"])
    cfg = StackConfig.from_dict(
        {
            "home": str(tmp_path / "home"),
            "ingest": {
                "lake_dir": str(tmp_path / "lake"),
                "compact_every_s": 60,
                "vacuum_retention_h": 0,
            },
        }
    )
    said: list[str] = []
    first, second = Ingestor(cfg, 0, said.append), Ingestor(cfg, 1, said.append)
    assert not first._upkeep_due()  # not before its period
    first.last_upkeep = second.last_upkeep = time.monotonic() - 61
    assert first._upkeep_due() and not second._upkeep_due()  # one ingestor does it
    first.upkeep()
    assert not first._upkeep_due()
    # four small files of each table merged, and the replaced ones deleted (retention 0)
    assert any("8 small files compacted, 8 old files vacuumed" in s for s in said), said
    sessions = lake._table(SESSIONS)
    assert len(pa.table(sessions.get_add_actions(flatten=True))) == 1
    assert sorted(Lake(tmp_path / "lake").read(SESSIONS).column("request_id").to_pylist()) == [
        "s1",
        "s2",
        "s3",
        "s4",
    ]
