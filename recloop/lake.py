"""The lake: two Delta Lake tables (delta-rs, no JVM) and the ingestor's commits in them.

Layout under ``<home>/lake``::

    sessions/    Delta table: one row per served session, feedback joined by position
    orphans/     Delta table: feedback that joined nothing (late, or no impression)
    _state/<writer>-<seq>.json   the ingestor's join state, one file per commit

Any engine that reads Delta reads the tables (Polars, DuckDB's delta extension, Spark,
``ray.data.read_delta``). Each row carries the commit that wrote it: ``writer`` (the
ingestor, ``ingestor-0``) and ``seq`` (its commit number).

**The commit point is a commit of the sessions table.** An ingestor's flush appends its
orphans to their table, writes its join state to ``_state/``, then appends its sessions
in one Delta commit that also records the writer's progress: an application transaction
(app id = writer, version = seq; ``DeltaTable.transaction_version``) and, in the
commit's metadata (key ``recloop``), the entry: the Kafka offsets the commit covers per
partition, its state file and the file statistics. A flush without new sessions commits
no rows, only that. After a crash anywhere before it, the writer resumes from its last
committed seq: rows it appended to the orphans table after it are deleted
(``remove_uncommitted``), state files after it are removed, and the records are read
again from the committed offsets, so every event lands once. Readers take only committed
commits: the sessions table holds nothing else, and the orphans table is read through
the committed ``(writer, seq)`` pairs.

The join state stays outside Delta: it is the ingestor's private operator state (open
sessions, per-user history and counters, as a snapshot or a delta), read back only by
the ingestor that owns the partition, and in no table shape anyone queries; the commit
names the file that holds it.

A reader that consumes the lake incrementally keeps *marks*: the last seq it has taken
from each writer (a writer's commits land in seq order). ``compact`` (Delta's optimize)
merges the small files of frequent flushes and checkpoints the log; ``vacuum`` deletes
files no version within the retention reads (``recloop lake compact|vacuum``; the first
ingestor runs both every ``ingest.compact_every_s``).

Durability: delta-rs commits by an atomic put-if-absent of the log file and the data
files are written before it, so a killed process never leaves a partial commit; it does
not fsync on a local disk (the join state files are fsynced).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

SESSIONS = "sessions"
ORPHANS = "orphans"

_i64, _f64, _str, _bool = pa.int64(), pa.float64(), pa.string(), pa.bool_()

SCHEMAS: dict[str, pa.Schema] = {
    # One served session with the feedback joined to it, position by position.
    SESSIONS: pa.schema(
        [
            ("event_id", _str),  # of the impression
            ("request_id", _str),
            ("user_id", _i64),
            ("arm", _str),
            ("model_version", _str),
            ("event_time_ms", _i64),  # impression event time
            ("history", pa.list_(_i64)),  # the user's items before the session, oldest first
            ("items", pa.list_(_i64)),  # served, by position
            ("scores", pa.list_(_f64)),
            ("feedback", pa.list_(_bool)),  # did feedback arrive for the position
            ("clicked", pa.list_(_bool)),
            ("watch_time_s", pa.list_(_f64)),
            ("liked", pa.list_(_bool)),
            ("followed", pa.list_(_bool)),
            ("n_feedback", _i64),
            ("clicks", _i64),
            ("session_watch_s", _f64),
            ("likes", _i64),
            ("follows", _i64),
            ("last_feedback_ms", _i64),  # event time of the newest feedback (0: none)
            ("record_ts_ms", _i64),  # newest Kafka timestamp of its records (wall clock)
            ("closed_by", _str),  # complete | window | wait
            ("context", _str),  # JSON: the request's tags, then the feedback's (the run)
        ]
    ),
    # Feedback that could not be joined: its session closed already (late), or no
    # impression arrived within the window (missing).
    ORPHANS: pa.schema(
        [
            ("event_id", _str),
            ("request_id", _str),
            ("user_id", _i64),
            ("item_id", _i64),
            ("position", _i64),
            ("arm", _str),
            ("model_version", _str),
            ("event_time_ms", _i64),
            ("clicked", _bool),
            ("watch_time_s", _f64),
            ("liked", _bool),
            ("followed", _bool),
            ("record_ts_ms", _i64),
            ("reason", _str),  # late | missing-impression
        ]
    ),
}


class LakeError(RuntimeError):
    pass


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_with(
    path: Path, write: Callable[[str], None], sync_dirs: set[Path] | None = None
) -> None:
    """``write(tmp_name)`` a hidden sibling, fsync it, rename it to ``path``: the file
    is either absent or complete, and durable once this returns. With ``sync_dirs``
    the directory is added to that set instead of fsynced here: the caller fsyncs each
    directory once, after all of its files (one directory fsync per commit, not one
    per file), and before anything that refers to them is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dirs is None:
        fsync_dir(path.parent)
    else:
        sync_dirs.add(path.parent)


