"""``recloop analyze``: the verdict of a simulated A/B run, from the events it logged.

Reads the run folder written by ``recloop simulate`` (``actors.sim.driver``), reads the
run's interactions back from Kafka between the offsets noted at its start and end (only
events tagged with the run's id count: other traffic may share the topic), checks that
every event the simulator produced came back exactly once, rebuilds one row per served
session, joins the simulator's ledger for the hidden model's expected and oracle values,
and hands the sessions to ``recloop.ab_stats``. Prints a table; saves
``analysis.json`` in the run folder (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

INTERACTIONS = "recloop.interactions"


def _log(msg: str) -> None:
    print(f"[analyze {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_run_events(bootstrap: str, manifest: dict) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The run's interactions from Kafka as a frame, plus the delivery check."""
    from recloop.kafka_io import read_range

    off = manifest["offsets"][INTERACTIONS]
    start = {int(p): o for p, o in off["start"].items()}
    end = {int(p): o for p, o in off["end"].items()}
    events, invalid = read_range(bootstrap, INTERACTIONS, start, end)
    run_id = manifest["run_id"]
    mine = [e for e in events if e.context.get("sim_run") == run_id]
    frame = pd.DataFrame(
        {
            "event_id": [e.event_id for e in mine],
            "request_id": [e.request_id for e in mine],
            "user_id": [e.user_id for e in mine],
            "arm": [e.arm for e in mine],
            "model_version": [e.model_version for e in mine],
            "position": [e.position for e in mine],
            "event_time_ms": [e.event_time_ms for e in mine],
            "clicked": [e.clicked for e in mine],
            "watch_time_s": [e.watch_time_s for e in mine],
            "liked": [e.liked for e in mine],
            "followed": [e.followed for e in mine],
        }
    )
    produced = int(manifest["totals"]["events_sent"])
    unique = int(frame["event_id"].nunique()) if len(frame) else 0
    delivery = {
        "source": f"kafka:{INTERACTIONS}",
        "produced": produced,
        "read": len(frame),
        "unique": unique,
        "duplicates": len(frame) - unique,
        "missing": produced - unique,
        "other_records_in_range": len(events) - len(mine),
        "invalid_records_in_range": len(invalid),
    }
    return frame, delivery


def sessions_from_events(events: pd.DataFrame, ledger: pd.DataFrame) -> pd.DataFrame:
    """One row per served session, from the logged events (duplicates dropped by
    ``event_id``), with the simulator's expected/oracle values joined by request id."""
    ev = events.drop_duplicates("event_id")
    g = ev.groupby("request_id", sort=False)
    sessions = pd.DataFrame(
        {
            "user_id": g["user_id"].first(),
            "arm": g["arm"].first(),
            "model_version": g["model_version"].first(),
            "n_items": g.size(),
            "views": g["clicked"].sum().astype(int),
            "watch_s": g["watch_time_s"].sum(),
            "likes": g["liked"].sum().astype(int),
            "follows": g["followed"].sum().astype(int),
        }
    ).reset_index()
    # The ledger's pre-experiment columns (``pre_*``, per user) go along: covariates.
    pre = [c for c in ledger.columns if str(c).startswith("pre_")]
    side = ledger.dropna(subset=["request_id"])[
        ["request_id", "t_ms", "session", "expected_watch_s", "oracle_watch_s", *pre]
    ]
    sessions = sessions.merge(side, on="request_id", how="left")
    return sessions.sort_values(["t_ms", "user_id"], kind="stable").reset_index(drop=True)


