"""The continuous trainer's files, a contract on disk: ``<home>/train/<arm>/state.json``
(marks, last round, round in progress, recent rounds; atomic writes) and ``rounds.jsonl``
(one JSON line per completed round), and the serving model's freshness.

``pipelines.continuous`` writes them; the monitor (``recloop status``, the dashboard) and
the simulation driver read them. Both sides use this module, so neither imports the
other.
"""

from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from recloop.config import StackConfig
from recloop.lake import SESSIONS, Lake, write_atomic


def train_dir(cfg: StackConfig, arm: str | None = None) -> Path:
    return cfg.home / "train" / (arm or cfg.train.arm)


def state_path(cfg: StackConfig, arm: str | None = None) -> Path:
    return train_dir(cfg, arm) / "state.json"


def rounds_path(cfg: StackConfig, arm: str | None = None) -> Path:
    return train_dir(cfg, arm) / "rounds.jsonl"


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


def save_state(cfg: StackConfig, state: dict[str, Any]) -> None:
    data = json.dumps(state, indent=1, sort_keys=True, allow_nan=False).encode()
    write_atomic(state_path(cfg, state["arm"]), data)


def read_rounds(cfg: StackConfig, arm: str | None = None) -> list[dict[str, Any]]:
    path = rounds_path(cfg, arm)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_round(cfg: StackConfig, record: dict[str, Any]) -> None:
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
        fh.write(json.dumps(plain(record), sort_keys=True, allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def plain(x: Any) -> Any:
    """JSON-safe: non-finite floats become None, tuples lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    return x


def freshness(cfg: StackConfig, arm: str | None = None) -> dict[str, Any]:
    """How fresh the arm's serving model is: the newest feedback (event time) and record
    (wall clock) its training saw, the delay from that record to now and to the
    version's promotion, and the lake's newest event time vs the version's."""
    from recloop.checkpoint import checkpoint_format
    from recloop.registry import open_registry

    arm = arm or cfg.train.arm
    reg = open_registry(cfg)
    record = reg.arm(arm)
    version = record["current"]
    out: dict[str, Any] = {"arm": arm, "version": version, "lineage": record["lineage"]}
    lake = Lake(cfg.lake_dir)
    newest_lake = lake.newest_event_ms(SESSIONS)
    out["lake_newest_event_ms"] = newest_lake
    if version is None:
        return out
    path = reg.fetch(record["lineage"], version, cache_dir=train_dir(cfg, arm) / "cache")
    meta = json.loads((Path(path) / "config.json").read_text())
    now = int(time.time() * 1000)
    promoted = [h["at"] for h in record.get("history", []) if h.get("version") == version]
    out.update(
        {
            "format": checkpoint_format(path),
            "round": meta.get("round"),
            "newest_event_ms": meta.get("newest_event_ms"),
            "newest_feedback_ms": meta.get("newest_feedback_ms"),
            "newest_record_ts_ms": meta.get("newest_record_ts_ms"),
            "now_ms": now,
            "promoted_at": promoted[-1] if promoted else None,
        }
    )
    rec_ts = meta.get("newest_record_ts_ms")
    out["feedback_age_s"] = (now - rec_ts) / 1000 if rec_ts else None
    if rec_ts and promoted:
        at_ms = datetime.fromisoformat(promoted[-1]).timestamp() * 1000
        out["feedback_to_serving_s"] = (at_ms - rec_ts) / 1000
    else:
        out["feedback_to_serving_s"] = None
    ev = meta.get("newest_event_ms")
    out["event_time_lag_s"] = (newest_lake - ev) / 1000 if ev and newest_lake else None
    return out
