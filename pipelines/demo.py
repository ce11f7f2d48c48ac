"""``recloop demo``: the whole loop on the embedded stack, then its report.

    recloop demo [--quick] [--home DIR] [--keep-up] [--synthetic]

1. starts the embedded default stack (local Kafka, a local Ray head with Serve, Feast on
   SQLite) under ``<home>/demo`` on free ports; the demo's state from a previous run is
   cleared first (the fitted user model is kept);
2. takes the newest seed checkpoint, or pre-trains one on MovieLens-100k (a shorter
   budget than ``recloop pretrain``; ``--quick``: a small one, kept apart from the seeds);
3. deploys serving with the three arms of ``infra/experiments/demo.yaml`` (``control``
   frozen, ``online``, ``online-ipa``) and the live dashboard (its URL is printed);
4. runs the DPO sample server, the ingestor actors and continuous training while the
   simulated users' traffic flows, for a bounded time (6 minutes; ``--quick``: 2.5), then
   lets the training rounds in progress finish;
5. writes the report (``<home>/reports/<run>/report.html`` with PNG figures, and
   ``summary.json``) and stops everything it started (``--keep-up`` leaves the stack and
   the dashboard running; ``recloop down --home <home>/demo`` stops them later).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from recloop.ab_stats import unadjusted_fields
from recloop.config import PROJECT_ROOT, StackConfig

RUN_FILE = PROJECT_ROOT / "infra" / "experiments" / "demo.yaml"
KEEP_ACROSS_RUNS = ("sim/user_model",)  # fitted once per dataset (~10 s on MovieLens)
QUICK = {  # --quick: a sample of the users over a shorter virtual horizon, smaller rounds,
    # and a quarter of the requests mirrored, so pairs are mined in the minute or so between
    # the first reward model and the end of the traffic
    "simulation": {"users": 360, "duration_s": 45000.0, "speedup": 300.0, "drain_s": 150.0},
    "stack": {
        # 30, not 40: in two quick runs the online-ipa arm had 38 high-quality sessions
        # of its own when the traffic ended, and at 40 it never trained at all
        "train.min_sessions": 30,
        "train.workers": 1,
        "train.epochs": 1,
        "serve.dpo_fraction": 0.25,
    },
}
MOVIELENS_USERS = 943
SEED_MINUTES = 3.0  # pre-training budget when no seed checkpoint exists (15 min in all)
METRIC_WORDS = {"swt": "session watch time", "vtr": "view rate", "ltr": "like rate"}


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- set-up
def reset_home(home: Path) -> None:
    """Clear a previous demo's state under ``home`` (its stack must be down), keeping the
    paths of ``KEEP_ACROSS_RUNS``."""
    keep = [home / k for k in KEEP_ACROSS_RUNS]

    def clear(folder: Path) -> None:
        for path in folder.iterdir():
            if path in keep:
                continue
            if any(k.is_relative_to(path) for k in keep):
                clear(path)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    if home.exists():
        clear(home)


def demo_config(home: Path, run_file: Path, quick: bool, synthetic: bool) -> StackConfig:
    """The stack config: free ports under ``home``, the run file's ``stack:`` section."""
    from recloop.stack import isolated_config

    cache = os.environ.get("RECLOOP_CACHE")
    overrides = {"data.synthetic": True if synthetic else None, **(QUICK["stack"] if quick else {})}
    cfg = isolated_config(home, Path(cache) if cache else None, run_file, **overrides)
    return dataclasses.replace(
        cfg, serve=dataclasses.replace(cfg.serve, experiment=run_file, dashboard=True)
    )