def write_atomic(path: Path, data: bytes, sync_dirs: set[Path] | None = None) -> None:
    write_with(path, lambda tmp: Path(tmp).write_bytes(data), sync_dirs)


@dataclass(frozen=True)
class Entry:
    """One commit of one writer."""

    writer: str
    seq: int
    committed_at_ms: int
    files: list[dict[str, Any]]
    partitions: dict[str, dict[str, Any]]
    counts: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(
            writer=data["writer"],
            seq=int(data["seq"]),
            committed_at_ms=int(data["committed_at_ms"]),
            files=list(data.get("files", [])),
            partitions=dict(data.get("partitions", {})),
            counts=dict(data.get("counts", {})),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "writer": self.writer,
            "seq": self.seq,
            "committed_at_ms": self.committed_at_ms,
            "files": self.files,
            "partitions": self.partitions,
            "counts": self.counts,
        }


WRITER = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
META_KEY = "recloop"  # the commit metadata key that holds a commit point's entry
# Each row's commit: who wrote it and in which of its commits.
COMMIT_FIELDS = [pa.field("writer", pa.string()), pa.field("seq", pa.int64())]
LEGACY_HINT = "run `recloop lake migrate` (it keeps the old files under _pre_delta/)"


def table_schema(name: str) -> pa.Schema:
    """The Delta table's schema: the rows' (``SCHEMAS[name]``) and their commit."""
    return pa.schema([*SCHEMAS[name], *COMMIT_FIELDS])


def file_record(name: str, table: pa.Table) -> dict[str, Any]:
    """What an entry says of the rows it commits to table ``name``."""
    ts, rec = table.column("event_time_ms"), table.column("record_ts_ms")
    return {
        "table": name,
        "rows": table.num_rows,
        "min_event_ms": int(pc.min(ts).as_py()),
        "max_event_ms": int(pc.max(ts).as_py()),
        "max_record_ts_ms": int(pc.max(rec).as_py()),
    }


