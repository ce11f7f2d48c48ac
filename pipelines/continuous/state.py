"""The trainer's own files under ``<home>/train/<arm>/`` (see ``pipelines.continuous``):
its round folders and its lock, and the training constants. ``state.json`` and
``rounds.jsonl``, which the monitor reads too, are ``recloop.train_state``'s."""

from __future__ import annotations

import contextlib
import fcntl
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from recloop.config import StackConfig
from recloop.train_state import train_dir

Progress = Callable[[str], None]
PromoteFn = Callable[[StackConfig, str, str, Progress], Any]

SEED = 0  # training shuffles and dropout derive from (SEED, round, epoch, step)
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
MAX_WORKER_FAILURES = 0  # a failed round raises; the next run_round resumes it
KEEP_ROUND_DIRS = 10  # rounds whose examples stay on disk
KEEP_STATE_ROUNDS = 20  # round summaries kept in state.json (all are in rounds.jsonl)
FAULT_ENV = "RECLOOP_TRAIN_FAULT"  # "exit:<step>": rank 0 exits after that step (tests)


def _log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------- files
def round_dir(cfg: StackConfig, round_no: int) -> Path:
    return train_dir(cfg) / "rounds" / f"r{round_no:05d}"


@contextlib.contextmanager
def _arm_lock(cfg: StackConfig) -> Iterator[None]:
    path = train_dir(cfg) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another trainer holds {path}: one trainer per arm ({cfg.train.arm})"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