def find_or_train_seed(cfg: StackConfig, base: Path, quick: bool, synthetic: bool) -> Path:
    """The newest seed checkpoint; else pre-train one (``--quick``: a small, fast one)."""
    from serving.api import latest_seed

    synthetic = synthetic or cfg.data.use_synthetic
    if not synthetic:
        found = latest_seed(dataclasses.replace(cfg, home=base))  # base's seeds, the repo's
        if found is not None:
            _say(f"seed model: {found} (newest pre-trained checkpoint)")
            return found
    kind = "demo-synthetic" if synthetic else ("demo-quick" if quick else "seed")
    if kind != "seed":  # a small seed made by an earlier demo, kept apart from the real ones
        made = sorted((base / "models" / kind).glob("*/config.json"))
        if made:
            _say(f"seed model: {made[-1].parent} (made by an earlier demo)")
            return made[-1].parent
    out = base / "models" / kind / time.strftime("%Y%m%d-%H%M%S")
    data = "synthetic" if synthetic else str(cfg.data.movielens_dir)
    cmd = [sys.executable, "-m", "pipelines.offline.pretrain", "--data", data, "--out", str(out)]
    if quick or synthetic:  # disjoint sessions: a fifth of the examples, 2 short epochs
        cmd += ["--epochs", "2", "--stride", "5", "--max-minutes", "1.5"]
    else:
        cmd += ["--max-minutes", str(SEED_MINUTES)]
    _say(f"no seed checkpoint: pre-training one ({' '.join(cmd[3:])})")
    started = time.monotonic()
    subprocess.run(cmd, check=True, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL)
    _say(f"seed model {out} in {time.monotonic() - started:.0f} s")
    return out


# --------------------------------------------------------------------------- progress
def _loop_line(snap: dict[str, Any]) -> str:
    parts = []
    for arm, t in (snap.get("training") or {}).items():
        parts.append(f"{arm} r{t.get('round') or 0} {t.get('status') or 'waiting'}")
    ing = snap.get("ingest") or {}
    sv = snap.get("serving") or {}
    dpo = snap.get("dpo") or {}
    lat = sv.get("latency_ms") or {}
    parts.append(f"{ing.get('lake_sessions', 0)} sessions landed, lag {ing.get('lag')}")
    parts.append(f"{dpo.get('emitted', 0)} DPO pairs")
    parts.append(f"p99 {lat.get('p99')} ms")
    return "loop: " + "; ".join(parts)


def _fetch(url: str, timeout: float = 10.0) -> Any:
    import requests

    resp = requests.get(url, timeout=timeout)
    resp.raise_for_status()
    return resp.json()