class Lake:
    """The lake at ``root`` (a local or shared directory). Cheap to make; keeps what it
    parsed of the sessions table's log, so a long-lived instance reads only new commits."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.state_dir = self.root / "_state"
        self._tables: dict[str, Any] = {}  # name -> DeltaTable, once it exists
        self._entries: dict[tuple[str, int], Entry] = {}
        self._parsed_to = -1  # the sessions table's newest version parsed for entries
        self._staged: dict[tuple[str, int], pa.Table] = {}  # sessions waiting for commit

    def __repr__(self) -> str:
        return f"Lake({str(self.root)!r})"

    # ------------------------------------------------------------------ tables
    def _table(self, name: str, create: bool = False) -> Any:
        """Table ``name``, brought up to its newest version; None if it does not exist
        (and ``create`` is false)."""
        from deltalake import DeltaTable

        dt = self._tables.get(name)
        if dt is not None:
            dt.update_incremental()
            return dt
        uri = str(self.root / name)
        if not DeltaTable.is_deltatable(uri):
            if self.is_legacy():
                raise LakeError(
                    f"{self.root} holds a lake in the layout before Delta Lake: {LEGACY_HINT}"
                )
            if not create:
                return None
            DeltaTable.create(uri, schema=table_schema(name), mode="ignore", name=name)
        dt = self._tables[name] = DeltaTable(uri)
        return dt

    def version(self, name: str = SESSIONS) -> int | None:
        """Table ``name``'s newest version (None: no table yet)."""
        dt = self._table(name)
        return None if dt is None else int(dt.version())

    def is_legacy(self) -> bool:
        """Whether ``root`` holds the commit log of the layout before Delta Lake."""
        return (self.root / "_log").is_dir()

    # ------------------------------------------------------------------ writing
    def write_files(self, name: str, table: pa.Table, writer: str, seq: int) -> list[dict]:
        """Rows of ``writer``'s commit ``seq`` to table ``name`` (schema ``SCHEMAS[name]``);
        returns the file records its entry lists. Sessions are held until ``commit``
        (they go in the commit point itself); other tables' rows are appended now and
        count only once that commit lands (``remove_uncommitted`` drops them otherwise)."""
        if not WRITER.match(writer):
            raise LakeError(f"bad writer name {writer!r}")
        if table.num_rows == 0:
            return []
        table = table.cast(SCHEMAS[name]) if table.schema != SCHEMAS[name] else table
        if name == SESSIONS:
            key = (writer, seq)
            held = self._staged.get(key)
            self._staged[key] = table if held is None else pa.concat_tables([held, table])
        else:
            self._append(name, _with_commit(table, writer, seq))
        return [file_record(name, table)]

    def _append(self, name: str, rows: pa.Table, props: Any = None, dt: Any = None) -> None:
        """Append ``rows`` in one commit (``dt``: the table, already brought up to date)."""
        from deltalake import write_deltalake

        dt = self._table(name, create=True) if dt is None else dt
        write_deltalake(dt, rows, mode="append", commit_properties=props)  # updates ``dt``

    def commit(self, entry: Entry) -> int:
        """The commit point of ``entry``: its sessions (held by ``write_files``) and the
        writer's progress, in one commit of the sessions table. Returns its version."""
        from deltalake import CommitProperties, Transaction

        if not WRITER.match(entry.writer):
            raise LakeError(f"bad writer name {entry.writer!r}")
        dt = self._table(SESSIONS, create=True)
        if int(dt.transaction_version(entry.writer) or 0) >= entry.seq:
            raise LakeError(f"{entry.writer} committed seq {entry.seq} already")
        held = self._staged.pop((entry.writer, entry.seq), SCHEMAS[SESSIONS].empty_table())
        props = CommitProperties(
            custom_metadata={META_KEY: json.dumps(entry.to_json(), sort_keys=True)},
            app_transactions=[Transaction(app_id=entry.writer, version=entry.seq)],
        )
        self._append(SESSIONS, _with_commit(held, entry.writer, entry.seq), props, dt)
        self._entries[(entry.writer, entry.seq)] = entry
        return dt.version()

    def remove_uncommitted(self, writer: str) -> int:
        """Delete the rows ``writer`` appended after its last commit point (a crash
        between them); returns how many. Other writers' rows are not touched."""
        from deltalake.exceptions import CommitFailedError

        self._staged = {k: v for k, v in self._staged.items() if k[0] != writer}
        last, removed = self.last_seq(writer), 0
        quoted = writer.replace("'", "''")
        for name in SCHEMAS:
            if name == SESSIONS or (dt := self._table(name)) is None:
                continue
            # A clean restart has nothing to roll back: the files' statistics say so
            # without a delete (which rewrites nothing but still commits).
            if not _files_of(dt, [Entry(writer, last + 1, 0, [], {}, {})], every=False, after=True):
                continue
            for attempt in range(5):
                try:
                    got = dt.delete(f"writer = '{quoted}' AND seq > {int(last)}")
                    break
                except CommitFailedError:  # another writer's compaction committed first
                    if attempt == 4:
                        raise
                    dt.update_incremental()
            removed += int(got.get("num_deleted_rows", 0))
        return removed

    # ------------------------------------------------------------------ reading
    def entries(self, writer: str | None = None) -> list[Entry]:
        """Committed entries, ordered by writer then seq (the commits still in the
        table's log: ``vacuum`` keeps the log's retention of it)."""
        dt = self._table(SESSIONS)
        if dt is None:
            return []
        version = dt.version()
        if version > self._parsed_to:
            for commit in dt.history(limit=version - self._parsed_to):
                meta = commit.get(META_KEY)
                if meta:
                    e = Entry.from_json(json.loads(meta))
                    self._entries[(e.writer, e.seq)] = e
            self._parsed_to = version
        keys = sorted(k for k in self._entries if writer is None or k[0] == writer)
        return [self._entries[k] for k in keys]

    def last_seq(self, writer: str) -> int:
        """``writer``'s last committed seq (0: none), from its application transaction."""
        dt = self._table(SESSIONS)
        version = dt.transaction_version(writer) if dt is not None else None
        return int(version or 0)

    def new_entries(self, marks: dict[str, int]) -> list[Entry]:
        """Entries after ``marks`` ({writer: last seq taken}), oldest commit first."""
        new = [e for e in self.entries() if e.seq > int(marks.get(e.writer, 0))]
        return sorted(new, key=lambda e: (e.committed_at_ms, e.writer, e.seq))

    @staticmethod
    def advance(marks: dict[str, int], entries: Iterable[Entry]) -> dict[str, int]:
        out = dict(marks)
        for e in entries:
            out[e.writer] = max(out.get(e.writer, 0), e.seq)
        return out

    def read(
        self,
        name: str = SESSIONS,
        entries: Iterable[Entry] | None = None,
        columns: Sequence[str] | None = None,
        with_commit: bool = False,
    ) -> pa.Table:
        """The rows of table ``name`` that ``entries`` committed (default: every
        committed row), in the entries' order; ``with_commit`` adds each row's
        ``writer`` and ``seq``."""
        order = list(self.entries() if entries is None else entries)
        fields = (
            list(SCHEMAS[name]) if columns is None else [SCHEMAS[name].field(c) for c in columns]
        )
        if with_commit:
            fields += COMMIT_FIELDS
        schema = pa.schema(fields)
        if not order:
            return schema.empty_table()
        paths, match = self.scan(name, order, every=entries is None)
        if not paths:
            return schema.empty_table()
        wanted = [f.name for f in fields]
        need = list(dict.fromkeys([*wanted, "writer", "seq"]))
        data = pads.dataset(paths, schema=table_schema(name), format="parquet")
        table = data.to_table(columns=need, filter=match)
        return in_commit_order(table, order).select(wanted).cast(schema)

    def scan(
        self, name: str, entries: Sequence[Entry], every: bool = False
    ) -> tuple[list[str], pc.Expression | None]:
        """What a reader of ``entries``' rows of table ``name`` opens: the table's files
        (absolute paths, at its newest version) whose commit statistics can hold them,
        and the row filter that keeps exactly their rows (``every``: every commit of
        their writers up to the newest). An incremental read of a few commits opens a
        few files, not one per flush since the last compaction. Any Parquet reader can
        read them (the round's Ray Data tasks do); ([], None) when there is nothing."""
        dt = self._table(name)
        if dt is None or not entries:
            return [], None
        paths = [str(self.root / name / p) for p in _files_of(dt, entries, every=every)]
        return paths, _commit_filter(entries, every=every)

    def newest_event_ms(self, name: str | None = None) -> int | None:
        """The newest event time committed (to table ``name``, or any)."""
        if name == SESSIONS:
            # Only commit points write the sessions table: its files' statistics are
            # the answer, without parsing the log's history.
            dt = self._table(SESSIONS)
            acts = pa.table(dt.get_add_actions(flatten=True)) if dt is not None else None
            col = "max.event_time_ms"
            if acts is not None and col in acts.column_names and acts.column(col).null_count == 0:
                got = pc.max(acts.column(col)).as_py()
                return None if got is None else int(got)
        names = list(SCHEMAS) if name is None else [name]
        return max(
            (f["max_event_ms"] for e in self.entries() for f in e.files if f["table"] in names),
            default=None,
        )

    def summary(self) -> dict[str, Any]:
        entries = self.entries()
        rows: dict[str, int] = {}
        for e in entries:
            for f in e.files:
                rows[f["table"]] = rows.get(f["table"], 0) + int(f["rows"])
        versions = {n: dt.version() for n in SCHEMAS if (dt := self._table(n)) is not None}
        return {
            "root": str(self.root),
            "format": "delta",
            "versions": versions,
            "commits": len(entries),
            "writers": sorted({e.writer for e in entries}),
            "rows": rows,
            "newest_event_ms": self.newest_event_ms(),
        }

    # ------------------------------------------------------------------ upkeep
    def compact(self, target_mb: int = 64) -> dict[str, Any]:
        """Merge each table's small files (one per flush) into files of up to
        ``target_mb``, then checkpoint its log (readers start from the checkpoint)."""
        out: dict[str, Any] = {}
        for name in SCHEMAS:
            dt = self._table(name)
            if dt is None:
                continue
            got = dt.optimize.compact(target_size=target_mb * 1024 * 1024)
            dt.update_incremental()
            dt.create_checkpoint()
            out[name] = {
                "files_removed": int(got.get("numFilesRemoved", 0)),
                "files_added": int(got.get("numFilesAdded", 0)),
                "version": dt.version(),
            }
        return out

    def vacuum(self, retention_hours: float = 24.0) -> dict[str, int]:
        """Delete the files no table version of the last ``retention_hours`` reads
        (those compaction replaced, rows rolled back), and the log older than the
        table's log retention that a checkpoint covers."""
        out: dict[str, int] = {}
        for name in SCHEMAS:
            dt = self._table(name)
            if dt is None:
                continue
            gone = dt.vacuum(
                retention_hours=max(0, int(retention_hours)),
                dry_run=False,
                enforce_retention_duration=False,
            )
            dt.cleanup_metadata()
            out[name] = len(gone)
        return out

    # ------------------------------------------------------------------ migration
    def migrate(self, progress: Callable[[str], None] = lambda _: None) -> dict[str, int]:
        """Rewrite a lake of the layout before Delta Lake (a ``_log`` of JSON entries
        over Parquet files) as Delta tables, commit by commit in the order they were
        made, with the same entries (writers, seqs, offsets, state files): an ingestor
        resumes from it where it stopped. The old files move to ``_pre_delta/``."""
        if not self.is_legacy():
            raise LakeError(f"{self.root} has no lake of the earlier layout (no _log)")
        old = self.root / "_pre_delta"
        if old.exists():
            raise LakeError(f"{old} exists: an earlier migration stopped half-way; look there")
        old.mkdir()
        for part in ("_log", *SCHEMAS):
            if (self.root / part).exists():
                shutil.move(str(self.root / part), str(old / part))
        raw = [json.loads(p.read_text()) for p in sorted((old / "_log").glob("*.json"))]
        raw.sort(key=lambda d: (d["committed_at_ms"], d["writer"], d["seq"]))
        rows = dict.fromkeys(SCHEMAS, 0)
        for i, d in enumerate(raw, 1):
            e = Entry.from_json(d)
            files: list[dict] = []
            for name in SCHEMAS:
                paths = [old / f["path"] for f in e.files if f["table"] == name]
                if paths:
                    table = pa.concat_tables([pq.read_table(p).cast(SCHEMAS[name]) for p in paths])
                    files += self.write_files(name, table, e.writer, e.seq)
                    rows[name] += table.num_rows
            self.commit(Entry(e.writer, e.seq, e.committed_at_ms, files, e.partitions, e.counts))
            if i % 500 == 0:
                progress(f"migrated {i} of {len(raw)} commits")
        progress(f"migrated {len(raw)} commits ({rows}); the old files are in {old}")
        return {"commits": len(raw), **rows}