def randomisation_units(
    sessions: pd.DataFrame, experiment: dict[str, Any], settings: dict[str, Any]
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The sessions and analysis settings for the experiment's randomisation unit: as
    they are when users were assigned; when clusters were (``unit: cluster``), a
    ``cluster`` column that becomes the analysis' unit, and each covariate replaced by
    its cluster's mean over the cluster's users (each user once)."""
    if experiment.get("unit") != "cluster":
        return sessions, settings
    from recloop.experiment import Experiment

    exp = Experiment.model_validate(experiment)
    sessions = sessions.copy()
    sessions["cluster"] = [exp.cluster_of(u) for u in sessions["user_id"]]
    for c in settings.get("covariates") or ():
        if c in sessions.columns:
            per_cluster = sessions.drop_duplicates("user_id").groupby("cluster")[c].mean()
            sessions[c] = sessions["cluster"].map(per_cluster)
    return sessions, {**settings, "unit": "cluster"}


def first_vs_returning(sessions: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per arm, session watch time of users' first sessions of the run against their later
    ones: a model that keeps serving what the user already saw falls off on return."""
    out: dict[str, dict[str, Any]] = {}
    for arm, g in sessions.groupby("arm"):
        first = g[g["session"] == 0]
        later = g[g["session"] > 0]
        out[str(arm)] = {
            "first_sessions": len(first),
            "first_swt": round(float(first["watch_s"].mean()), 3) if len(first) else None,
            "returning_sessions": len(later),
            "returning_swt": round(float(later["watch_s"].mean()), 3) if len(later) else None,
        }
    return out


def analyze_run(cfg: Any, run_dir: Path, overrides: dict | None = None) -> dict[str, Any]:
    """The analysis of one run folder (``cfg``: the stack config, for Kafka)."""
    from recloop.ab_stats import AnalysisConfig, analyze

    manifest = json.loads((run_dir / "manifest.json").read_text())
    ledger = pd.read_parquet(run_dir / "ledger.parquet")
    events, delivery = read_run_events(cfg.kafka.bootstrap, manifest)
    _log(
        f"{manifest['run_id']}: {delivery['read']} events read back for "
        f"{delivery['produced']} produced ({delivery['missing']} missing, "
        f"{delivery['duplicates']} duplicates)"
    )
    if events.empty:
        statuses = ledger["status"].value_counts().to_dict() if len(ledger) else {}
        raise ValueError(
            f"run {manifest['run_id']} logged no interactions to analyse "
            f"(sessions by status: {statuses})"
        )
    sessions = sessions_from_events(events, ledger)
    settings = {**manifest.get("analysis", {}), **(overrides or {})}
    sessions, settings = randomisation_units(sessions, manifest.get("experiment") or {}, settings)
    acfg = AnalysisConfig(**settings)
    failed = ledger[ledger["status"] != "ok"]
    result = analyze(
        sessions,
        acfg,
        policy=manifest["policy"],
        meta={
            "run_id": manifest["run_id"],
            "run_file": manifest["run_file"],
            "data": manifest["data"],
            "seed": manifest["simulation"]["seed"],
            "delivery": delivery,
            "failed_sessions": {
                "count": len(failed),
                "by_status": failed["status"].value_counts().to_dict(),
            },
            "model_versions": {
                arm: sorted(g["model_version"].unique().tolist())
                for arm, g in sessions.groupby("arm")
            },
            "first_vs_returning": first_vs_returning(sessions),
            "service": manifest.get("service", {}),
            "throughput": {
                k: manifest["totals"][k] for k in ("requests_per_s", "events_per_s", "max_lag_s")
            },
        },
    )
    return result


def main(argv: list[str] | None = None) -> int:
    from actors.api import resolve_run
    from recloop.ab_stats import format_table
    from recloop.config import load_config

    ap = argparse.ArgumentParser(prog="recloop analyze", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="run id or folder (default: the latest run)")
    ap.add_argument("--config", help="stack run file (for Kafka and home)")
    ap.add_argument("--home", help="state folder (default .recloop)")
    ap.add_argument("--design", choices=["fixed", "sequential"], help="override the run's")
    ap.add_argument("--alpha", type=float)
    ap.add_argument("--control", help="the control arm (default: the run file's)")
    ap.add_argument("--out", help="where to save the JSON (default: <run>/analysis.json)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, overrides={"home": args.home})
    run_dir = resolve_run(cfg, args.run)
    overrides = {
        k: v
        for k, v in {"design": args.design, "alpha": args.alpha, "control": args.control}.items()
        if v is not None
    }
    try:
        result = analyze_run(cfg, run_dir, overrides)
    except ValueError as exc:  # a run the statistics cannot take: say why, no traceback
        print(f"recloop analyze: {run_dir.name}: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    d = result["meta"]["delivery"]
    print(
        f"\ndelivery: {d['read']} events read back from {d['source']} for {d['produced']} "
        f"produced ({d['missing']} missing, {d['duplicates']} duplicates)"
    )
    print("session watch time, first sessions of the run vs returning users' later ones:")
    for arm, r in result["meta"]["first_vs_returning"].items():
        print(
            f"  {arm:<16} first {r['first_swt']} s (n={r['first_sessions']})   "
            f"returning {r['returning_swt']} s (n={r['returning_sessions']})"
        )
    out = Path(args.out) if args.out else run_dir / "analysis.json"
    out.write_text(json.dumps(result, indent=2))
    _log(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