# --------------------------------------------------------------------------- summary
def build_summary(
    cfg: StackConfig,
    manifest: dict[str, Any],
    analysis: dict[str, Any],
    history: list[dict],
    seed: Path,
    quick: bool,
    initial: dict[str, str | None],
) -> dict[str, Any]:
    """The report's data (the schema is in ``pipelines.analysis.report``); ``initial``: each arm's
    version when the traffic started."""
    import pandas as pd

    from recloop.monitor import dpo_counts

    t0 = float(manifest["started_at"])
    speed = float(manifest["simulation"]["speedup"]) or 1.0
    v0 = int(manifest["t0_ms"])
    arms = manifest["experiment"]["arms"]
    control = analysis["config"]["control"]
    learning = [a["name"] for a in arms if a["learning"] != "frozen"]

    def wall(t_ms: float) -> float:
        return round((t_ms - v0) / speed / 1000, 2)

    online = {}
    for arm, rows in analysis["over_time"].items():
        online[arm] = [
            {
                "t_s": wall((r["t_ms_start"] + r["t_ms_end"]) / 2),
                "sessions": r["sessions"],
                **{k: r.get(k) for m in METRIC_WORDS for k in (m, f"{m}_ci")},
                # the hidden model's view: expected and best achievable watch time
                **{k: r.get(k) for k in ("expected_swt", "oracle_swt", "oracle_gap")},
            }
            for r in rows
            if r["sessions"] > 0
        ]
    verdict = [
        {
            "arm": c["arm"],
            "control": c["control"],
            "metric": c["metric"],
            "control_value": c["control_value"],
            "arm_value": c["arm_value"],
            "rel_lift": c["rel_lift"],
            "ci": c["ci_boot"] if c["ci_boot"][0] is not None else c["ci_delta"],
            "p_value": c["p_value"],
            "verdict": c["verdict"],
            **unadjusted_fields(c),  # CUPED: the plain test beside the adjusted one
        }
        for c in analysis["comparisons"]
    ]
    versions: dict[str, list[dict]] = {}
    training: dict[str, list[dict]] = {}
    per_version = []
    for a in arms:
        arm = a["name"]
        versions[arm] = [
            {
                "t_s": 0.0,
                "round": None,
                "version": initial.get(arm),
                "status": "seed",
                "reason": "the seed checkpoint",
            }
        ]
        if arm not in learning:
            continue
        training[arm] = []
        # The rounds completed during the run, as the trainers' stop reported them.
        rounds = (manifest.get("learning") or {}).get(arm, {}).get("rounds", [])
        for r in (r for r in rounds if r.get("round") is not None):
            t_s = round(r["completed_at_ms"] / 1000 - t0, 2)
            gate = r.get("gate") or {}
            versions[arm].append(
                {
                    "t_s": t_s,
                    "round": r["round"],
                    "version": r.get("version"),
                    "status": r["status"],
                    "reason": gate.get("reason", r.get("reason", "")),
                }
            )
            if r.get("kind") == "recount":  # a popularity arm's counts: no training, no gate
                continue
            last = (r.get("losses") or [{}])[-1]
            rm = r.get("reward_model") or {}
            rm_epochs = rm.get("epochs") or [{}]
            training[arm].append(
                {
                    "round": r["round"],
                    "t_s": t_s,
                    "status": r["status"],
                    "examples": r.get("examples"),
                    "pairs": r.get("trained_pairs", 0),
                    "round_s": r.get("round_s"),
                    "ntp_loss": last.get("ntp_loss"),
                    "dpo_loss": last.get("dpo_loss"),
                    "reward_loss": rm_epochs[-1].get("loss"),
                    "reward_auc": (rm.get("holdout") or {}).get("auc"),
                }
            )
            if r["status"] == "promoted" and r.get("newest_record_ts_ms"):
                per_version.append(
                    {
                        "arm": arm,
                        "version": r.get("version"),
                        "round": r["round"],
                        "t_s": t_s,
                        "feedback_to_serving_s": round(
                            (r["completed_at_ms"] - r["newest_record_ts_ms"]) / 1000, 2
                        ),
                    }
                )

    def t_of(s: dict) -> float:
        return round(s["t"] - t0, 2)

    dpo_tl = [{"t_s": t_of(s), **s["dpo"]} for s in history if s.get("dpo")]
    sampler = (manifest.get("learning") or {}).get("dpo_sampler")
    dpo_totals = dpo_counts(sampler) if sampler else {}
    ingest_tl = [
        {
            "t_s": t_of(s),
            **{
                k: s["ingest"].get(k)
                for k in ("lag", "freshness_p50_ms", "freshness_p99_ms", "records")
            },
        }
        for s in history
        if s.get("ingest")
    ]
    fresh_tl = [
        {"t_s": t_of(s), "arm": arm, "feedback_age_s": t.get("feedback_age_s")}
        for s in history
        for arm, t in (s.get("training") or {}).items()
        if t.get("feedback_age_s") is not None
    ]
    serving_tl = [
        {
            "t_s": t_of(s),
            "requests_per_s": s["serving"].get("requests_per_s"),
            **{
                f"{q}_ms": (s["serving"].get("latency_ms") or {}).get(q)
                for q in ("p50", "p90", "p99")
            },
        }
        for s in history
        if s.get("serving")
    ]
    ledger = pd.read_parquet(Path(manifest["_run_dir"]) / "ledger.parquet")
    ok = ledger[ledger["status"] == "ok"]
    lat = ok["latency_ms"].astype(float)

    def pct(x: pd.Series, q: float) -> float | None:
        return round(float(x.quantile(q)), 2) if len(x) else None

    # Requests sent while any arm's round was running, against the others; and, of the
    # former, those sent while a round promoted its version (the last phase: the replicas
    # load it beside the requests; a recount's whole span counts as its promotion).
    done = [
        r
        for arm in learning
        for r in (manifest.get("learning") or {}).get(arm, {}).get("rounds", [])
        if r.get("round") is not None and r.get("completed_at_ms")
    ]
    by_rounds: dict[str, Any] = {"rounds": len(done)}
    if "wall_ms" in ok.columns and done:
        wall = ok["wall_ms"].astype(float)
        during = pd.Series(False, index=ok.index)
        promoting = pd.Series(False, index=ok.index)
        for r in done:
            hi = r["completed_at_ms"]
            lo = hi - 1000 * float(r.get("round_s") or 0)
            during |= (wall >= lo) & (wall <= hi)
            promote_s = (r.get("phases") or {}).get("promote")
            start = lo if r.get("kind") == "recount" else hi - 1000 * float(promote_s or 0)
            promoting |= (wall >= start) & (wall <= hi)
        for name, part in (
            ("during_rounds", lat[during]),
            ("between_rounds", lat[~during]),
            ("during_promotions", lat[promoting]),
            ("rest_of_rounds", lat[during & ~promoting]),
        ):
            by_rounds[name] = {"p50": pct(part, 0.5), "p99": pct(part, 0.99), "n": len(part)}
        d99, b99 = by_rounds["during_rounds"]["p99"], by_rounds["between_rounds"]["p99"]
        by_rounds["p99_ratio"] = round(d99 / b99, 3) if d99 and b99 else None
    delays = sorted(v["feedback_to_serving_s"] for v in per_version)
    rounds_decided = {  # a popularity arm's recounts included (they have no training rows)
        arm: sum(1 for r in versions[arm] if r["status"] in ("promoted", "rejected"))
        for arm in training
    }

    summary = {
        "run": {
            "run_id": manifest["run_id"],
            "started_at": t0,
            "wall_s": manifest["wall_s"],
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
            "quick": quick,
            "data": manifest["data"],
            "seed_checkpoint": str(seed),
            "dpo_fraction": cfg.serve.dpo_fraction,
            "sessions": manifest["totals"]["sessions"],
            "arms": [{k: a[k] for k in ("name", "share", "learning")} for a in arms],
            "control": control,
        },
        "headline": headline(verdict, control),
        "verdict": verdict,
        "online_over_time": online,
        "versions": versions,
        "training": training,
        "dpo": {"timeline": dpo_tl, "totals": dpo_totals},
        "ingest": {"timeline": ingest_tl},
        "feedback_to_serving": {
            "timeline": fresh_tl,
            "per_version": per_version,
            "p50_s": delays[len(delays) // 2] if delays else None,
        },
        "rounds_decided": rounds_decided,
        "serving": {
            "timeline": serving_tl,
            "latency_ms": {
                "p50": pct(lat, 0.5),
                "p90": pct(lat, 0.9),
                "p99": pct(lat, 0.99),
                "mean": round(float(lat.mean()), 2) if len(lat) else None,
                "n": len(lat),
            },
            "requests_per_s": manifest["totals"]["requests_per_s"],
            "by_rounds": by_rounds,
            "by_arm": {
                str(arm): {
                    "p50_ms": pct(g["latency_ms"], 0.5),
                    "p99_ms": pct(g["latency_ms"], 0.99),
                    "n": len(g),
                }
                for arm, g in ok.groupby("arm")
            },
        },
    }
    return summary


def headline(verdict: list[dict], control: str) -> str:
    """One sentence: each arm's session watch time against the control."""
    parts = []
    for v in verdict:
        if v["metric"] != "swt" or v["rel_lift"] is None:
            continue
        ci = v["ci"] or [None, None]
        ci_s = f" [{ci[0]:+.1%}, {ci[1]:+.1%}]" if ci[0] is not None else ""
        p = f", p = {v['p_value']:.2f}" if v["p_value"] is not None else ""
        parts.append(f"{v['arm']} {v['rel_lift']:+.1%}{ci_s}{p} ({v['verdict']})")
    if not parts:
        return "no comparison of session watch time could be made"
    cut = [
        v["variance_reduction"]
        for v in verdict
        if v["metric"] == "swt" and v.get("variance_reduction") is not None
    ]
    how = (
        f" (CUPED on the users' pre-run history: {min(cut):.0%}-{max(cut):.0%} of the "
        "variance taken out)"
        if cut
        else ""
    )
    return f"session watch time against {control}{how}: " + "; ".join(parts)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="recloop demo", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="a sample of users, smaller rounds (~5 min)"
    )
    ap.add_argument("--home", help="state folder (default .recloop; env RECLOOP_HOME)")
    ap.add_argument(
        "--run-file", type=Path, default=RUN_FILE, help="arms and traffic (default demo.yaml)"
    )
    ap.add_argument("--checkpoint", help="seed checkpoint (default: the newest, or pre-train)")
    ap.add_argument("--synthetic", action="store_true", help="generated data, not MovieLens")
    ap.add_argument("--keep-up", action="store_true", help="leave the stack and dashboard up")
    ap.add_argument("--minutes", type=float, help="simulated traffic for this wall time")
    ap.add_argument("--out", type=Path, help="report folder (default <home>/reports/<run>)")
    args = ap.parse_args(argv)
    started = time.monotonic()

    from actors.api import load_run, simulate, stop_ingestors
    from pipelines.analysis.ab_analysis import analyze_run
    from pipelines.analysis.report import render_report
    from recloop.data import resolve_movielens
    from recloop.ray_head import connect
    from recloop.registry import open_registry
    from recloop.stack import Stack
    from serving.api import dashboard_url, ensure_arms

    base = Path(args.home or os.environ.get("RECLOOP_HOME") or PROJECT_ROOT / ".recloop")
    base = base.resolve()
    home = base / "demo"
    sim_overrides: dict[str, Any] = dict(QUICK["simulation"]) if args.quick else {}
    run = load_run(args.run_file, sim_overrides)
    if args.minutes:
        sim_overrides["duration_s"] = args.minutes * 60 * run.simulation.speedup
    cfg = demo_config(home, args.run_file, args.quick, args.synthetic)
    # MovieLens-100k where configured, else fetched once; else generated data, said why.
    cfg = dataclasses.replace(cfg, data=resolve_movielens(cfg.data, _say))
    if cfg.data.use_synthetic:  # fewer users than MovieLens: as many sessions from them
        want = QUICK["simulation"]["users"] if args.quick else MOVIELENS_USERS
        scale = max(1.0, want / cfg.data.synthetic_users)
        sim_overrides["sessions_per_user_day"] = run.simulation.sessions_per_user_day * scale
    if (home / "run").exists():  # a previous demo's stack (left up with --keep-up, or killed)
        Stack(cfg).down(_say)
    reset_home(home)
    stack = Stack(cfg)
    stop = threading.Event()
    try:
        stack.up(_say)
        connect(cfg)
        seed = (
            Path(args.checkpoint)
            if args.checkpoint
            else find_or_train_seed(cfg, base, args.quick, args.synthetic)
        )
        ensure_arms(cfg, seed, _say)
        url = dashboard_url(cfg)
        reg = open_registry(cfg)
        initial = {a.name: reg.current(a.name) for a in run.experiment.arms}

        def progress() -> None:  # the loop's state every 30 s, from the dashboard
            while not stop.wait(30.0):
                try:
                    _say(_loop_line(_fetch(url + "/api/snapshot")))
                except Exception as exc:
                    _say(f"loop: dashboard not answering ({type(exc).__name__})")

        threading.Thread(target=progress, daemon=True).start()
        _say(f"dashboard (live, once serving is up): {url}")
        manifest = simulate(cfg, args.run_file, _say, True, sim_overrides)
        run_dir = cfg.home / "sim" / "runs" / manifest["run_id"]
        manifest["_run_dir"] = str(run_dir)
        history = _fetch(url + "/api/history", timeout=60)["snapshots"]
        _say(f"{len(history)} dashboard snapshots; analysing the run")
        analysis = analyze_run(cfg, run_dir)
        summary = build_summary(cfg, manifest, analysis, history, seed, args.quick, initial)
        out = args.out or base / "reports" / manifest["run_id"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (out / "analysis.json").write_text(json.dumps(analysis, indent=2, default=str))
        (out / "snapshots.json").write_text(json.dumps(history, default=str))  # the dashboard's
        report = render_report(summary, out)
        stop.set()
        stop_ingestors(cfg, _say)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        _say(f"demo failed: {type(exc).__name__}: {exc} (logs under {cfg.logs_dir})")
        return 1
    finally:
        import ray

        stop.set()
        ray.shutdown()  # before the head goes: a driver left connected waits for it
        if not args.keep_up:
            stack.down(_say)
    _say(summary["headline"])
    f2s, by_rounds = summary["feedback_to_serving"], summary["serving"]["by_rounds"]
    _say(
        f"rounds decided per arm {summary['rounds_decided']}; feedback-to-served p50 "
        f"{f2s['p50_s']} s over {len(f2s['per_version'])} promotions; serving p99 during "
        f"rounds / between: {by_rounds.get('p99_ratio')}"
    )
    _say(f"report: {report['html']}")
    _say(f"summary: {out / 'summary.json'}")
    if args.keep_up:
        _say(
            f"the stack and the dashboard stay up: {url}; stop them with "
            f"`recloop down --home {home}`"
        )
    _say(f"demo done in {(time.monotonic() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
