"""``recloop``: the command line of the local stack.

    recloop up        start Kafka, a Ray head (with Serve HTTP) and apply the Feast repo
    recloop status    one line per part; --watch: the live loop, refreshed every few seconds
    recloop fetch     fetch the Kafka broker's jars with Maven (once; `up` does it too)
    recloop smoke     a round trip through every part (Kafka, Feast, Serve over HTTP)
    recloop down      stop what `up` started (--purge also deletes the stack's data)
    recloop serve     deploy the recommendation service (A/B arms) on the running stack
    recloop publish   add a checkpoint to a lineage of the model registry
    recloop promote   make a version current for an arm; replicas swap without downtime
    recloop rollback  return an arm to the version it served before
    recloop arms      arms, shares, current and live versions
    recloop prometheus  a Prometheus server scraping the stack (Ray's metrics + the loop's)
    recloop lake      the lake's Delta tables: summary | compact | vacuum | migrate
    recloop simulate  drive simulated users' A/B traffic through the running stack
    recloop analyze   the A/B verdict of a simulated run, from its logged events
    recloop ingest    Kafka → Feast + lake, exactly once (foreground, or --detach as actors)
    recloop train     continuous training rounds on the lake; each gated version promoted
    recloop dpo       the DPO sample server: --detach | --stop | --status
    recloop reward    fit the session reward model on the lake, per-target held-out AUC
    recloop demo      the whole loop on the embedded stack: A/B through it, then the report
    recloop pretrain  build the tokenizer and pre-train the seed OneRec model (a checkpoint)
    recloop eval      offline evaluation: --model onerec|sasrec|pop on a dataset
    recloop ablate    OneRec ablations: MoE vs dense, M=5 vs M=1, beam 8/32/128
    recloop scaling   power-law fits of held-out SID and InfoNCE losses vs model and data size

Every flag maps onto a key of the stack config (``--config run.yaml``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings

from recloop.config import PROJECT_ROOT, ConfigError, StackConfig, load_config
from recloop.procs import PrerequisiteMissing


def _say(msg: str) -> None:
    print(f"[recloop {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _config(args: argparse.Namespace) -> StackConfig:
    return load_config(
        args.config,
        overrides={
            "home": args.home,
            "kafka.bootstrap_servers": args.kafka_bootstrap,
            "kafka.port": args.kafka_port,
            "ray.address": args.ray_address,
            "ray.serve_port": args.serve_port,
            "data.synthetic": True if args.synthetic else None,
        },
    )


def cmd_up(cfg: StackConfig, args: argparse.Namespace) -> int:
    from recloop.stack import Stack

    started = time.monotonic()
    timings = Stack(cfg).up(_say)
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    _say(f"stack up in {time.monotonic() - started:.1f} s ({parts}); state in {cfg.home}")
    return 0


def cmd_status(cfg: StackConfig, args: argparse.Namespace) -> int:
    from recloop.stack import Stack

    parts = Stack(cfg).status()
    for part in parts:
        print(part.line(), flush=True)
    ok = all(p.ok for p in parts)
    if not args.watch:
        return 0 if ok else 1
    if not ok:
        _say("the stack is not up: nothing to watch")
        return 1
    return watch(cfg, args.interval, args.looks)


def watch(cfg: StackConfig, interval_s: float, looks: int | None = None) -> int:
    """The loop's terminal view every ``interval_s`` (the dashboard's newest snapshot, or
    one collected here when the dashboard is not deployed), until Ctrl-C."""
    import requests

    from recloop.monitor import Monitor, format_snapshot
    from serving.api import dashboard_url

    url = dashboard_url(cfg) + "/api/snapshot"
    local: Monitor | None = None
    clear = "\033[H\033[2J" if sys.stdout.isatty() else ""
    n = 0
    while looks is None or n < looks:
        snap = None
        if local is None:
            try:
                snap = requests.get(url, timeout=10).json() or None
            except (requests.RequestException, ValueError):
                snap = None
        if snap is None or "t" not in snap:
            local = local or Monitor(cfg)
            snap = local.collect()
        print(clear + format_snapshot(snap), flush=True)
        n += 1
        if looks is None or n < looks:
            time.sleep(interval_s)
    return 0


def cmd_down(cfg: StackConfig, args: argparse.Namespace) -> int:
    from recloop.stack import Stack

    leftovers = Stack(cfg).down(_say, purge=args.purge)
    if leftovers:
        _say("processes still alive after down:\n  " + "\n  ".join(leftovers))
        return 1
    _say("stack down; no process left behind")
    return 0


def cmd_fetch(cfg: StackConfig, args: argparse.Namespace) -> int:
    from recloop.broker import KafkaBroker

    broker = KafkaBroker(cfg)
    broker.check_java()
    _say(f"Kafka jars in {broker.ensure_jars(_say)}")
    return 0


def cmd_smoke(cfg: StackConfig, args: argparse.Namespace) -> int:
    from recloop.smoke import run_smoke

    return 0 if run_smoke(cfg, _say) else 1


def cmd_serve(cfg: StackConfig, args: argparse.Namespace) -> int:
    from pathlib import Path

    from serving.api import serve_up

    serve_up(cfg, Path(args.seed) if args.seed else None, _say)
    return 0


def cmd_publish(cfg: StackConfig, args: argparse.Namespace) -> int:
    from recloop.registry import open_registry

    version = open_registry(cfg).publish(args.lineage, args.checkpoint, version=args.version)
    _say(f"published {args.checkpoint} as {args.lineage}/{version}")
    print(version)
    return 0


def cmd_promote(cfg: StackConfig, args: argparse.Namespace) -> int:
    from serving.api import print_json, promote

    print_json(promote(cfg, args.arm, args.version, _say))
    return 0


def cmd_rollback(cfg: StackConfig, args: argparse.Namespace) -> int:
    from serving.api import print_json, rollback

    print_json(rollback(cfg, args.arm, _say))
    return 0


def cmd_arms(cfg: StackConfig, args: argparse.Namespace) -> int:
    from serving.api import arms_report, print_json

    print_json(arms_report(cfg))
    return 0


def cmd_prometheus(cfg: StackConfig, args: argparse.Namespace) -> int:
    from recloop.prometheus import Prometheus

    prom = Prometheus(cfg, port=args.port, scrape_s=args.scrape_s, binary=args.binary)
    prom.start(_say)
    _say("scraping Ray's metrics agents and /dashboard/metrics; Ctrl-C stops it")
    try:
        while prom.proc is not None and prom.proc.poll() is None:
            time.sleep(1)
        _say(f"prometheus exited; see {prom.log_file}")
        return 1
    finally:
        prom.stop()


def cmd_lake(cfg: StackConfig, args: argparse.Namespace) -> int:
    import json

    from recloop.lake import Lake, LakeError

    lake = Lake(args.lake or cfg.lake_dir)
    try:
        if args.action == "migrate":
            out = lake.migrate(_say)
        elif args.action == "compact":
            out = lake.compact()
        elif args.action == "vacuum":
            out = lake.vacuum(args.retention_hours)
        else:
            out = lake.summary()
    except LakeError as exc:
        raise ConfigError(str(exc)) from None
    print(json.dumps(out, indent=2))
    return 0


def cmd_simulate(cfg: StackConfig, args: argparse.Namespace) -> int:
    from actors.api import simulate

    overrides = {
        k: v
        for k, v in {
            "seed": args.seed,
            "speedup": args.speedup,
            "duration_s": args.duration_s,
            "max_sessions": args.max_sessions,
            "users": args.users,
            "shards": args.shards,
        }.items()
        if v is not None
    }
    manifest = simulate(cfg, args.experiment, _say, deploy=not args.no_deploy, overrides=overrides)
    print(manifest["run_id"])
    return 0 if manifest["totals"]["failed"] == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recloop", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML run file (its `stack:` section)")
    common.add_argument("--home", help="state folder (default .recloop; env RECLOOP_HOME)")
    common.add_argument("--kafka-bootstrap", help="use this Kafka instead of provisioning one")
    common.add_argument("--kafka-port", type=int, help="port of the provisioned broker")
    common.add_argument("--ray-address", help="use this Ray cluster instead of a local head")
    common.add_argument("--serve-port", type=int, help="Serve HTTP port")
    common.add_argument("--synthetic", action="store_true", help="generated data, not MovieLens")
    common.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for job, module in JOBS.items():
        sub.add_parser(job, help=f"run {module} (see `recloop {job} --help`)", add_help=False)
    sub.add_parser("up", parents=[common], help="start the local stack").set_defaults(fn=cmd_up)
    st = sub.add_parser("status", parents=[common], help="health of each part; --watch: the loop")
    st.add_argument("--watch", action="store_true", help="the live loop, refreshed (Ctrl-C ends)")
    st.add_argument("--interval", type=float, default=3.0, help="seconds between refreshes")
    st.add_argument("--looks", type=int, help="with --watch: stop after this many refreshes")
    st.set_defaults(fn=cmd_status)
    sub.add_parser("smoke", parents=[common], help="round trip through every part").set_defaults(
        fn=cmd_smoke
    )
    sub.add_parser(
        "fetch", parents=[common], help="fetch the Kafka broker's jars (Maven, once)"
    ).set_defaults(fn=cmd_fetch)
    serve_p = sub.add_parser("serve", parents=[common], help="deploy the recommendation service")
    serve_p.add_argument("--seed", help="checkpoint for arms without a model (default: newest)")
    serve_p.set_defaults(fn=cmd_serve)
    pub = sub.add_parser("publish", parents=[common], help="add a checkpoint to the registry")
    pub.add_argument("lineage")
    pub.add_argument("checkpoint")
    pub.add_argument("--version", help="version name (default: time-based)")
    pub.set_defaults(fn=cmd_publish)
    pro = sub.add_parser("promote", parents=[common], help="serve VERSION on ARM")
    pro.add_argument("arm")
    pro.add_argument("version")
    pro.set_defaults(fn=cmd_promote)
    rb = sub.add_parser("rollback", parents=[common], help="ARM back to its previous version")
    rb.add_argument("arm")
    rb.set_defaults(fn=cmd_rollback)
    sub.add_parser("arms", parents=[common], help="arms and their versions").set_defaults(
        fn=cmd_arms
    )
    prom = sub.add_parser("prometheus", parents=[common], help="Prometheus scraping the stack")
    prom.add_argument("--port", type=int, default=9090, help="its HTTP port (UI and query API)")
    prom.add_argument("--scrape-s", type=float, default=5.0, help="scrape interval, seconds")
    prom.add_argument("--binary", help="the prometheus binary (default: the one on PATH)")
    prom.set_defaults(fn=cmd_prometheus)
    lake = sub.add_parser("lake", parents=[common], help="the lake's Delta tables")
    lake.add_argument(
        "action",
        nargs="?",
        default="summary",
        choices=["summary", "compact", "vacuum", "migrate"],
        help="summary (default); compact: merge small files, checkpoint the log; vacuum: "
        "delete files no recent version reads; migrate: a lake of the layout before Delta",
    )
    lake.add_argument("--lake", help="the lake's folder (default: the stack's, <home>/lake)")
    lake.add_argument(
        "--retention-hours", type=float, default=24.0, help="vacuum: keep files this recent"
    )
    lake.set_defaults(fn=cmd_lake)
    sim = sub.add_parser("simulate", parents=[common], help="simulated A/B traffic")
    sim.add_argument(
        "--experiment",
        default=str(PROJECT_ROOT / "infra" / "experiments" / "model-vs-baselines.yaml"),
        help="run file: experiment, simulation, analysis (see infra/experiments/)",
    )
    sim.add_argument("--seed", type=int, help="simulation.seed")
    sim.add_argument("--speedup", type=float, help="simulation.speedup (0: as fast as possible)")
    sim.add_argument("--duration-s", type=float, help="simulation.duration_s (virtual)")
    sim.add_argument("--max-sessions", type=int, help="simulation.max_sessions")
    sim.add_argument("--users", type=int, help="simulation.users")
    sim.add_argument("--shards", type=int, help="simulation.shards")
    sim.add_argument("--no-deploy", action="store_true", help="use the service as deployed")
    sim.set_defaults(fn=cmd_simulate)
    down = sub.add_parser("down", parents=[common], help="stop the local stack")
    down.add_argument("--purge", action="store_true", help="also delete broker and Feast data")
    down.set_defaults(fn=cmd_down)
    return parser


# Jobs with their own argument parsers: `recloop JOB --help` shows their flags.
JOBS = {
    "pretrain": "pipelines.offline.pretrain",
    "eval": "pipelines.offline.evaluate",
    "ablate": "pipelines.offline.ablations",
    "scaling": "pipelines.offline.scaling",
    "analyze": "pipelines.analysis.ab_analysis",
    "bias": "benchmarks.bias",
    "clusters": "pipelines.analysis.clusters",
    "fit-user-model": "actors.sim.fit_user_model",
    "ingest": "actors.ingestor",
    "train": "pipelines.continuous",
    "dpo": "actors.dpo_sampler",
    "reward": "pipelines.alignment.reward",
    "demo": "pipelines.demo",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in JOBS:
        import importlib

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return int(importlib.import_module(JOBS[argv[0]]).main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for noisy in ("kafka", "feast", "ray"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        cfg = _config(args)
        return int(args.fn(cfg, args))
    except (
        ConfigError,
        PrerequisiteMissing,
        ConnectionError,
        TimeoutError,
        FileNotFoundError,
        ValueError,  # RegistryError and experiment validation: the message says what to fix
    ) as exc:
        print(f"recloop {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
