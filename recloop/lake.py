"""The lake: training examples as Parquet files, made visible by a commit log.

Layout under ``<home>/lake``::

    sessions/date=YYYY-MM-DD/hour=HH/<writer>-<seq>.parquet   one row per served session
    orphans/date=YYYY-MM-DD/hour=HH/<writer>-<seq>.parquet    feedback that joined nothing
    _state/<writer>-<seq>.json                                the ingestor's state (one per commit)
    _log/<writer>-<seq>.json                                  one commit: files, offsets, state

Partitions are by event time (UTC) of the impression (sessions) or of the feedback
(orphans). A data file is written under a hidden name, fsynced and renamed; it becomes
part of the lake only when a ``_log`` entry that lists it is written (atomically, last).
Readers go through the log, never through a directory listing, so a file left by a
writer that crashed before its commit is never read (and the writer removes it when it
starts again). The log entry also holds the Kafka offsets the files cover, which is what
makes ingestion exactly-once: after a crash the ingestor resumes from the log, not from
the offsets Kafka last saw committed.

A reader that consumes the lake incrementally keeps *marks*: the last sequence number
it has taken from each writer (a writer's entries are committed in sequence order).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
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

_FILE = re.compile(r"^(?P<writer>[a-z0-9][a-z0-9_-]*)-(?P<seq>\d{8})\.parquet$")
_ENTRY = re.compile(r"^(?P<writer>[a-z0-9][a-z0-9_-]*)-(?P<seq>\d{8})\.json$")
WRITER = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


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


def write_parquet_atomic(path: Path, table: pa.Table, sync_dirs: set[Path] | None = None) -> None:
    write_with(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"), sync_dirs)


def hour_partition(event_time_ms: int) -> str:
    t = datetime.fromtimestamp(event_time_ms / 1000, UTC)
    return f"date={t:%Y-%m-%d}/hour={t:%H}"


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


class Lake:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.log_dir = self.root / "_log"
        self.state_dir = self.root / "_state"
        self._parsed: dict[str, Entry] = {}  # log file name -> entry (entries never change)

    def __repr__(self) -> str:
        return f"Lake({str(self.root)!r})"

    # ------------------------------------------------------------------ writing
    def write_files(
        self,
        name: str,
        table: pa.Table,
        writer: str,
        seq: int,
        sync_dirs: set[Path] | None = None,
    ) -> list[dict]:
        """Write ``table`` (schema ``SCHEMAS[name]``) as one file per event-time hour;
        return the file records a commit lists. Not visible until ``commit``. With
        ``sync_dirs`` the caller fsyncs the directories (see ``write_with``)."""
        if table.num_rows == 0:
            return []
        table = table.cast(SCHEMAS[name]) if table.schema != SCHEMAS[name] else table
        times = table.column("event_time_ms").to_pylist()
        parts: dict[str, list[int]] = {}
        for i, t in enumerate(times):
            parts.setdefault(hour_partition(t), []).append(i)
        out = []
        for part, rows in sorted(parts.items()):
            chunk = table.take(pa.array(rows, pa.int64()))
            rel = f"{name}/{part}/{writer}-{seq:08d}.parquet"
            write_parquet_atomic(self.root / rel, chunk, sync_dirs)
            ts = chunk.column("event_time_ms")
            rec = chunk.column("record_ts_ms")
            out.append(
                {
                    "table": name,
                    "path": rel,
                    "rows": chunk.num_rows,
                    "min_event_ms": int(pc.min(ts).as_py()),
                    "max_event_ms": int(pc.max(ts).as_py()),
                    "max_record_ts_ms": int(pc.max(rec).as_py()),
                }
            )
        return out

    def commit(self, entry: Entry) -> Path:
        """Make an entry (and the files it lists) visible; atomic and durable."""
        if not WRITER.match(entry.writer):
            raise LakeError(f"bad writer name {entry.writer!r}")
        path = self.log_dir / f"{entry.writer}-{entry.seq:08d}.json"
        if path.exists():
            raise LakeError(f"{path} exists: {entry.writer} committed seq {entry.seq} already")
        write_atomic(path, json.dumps(entry.to_json(), sort_keys=True).encode())
        return path

    def remove_uncommitted(self, writer: str) -> list[Path]:
        """Delete data and state files of ``writer`` newer than its last commit (left by a
        crash between writing and committing). Other writers' files are not touched."""
        last = self.last_seq(writer)
        removed = []
        for name in SCHEMAS:
            base = self.root / name
            if not base.is_dir():
                continue
            for f in base.glob(f"*/*/{writer}-*.parquet"):
                m = _FILE.match(f.name)
                if m and m["writer"] == writer and int(m["seq"]) > last:
                    f.unlink()
                    removed.append(f)
        for f in self.root.glob("**/.*.parquet.*"):  # half-written temporaries of anyone
            if time.time() - f.stat().st_mtime > 60:
                f.unlink(missing_ok=True)
        return removed

    # ------------------------------------------------------------------ reading
    def entries(self, writer: str | None = None) -> list[Entry]:
        """Committed entries, ordered by writer then sequence."""
        if not self.log_dir.is_dir():
            return []
        out = []
        for name in sorted(os.listdir(self.log_dir)):
            m = _ENTRY.match(name)
            if not m or (writer is not None and m["writer"] != writer):
                continue
            if name not in self._parsed:
                data = json.loads((self.log_dir / name).read_text())
                self._parsed[name] = Entry.from_json(data)
            out.append(self._parsed[name])
        return out

    def last_seq(self, writer: str) -> int:
        seqs = [e.seq for e in self.entries(writer)]
        return max(seqs) if seqs else 0

    def files(self, name: str = SESSIONS, entries: Iterable[Entry] | None = None) -> list[Path]:
        """Absolute paths of the committed files of table ``name``."""
        entries = self.entries() if entries is None else entries
        return [self.root / f["path"] for e in entries for f in e.files if f["table"] == name]

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
        self, name: str = SESSIONS, entries: Iterable[Entry] | None = None, columns=None
    ) -> pa.Table:
        """The rows of table ``name`` in ``entries`` (default: the whole lake)."""
        paths = self.files(name, entries)
        schema = SCHEMAS[name]
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        if not paths:
            return schema.empty_table()
        tables = [pq.read_table(p, columns=columns) for p in paths]
        return pa.concat_tables([t.cast(schema) for t in tables])

    def newest_event_ms(self, name: str | None = None) -> int | None:
        """The newest event time committed (to table ``name``, or any)."""
        return max(
            (
                int(f["max_event_ms"])
                for e in self.entries()
                for f in e.files
                if name is None or f["table"] == name
            ),
            default=None,
        )

    def summary(self) -> dict[str, Any]:
        entries = self.entries()
        rows: dict[str, int] = {}
        for e in entries:
            for f in e.files:
                rows[f["table"]] = rows.get(f["table"], 0) + int(f["rows"])
        return {
            "root": str(self.root),
            "commits": len(entries),
            "writers": sorted({e.writer for e in entries}),
            "rows": rows,
            "newest_event_ms": self.newest_event_ms(),
        }
