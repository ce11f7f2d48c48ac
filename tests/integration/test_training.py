"""Continuous training on the real stack's Ray: a synthetic lake (sessions cut from the
generated data's sequences), the quick seed checkpoint serving arm ``online`` in a
registry; a round run by Ray Train (2 CPU workers, DDP over gloo), and one by the warm
trainer actor, each killed mid-round and resumed.

Promotion here is registry-only (``promote_registry``): no Serve application is deployed
by these tests, and the hot swap through Serve is covered by tests/integration/
test_serving.py. The test has its own home (lake, registry, train state)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pyarrow as pa
import pytest

from recloop.config import StackConfig
from recloop.lake import SCHEMAS, SESSIONS, Entry, Lake

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARM = "online"
T0 = 1_750_000_000_000


def _sessions(seed_dir: Path, users: int = 120) -> list[dict]:
    """Sessions of 5 served items after each 5th position of the users' sequences: the
    sequence's next items (clicked) interleaved with popular items (not clicked)."""
    from pipelines.offline.datasets import from_interaction_data
    from recloop.data import synthetic

    meta = json.loads((seed_dir / "config.json").read_text())
    raw = meta["item_ids"]  # model id m -> data id raw[m - 1]
    ds = from_interaction_data(synthetic(seed=0))
    rows, k = [], 0
    for u in sorted(ds.sequences)[:users]:
        seq = [raw[m - 1] for m in ds.sequences[u]]
        for p in range(5, len(seq) - 5, 5):
            nxt = seq[p : p + 5]
            clicks = (u + p) % 5  # 0..4 clicked: some sessions below min_clicks
            items = nxt[:clicks] + [raw[(u * 7 + p + j) % 20] for j in range(5 - clicks)]
            clicked = [j < clicks for j in range(5)]
            arm = "control" if k % 7 == 0 else ARM  # other arms' traffic is in the lake too
            rows.append(
                {
                    "event_id": f"ev-{k}",
                    "request_id": f"rq-{k}",
                    "user_id": u,
                    "arm": arm,
                    "model_version": "seed",
                    "event_time_ms": T0 + 1000 * k,
                    "history": seq[max(0, p - 50) : p],
                    "items": items,
                    "scores": [0.0] * 5,
                    "feedback": [True] * 5,
                    "clicked": clicked,
                    "watch_time_s": [60.0 if c else 0.0 for c in clicked],
                    "liked": [False] * 5,
                    "followed": [False] * 5,
                    "n_feedback": 5,
                    "clicks": clicks,
                    "session_watch_s": 60.0 * clicks,
                    "likes": 0,
                    "follows": 0,
                    "last_feedback_ms": T0 + 1000 * k + 500,
                    "record_ts_ms": int(time.time() * 1000) - 60_000 + k,
                    "closed_by": "complete",
                    "context": "{}",
                }
            )
            k += 1
    return rows


def _commit(lake: Lake, rows: list[dict], writer: str, seq: int) -> Entry:
    table = pa.Table.from_pylist(rows, schema=SCHEMAS[SESSIONS])
    files = lake.write_files(SESSIONS, table, writer, seq)
    entry = Entry(writer, seq, int(time.time() * 1000), files, {}, {"sessions": len(rows)})
    lake.commit(entry)
    return entry


def _setup(ray_driver: StackConfig, seed_dir: Path, home: Path, **train) -> StackConfig:
    """A config on the stack's Ray with its own home, a registry whose arm ``online``
    serves the seed checkpoint, and a lake of three commits (two writers)."""
    from recloop.registry import ModelRegistry

    values = dict(
        arm=ARM,
        workers=2,
        cpus_per_worker=0.4,
        min_sessions=100,
        epochs=2,
        batch_size=16,
        checkpoint_every_steps=3,
        holdout_fraction=0.3,  # a slice big enough for a steady metric
        tolerance=0.2,  # the gate's strictness is unit-tested; here: a round end to end
    )
    values.update(train)
    cfg = dataclasses.replace(
        ray_driver,
        home=home,
        serve=dataclasses.replace(ray_driver.serve, registry_uri=None),
        train=dataclasses.replace(ray_driver.train, **values),
    )
    reg = ModelRegistry(cfg.registry_uri)
    reg.create_arm(ARM, ARM)
    reg.promote(ARM, reg.publish(ARM, seed_dir, version="seed"))
    rows = _sessions(seed_dir)
    lake = Lake(cfg.lake_dir)
    third = len(rows) // 3
    _commit(lake, rows[:third], "ing-0", 1)
    _commit(lake, rows[third : 2 * third], "ing-1", 1)
    _commit(lake, rows[2 * third :], "ing-0", 2)
    return cfg


