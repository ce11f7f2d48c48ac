"""A round's data through Ray Data: the round's commits read from the sessions Delta table
as a Ray Dataset (the files the lake names for them, filtered by commit, data policy and
quality bar as they are read) and mapped to next-session examples in Ray tasks (on any
node of a cluster that reaches the lake), then collected in event-time order.

The same code runs on one machine and on a cluster: the tasks hold ``train.data_cpus``
each, so a two-core machine whose serving replicas hold most of its CPUs still schedules
them. Without Ray (a round run in a plain process) the round builds its examples in
process with ``data.build_examples``, the reference this path agrees with
(``tests/integration/test_training.py``). The examples are collected rather than
streamed into the training workers: a resumed round must replay the same batches, so a
round's examples are fixed once (``examples.safetensors``) and the gate needs the newest
of them held out, which only a whole view of the round can say.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.continuous.data import (
    SESSION_COLUMNS,
    SessionExamples,
    assemble_examples,
    build_examples,
    policy_sessions,
    quality_sessions,
)
from recloop.config import DATA_ENGINES as ENGINES
from recloop.examples import check_policy, example_order, to_examples
from recloop.lake import SESSIONS, Entry, Lake, in_commit_order, table_schema


@dataclass
class RoundData:
    """A round's examples, and the data policy's sessions when the round asked for them
    (an IPA round's reward model learns from every session of the arm, not only the
    high-quality ones)."""

    examples: SessionExamples
    policy_rows: list[dict] | None
    engine: str  # "ray" or "local"
    fallback: str | None = None  # why an "auto" round read in process after all


def engine(name: str) -> str:
    """``train.data_engine`` resolved: "auto" is Ray Data when this process is connected
    to a Ray cluster of more than one node (a trainer actor, a driver), in process
    otherwise. On one node Ray Data's tasks share the round's own cores, so they bring
    no parallelism, only task and worker start-up (``make bench-training`` times both
    paths on the same commits: ``read_paths`` in its JSON)."""
    if name not in ENGINES:
        raise ValueError(f"train.data_engine must be one of {ENGINES}, not {name!r}")
    if name != "auto":
        return name
    ray = sys.modules.get("ray")  # a process that never imported Ray is not connected
    if ray is None or not ray.is_initialized():
        return "local"
    try:
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception:  # the head is away: the round reads what it can reach itself
        return "local"
    return "ray" if nodes > 1 else "local"


@dataclass(frozen=True)
class RoundQuery:
    """What a round reads of its commits: the sessions that the data ``policy``
    (``arm``'s own, or every arm's: ``policy_sessions``) and the quality bar keep, as
    examples for a model of these sizes, weighted by the arm that served them when
    ``weights`` are given (``policy_weights``). ``context(high-quality session rows)``
    returns the row builder of a context model; ``policy_rows``: also return the
    policy's sessions (whole rows, in commit order)."""

    arm: str
    policy: str
    min_clicks: int
    min_watch_s: float
    item_ids: Sequence[int]
    max_history: int
    session_len: int
    holdout_fraction: float
    context: Callable[[list[dict]], Callable[[dict, list[int]], list[int]]] | None = None
    policy_rows: bool = False
    weights: dict[str, float] | None = None


def round_data(
    lake: Lake,
    entries: Sequence[Entry],
    q: RoundQuery,
    *,
    data_engine: str = "auto",
    cpus: float = 0.1,
    resources: dict[str, float] | None = None,
    tasks: int = 2,
    timeout_s: float = 60.0,
) -> RoundData:
    """The examples ``q`` asks for of ``entries``' sessions. Ray Data's tasks hold
    ``cpus`` and ``resources`` each (the train workers' custom resources: they run on
    train nodes), at most ``tasks`` at once per step.

    With ``data_engine`` "auto", a round whose Ray Data tasks cannot run (no free share
    of the cluster for one, or an execution without progress for ``timeout_s``) reads
    in process instead and says why in ``RoundData.fallback``; with "ray" it raises."""
    check_policy(q.policy)
    kind = engine(data_engine)
    fallback = None
    if kind == "ray":
        remote = _remote(cpus, resources, tasks)
        try:
            no_room(cpus, resources)
            return _ray_round_data(lake, entries, q, remote, timeout_s)
        except Exception as exc:  # the loop goes on; the record says how it read
            if data_engine == "ray":
                raise
            fallback = f"Ray Data: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    rows = lake.read(SESSIONS, entries, columns=SESSION_COLUMNS).to_pylist()
    mine = policy_sessions(rows, q.arm, q.policy)
    hq = quality_sessions(mine, q.min_clicks, q.min_watch_s)
    build = q.context(hq) if q.context is not None else None
    ex = build_examples(
        hq, q.item_ids, q.max_history, q.session_len, q.holdout_fraction, build, q.weights
    )
    return RoundData(ex, mine if q.policy_rows else None, "local", fallback)


