"""The continuous-training job: rounds until stopped, the trainer as a Ray actor of the
stack, and ``recloop train``'s command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from pipelines.continuous.rounds import default_trainer, run_round
from pipelines.continuous.state import Progress, PromoteFn, _log
from pipelines.continuous.trainer import Trainer, WarmTrainer
from recloop.config import StackConfig
from recloop.examples import DATA_POLICIES, check_policy
from recloop.train_state import freshness, read_rounds


# --------------------------------------------------------------------------- loop
def train_forever(
    cfg: StackConfig,
    stop: threading.Event | None = None,
    progress: Progress = print,
    policy: str = "own-arm",
    promote: PromoteFn | None = None,
    trainer: Trainer | None = None,
) -> None:
    """Round after round until ``stop`` is set: a round as soon as the lake has enough
    new data (polled every ``train.poll_s``); a failed round is resumed on the next poll.
    One trainer serves every round (``default_trainer``: warm with one worker)."""
    stop = stop or threading.Event()
    trainer = trainer or default_trainer(cfg)
    while not stop.is_set():
        try:
            record = run_round(cfg, progress, policy, promote, trainer)
        except Exception as exc:  # the state keeps the round in progress: resume it
            progress(
                f"round failed ({type(exc).__name__}: {exc}); retrying in {cfg.train.poll_s:.0f} s"
            )
            record = None
        if record is not None and record.get("status") != "skipped":
            progress(
                json.dumps(
                    {
                        k: record.get(k)
                        for k in (
                            "round",
                            "status",
                            "version",
                            "examples",
                            "train_s",
                            "round_s",
                            "examples_per_s",
                        )
                    }
                )
            )
            continue  # more data may be waiting
        if record is None:
            stop.wait(cfg.train.poll_s)


# --------------------------------------------------------------------------- as a Ray actor
def actor_name(arm: str) -> str:
    return f"trainer-{arm}"


def _actor_class():
    import ray

    @ray.remote(max_concurrency=2)  # CPUs: see start_actor
    class TrainerActor:
        def __init__(self, cfg: dict, policy: str) -> None:
            from recloop import priority

            self.cfg = StackConfig.from_dict(cfg)
            self.policy = policy
            self.stop_event = threading.Event()
            self.priority = priority.apply(self.cfg)  # below the serving replicas
            self.trainer = default_trainer(self.cfg)  # warm: kept across rounds

        def run(self) -> None:
            train_forever(self.cfg, self.stop_event, _log, self.policy, trainer=self.trainer)

        def run_once(self) -> dict | None:
            return run_round(self.cfg, _log, self.policy, trainer=self.trainer)

        def status(self) -> dict[str, Any]:
            out = {"rounds": read_rounds(self.cfg)[-5:], "freshness": freshness(self.cfg)}
            out["priority"] = self.priority
            if isinstance(self.trainer, WarmTrainer):
                out["warm"] = self.trainer.status()
            return out

        def stop(self) -> None:
            self.stop_event.set()

    return TrainerActor


def start_actor(
    cfg: StackConfig,
    policy: str = "own-arm",
    progress: Progress = print,
    run: bool = True,
    env: dict[str, str] | None = None,
):
    """The arm's trainer as a detached actor of the stack (idempotent); ``run`` starts
    its rounds (``train_forever``) at once. With one worker the actor is the warm
    trainer and holds ``train.cpus_per_worker`` CPUs (and ``train.worker_resources``, so
    it lands on a train node); with more, its Ray Train workers hold them. ``env``:
    environment variables of the actor's process (fault injection in tests)."""
    import ray

    from recloop.ray_head import connect

    connect(cfg)
    name = actor_name(cfg.train.arm)
    try:
        actor = ray.get_actor(name)
        progress(f"{name} is running already")
        return actor
    except ValueError:
        pass
    warm = cfg.train.workers <= 1
    options: dict[str, Any] = {
        "name": name,
        "lifetime": "detached",
        "num_cpus": cfg.train.cpus_per_worker if warm else 0,
    }
    if warm and cfg.train.worker_resources:
        options["resources"] = dict(cfg.train.worker_resources)
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    actor = _actor_class().options(**options).remote(cfg.to_dict(), check_policy(policy))
    if run:
        actor.run.remote()
    where = "warm, in the actor" if warm else f"on {cfg.train.workers} Ray Train workers"
    progress(f"started {name} (detached actor; rounds train {where})")
    return actor


def stop_actor(cfg: StackConfig, progress: Progress = print) -> bool:
    import ray

    from recloop.ray_head import connect

    connect(cfg)
    try:
        actor = ray.get_actor(actor_name(cfg.train.arm))
    except ValueError:
        return False
    try:
        ray.get(actor.stop.remote(), timeout=30)
    finally:
        ray.kill(actor)  # a round in progress resumes when a trainer starts again
    progress(f"stopped {actor_name(cfg.train.arm)}")
    return True


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="recloop train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="stack run file (home, Ray, registry)")
    ap.add_argument("--home", help="state folder (default .recloop)")
    ap.add_argument("--arm", help="the arm whose lineage is trained (train.arm)")
    ap.add_argument(
        "--workers",
        type=int,
        help="1: the warm in-process trainer; more: Ray Train DDP workers (train.workers)",
    )
    ap.add_argument(
        "--data-policy",
        choices=DATA_POLICIES,
        default=None,
        help="own-arm (default): the arm's own sessions; pooled: every arm's; weighted: every "
        "arm's, each arm's weighted by the inverse of its share of them",
    )
    ap.add_argument("--pooled", action="store_true", help="the same as --data-policy pooled")
    ap.add_argument(
        "--dpo",
        action="store_true",
        help="iterative preference alignment: the reward model and DPO on the arm's pairs",
    )
    ap.add_argument("--once", action="store_true", help="one round (or wait for none), then exit")
    ap.add_argument("--freshness", action="store_true", help="print the serving model's freshness")
    ap.add_argument("--detach", action="store_true", help="run as a detached actor of the stack")
    ap.add_argument("--stop", action="store_true", help="stop the arm's detached trainer")
    return ap


def main(argv: list[str] | None = None) -> int:
    from recloop.config import load_config

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pooled and args.data_policy not in (None, "pooled"):
        parser.error(f"--pooled contradicts --data-policy {args.data_policy}")
    policy = args.data_policy or ("pooled" if args.pooled else "own-arm")
    cfg = load_config(
        args.config,
        overrides={
            "home": args.home,
            "train.arm": args.arm,
            "train.workers": args.workers,
            "train.dpo": True if args.dpo else None,
        },
    )
    if args.freshness:
        print(json.dumps(freshness(cfg), indent=2))
        return 0
    if args.detach:
        start_actor(cfg, policy, _log)
        return 0
    if args.stop:
        return 0 if stop_actor(cfg, _log) else 1
    from recloop import priority
    from recloop.ray_head import connect

    connect(cfg)
    priority.apply(cfg)  # training is background work beside the serving replicas
    if args.once:
        record = run_round(cfg, _log, policy=policy)
        print(json.dumps(record, indent=2) if record else "no round: not enough new data")
        return 0
    # Ctrl-C (or the simulation driver's SIGINT between rounds) stops the loop, even
    # when this process was started with SIGINT ignored (a background job of a shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = threading.Event()
    try:
        train_forever(cfg, stop, _log, policy=policy)
    except KeyboardInterrupt:
        stop.set()
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
