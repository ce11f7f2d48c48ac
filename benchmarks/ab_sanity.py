"""Can the simulated A/B test be trusted? The two sanity checks, on a stack of its own.

1. A/A (``infra/experiments/aa-seed.yaml``): two arms serve the same frozen seed model;
   run for several seeds. Every metric should show no significant difference (p > 0.05
   in ~95% of seed x metric cells) and the CIs should cover zero.
2. Model vs baselines (``infra/experiments/model-vs-baselines.yaml``): the frozen seed
   model against most-popular and random arms, under every kind of hidden user model
   (``--kinds``; the simulator's default is chosen by held-out fit, ``make
   bench-sim-fit``, never by these verdicts). Reports every lift with its CI.

Each run goes through the whole path: simulator actors -> HTTP -> Serve router and arms
-> Kafka -> analysis read back from Kafka (delivery checked). Runs go as fast as the
service answers (speed-up 0); the run files' horizons apply. Saves the per-run verdicts
and a summary as JSON.

    make bench-ab        # or: .venv/bin/python -m benchmarks.ab_sanity [--seeds 1,2,3,4,5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from recloop.ab_stats import unadjusted_fields
from recloop.config import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
EXPERIMENTS = PROJECT_ROOT / "infra" / "experiments"
METRICS = ("swt", "vtr", "ltr", "wtr")


def _say(msg: str) -> None:
    print(f"[bench-ab {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _brief(result: dict) -> dict[str, Any]:
    rows = {}
    for c in result["comparisons"]:
        rows[f"{c['arm']}.{c['metric']}"] = {
            "control": round(c["control_value"], 4),
            "arm": round(c["arm_value"], 4),
            "rel_lift": round(c["rel_lift"], 4),
            "ci_boot": [round(x, 4) for x in c["ci_boot"]],
            "p_value": c["p_value"],
            "verdict": c["verdict"],
            **unadjusted_fields(c),  # CUPED: the plain test beside the adjusted one
        }
    arms = {
        a: {k: v for k, v in info.items() if k in ("users", "sessions", "oracle_gap")}
        for a, info in result["arms"].items()
    }
    return {
        "comparisons": rows,
        "arms": arms,
        "delivery": result["meta"]["delivery"],
        "first_vs_returning": result["meta"]["first_vs_returning"],
        "features": result["meta"]["service"].get("features", {}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1,2,3,4,5", help="A/A seeds")
    ap.add_argument("--max-sessions", type=int, help="override the run files' horizon")
    ap.add_argument("--synthetic", action="store_true", help="generated data, not MovieLens")
    ap.add_argument("--checkpoint", help="seed checkpoint (default: the newest pretrained)")
    ap.add_argument(
        "--kinds", default="static,sequential", help="hidden user models for model vs baselines"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "ab_sanity.json")
    args = ap.parse_args()

    import ray

    from actors.sim.driver import simulate
    from actors.sim.runfile import SimulationConfig
    from actors.sim.user_model import KINDS

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - set(KINDS):
        ap.error(f"--kinds: one or more of {KINDS}")
    from pipelines.analysis.ab_analysis import analyze_run
    from recloop.ray_head import connect
    from recloop.stack import Stack, isolated_config
    from serving.api import latest_seed

    home = Path(tempfile.mkdtemp(prefix="rl-ab-", dir="/tmp"))
    cfg = isolated_config(home, **{"data.synthetic": args.synthetic or None})
    seed_ckpt = Path(args.checkpoint) if args.checkpoint else latest_seed(cfg)
    if seed_ckpt is None:
        print("no seed checkpoint: run `recloop pretrain` or pass --checkpoint", file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {"speedup": 0.0}
    if args.max_sessions:
        overrides["max_sessions"] = args.max_sessions
    default_kind = SimulationConfig().user_model_kind
    out: dict[str, Any] = {
        "checkpoint": str(seed_ckpt),
        "default_kind": default_kind,
        "aa": {},
        "model_vs_baselines": {},
    }
    stack = Stack(cfg)
    started = time.monotonic()
    try:
        stack.up(_say)
        connect(cfg)
        from serving.api import ensure_arms

        for name in ("model-vs-baselines", "aa-seed"):  # publish the seed into each lineage
            import dataclasses

            c = dataclasses.replace(
                cfg, serve=dataclasses.replace(cfg.serve, experiment=EXPERIMENTS / f"{name}.yaml")
            )
            ensure_arms(c, seed_ckpt, _say)

        def run(name: str, **extra: Any) -> dict:
            path = EXPERIMENTS / f"{name}.yaml"
            manifest = simulate(cfg, path, _say, True, {**overrides, **extra})
            result = analyze_run(cfg, cfg.home / "sim" / "runs" / manifest["run_id"])
            brief = _brief(result)
            brief["throughput"] = result["meta"]["throughput"]
            brief["policy"] = result["policy"]
            _say(f"{name}: {json.dumps(brief['comparisons'])}")
            return brief

        for kind in kinds:
            out["model_vs_baselines"][kind] = run("model-vs-baselines", user_model_kind=kind)
        for seed in [int(s) for s in args.seeds.split(",") if s]:
            out["aa"][str(seed)] = run("aa-seed", seed=seed)
        ray.shutdown()
    finally:
        stack.down(_say)
        shutil.rmtree(home, ignore_errors=True)

    cells = [
        (seed, m, r["comparisons"][f"b.{m}"])
        for seed, r in out["aa"].items()
        for m in METRICS
        if f"b.{m}" in r["comparisons"]
    ]
    out["aa_summary"] = {
        "runs": len(out["aa"]),
        "cells": len(cells),
        "significant_at_0.05": sum(c["p_value"] < 0.05 for _, _, c in cells),
        "ci_covers_zero": sum(c["ci_boot"][0] <= 0 <= c["ci_boot"][1] for _, _, c in cells),
        "swt_p_values": {seed: c["p_value"] for seed, m, c in cells if m == "swt"},
        "all_deliveries_complete": all(
            r["delivery"]["missing"] == 0 and r["delivery"]["duplicates"] == 0
            for r in [*out["aa"].values(), *out["model_vs_baselines"].values()]
        ),
    }
    out["wall_s"] = round(time.monotonic() - started, 1)
    out["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["aa_summary"], indent=2))
    for kind, r in out["model_vs_baselines"].items():
        print(kind, json.dumps(r["comparisons"], indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