def _with_commit(table: pa.Table, writer: str, seq: int) -> pa.Table:
    """``table`` with its commit's columns."""
    n = table.num_rows
    commit = [pa.array([writer] * n, pa.string()), pa.array([seq] * n, pa.int64())]
    return pa.Table.from_arrays(
        [*table.columns, *commit], schema=pa.schema([*table.schema, *COMMIT_FIELDS])
    )


def _files_of(dt: Any, entries: Sequence[Entry], every: bool, after: bool = False) -> list[str]:
    """The table's files (paths relative to it) whose writer and seq statistics overlap
    ``entries`` (``every``: every seq of their writers up to the newest; ``after``: every
    seq from the entries' on). A file without statistics is kept."""
    spans: dict[str, tuple[int, int]] = {}
    for e in entries:
        lo, hi = spans.get(e.writer, (e.seq, e.seq))
        spans[e.writer] = (0 if every else min(lo, e.seq), 2**62 if after else max(hi, e.seq))
    acts = pa.table(dt.get_add_actions(flatten=True))
    cols = ("path", "min.writer", "max.writer", "min.seq", "max.seq")
    if any(c not in acts.column_names for c in cols):
        return acts.column("path").to_pylist()
    out = []
    for path, w_lo, w_hi, s_lo, s_hi in zip(
        *(acts.column(c).to_pylist() for c in cols), strict=True
    ):
        if None in (w_lo, w_hi, s_lo, s_hi) or any(
            w_lo <= w <= w_hi and s_lo <= hi and s_hi >= lo for w, (lo, hi) in spans.items()
        ):
            out.append(path)
    return out