@pytest.mark.faults
def test_a_round_killed_mid_training_resumes_then_publishes_and_promotes(
    ray_driver, synthetic_checkpoints, tmp_path, monkeypatch, fault_record
):
    """One round on Ray Train with 2 workers, killed after its first checkpoint and run
    again: it resumes from that checkpoint (not step 0), trains every example exactly
    ``epochs`` times, publishes, passes the gate, is promoted, and the marks advance once.
    (An uninterrupted round differs only by the missing restore; the unit tests run
    whole rounds, crashes and gate rejections with the in-process trainer.)"""
    from pipelines import continuous as ct
    from recloop import train_state as ts
    from recloop.registry import open_registry

    # Ray Data forced: on this one-node cluster "auto" reads in process
    cfg = _setup(ray_driver, synthetic_checkpoints[0], tmp_path / "home", data_engine="ray")
    reg = open_registry(cfg)
    # rank 0 calls os._exit(1) once the checkpoint of step >= 3 is registered
    monkeypatch.setenv(ct.FAULT_ENV, "exit:3")
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        ct.run_round(cfg, promote=ct.promote_registry)
    print(
        f"killed attempt after {time.monotonic() - started:.1f} s: "
        f"{type(info.value).__name__}: {str(info.value)[:200]}"
    )
    monkeypatch.delenv(ct.FAULT_ENV)
    state = ts.load_state(cfg)
    ip = state["in_progress"]
    assert state["marks"] == {} and ip is not None and ip["phase"] == "training"
    assert reg.current(ARM) == "seed" and reg.versions(ARM) == ["seed"]
    assert any((ts.train_dir(cfg) / "ray" / ip["run"]).glob("ckpt-*"))

    started = time.monotonic()
    rec = ct.run_round(cfg, promote=ct.promote_registry)  # the restarted trainer
    resumed_s = time.monotonic() - started
    print(json.dumps({k: v for k, v in rec.items() if k != "gate"}, indent=1))
    print(json.dumps(rec["gate"], indent=1))
    print(f"resumed round in {resumed_s:.1f} s")
    # the same round: same entries, base and Ray Train run
    assert rec["round"] == 1 and rec["run"] == ip["run"] and rec["base_version"] == "seed"
    assert rec["commits"] == len(ip["entries"]) == 3
    starts = [a["start_global_step"] for a in rec["attempts"]]
    assert starts[0] == 0 and starts[-1] == rec["resumed_from_step"] >= 3, rec["attempts"]
    assert rec["workers"] == 2 and all(a["world"] == 2 for a in rec["attempts"])
    # every example trained exactly `epochs` times over both attempts (the trainer also
    # checks the per-example counts): nothing skipped, nothing repeated
    assert rec["trained_examples"] == rec["train_examples"] * cfg.train.epochs
    assert 0 < rec["hq_sessions"] < rec["policy_sessions"] < rec["sessions"]  # policy, quality
    assert rec["data_engine"] == "ray" and rec["data_fallback"] is None  # Ray Data read it
    # published and promoted; its meta says what it learned from
    assert rec["status"] == "promoted" and rec["promoted"], rec["gate"]
    assert rec["version"] in reg.versions(ARM) and reg.current(ARM) == rec["version"]
    marks = {"ing-0": 2, "ing-1": 1}
    meta = json.loads((reg.fetch(ARM, rec["version"]) / "config.json").read_text())
    assert meta["lake_marks"] == marks and meta["base_version"] == "seed" and meta["round"] == 1
    assert meta["newest_feedback_ms"] and meta["newest_record_ts_ms"]
    # the marks advanced exactly once
    state = ts.load_state(cfg)
    assert state["marks"] == marks and state["round"] == 1 and state["in_progress"] is None
    assert [r["round"] for r in ts.read_rounds(cfg)] == [1]
    assert not (ts.train_dir(cfg) / "ray" / rec["run"]).exists()  # cleaned up
    assert ct.run_round(cfg, promote=ct.promote_registry) is None  # no new data
    fresh = ts.freshness(cfg)
    assert fresh["version"] == rec["version"] and fresh["event_time_lag_s"] == 0
    assert 0 < fresh["feedback_to_serving_s"] < 900
    fault_record(
        fault="trainer killed mid-round (rank 0 exits after a checkpoint)",
        load=f"1 round, 2 Ray Train workers, {rec['train_examples']} examples",
        survived=True,
        recovery_s=round(resumed_s, 1),
        detail=f"resumed from step {rec['resumed_from_step']}; {rec['trained_examples']} of "
        f"{rec['train_examples'] * cfg.train.epochs} example steps, each example "
        f"{cfg.train.epochs}x over both attempts; promoted",
    )


