"""The traffic simulator: real users' histories, Poisson arrivals on a virtual clock, real
HTTP requests, and feedback from the hidden response model as Kafka events.

``Population`` holds the users (their real histories and arrival rates); ``schedule``
draws every arrival of the run up front from the seed, so the same seed gives the same
users at the same virtual times. ``Simulator`` plays a shard of the schedule: it paces
arrivals to ``speedup`` virtual seconds per wall second, keeps up to ``concurrency``
requests in flight, plays one user's sessions strictly in order (a user's fatigue and
drift depend on what they saw before), asks the hidden model how the user responds to the
served slate, and sends one ``Interaction`` per shown item. Randomness comes from
``(seed, user, session)`` and event ids from ``(run, user, session, position)``, never
from the order in which responses come back, so a run is reproducible under its seed
whatever the network timing. ``SimulatorShard`` is the same as a Ray actor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from actors.sim.runfile import SimulationConfig
from recloop.events import Interaction

ARRIVAL_STREAM = 0xA771  # rng stream ids: arrivals and responses never share draws
RESPONSE_STREAM = 0x5E55

# (payload) -> response JSON; raises ``RequestFailed`` with a short status on failure
Transport = Callable[[dict], Awaitable[dict]]
Sink = Callable[[Interaction], None]


class RequestFailed(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


@dataclass
class Population:
    """The simulated users: real histories (oldest first) and relative activity."""

    user_ids: np.ndarray  # (U,)
    histories: dict[int, list[int]]
    history_times_ms: dict[int, list[int]]
    activity: np.ndarray  # (U,) mean 1: relative arrival rate

    @classmethod
    def from_data(cls, data: Any, users: int | None = None, seed: int = 0) -> Population:
        """``data``: ``recloop.data.InteractionData``; ``users`` samples that many."""
        ratings = data.ratings.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
        ids = np.sort(ratings["user_id"].unique())
        if users is not None and users < len(ids):
            rng = np.random.default_rng([seed, 0x05E5])
            ids = np.sort(rng.choice(ids, size=users, replace=False))
        keep = ratings[ratings["user_id"].isin(ids)]
        histories, times = {}, {}
        for uid, grp in keep.groupby("user_id", sort=True):
            histories[int(uid)] = grp["item_id"].astype(int).tolist()
            times[int(uid)] = (grp["timestamp"].astype(np.int64) * 1000).tolist()
        counts = np.array([len(histories[int(u)]) for u in ids], dtype=float)
        activity = np.sqrt(counts)
        return cls(ids.astype(np.int64), histories, times, activity / activity.mean())

    def shard(self, index: int, count: int) -> Population:
        ids = self.user_ids[index::count]
        pick = set(ids.tolist())
        return Population(
            ids,
            {u: h for u, h in self.histories.items() if u in pick},
            {u: t for u, t in self.history_times_ms.items() if u in pick},
            self.activity[index::count],
        )


def schedule(pop: Population, cfg: SimulationConfig) -> pd.DataFrame:
    """Every arrival of the run: ``t_s`` (virtual seconds from the start), ``user_id`` and
    ``session`` (the user's session number), in time order; deterministic under the seed.
    Each user's arrivals are drawn from their own stream, so a user's schedule does not
    depend on who else is in the population or shard."""
    rate = cfg.sessions_per_user_day / 86400.0  # per virtual second, mean user
    t_all, u_all, k_all = [], [], []
    for uid, act in zip(pop.user_ids.tolist(), pop.activity.tolist(), strict=True):
        rng = np.random.default_rng([cfg.seed, ARRIVAL_STREAM, uid])
        lam = rate * act
        n_max = int(lam * cfg.duration_s * 2 + 20)
        t = np.cumsum(rng.exponential(1.0 / lam, size=n_max))
        while t[-1] < cfg.duration_s:  # rare: draw more
            t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / lam, size=n_max))])
        t = t[t < cfg.duration_s]
        t_all.append(t)
        u_all.append(np.full(len(t), uid, dtype=np.int64))
        k_all.append(np.arange(len(t), dtype=np.int64))
    frame = pd.DataFrame(
        {
            "t_s": np.concatenate(t_all) if t_all else np.zeros(0),
            "user_id": np.concatenate(u_all) if u_all else np.zeros(0, dtype=np.int64),
            "session": np.concatenate(k_all) if k_all else np.zeros(0, dtype=np.int64),
        }
    )
    frame = frame.sort_values(["t_s", "user_id"], kind="stable").reset_index(drop=True)
    if cfg.max_sessions is not None:
        frame = frame.iloc[: cfg.max_sessions]
    return frame


def event_id(run_id: str, user_id: int, session: int, position: int) -> str:
    """Deterministic: a resent event has the same id, so consumers can drop duplicates."""
    key = f"{run_id}:{user_id}:{session}:{position}".encode()
    return hashlib.blake2b(key, digest_size=16).hexdigest()


@dataclass
class Progress:
    total: int
    done: int = 0
    ok: int = 0
    failed: int = 0
    events: int = 0
    in_flight: int = 0
    virtual_s: float = 0.0
    max_lag_s: float = 0.0  # how far dispatch fell behind the paced schedule
    started: float = field(default_factory=time.monotonic)
    statuses: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> dict[str, Any]:
        wall = max(time.monotonic() - self.started, 1e-9)
        return {
            "total": self.total,
            "done": self.done,
            "ok": self.ok,
            "failed": self.failed,
            "events": self.events,
            "in_flight": self.in_flight,
            "virtual_s": round(self.virtual_s, 1),
            "wall_s": round(wall, 2),
            "requests_per_s": round(self.done / wall, 1),
            "events_per_s": round(self.events / wall, 1),
            "max_lag_s": round(self.max_lag_s, 2),
            "statuses": dict(self.statuses),
        }


class Simulator:
    """Plays one shard of a run's schedule against ``transport``, sending to ``sink``."""

    def __init__(
        self,
        run_id: str,
        cfg: SimulationConfig,
        model: Any,  # actors.sim.user_model.HiddenUserModel
        population: Population,
        arrivals: pd.DataFrame,
        t0_ms: int,
        transport: Transport,
        sink: Sink,
    ) -> None:
        self.run_id, self.cfg, self.model = run_id, cfg, model
        self.population, self.arrivals, self.t0_ms = population, arrivals, t0_ms
        self.transport, self.sink = transport, sink
        self.states: dict[int, Any] = {}
        self.ledger: list[dict[str, Any]] = []
        self.progress = Progress(total=len(arrivals))

    def _state(self, user_id: int) -> Any:
        state = self.states.get(user_id)
        if state is None:
            state = self.model.new_state(
                user_id,
                self.t0_ms,
                self.population.histories.get(user_id, []),
                self.population.history_times_ms.get(user_id, []),
            )
            self.states[user_id] = state
        return state

    def _payload(self, user_id: int, t_ms: int) -> dict:
        payload: dict[str, Any] = {
            "user_id": user_id,
            "event_time_ms": t_ms,
            "exclude_seen": self.cfg.exclude_seen,
            "context": {"sim_run": self.run_id},
        }
        if self.cfg.session_size is not None:
            payload["session_size"] = self.cfg.session_size
        return payload

    async def _session(self, user_id: int, session: int, t_ms: int, prev: asyncio.Task | None):
        if prev is not None:  # one user's sessions happen in order
            await prev
        p = self.progress
        row: dict[str, Any] = {
            "user_id": user_id,
            "session": session,
            "t_ms": t_ms,
            "request_id": None,
            "arm": None,
            "model_version": None,
            "status": "ok",
            "n_items": 0,
            "views": 0,
            "watch_s": 0.0,
            "likes": 0,
            "follows": 0,
            "expected_watch_s": None,
            "oracle_watch_s": None,
            # What the platform knew of the user before the run (a CUPED covariate:
            # recloop.ab_stats): how much history they came with, log(1 + items).
            "pre_log_history": math.log1p(len(self.population.histories.get(user_id, []))),
            "latency_ms": None,
            "wall_ms": int(time.time() * 1000),  # when the request left (wall clock)
        }
        started = time.monotonic()
        p.in_flight += 1
        try:
            reply = await self.transport(self._payload(user_id, t_ms))
        except RequestFailed as exc:
            row["status"] = exc.status
        finally:
            p.in_flight -= 1
        row["latency_ms"] = round((time.monotonic() - started) * 1000, 2)
        if row["status"] == "ok":
            self._respond(row, reply, user_id, session, t_ms)
            p.ok += 1
        else:
            p.failed += 1
        p.statuses[row["status"]] = p.statuses.get(row["status"], 0) + 1
        p.done += 1
        self.ledger.append(row)

    def _respond(self, row: dict, reply: dict, user_id: int, session: int, t_ms: int) -> None:
        items = [int(it["item_id"]) for it in sorted(reply["items"], key=lambda i: i["position"])]
        row.update(
            request_id=reply["request_id"],
            arm=reply["arm"],
            model_version=reply["model_version"],
            n_items=len(items),
        )
        if not items:
            return
        state = self._state(user_id)
        if self.cfg.oracle:
            row["oracle_watch_s"] = float(self.model.oracle(state, t_ms, len(items))[1])
        rng = np.random.default_rng([self.cfg.seed, RESPONSE_STREAM, user_id, session])
        resp = self.model.session_response(state, items, t_ms, rng)
        row["expected_watch_s"] = float(resp.expected_watch_s)
        context = {"sim_run": self.run_id}
        for k in range(len(items)):
            clicked = bool(resp.clicked[k])
            self.sink(
                Interaction(
                    event_id=event_id(self.run_id, user_id, session, k),
                    event_time_ms=int(resp.event_time_ms[k]),
                    request_id=reply["request_id"],
                    user_id=user_id,
                    item_id=items[k],
                    position=k,
                    arm=reply["arm"],
                    model_version=reply["model_version"],
                    clicked=clicked,
                    watch_time_s=float(resp.watch_time_s[k]) if clicked else 0.0,
                    liked=bool(resp.liked[k]) and clicked,
                    followed=bool(resp.followed[k]) and clicked,
                    context=context,
                )
            )
        self.progress.events += len(items)
        row.update(
            views=int(resp.clicked.sum()),
            watch_s=float(resp.watch_time_s.sum()),
            likes=int(resp.liked.sum()),
            follows=int(resp.followed.sum()),
        )

    async def run(self) -> dict[str, Any]:
        """Play the whole shard; returns the progress snapshot (``self.ledger`` holds one
        row per session)."""
        cfg, p = self.cfg, self.progress
        slots = asyncio.Semaphore(cfg.concurrency)
        tails: dict[int, asyncio.Task] = {}
        pending: set[asyncio.Task] = set()
        p.started = wall0 = time.monotonic()

        def release(task: asyncio.Task) -> None:
            slots.release()
            pending.discard(task)

        for t_s, uid, k in self.arrivals.itertuples(index=False):
            if cfg.speedup > 0:
                due = wall0 + t_s / cfg.speedup
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await slots.acquire()
            if cfg.speedup > 0:
                p.max_lag_s = max(p.max_lag_s, time.monotonic() - (wall0 + t_s / cfg.speedup))
            p.virtual_s = float(t_s)
            uid = int(uid)
            t_ms = self.t0_ms + int(round(t_s * 1000))
            task = asyncio.create_task(self._session(uid, int(k), t_ms, tails.get(uid)))
            tails[uid] = task
            pending.add(task)
            task.add_done_callback(release)
        if pending:
            await asyncio.gather(*pending)
        return p.snapshot()


# --------------------------------------------------------------------------- HTTP + Kafka
def http_transport(url: str, concurrency: int, timeout_s: float) -> tuple[Transport, Callable]:
    """POST to ``url`` with one pooled aiohttp session; returns (transport, close)."""
    import aiohttp

    state: dict[str, Any] = {}

    async def session() -> aiohttp.ClientSession:
        if "s" not in state:
            state["s"] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=concurrency),
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            )
        return state["s"]

    async def post(payload: dict) -> dict:
        s = await session()
        try:
            async with s.post(url, json=payload) as resp:
                if resp.status != 200:
                    raise RequestFailed(f"http {resp.status}")
                return await resp.json()
        except RequestFailed:
            raise
        except TimeoutError:
            raise RequestFailed("timeout") from None
        except aiohttp.ClientError as exc:
            raise RequestFailed(f"error {type(exc).__name__}") from None

    async def close() -> None:
        if "s" in state:
            await state.pop("s").close()

    return post, close


