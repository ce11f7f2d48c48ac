"""The traffic simulator's logic with an in-memory transport and sink: schedule,
determinism under a seed whatever the response timing, per-user order, failures, events.
The real HTTP + Kafka path is covered by tests/integration/test_simulation.py."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest

from actors.sim.runfile import SimulationConfig, load_run
from actors.sim.simulator import Population, RequestFailed, Simulator, event_id, schedule
from recloop.config import PROJECT_ROOT
from recloop.data import synthetic
from recloop.events import Interaction, decode, encode

T0 = 1_800_000_000_000


@pytest.fixture(scope="module")
def data():
    return synthetic(n_users=60, n_items=120, n_ratings=1500, seed=3)


@pytest.fixture(scope="module")
def model(data):
    from actors.sim.user_model import HiddenUserModel

    return HiddenUserModel.fit(data, dim=8, epochs=2, seed=0)


def _sim(**kw) -> SimulationConfig:
    base = {"seed": 5, "duration_s": 3 * 86400.0, "speedup": 0.0, "concurrency": 8}
    return SimulationConfig(**{**base, **kw})


def test_schedule_is_deterministic_and_per_user(data):
    pop = Population.from_data(data)
    a, b = schedule(pop, _sim()), schedule(pop, _sim())
    assert a.equals(b)
    assert not a.equals(schedule(pop, _sim(seed=6)))
    assert (np.diff(a["t_s"].to_numpy()) >= 0).all()
    assert a["t_s"].max() < 3 * 86400
    # a user's arrivals do not depend on who else is simulated (shards agree with the whole)
    shard = pop.shard(1, 3)
    part = schedule(shard, _sim())
    whole = a[a["user_id"].isin(shard.user_ids)].reset_index(drop=True)
    assert part.reset_index(drop=True).equals(whole)
    # sessions are numbered 0.. per user in time order
    for _, g in a.groupby("user_id"):
        assert g["session"].tolist() == list(range(len(g)))


def test_arrival_rate_matches_the_config(data):
    pop = Population.from_data(data)
    sim = _sim(sessions_per_user_day=6.0, duration_s=5 * 86400.0)
    n = len(schedule(pop, sim))
    expected = 6.0 * 5 * len(pop.user_ids)
    assert abs(n - expected) < 4 * np.sqrt(expected)
    assert len(schedule(pop, _sim(max_sessions=25))) == 25


def test_population_sample_is_seeded(data):
    a = Population.from_data(data, users=10, seed=1)
    assert len(a.user_ids) == 10
    assert (a.user_ids == Population.from_data(data, users=10, seed=1).user_ids).all()
    assert abs(a.activity.mean() - 1.0) < 1e-9
    u = int(a.user_ids[0])
    times = a.history_times_ms[u]
    assert times == sorted(times) and len(a.histories[u]) == len(times)


class FakeServer:
    """Deterministic slates for a payload, answered after a random delay."""

    def __init__(self, n_items: int, jitter_seed: int, fail_every: int = 0) -> None:
        self.n_items, self.rng, self.fail_every = n_items, random.Random(jitter_seed), fail_every
        self.calls: list[dict] = []
        self.active: set[int] = set()
        self.overlaps = 0

    async def __call__(self, payload: dict) -> dict:
        user, t = payload["user_id"], payload["event_time_ms"]
        if user in self.active:
            self.overlaps += 1
        self.active.add(user)
        self.calls.append(payload)
        n = len(self.calls)
        await asyncio.sleep(self.rng.random() * 0.003)
        self.active.discard(user)
        if self.fail_every and n % self.fail_every == 0:
            raise RequestFailed("http 503")
        r = np.random.default_rng([user, t])
        items = r.choice(np.arange(1, self.n_items + 1), size=5, replace=False)
        return {
            "request_id": f"r{user}-{t}",
            "arm": "a" if user % 2 else "b",
            "model_version": "v1",
            "items": [
                {"item_id": int(i), "score": 0.0, "position": p} for p, i in enumerate(items)
            ],
        }


def _play(data, model, jitter_seed: int, **kw) -> tuple[Simulator, list, FakeServer]:
    pop = Population.from_data(data)
    sim = _sim(max_sessions=300, **kw)
    server = FakeServer(120, jitter_seed, kw.pop("fail_every", 0) if "fail_every" in kw else 0)
    events: list[Interaction] = []
    s = Simulator("run1", sim, model, pop, schedule(pop, sim), T0, server, events.append)
    asyncio.run(s.run())
    return s, events, server


def test_a_run_is_reproducible_whatever_the_response_timing(data, model):
    s1, e1, _ = _play(data, model, jitter_seed=1)
    s2, e2, _ = _play(data, model, jitter_seed=2)
    key = lambda e: e.event_id  # noqa: E731
    assert [encode(e) for e in sorted(e1, key=key)] == [encode(e) for e in sorted(e2, key=key)]
    assert len(e1) == 5 * 300 and s1.progress.events == len(e1)
    ledger1 = sorted(s1.ledger, key=lambda r: (r["user_id"], r["session"]))
    ledger2 = sorted(s2.ledger, key=lambda r: (r["user_id"], r["session"]))
    strip = lambda r: {k: v for k, v in r.items() if k not in ("latency_ms", "wall_ms")}  # noqa: E731 (timings)
    assert [strip(r) for r in ledger1] == [strip(r) for r in ledger2]
    # and another seed gives other feedback
    _, e3, _ = _play(data, model, jitter_seed=1, seed=9)
    assert sorted(map(key, e3)) != sorted(map(key, e1))


def test_one_users_sessions_are_played_in_order_never_overlapping(data, model):
    s, _, server = _play(data, model, jitter_seed=4, concurrency=32)
    assert server.overlaps == 0
    by_user: dict[int, list[int]] = {}
    for p in server.calls:
        by_user.setdefault(p["user_id"], []).append(p["event_time_ms"])
    assert all(ts == sorted(ts) for ts in by_user.values())
    assert all(p["context"] == {"sim_run": "run1"} for p in server.calls)


def test_events_follow_the_contract_and_the_ledger_adds_up(data, model):
    s, events, _ = _play(data, model, jitter_seed=1)
    for e in events[:50]:
        assert decode(Interaction, encode(e)) == e
        assert e.context == {"sim_run": "run1"}
        assert e.event_id == event_id("run1", e.user_id, _session_of(s, e), e.position)
    assert sum(r["views"] for r in s.ledger) == sum(e.clicked for e in events)
    watch = sum(r["watch_s"] for r in s.ledger)
    assert watch == pytest.approx(sum(e.watch_time_s for e in events))
    assert all(r["oracle_watch_s"] >= r["expected_watch_s"] - 1e-6 for r in s.ledger)
    # feedback happens after the session was asked for, in position order
    first = {}
    for e in sorted(events, key=lambda e: (e.request_id, e.position)):
        assert e.event_time_ms >= first.setdefault(e.request_id, e.event_time_ms)


def _session_of(s: Simulator, e: Interaction) -> int:
    (row,) = [r for r in s.ledger if r["request_id"] == e.request_id]
    return row["session"]


def test_failed_requests_are_counted_and_produce_no_events(data, model):
    pop = Population.from_data(data)
    sim = _sim(max_sessions=100)
    server = FakeServer(120, 1, fail_every=10)
    events: list[Interaction] = []
    s = Simulator("run1", sim, model, pop, schedule(pop, sim), T0, server, events.append)
    summary = asyncio.run(s.run())
    assert summary["failed"] == 10 and summary["ok"] == 90
    assert summary["statuses"] == {"ok": 90, "http 503": 10}
    assert len(events) == 5 * 90
    assert sum(r["status"] == "http 503" and r["n_items"] == 0 for r in s.ledger) == 10


def test_paced_runs_follow_the_virtual_clock(data, model):
    pop = Population.from_data(data)
    sim = _sim(max_sessions=40, duration_s=86400.0, speedup=86400.0 / 2)  # a day in 2 s
    arrivals = schedule(pop, sim)
    server = FakeServer(120, 1)
    s = Simulator("run1", sim, model, pop, arrivals, T0, server, lambda e: None)
    summary = asyncio.run(s.run())
    span = arrivals["t_s"].iloc[-1] / sim.speedup
    assert summary["wall_s"] >= 0.9 * span  # never ahead of the virtual clock
    assert summary["done"] == 40


# --------------------------------------------------------------------------- run files
@pytest.mark.parametrize("path", sorted((PROJECT_ROOT / "infra" / "experiments").glob("*.yaml")))
def test_the_shipped_run_files_load(path: Path):
    run = load_run(path)
    assert run.analysis["control"] in {a.name for a in run.experiment.arms}
    assert run.experiment.policy_statement()


def test_run_file_errors_name_the_field(tmp_path: Path):
    base = "experiment:\n  name: x\n  salt: s\n  arms:\n    - {name: a, share: 1.0}\n"
    p = tmp_path / "r.yaml"
    p.write_text(base + "simulation:\n  speedup: -1\n")
    with pytest.raises(ValueError, match="speedup"):
        load_run(p)
    p.write_text(base + "simulation:\n  sped: 1\n")
    with pytest.raises(ValueError, match="unknown simulation key"):
        load_run(p)
    p.write_text(base + "simulation:\n  user_model_kind: markov\n")
    with pytest.raises(ValueError, match="user_model_kind"):
        load_run(p)
    p.write_text(base + "analysis:\n  control: zz\n")
    with pytest.raises(ValueError, match="not an arm"):
        load_run(p)
    p.write_text(base + "extra: 1\n")
    with pytest.raises(ValueError, match="unknown top-level"):
        load_run(p)
    p.write_text(base)
    run = load_run(p, {"seed": 11})
    assert run.simulation.seed == 11 and run.analysis["control"] == "a"


def test_the_cli_default_run_file_exists():
    from recloop.cli import build_parser

    args = build_parser().parse_args(["simulate"])
    assert Path(args.experiment).is_file()
    load_run(args.experiment)
