"""The trainer's files and state: ``<home>/train/<arm>/`` (see ``pipelines.continuous``)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from recloop.config import StackConfig
from recloop.lake import write_atomic

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
def train_dir(cfg: StackConfig, arm: str | None = None) -> Path:
    return cfg.home / "train" / (arm or cfg.train.arm)


def state_path(cfg: StackConfig, arm: str | None = None) -> Path:
    return train_dir(cfg, arm) / "state.json"


def rounds_path(cfg: StackConfig, arm: str | None = None) -> Path:
    return train_dir(cfg, arm) / "rounds.jsonl"


def round_dir(cfg: StackConfig, round_no: int) -> Path:
    return train_dir(cfg) / "rounds" / f"r{round_no:05d}"


def load_state(cfg: StackConfig, arm: str | None = None) -> dict[str, Any]:
    path = state_path(cfg, arm)
    if not path.exists():
        return {
            "arm": arm or cfg.train.arm,
            "marks": {},
            "pref_offsets": {},  # recloop.preferences partition -> next offset to train on
            "round": 0,
            "in_progress": None,
            "rounds": [],
        }
    return json.loads(path.read_text())


def _save_state(cfg: StackConfig, state: dict[str, Any]) -> None:
    data = json.dumps(state, indent=1, sort_keys=True, allow_nan=False).encode()
    write_atomic(state_path(cfg, state["arm"]), data)


def read_rounds(cfg: StackConfig, arm: str | None = None) -> list[dict[str, Any]]:
    path = rounds_path(cfg, arm)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append_round(cfg: StackConfig, record: dict[str, Any]) -> None:
    """Append ``record`` to rounds.jsonl unless a line for the same round is there (a
    trainer that crashed after the append and before the state write redoes this)."""
    path = rounds_path(cfg)
    if record.get("round") is not None:
        if any(
            r.get("round") == record["round"] and r.get("run") == record.get("run")
            for r in read_rounds(cfg)
        ):
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(_plain(record), sort_keys=True, allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


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


def _plain(x: Any) -> Any:
    """JSON-safe: non-finite floats become None, tuples lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x