class KafkaSink:
    """Interactions to Kafka (acks=all, idempotent). A send the broker refused fails the
    next send and ``close``: the run stops rather than losing events silently."""

    def __init__(self, bootstrap: str, client_id: str) -> None:
        from recloop.kafka_io import EventProducer

        self.producer = EventProducer(bootstrap, client_id=client_id)
        self.errors: list[BaseException] = []
        self.sent = 0

    def __call__(self, event: Interaction) -> None:
        if self.errors:
            raise RuntimeError(f"Kafka refused an earlier event: {self.errors[0]}")
        self.producer.send(event).add_errback(self.errors.append)
        self.sent += 1

    def close(self, timeout_s: float = 120.0) -> None:
        try:
            self.producer.flush(timeout_s=timeout_s)
        finally:
            self.producer.close()
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} events not delivered: {self.errors[0]}")


def run_shard(
    cfg_dict: dict,
    sim_dict: dict,
    run_id: str,
    t0_ms: int,
    model_dir: str,
    url: str,
    shard: int,
    shards: int,
    on_start: Callable[[Simulator], None] | None = None,
) -> dict[str, Any]:
    """One shard, start to end, in this process (what the Ray actor runs)."""
    from actors.sim.user_model import HiddenUserModel
    from recloop.config import StackConfig
    from recloop.data import load

    cfg = StackConfig.from_dict(cfg_dict)
    sim = SimulationConfig(**sim_dict)
    model = HiddenUserModel.load(model_dir)
    if sim.response:
        model.config = dataclasses.replace(model.config, **sim.response)
    population = Population.from_data(load(cfg.data), sim.users, sim.seed)
    arrivals = schedule(population, sim)
    mine = population.shard(shard, shards)
    arrivals = arrivals[arrivals["user_id"].isin(set(mine.user_ids.tolist()))]
    sink = KafkaSink(cfg.kafka.bootstrap, f"recloop-sim-{shard}")

    async def main() -> dict[str, Any]:
        post, close = http_transport(url, sim.concurrency, sim.request_timeout_s)
        simulator = Simulator(run_id, sim, model, mine, arrivals, t0_ms, post, sink)
        if on_start is not None:
            on_start(simulator)
        try:
            summary = await simulator.run()
        finally:
            await close()
        return {"summary": summary, "ledger": simulator.ledger}

    try:
        out = asyncio.run(main())
    finally:
        sink.close()
    out["summary"]["events_sent"] = sink.sent
    return out