@pytest.mark.faults
def test_the_warm_trainer_actor_killed_mid_round_resumes_exactly(
    ray_driver, synthetic_checkpoints, tmp_path, fault_record
):
    """``recloop train --detach`` with one worker: the arm's trainer is a named, detached
    actor that trains in its own process (warm, no Ray Train job). Its process dies
    mid-round after a checkpoint (``os._exit``); a new actor resumes the round and
    publishes the weights an unbroken warm round publishes, then promotes them."""
    import ray
    from safetensors.torch import load_file

    from pipelines import continuous as ct
    from recloop import train_state as ts
    from recloop.registry import open_registry

    straight = _setup(ray_driver, synthetic_checkpoints[0], tmp_path / "straight", workers=1)
    full = ct.run_round(straight, promote=ct.promote_registry, trainer=ct.WarmTrainer(straight))

    cfg = _setup(ray_driver, synthetic_checkpoints[0], tmp_path / "home", workers=1)
    actor = ct.start_actor(cfg, run=False, env={ct.FAULT_ENV: "exit:3"})
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.run_once.remote(), timeout=600)
    ip = ts.load_state(cfg)["in_progress"]
    assert ip is not None and ip["phase"] == "training"
    assert any((ts.train_dir(cfg) / "local" / ip["run"]).glob("ckpt-*"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the dead actor's name is released
        try:
            ray.get_actor(ct.actor_name(ARM))
            time.sleep(0.5)
        except ValueError:
            break
    started = time.monotonic()
    actor = ct.start_actor(cfg, run=False)
    try:
        rec = ray.get(actor.run_once.remote(), timeout=600)
        resumed_s = time.monotonic() - started
        assert rec["status"] == "promoted" and rec["run"] == ip["run"], rec.get("gate")
        assert rec["resumed_from_step"] >= 3 and rec["workers"] == 1
        assert rec["data_engine"] == full["data_engine"] == "local"  # "auto" on one node
        assert rec["trained_examples"] == full["trained_examples"]
        reg = open_registry(cfg)
        fetched = open_registry(straight).fetch(ARM, full["version"])
        a = load_file(str(fetched / "model.safetensors"))
        b = load_file(str(reg.fetch(ARM, rec["version"]) / "model.safetensors"))
        assert all(a[k].equal(b[k]) for k in a)  # exactly the unbroken round's weights
        status = ray.get(actor.status.remote(), timeout=60)
        assert status["rounds"][-1]["version"] == rec["version"] == reg.current(ARM)
        assert status["warm"]["rounds"] == 1
        assert status["priority"]["nice"] >= cfg.priority.background_nice
    finally:
        assert ct.stop_actor(cfg)
    fault_record(
        fault="warm trainer actor killed mid-round (its process exits after a checkpoint)",
        load=f"1 round in the trainer actor, {rec['train_examples']} examples",
        survived=True,
        recovery_s=round(resumed_s, 1),
        detail=f"a new actor resumed from step {rec['resumed_from_step']}; weights equal to "
        "an unbroken round's; promoted",
    )


def test_a_rounds_data_through_ray_data_equals_the_in_process_reference(
    ray_driver, synthetic_checkpoints, tmp_path, monkeypatch
):
    """Ray Data's path (the sessions Delta table read, filtered by commit, data policy and
    quality, and mapped to examples in Ray tasks) gives exactly the examples, held-out
    slice and policy rows of the in-process reference, for a few commits and for all."""
    import torch

    from pipelines.continuous.dataset import NoRoom, RoundQuery, round_data

    cfg = _setup(ray_driver, synthetic_checkpoints[0], tmp_path / "home")
    meta = json.loads((synthetic_checkpoints[0] / "config.json").read_text())
    lake = Lake(cfg.lake_dir)
    entries = lake.entries()
    for chosen in (entries[:1], entries[1:], entries):
        q = RoundQuery(
            arm=ARM,
            policy="own-arm",
            min_clicks=2,
            min_watch_s=600.0,
            item_ids=meta["item_ids"],
            max_history=20,
            session_len=5,
            holdout_fraction=0.2,
            policy_rows=True,
        )
        ray_data = round_data(lake, chosen, q, data_engine="ray")
        local = round_data(lake, chosen, q, data_engine="local")
        assert ray_data.engine == "ray" and local.engine == "local"
        a, b = ray_data.examples, local.examples
        assert len(a) == len(b) > 10
        for name in ("histories", "targets", "event_time_ms", "holdout", "served", "watch"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.weight is None and b.weight is None
        assert ray_data.policy_rows == local.policy_rows
        assert {r["arm"] for r in ray_data.policy_rows} == {ARM}
    # pooled and weighted: every arm's sessions; weighted, each example weighs its arm's
    for policy, w in (("pooled", None), ("weighted", {ARM: 0.5, "control": 2.0})):
        pq = dataclasses.replace(q, policy=policy, weights=w)
        both = round_data(lake, entries, pq, data_engine="ray")
        ref = round_data(lake, entries, pq, data_engine="local")
        assert len(both.policy_rows) == sum(e.counts["sessions"] for e in entries)
        assert both.policy_rows == ref.policy_rows
        assert torch.equal(both.examples.targets, ref.examples.targets)
        if w is not None:
            assert torch.equal(both.examples.weight, ref.examples.weight)
            assert set(both.examples.weight.tolist()) == {0.5, 2.0}
    # No free share of the cluster for a task: "auto" (as on a cluster of several nodes,
    # where it picks Ray Data) reads in process and says why (the loop goes on), "ray"
    # refuses.
    from pipelines.continuous import dataset

    monkeypatch.setattr(dataset, "engine", lambda name: "local" if name == "local" else "ray")
    crowded = round_data(lake, entries, q, data_engine="auto", cpus=1000.0)
    assert crowded.engine == "local" and "no free share" in crowded.fallback
    assert torch.equal(crowded.examples.targets, local.examples.targets)
    with pytest.raises(NoRoom, match="no free share"):
        round_data(lake, entries, q, data_engine="ray", cpus=1000.0)