def _remote(cpus: float, resources: dict[str, float] | None, tasks: int) -> dict[str, Any]:
    """Each Ray Data step's task options: its share, resources and concurrency."""
    from ray.data import TaskPoolStrategy

    return {
        "num_cpus": cpus,
        "resources": dict(resources or {}),
        "compute": TaskPoolStrategy(size=int(tasks)),
    }


class NoRoom(RuntimeError):
    """No free share of the cluster for one Ray Data task."""


def no_room(cpus: float, resources: dict[str, float] | None) -> None:
    """Raise ``NoRoom`` when the cluster has no free share for one task of ``cpus`` CPUs
    and ``resources`` (its tasks would wait for one)."""
    import ray

    free = ray.available_resources()
    need = {"CPU": float(cpus), **{k: float(v) for k, v in (resources or {}).items()}}
    short = {k: round(free.get(k, 0.0), 3) for k, v in need.items() if free.get(k, 0.0) < v}
    if short:
        raise NoRoom(f"no free share for a task of {need} (free now: {short})")


@functools.cache
def commit_files() -> type:
    """The Ray Data datasource class of a round's read (Ray is imported on first use):
    ``CommitFiles(paths, match, columns, schema)`` reads the rows of some commits of a
    lake table from the files the lake names for them (``Lake.scan``: pruned by the
    commits' statistics), one read task per group of files (``file_groups``), each
    applying the commit filter (and the data policy's and quality bar's) as it reads.

    ``ray.data.read_delta`` reads the same table, but it first samples files in tasks of
    one whole CPU each, which never start on a machine whose serving replicas hold most
    of its CPUs; these read tasks hold the share the round gives them."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class CommitFiles(Datasource):
        def __init__(self, paths: list[str], match: Any, columns: list[str], schema) -> None:
            self.paths, self.match = list(paths), match
            self.columns, self.schema = list(columns), schema

        def estimate_inmemory_data_size(self) -> int | None:
            return sum(_size(p) or 0 for p in self.paths)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            read = functools.partial(read_files, match=self.match, columns=self.columns)
            tasks = []
            for group in file_groups(self.paths, parallelism):
                size = sum(_size(p) or 0 for p in group)
                meta = BlockMetadata(
                    num_rows=None, size_bytes=size, exec_stats=None, input_files=tuple(group)
                )
                tasks.append(
                    ReadTask(functools.partial(read, group, schema=self.schema), meta, self.schema)
                )
            return tasks

        def get_name(self) -> str:
            return "LakeCommits"

    return CommitFiles


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


# A read task's share of the files: a lake between compactions holds a small file per
# flush, hundreds per round, and a task per file cost ~25 ms each on two busy cores (a
# 6 s read for 250 files, measured); a task reads this many bytes of them at least.
TASK_BYTES = 32 * 1024 * 1024


def file_groups(paths: Sequence[str], parallelism: int) -> list[list[str]]:
    """``paths`` in order, cut into at most ``parallelism`` groups (at least one) of
    about ``TASK_BYTES`` or more each: one read task per group."""
    paths = list(paths)
    if not paths:
        return []
    sizes = [_size(p) or 0 for p in paths]
    by_size = -(-sum(sizes) // TASK_BYTES)  # ceil
    n = max(1, min(len(paths), int(parallelism) if parallelism > 0 else 1, by_size))
    target = sum(sizes) / n
    groups: list[list[str]] = [[]]
    filled = 0.0
    for path, size in zip(paths, sizes, strict=True):
        if groups[-1] and filled >= target and len(groups) < n:
            groups.append([])
            filled = 0.0
        groups[-1].append(path)
        filled += size
    return groups


def read_files(
    paths: list[str], *, match: Any, columns: list[str], schema: pa.Schema
) -> list[pa.Table]:
    """One read task: ``columns`` of the rows of ``paths`` that ``match`` keeps."""
    import pyarrow.dataset as pads

    table = pads.dataset(paths, format="parquet").to_table(columns=columns, filter=match)
    return [table.cast(schema)]


def _quality(min_clicks: int, min_watch_s: float) -> Any:
    """``data.is_high_quality`` as a row filter (a null count is no count)."""
    return (
        (pc.field("clicks") >= int(min_clicks))
        | (pc.field("session_watch_s") >= float(min_watch_s))
        | (pc.field("likes") > 0)
        | (pc.field("follows") > 0)
    )


def _sessions(lake: Lake, entries: Sequence[Entry], where: Any, remote: dict[str, Any]) -> Any:
    """The sessions of ``entries`` that ``where`` keeps, as a Ray Dataset (None: no file
    holds them)."""
    import ray

    paths, match = lake.scan(SESSIONS, entries)
    if not paths:
        return None
    columns = [*SESSION_COLUMNS, "writer", "seq"]
    schema = pa.schema([table_schema(SESSIONS).field(c) for c in columns])
    source = commit_files()(paths, match & where if where is not None else match, columns, schema)
    return ray.data.read_datasource(source, **remote)


def _ray_round_data(
    lake: Lake, entries: Sequence[Entry], q: RoundQuery, remote: dict[str, Any], timeout_s: float
) -> RoundData:
    import ray

    _quiet(ray, timeout_s)
    own = None if q.policy != "own-arm" else pc.field("arm") == q.arm
    quality = _quality(q.min_clicks, q.min_watch_s)
    mine = [] if q.policy_rows else None
    if q.policy_rows:  # the policy's sessions whole, in commit order (the reward model's)
        ds = _sessions(lake, entries, own, remote)
        table = _collect(ds) if ds is not None else pa.table({})
        if table.num_rows:
            mine = in_commit_order(table, entries).drop_columns(["writer", "seq"]).to_pylist()
    where = quality if own is None else own & quality
    ds = _sessions(lake, entries, where, remote)
    rows: list[dict] = []
    if ds is not None:
        examples = ds.map_batches(
            to_examples,
            fn_kwargs={"item_ids": [int(i) for i in q.item_ids], "session_len": q.session_len},
            batch_format="pyarrow",
            **remote,
        )
        rows = sorted(_collect(examples).to_pylist(), key=example_order)
    build = q.context(rows) if q.context is not None else None
    ex = assemble_examples(
        rows, rows, q.max_history, q.session_len, q.holdout_fraction, build, q.weights
    )
    return RoundData(ex, mine, "ray")


def warm_up(
    lake: Lake,
    cpus: float = 0.1,
    resources: dict[str, float] | None = None,
    tasks: int = 2,
    timeout_s: float = 60.0,
) -> bool:
    """Run the round's Ray Data steps once over no rows (a filter nothing passes), so
    the worker processes exist and have imported what the read and the map need before
    the first round (~4 s on this machine, paid while the rounds wait for data). False
    when there is nothing to read yet; ``NoRoom`` when the cluster has no free share
    for a task now."""
    import ray

    entries = lake.entries()[-1:]
    if not entries:
        return False
    remote = _remote(cpus, resources, tasks)
    no_room(cpus, resources)
    _quiet(ray, timeout_s)
    ds = _sessions(lake, entries, pc.field("event_time_ms") < 0, remote)
    if ds is None:
        return False
    _collect(
        ds.map_batches(
            to_examples,
            fn_kwargs={"item_ids": [], "session_len": 1},
            batch_format="pyarrow",
            **remote,
        )
    )
    return True


def _quiet(ray: Any, timeout_s: float = 60.0) -> None:
    """A round says what it read in one line: no progress bars, no plan per execution;
    an execution that makes no progress for ``timeout_s`` (its tasks find no CPU share
    free) raises instead of waiting for ever."""
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False
    data_ctx.execution_options.preserve_order = True  # blocks in file order
    data_ctx.execution_no_progress_timeout_s = float(timeout_s)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # A step of few blocks (a small round, the warm-up) runs fewer tasks than its cap.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks")


def _collect(ds: Any) -> pa.Table:
    """The dataset's rows as one Arrow table (its blocks in order)."""
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
