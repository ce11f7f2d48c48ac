"""The DPO sample server (OneRec section 4, Figure 3): preference pairs from mirrored traffic.

    recloop dpo --detach | --stop | --status

Serving's router mirrors a deterministic share of requests (``serve.dpo_fraction``, 1% by
default) to the detached actor ``serve.dpo_actor`` with a fire-and-forget call; the
actor only enqueues them (a bounded queue: when it is full the request is dropped and
counted, so the sampler can never push back on serving). A worker thread takes the
queued requests of the arms it mines for (``dpo.arms``, default every ``online-ipa`` arm
of the experiment), in small batches, and for each one

1. generates ``dpo.candidates`` sessions for the request's history with trie-constrained
   beam search on the arm's **current** version (the beam's top N, history excluded);
2. scores each candidate with the arm's current session reward model (``models.reward``;
   the combination ``dpo.reward_weights`` of its predicted targets, by default the
   predicted session watch time in seconds);
3. emits up to ``dpo.pairs_per_request`` pairs ``Preference(chosen, rejected)``: the
   highest reward against the lowest, the second highest against the second lowest, and
   so on (disjoint pairs, while the rewards differ), each with both rewards, the version
   that generated them (the DPO reference) and the reward model's version, to
   ``recloop.preferences``.

Weights: the arm's policy is the registry's current version of the arm, the reward
model the current version of the pseudo-arm ``<arm>.reward`` (published by the arm's
training rounds). The registry is checked every ``dpo.reload_s`` seconds and a promoted
version is loaded beside the old one and swapped in, so every promotion reaches the
sampler. Counters (``stats``): requests offered, queued, dropped, processed, pairs
emitted, and why others were skipped; processing rate and CPU seconds per request (the
compute the sample ratio costs).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from recloop.config import StackConfig
from recloop.registry import reward_arm

Progress = Callable[[str], None]
BATCH = 8  # mirrored requests generated in one beam search


def mined_arms(cfg: StackConfig) -> list[str]:
    """``dpo.arms``, or every online-ipa arm of the serving experiment."""
    if cfg.dpo.arms:
        return list(cfg.dpo.arms)
    from recloop.experiment import load_experiment

    arms = load_experiment(cfg.serve.experiment).arms
    return [a.name for a in arms if a.learning == "online-ipa"]


@dataclass
class RewardScorer:
    """A loaded session reward model behind data item ids."""

    version: str
    model: Any  # models.reward.SessionRewardModel
    to_model: dict[int, int]
    max_history: int
    weights: dict[str, float]

    @classmethod
    def load(cls, path: str, version: str, weights: dict[str, float]) -> RewardScorer:
        from recloop.checkpoint import load_reward

        ck = load_reward(path)
        to_model = {int(d): m for m, d in enumerate(ck.item_ids, start=1)}
        return cls(version, ck.model.eval(), to_model, ck.model.cfg.max_history, dict(weights))

    @torch.no_grad()
    def score(self, history: Sequence[int], sessions: Sequence[Sequence[int]]) -> list[float]:
        """The combined reward of each candidate session (data item ids)."""
        from models.ranker import pad_histories
        from models.reward import combine

        hist = [self.to_model[i] for i in history if i in self.to_model]
        h = pad_histories([hist], self.max_history).expand(len(sessions), -1)
        m = max(len(s) for s in sessions)
        items = torch.zeros(len(sessions), m, dtype=torch.long)
        for j, s in enumerate(sessions):
            items[j, : len(s)] = torch.tensor([self.to_model.get(i, 0) for i in s])
        rewards = self.model.session_rewards(h, items)
        return combine(rewards, self.weights).tolist()


def select_pairs(rewards: Sequence[float], k: int = 1) -> list[tuple[int, int]]:
    """Up to ``k`` disjoint (chosen, rejected) index pairs: the i-th highest reward
    against the i-th lowest (the first of equal ones first), for i < k and i < n / 2,
    while the chosen one's reward is above the rejected one's. Empty when every
    candidate has the same reward (no preference)."""
    n = len(rewards)
    best = sorted(range(n), key=lambda i: (-rewards[i], i))
    worst = sorted(range(n), key=lambda i: (rewards[i], i))
    out = []
    for i in range(min(k, n // 2)):
        hi, lo = best[i], worst[i]
        if rewards[hi] <= rewards[lo]:
            break
        out.append((hi, lo))
    return out


class PreferenceMiner:
    """The sampler's logic, without Ray: ``offer`` enqueues, ``run`` mines until stopped.

    ``registry`` (a ``recloop.registry.ModelRegistry``) and ``producer`` (an
    ``EventProducer``) are created from ``cfg`` unless given (tests pass their own)."""

    def __init__(
        self,
        cfg: StackConfig,
        arms: Sequence[str] | None = None,
        registry: Any = None,
        producer: Any = None,
        say: Progress = print,
    ) -> None:
        self.cfg, self.say = cfg, say
        self.arms = list(arms) if arms is not None else mined_arms(cfg)
        if registry is None:
            from recloop.registry import ModelRegistry

            registry = ModelRegistry(cfg.registry_uri)
        if producer is None:
            from recloop.kafka_io import EventProducer

            producer = EventProducer(cfg.kafka.bootstrap, client_id="recloop-dpo-sampler")
        self.registry, self.producer = registry, producer
        self.queue: queue.Queue[tuple[float, dict]] = queue.Queue(maxsize=cfg.dpo.queue_size)
        self.policies: dict[str, Any] = {}  # arm -> recloop.inference.LoadedModel
        self.rewards: dict[str, RewardScorer] = {}
        self._next_check = 0.0
        self._lock = threading.Lock()
        self.counts = {
            "offered": 0,
            "queued": 0,
            "dropped_full": 0,
            "other_arm": 0,
            "processed": 0,
            "emitted": 0,
            "no_model": 0,
            "no_reward_model": 0,
            "no_preference": 0,
            "errors": 0,
            "reloads": 0,
        }
        self.busy_s = 0.0  # wall time spent generating and scoring
        self.cpu_s = 0.0  # thread CPU time of the same
        self.latency_s: list[float] = []  # offer -> pair emitted, the latest 1000
        self.last_error: str | None = None
        self.started = time.time()

    # ------------------------------------------------------------------ intake
    def offer(self, payload: dict) -> bool:
        """Enqueue one mirrored request; never blocks (a full queue drops it)."""
        with self._lock:
            self.counts["offered"] += 1
            if payload.get("arm") not in self.arms:
                self.counts["other_arm"] += 1
                return False
            try:
                self.queue.put_nowait((time.monotonic(), payload))
            except queue.Full:
                self.counts["dropped_full"] += 1
                return False
            self.counts["queued"] += 1
            return True

    # ------------------------------------------------------------------ weights
    def refresh(self, force: bool = False) -> None:
        """Load each arm's promoted policy and reward model when they changed."""
        if not force and time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + self.cfg.dpo.reload_s
        from recloop.inference import LoadedModel

        for arm in self.arms:
            for kind, pointer in (("policy", arm), ("reward", reward_arm(arm))):
                try:
                    version = self.registry.current(pointer)
                except Exception:
                    version = None  # no such pointer yet
                loaded = (self.policies if kind == "policy" else self.rewards).get(arm)
                if version is None or (loaded is not None and loaded.version == version):
                    continue
                try:
                    lineage = self.registry.arm(pointer)["lineage"]
                    path = str(self.registry.fetch(lineage, version))
                    if kind == "policy":
                        model = LoadedModel.load(path, version)
                        if not isinstance(model, LoadedModel):
                            raise ValueError(f"{version} is not a generative (OneRec) model")
                        self.policies[arm] = model
                    else:
                        self.rewards[arm] = RewardScorer.load(
                            path, version, self.cfg.dpo.reward_weights
                        )
                    self.counts["reloads"] += 1
                    self.say(f"dpo sampler: arm {arm}: {kind} {version} loaded")
                except Exception as exc:  # keep the previous weights
                    self.last_error = f"{arm} {kind} {version}: {type(exc).__name__}: {exc}"[:500]
                    self.counts["errors"] += 1

    # ------------------------------------------------------------------ mining
    def mine(self, batch: Sequence[tuple[float, dict]]) -> list[Any]:
        """Pairs for a batch of queued requests (one beam search per arm)."""
        from models.beam_search import beam_search
        from recloop.events import Preference

        by_arm: dict[str, list[tuple[float, dict]]] = {}
        for t, p in batch:
            by_arm.setdefault(p["arm"], []).append((t, p))
        out = []
        n = self.cfg.dpo.candidates
        for arm, reqs in by_arm.items():
            policy, scorer = self.policies.get(arm), self.rewards.get(arm)
            if policy is None or scorer is None:
                key = "no_model" if policy is None else "no_reward_model"
                self.counts[key] += len(reqs)
                continue
            histories = [
                [policy.to_model[i] for i in p["history"] if i in policy.to_model] for _, p in reqs
            ]
            # A context-trained policy proposes on the context the request was served on.
            served_on = [
                {
                    "request_time_s": None
                    if p.get("event_time_ms") is None
                    else p["event_time_ms"] / 1000,
                    "profile": p.get("profile"),
                    "tags": p.get("tags"),
                }
                for _, p in reqs
            ]
            with torch.no_grad():
                enc = policy.ranker.encode(histories, policy.contexts(served_on, histories))
                width = max(self.cfg.dpo.beam_width, n)
                beams = beam_search(
                    policy.ranker.model, enc, policy.ranker.trie, width, exclude=histories
                )
            for b, (t, p) in enumerate(reqs):
                self.counts["processed"] += 1
                sessions = []
                for w in range(min(n, beams.items.shape[1])):
                    items = [policy.to_data[i] for i in beams.items[b, w].tolist() if i > 0]
                    if items:
                        sessions.append(items)
                rewards = scorer.score(p["history"], sessions) if len(sessions) >= 2 else []
                picks = select_pairs(rewards, self.cfg.dpo.pairs_per_request)
                if not picks:
                    self.counts["no_preference"] += 1
                    continue
                history = [int(i) for i in p["history"]][-4096:]
                event_time_ms = int(p.get("event_time_ms") or time.time() * 1000)
                out.extend(
                    (
                        t,
                        Preference(
                            event_time_ms=event_time_ms,
                            request_id=p["request_id"],
                            user_id=int(p["user_id"]),
                            model_version=policy.version,
                            history=history,
                            chosen=sessions[hi],
                            rejected=sessions[lo],
                            chosen_reward=float(rewards[hi]),
                            rejected_reward=float(rewards[lo]),
                            arm=arm,
                            reward_version=scorer.version,
                            candidates=len(sessions),
                        ),
                    )
                    for hi, lo in picks
                )
        return out

    def step(self, timeout_s: float = 0.5) -> int:
        """Take up to ``BATCH`` queued requests, mine and send their pairs; returns the
        number of pairs sent."""
        self.refresh()
        try:
            batch = [self.queue.get(timeout=timeout_s)]
        except queue.Empty:
            return 0
        while len(batch) < BATCH:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        t0, c0 = time.monotonic(), time.thread_time()
        try:
            pairs = self.mine(batch)
            for _, pref in pairs:
                self.producer.send(pref)
            self.producer.flush(30.0)
        except Exception as exc:
            self.counts["errors"] += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            self.say(f"dpo sampler: batch failed: {self.last_error}")
            return 0
        finally:
            self.busy_s += time.monotonic() - t0
            self.cpu_s += time.thread_time() - c0
        now = time.monotonic()
        self.counts["emitted"] += len(pairs)
        self.latency_s = (self.latency_s + [now - t for t, _ in pairs])[-1000:]
        return len(pairs)

    def run(self, stop: threading.Event) -> dict:
        torch.set_num_threads(self.cfg.dpo.torch_threads)
        self.say(f"dpo sampler: mining pairs for arms {self.arms}")
        self.refresh(force=True)
        while not stop.is_set():
            self.step()
        self.producer.flush(30.0)
        return self.stats()

    def stats(self) -> dict:
        c = dict(self.counts)
        lat = sorted(self.latency_s)
        return {
            "arms": self.arms,
            "counts": c,
            "queue": self.queue.qsize(),
            "policies": {a: m.version for a, m in self.policies.items()},
            "reward_models": {a: m.version for a, m in self.rewards.items()},
            "fraction_processed": c["processed"] / c["queued"] if c["queued"] else None,
            "busy_s": round(self.busy_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "cpu_s_per_request": self.cpu_s / c["processed"] if c["processed"] else None,
            "requests_per_busy_s": c["processed"] / self.busy_s if self.busy_s > 0 else None,
            "latency_p50_s": lat[len(lat) // 2] if lat else None,
            "latency_max_s": lat[-1] if lat else None,
            "uptime_s": round(time.time() - self.started, 1),
            "last_error": self.last_error,
        }


# --------------------------------------------------------------------------- Ray actor
def _actor_class():
    import ray

    @ray.remote(max_concurrency=4)
    class DpoSamplerActor:
        def __init__(self, cfg: dict, arms: list[str] | None = None) -> None:
            from recloop import priority

            conf = StackConfig.from_dict(cfg)
            self.priority = priority.apply(conf)  # mining is background work beside serving
            self.miner = PreferenceMiner(conf, arms, say=lambda m: print(m, flush=True))
            self.stop_event = threading.Event()

        def offer(self, payload: dict) -> bool:
            return self.miner.offer(payload)

        def run(self) -> dict:
            return self.miner.run(self.stop_event)

        def stats(self) -> dict:
            return {**self.miner.stats(), "priority": self.priority}

        def stop(self) -> None:
            self.stop_event.set()

    return DpoSamplerActor


def start_sampler(
    cfg: StackConfig, arms: Sequence[str] | None = None, say: Progress = print
) -> Any:
    """Start the detached sampler actor ``serve.dpo_actor`` (idempotent)."""
    import ray

    from recloop.ray_head import connect

    connect(cfg)
    name = cfg.serve.dpo_actor
    try:
        actor = ray.get_actor(name)
        say(f"{name} is running already")
        return actor
    except ValueError:
        pass
    arms = list(arms) if arms is not None else mined_arms(cfg)
    actor = (
        _actor_class()
        .options(
            name=name,
            lifetime="detached",
            num_cpus=cfg.dpo.sampler_cpus,
            resources=cfg.dpo.sampler_resources or None,
        )
        .remote(cfg.to_dict(), arms)
    )
    actor.run.remote()
    say(f"started {name} (detached actor, {cfg.dpo.sampler_cpus} CPU) for arms {arms}")
    return actor


def sampler_stats(cfg: StackConfig) -> dict | None:
    """The running sampler's ``stats`` (None when none runs)."""
    import ray

    from recloop.ray_head import connect

    connect(cfg)
    try:
        actor = ray.get_actor(cfg.serve.dpo_actor)
    except ValueError:
        return None
    return ray.get(actor.stats.remote(), timeout=30)


def stop_sampler(cfg: StackConfig, say: Progress = print) -> dict | None:
    """Stop the sampler; returns its final stats (None when none ran)."""
    import ray

    from recloop.ray_head import connect

    connect(cfg)
    try:
        actor = ray.get_actor(cfg.serve.dpo_actor)
    except ValueError:
        return None
    stats = None
    try:
        stats = ray.get(actor.stats.remote(), timeout=30)
        ray.get(actor.stop.remote(), timeout=30)
    finally:
        ray.kill(actor)
    say(f"stopped {cfg.serve.dpo_actor}")
    return stats


def main(argv: list[str] | None = None) -> int:
    from recloop.config import load_config

    parser = argparse.ArgumentParser(prog="recloop dpo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="stack config YAML")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--detach", action="store_true", help="start the sampler actor")
    what.add_argument("--stop", action="store_true", help="stop it (prints its final stats)")
    what.add_argument("--status", action="store_true", help="its counters as JSON")
    parser.add_argument("--arm", action="append", help="arm to mine for (repeatable)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    if args.detach:
        start_sampler(cfg, args.arm)
        return 0
    stats = stop_sampler(cfg) if args.stop else sampler_stats(cfg)
    print(json.dumps(stats, indent=2))
    return 0 if stats is not None or args.stop else 1


if __name__ == "__main__":
    sys.exit(main())
