"""CPU priority of background work on a shared machine (``priority`` in the config).

On Linux a nice value and a CPU affinity belong to each thread, not to the process:
``setpriority(PRIO_PROCESS, 0, n)`` from one thread leaves the others as they were. So
``background`` applies both to every thread the process has now (``/proc/self/task``);
threads started later inherit them from the thread that starts them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the calling process only
        return [0]


def background(nice: int, cpus: list[int] | None = None, idle: bool = False) -> dict[str, Any]:
    """Lower this process's priority to ``nice`` (never raises it: a process already
    nicer stays so) and, with ``cpus``, pin it to those cores (the ones that exist).
    Returns what was applied, for status lines; errors are reported, not raised: a
    machine that refuses is still a machine that works."""
    out: dict[str, Any] = {"pid": os.getpid(), "nice": None, "cpus": None}
    errors = []
    if nice > 0 and hasattr(os, "setpriority"):
        for tid in _threads():
            try:
                now = os.getpriority(os.PRIO_PROCESS, tid)
                if now < nice:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
            except OSError as exc:  # the thread ended, or not permitted
                errors.append(f"nice {tid}: {exc}")
        out["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
    if idle and hasattr(os, "SCHED_IDLE"):
        for tid in _threads():
            try:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            except OSError as exc:
                errors.append(f"idle {tid}: {exc}")
        out["policy"] = "idle" if os.sched_getscheduler(0) == os.SCHED_IDLE else "other"
    if cpus and hasattr(os, "sched_setaffinity"):
        have = os.sched_getaffinity(0)
        want = {c for c in cpus if c in have} or have
        for tid in _threads():
            try:
                os.sched_setaffinity(tid, want)
            except OSError as exc:
                errors.append(f"affinity {tid}: {exc}")
        out["cpus"] = sorted(os.sched_getaffinity(0))
    if errors:
        out["errors"] = errors[:5]
    return out


def apply(cfg: Any) -> dict[str, Any]:
    """``background`` with the stack config's ``priority`` section."""
    p = cfg.priority
    return background(
        int(p.background_nice), list(p.background_cpus), p.background_policy == "idle"
    )


def thread_nice(tid: int | None = None) -> int:
    """The nice value of a thread of this process (the calling one by default)."""
    if tid is None:
        return os.getpriority(os.PRIO_PROCESS, 0)
    return int(Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[16])


_settled = False


def settle_heap(young: int = 20_000) -> dict[str, int]:
    """Stop a long-running loop paying for its start-up heap on every collection.

    A process that imported torch, Ray or Feast holds ~400 k objects the cyclic
    collector walks on each full collection (~0.2 s each, measured in the ingestor: a
    third of its time on a backlog). ``gc.freeze`` moves what exists now out of the
    collector's sight (it is never freed, which is what start-up state is), and a
    larger young generation makes collections rarer while the loop allocates records
    in bursts. Call it once, after start-up and before the loop."""
    import gc

    global _settled
    if _settled:  # once per process: what a later call would freeze may yet be garbage
        return {"frozen": gc.get_freeze_count(), "young": gc.get_threshold()[0]}
    _settled = True
    gc.collect()
    gc.freeze()
    _, mid, old = gc.get_threshold()
    gc.set_threshold(young, max(mid, 50), max(old, 1000))
    return {"frozen": gc.get_freeze_count(), "young": young}


def lower_this_thread(nice: int) -> int:
    """Lower the calling thread alone to ``nice`` (never raises it); returns its nice
    value. For a worker thread of a process that must keep its priority otherwise (a
    Serve replica loading the next model version beside its requests)."""
    import threading

    tid = threading.get_native_id()
    try:
        if nice > 0 and os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        return os.getpriority(os.PRIO_PROCESS, tid)
    except (OSError, AttributeError):  # not permitted, or not Linux
        return 0
