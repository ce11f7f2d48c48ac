"""A round's data through Ray Data: the round's commits read from the sessions Delta table
as a Ray Dataset, filtered by the data policy and the quality bar and mapped to
next-session examples in Ray tasks (on any node of a cluster that reaches the lake), then
collected in event-time order by the round.

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

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipelines.continuous.data import (
    SESSION_COLUMNS,
    SessionExamples,
    assemble_examples,
    build_examples,
    policy_sessions,
    quality_sessions,
)
from recloop.config import DATA_ENGINES as ENGINES
from recloop.examples import example_order, to_examples
from recloop.lake import SESSIONS, Entry, Lake, in_commit_order


@dataclass
class RoundData:
    """A round's examples, and the data policy's sessions when the round asked for them
    (an IPA round's reward model learns from every session of the arm, not only the
    high-quality ones)."""

    examples: SessionExamples
    policy_rows: list[dict] | None
    engine: str  # "ray" or "local"


def engine(name: str) -> str:
    """``train.data_engine`` resolved: "auto" is Ray Data when this process is connected
    to Ray (a trainer actor, a driver), in process otherwise."""
    if name not in ENGINES:
        raise ValueError(f"train.data_engine must be one of {ENGINES}, not {name!r}")
    if name != "auto":
        return name
    ray = sys.modules.get("ray")  # a process that never imported Ray is not connected
    return "ray" if ray is not None and ray.is_initialized() else "local"


def round_data(
    lake: Lake,
    entries: Sequence[Entry],
    *,
    arm: str,
    pooled: bool,
    min_clicks: int,
    min_watch_s: float,
    item_ids: Sequence[int],
    max_history: int,
    session_len: int,
    holdout_fraction: float,
    context: Callable[[list[dict]], Callable[[dict, list[int]], list[int]]] | None = None,
    policy_rows: bool = False,
    data_engine: str = "auto",
    cpus: float = 0.1,
    resources: dict[str, float] | None = None,
    tasks: int = 2,
) -> RoundData:
    """The examples of ``entries``' sessions that the data policy (``arm``'s own, or
    every arm's when ``pooled``) and the quality bar keep. ``context(high-quality session
    rows)`` returns the row builder of a context model; ``policy_rows``: also return the
    policy's sessions (whole rows, in commit order). Ray Data's tasks hold ``cpus`` and
    ``resources`` each (the train workers' custom resources: they run on train nodes),
    at most ``tasks`` at once per step."""
    kind = engine(data_engine)
    if kind == "local":
        rows = lake.read(SESSIONS, entries, columns=SESSION_COLUMNS).to_pylist()
        mine = policy_sessions(rows, arm, pooled)
        hq = quality_sessions(mine, min_clicks, min_watch_s)
        build = context(hq) if context is not None else None
        ex = build_examples(hq, item_ids, max_history, session_len, holdout_fraction, build)
        return RoundData(ex, mine if policy_rows else None, "local")
    return _ray_round_data(
        lake,
        entries,
        arm=arm,
        pooled=pooled,
        min_clicks=min_clicks,
        min_watch_s=min_watch_s,
        item_ids=item_ids,
        max_history=max_history,
        session_len=session_len,
        holdout_fraction=holdout_fraction,
        context=context,
        policy_rows=policy_rows,
        remote={"num_cpus": cpus, "resources": dict(resources or {}), "concurrency": tasks},
    )


def _commits(entries: Sequence[Entry]) -> Any:
    """A Ray Data predicate: rows of these commits."""
    from ray.data.expressions import col

    seqs: dict[str, list[int]] = {}
    for e in entries:
        seqs.setdefault(e.writer, []).append(int(e.seq))
    match = None
    for writer, ss in sorted(seqs.items()):
        cond = (col("writer") == writer) & col("seq").is_in(sorted(ss))
        match = cond if match is None else match | cond
    return match


def _quality(min_clicks: int, min_watch_s: float) -> Any:
    """``data.is_high_quality`` as a Ray Data predicate (a null count is no count)."""
    from ray.data.expressions import col

    return (
        (col("clicks") >= int(min_clicks))
        | (col("session_watch_s") >= float(min_watch_s))
        | (col("likes") > 0)
        | (col("follows") > 0)
    )


def _ray_round_data(
    lake: Lake,
    entries: Sequence[Entry],
    *,
    arm: str,
    pooled: bool,
    min_clicks: int,
    min_watch_s: float,
    item_ids: Sequence[int],
    max_history: int,
    session_len: int,
    holdout_fraction: float,
    context: Callable[[list[dict]], Callable[[dict, list[int]], list[int]]] | None,
    policy_rows: bool,
    remote: dict[str, Any],
) -> RoundData:
    import ray
    from ray.data.expressions import col

    _quiet(ray)
    version = lake.version(SESSIONS)
    if version is None or not entries:
        empty = build_examples([], item_ids, max_history, session_len, holdout_fraction)
        return RoundData(empty, [] if policy_rows else None, "ray")
    ds = ray.data.read_delta(
        str(lake.root / SESSIONS),
        version=version,  # the version that holds every entry asked for
        columns=[*SESSION_COLUMNS, "writer", "seq"],
        **remote,
    )
    keep = _commits(entries)
    if not pooled:
        keep = keep & (col("arm") == arm)
    ds = ds.filter(expr=keep, **remote)
    mine = None
    if policy_rows:
        ds = ds.materialize()
        table = _collect(ds)
        mine = (
            in_commit_order(table, entries).drop_columns(["writer", "seq"]).to_pylist()
            if table.num_rows
            else []
        )
    examples = ds.filter(expr=_quality(min_clicks, min_watch_s), **remote).map_batches(
        to_examples,
        fn_kwargs={"item_ids": [int(i) for i in item_ids], "session_len": session_len},
        batch_format="pyarrow",
        **remote,
    )
    rows = sorted(_collect(examples).to_pylist(), key=example_order)
    build = context(rows) if context is not None else None
    ex = assemble_examples(rows, rows, max_history, session_len, holdout_fraction, build)
    return RoundData(ex, mine, "ray")


def warm_up(
    lake: Lake, cpus: float = 0.1, resources: dict[str, float] | None = None, tasks: int = 2
) -> bool:
    """Run the round's Ray Data steps once over no rows (a filter nothing passes), so
    the worker processes exist and have imported what the read and the map need before
    the first round (~4 s on this machine, paid while the rounds wait for data). False
    when there is no sessions table to read yet."""
    import ray
    from ray.data.expressions import col

    version = lake.version(SESSIONS)
    if version is None:
        return False
    remote = {"num_cpus": cpus, "resources": dict(resources or {}), "concurrency": tasks}
    _quiet(ray)
    ds = ray.data.read_delta(
        str(lake.root / SESSIONS), version=version, columns=SESSION_COLUMNS, **remote
    )
    ds = ds.filter(expr=col("event_time_ms") < 0, **remote).map_batches(
        to_examples,
        fn_kwargs={"item_ids": [], "session_len": 1},
        batch_format="pyarrow",
        **remote,
    )
    _collect(ds)
    return True


def _quiet(ray: Any) -> None:
    """A round says what it read in one line: no progress bars, no plan per execution."""
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False
    data_ctx.execution_options.preserve_order = True  # blocks in file order
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _collect(ds: Any) -> pa.Table:
    """The dataset's rows as one Arrow table (its blocks in order)."""
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
