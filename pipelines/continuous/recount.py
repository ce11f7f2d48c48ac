"""The round of a popularity arm that learns online: its counts follow the lake's clicks.

A most-popular service in production is not frozen: it re-counts what users click. A
``model: popularity, learning: online`` arm does that here, as the baseline a learning
arm must beat. Each round takes the lake's new sessions under the data policy (the arm's
own traffic by default, like every learning arm), adds each item's clicks to the scores
of the version it serves (the data's counts to begin with), publishes the result as a
new baseline version and promotes it. No gate: the scores are counts, not a fit.

The served checkpoint is the round's state: it records the lake marks its counts cover,
so a round killed after publishing and before the state file is written counts nothing
twice (the next round starts from the marks of the version serving).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any

import torch

from pipelines.continuous.data import (
    _newest,
    _read_sessions,
    policy_sessions,
    policy_weights,
    session_rows,
)
from pipelines.continuous.state import (
    KEEP_STATE_ROUNDS,
    Progress,
    PromoteFn,
    _now_ms,
    round_dir,
)
from recloop.checkpoint import BASELINE_FORMAT, load_baseline, save_baseline
from recloop.config import StackConfig
from recloop.lake import Lake
from recloop.train_state import append_round, load_state, plain, save_state

# config.json keys save_baseline writes itself, or this round does
_OWN_KEYS = {"format", "kind", "created_at", "session_len", "item_ids", "lake_marks"}
_OWN_KEYS |= {"clicks_added", "round", "base_version", "newest_event_ms"}
_OWN_KEYS |= {"newest_feedback_ms", "newest_record_ts_ms"}


def serves_popularity(cfg: StackConfig) -> bool:
    """Whether the arm's current version is a popularity baseline (not a model): its
    ``config.json`` alone, read on every poll."""
    from recloop.registry import open_registry

    reg = open_registry(cfg)
    arm = cfg.train.arm
    version = reg.current(arm)
    if version is None:
        return False
    conf = reg.config(reg.arm(arm)["lineage"], version)
    return conf.get("format") == BASELINE_FORMAT and conf.get("kind") == "popularity"


def click_counts(
    rows: list[dict], item_ids: list[int], weights: dict[str, float] | None = None
) -> torch.Tensor:
    """Clicks per item of ``item_ids`` (in that order) over the session rows; clicks on
    items the baseline does not know are not counted. ``weights``: a click counts its
    session's arm's weight (the "weighted" data policy) instead of one."""
    pos = {int(i): k for k, i in enumerate(item_ids)}
    counts = torch.zeros(len(item_ids), dtype=torch.float64)
    for r in rows:
        w = 1.0 if weights is None else weights.get(str(r.get("arm")), 1.0)
        for item, clicked in zip(r["items"], r["clicked"] or [], strict=False):
            k = pos.get(int(item))
            if k is not None and clicked:
                counts[k] += w
    return counts.float()


def recount_round(
    cfg: StackConfig, progress: Progress, policy: str, promote: PromoteFn
) -> dict[str, Any] | None:
    """One round of the popularity arm; None while fewer than ``train.min_sessions`` new
    sessions of the policy are in the lake."""
    from recloop.registry import open_registry

    started = time.monotonic()
    tc, arm = cfg.train, cfg.train.arm
    reg = open_registry(cfg)
    lineage, base_version = reg.arm(arm)["lineage"], reg.current(arm)
    marks = dict(reg.config(lineage, base_version).get("lake_marks") or {})
    lake = Lake(cfg.lake_dir)
    new = lake.new_entries(marks)
    if sum(session_rows(e) for e in new) < tc.min_sessions:  # from the commit log alone
        return None
    rows = _read_sessions(lake, new)
    mine = policy_sessions(rows, arm, policy)
    if len(mine) < tc.min_sessions:
        return None
    marks_after = Lake.advance(marks, new)
    with tempfile.TemporaryDirectory(prefix="recloop-pop-") as tmp:
        base = load_baseline(reg.fetch(lineage, base_version, cache_dir=tmp))
    weights = policy_weights(rows, policy)
    clicks = click_counts(mine, base.item_ids, weights)
    state = load_state(cfg)
    # the served version numbers its round too: a state file lost with a crash (or
    # never written) does not make the next round reuse a number
    round_no = max(int(state["round"]), int(base.meta.get("round") or 0)) + 1
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    out = round_dir(cfg, round_no) / f"popularity-{stamp}"
    shutil.rmtree(out, ignore_errors=True)  # staged by a round killed before publishing
    top = [int(base.item_ids[int(k)]) for k in torch.topk(clicks, min(5, len(clicks))).indices]
    save_baseline(
        out,
        "popularity",
        list(base.item_ids),
        base.scores + clicks,
        session_len=base.session_len,
        meta={
            **{k: v for k, v in base.meta.items() if k not in _OWN_KEYS},
            "lake_marks": marks_after,
            "clicks_added": round(float(clicks.sum())),
            "round": round_no,
            "base_version": base_version,
            # what freshness reads: the newest feedback these counts include
            "newest_event_ms": _newest(mine, "event_time_ms"),
            "newest_feedback_ms": _newest(mine, "last_feedback_ms"),
            "newest_record_ts_ms": _newest(mine, "record_ts_ms"),
        },
    )
    version = reg.publish(
        lineage,
        out,
        version=f"{arm[:40]}-r{round_no:05d}-{stamp}",
        metrics={"round": round_no, "sessions": len(mine), "clicks": round(float(clicks.sum()))},
    )
    promote(cfg, arm, version, progress)
    record = {
        "round": round_no,
        "arm": arm,
        "kind": "recount",
        "status": "promoted",
        "promoted": True,
        "reason": "popularity counts follow the clicks (no gate)",
        "version": version,
        "base_version": base_version,
        "sessions": len(rows),
        "policy_sessions": len(mine),
        "clicks": round(float(clicks.sum())),
        "most_clicked": top,
        "commits": len(new),
        "data_policy": policy,
        "arm_weights": weights,
        "newest_event_ms": _newest(mine, "event_time_ms"),
        "newest_feedback_ms": _newest(mine, "last_feedback_ms"),
        "newest_record_ts_ms": _newest(mine, "record_ts_ms"),
        "round_s": round(time.monotonic() - started, 3),
        "lake_marks": marks_after,
        "completed_at_ms": _now_ms(),
    }
    append_round(cfg, record)
    state.update(marks=marks_after, round=round_no, in_progress=None)
    state["rounds"] = (state.get("rounds", []) + [plain(record)])[-KEEP_STATE_ROUNDS:]
    save_state(cfg, state)
    progress(
        f"round {round_no}: popularity +{record['clicks']} clicks from {len(mine)} sessions "
        f"-> {version} (promoted in {record['round_s']:.1f} s)"
    )
    return record