def in_commit_order(table: pa.Table, order: Sequence[Entry]) -> pa.Table:
    """``table``'s rows ordered by their commit's place in ``order``; rows of one
    commit keep their order. Rows of commits older than the log's retention (no entry
    any more) come first, by seq."""
    keys = pa.table(
        {
            "writer": pa.array([e.writer for e in order], pa.string()),
            "seq": pa.array([e.seq for e in order], pa.int64()),
            "_rank": pa.array(range(len(order)), pa.int64()),
        }
    )
    indexed = pa.table(
        {
            "writer": table.column("writer"),
            "seq": table.column("seq"),
            "_row": pa.array(range(table.num_rows), pa.int64()),
        }
    )
    ranked = indexed.join(keys, ["writer", "seq"], join_type="left outer")
    rank = pc.fill_null(ranked.column("_rank"), -1)
    ranked = ranked.set_column(ranked.schema.get_field_index("_rank"), "_rank", rank)
    order_by = [("_rank", "ascending"), ("seq", "ascending"), ("_row", "ascending")]
    return table.take(ranked.sort_by(order_by).column("_row"))


def _commit_filter(entries: Sequence[Entry], every: bool) -> pc.Expression:
    """Rows of these commits; ``every``: of every commit of their writers up to the
    newest (the whole committed lake)."""
    seqs: dict[str, list[int]] = {}
    for e in entries:
        seqs.setdefault(e.writer, []).append(e.seq)
    match = None
    for writer, ss in seqs.items():
        by = pc.field("writer") == writer
        cond = by & (pc.field("seq") <= max(ss)) if every else by & pc.field("seq").isin(ss)
        match = cond if match is None else match | cond
    return match
