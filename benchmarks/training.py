"""The closed loop under load: online vs frozen A/B, training rounds and freshness.

Starts its own stack (temporary home, free ports, the shared jar cache; MovieLens-100k
when it is there), publishes the newest seed checkpoint into both arms, and runs
``infra/experiments/online-vs-frozen.yaml``: simulated users with fast taste drift,
the ingestor actors landing feedback in Feast and the lake, and ``recloop train``
fine-tuning the ``online`` arm round after round, each gated version hot-swapped in.

It reports:

- the A/B verdict (session watch time, view/like/follow rates; ``recloop analyze``);
- per training round: examples, examples/s end to end and in compute alone, round time,
  gate decision;
- feedback-to-serving delay, sampled every 10 s during the run: the wall-clock age of
  the newest feedback in the version serving on ``online``;
- the baseline measured in the same run: the last round's examples trained in this
  process by one worker (``local_train``), beside the Ray Train workers' compute rate.

    make bench-training         # or: .venv/bin/python -m benchmarks.training
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from recloop.config import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
RUN_FILE = PROJECT_ROOT / "infra" / "experiments" / "online-vs-frozen.yaml"


def _say(msg: str) -> None:
    print(f"[bench-training {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def local_baseline(cfg: Any, round_no: int) -> dict[str, Any] | None:
    """The round's examples, one epoch, one worker in this process."""
    import torch

    from pipelines.continuous import (
        SessionExamples,
        local_train,
        read_rounds,
        round_dir,
        worker_conf,
    )
    from serving.control import registry

    path = round_dir(cfg, round_no) / "examples.safetensors"
    if not path.exists():
        return None
    ex = SessionExamples.load(path)
    h, t = ex.train_part()
    rec = next(r for r in read_rounds(cfg) if r["round"] == round_no)
    tc = cfg.train
    torch.set_num_threads(tc.torch_threads)
    plan = {
        "seed": 0,
        "epochs": 1,
        "batch_size": tc.batch_size * tc.workers,  # the same global batch
        "lr": tc.lr,
        "checkpoint_every_steps": 10**9,
    }
    lineage = registry(cfg).arm(tc.arm)["lineage"]
    conf = worker_conf(cfg, 10**6 + round_no, plan, lineage, rec["base_version"], h, t)
    started = time.perf_counter()
    local_train(cfg, conf, f"baseline-{round_no}", 1)
    wall = time.perf_counter() - started
    return {"round": round_no, "examples": len(t), "seconds": wall, "examples_per_s": len(t) / wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-file", type=Path, default=RUN_FILE)
    ap.add_argument("--max-sessions", type=int, help="override the run file's horizon")
    ap.add_argument("--speedup", type=float, help="override the run file's speed-up")
    ap.add_argument("--seed", type=int, help="override the run file's simulation seed")
    ap.add_argument("--synthetic", action="store_true", help="generated data, not MovieLens")
    ap.add_argument("--checkpoint", help="seed checkpoint (default: the newest pretrained)")
    ap.add_argument("--out", type=Path, default=RESULTS / "training.json")
    args = ap.parse_args()

    import ray

    from actors.ingestor import stop_actors
    from actors.sim.driver import simulate
    from pipelines.ab_analysis import analyze_run
    from pipelines.continuous import freshness, read_rounds
    from recloop.lake import Lake
    from recloop.ray_head import connect
    from recloop.stack import Stack, isolated_config
    from serving.control import ensure_arms, latest_seed

    home = Path(tempfile.mkdtemp(prefix="rl-bt-", dir="/tmp"))
    cfg = isolated_config(home, **{"data.synthetic": args.synthetic or None})
    cfg = dataclasses.replace(
        cfg,
        serve=dataclasses.replace(cfg.serve, experiment=args.run_file),
        train=dataclasses.replace(cfg.train, arm="online"),
    )
    seed = Path(args.checkpoint) if args.checkpoint else latest_seed(cfg)
    if seed is None:
        print("no seed checkpoint: run `recloop pretrain` or pass --checkpoint", file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {}
    if args.max_sessions:
        overrides["max_sessions"] = args.max_sessions
    if args.speedup is not None:
        overrides["speedup"] = args.speedup
    if args.seed is not None:
        overrides["seed"] = args.seed
    out: dict[str, Any] = {"machine": platform.platform(), "checkpoint": str(seed)}
    stack = Stack(cfg)
    samples: list[dict] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(10.0):
            try:
                f = freshness(cfg, "online")
                samples.append({k: f.get(k) for k in ("version", "round", "feedback_age_s")})
            except Exception as exc:  # the registry mid-write, or no version yet
                samples.append({"error": repr(exc)[:200]})

    try:
        stack.up(_say)
        connect(cfg)
        ensure_arms(cfg, seed, _say)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        manifest = simulate(cfg, args.run_file, _say, True, overrides)
        stop.set()
        result = analyze_run(cfg, cfg.home / "sim" / "runs" / manifest["run_id"])
        out["ab"] = {
            "policy": result["policy"],
            "comparisons": result["comparisons"],
            "arms": {
                a: {"sessions": r["sessions"], "users": r["users"], **r["metrics"]}
                for a, r in result["arms"].items()
            },
            "over_time": result.get("over_time"),
            "throughput": result["meta"]["throughput"],
        }
        rounds = read_rounds(cfg, "online")
        keep = (
            "round", "status", "version", "sessions", "high_quality", "examples", "examples_per_s",
            "compute_examples_per_s", "train_s", "round_s", "gate",
        )  # fmt: skip
        out["rounds"] = [{k: r.get(k) for k in keep} for r in rounds]
        out["freshness_samples"] = samples
        ages = sorted(s["feedback_age_s"] for s in samples if s.get("feedback_age_s") is not None)
        out["feedback_to_serving"] = {
            "samples": len(ages),
            "p50_s": ages[len(ages) // 2] if ages else None,
            "max_s": ages[-1] if ages else None,
            "final": freshness(cfg, "online"),
        }
        out["lake"] = Lake(cfg.lake_dir).summary()
        out["ingestor"] = [
            ray.get(ray.get_actor(f"ingestor-{i}").stats.remote(), timeout=30)
            for i in range(cfg.ingest.consumers)
        ]
        stop_actors(cfg, _say)
        trained = [r for r in rounds if r.get("examples")]
        if trained:
            out["baseline_local_one_worker"] = local_baseline(cfg, trained[-1]["round"])
            last = trained[-1]
            base = out["baseline_local_one_worker"]
            if base and last.get("compute_examples_per_s"):
                out["ray_compute_vs_local"] = (
                    last["compute_examples_per_s"] / base["examples_per_s"]
                )
        ray.shutdown()
    finally:
        stop.set()
        stack.down(_say)
        shutil.rmtree(home, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps({k: out.get(k) for k in ("ab", "feedback_to_serving")}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
