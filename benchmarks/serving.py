"""HTTP load on the recommendation service, beside a trivial deployment as baseline.

Brings up its own stack (temporary home, free ports, MovieLens-100k unless
``--synthetic``), publishes the seed checkpoint to both arms, pushes every user's
latest history into Feast, deploys the service and measures, closed-loop with an async
client (``aiohttp``, one thread):

- ``/recommend`` at concurrency 1, 8 and 32 with batching on (``serve.max_batch_size``)
  and off (a batch limit of 1): p50/p99 latency, requests/s, errors, each arm's mean batch
  size and each replica's CPU use (cores) over the load. On and off are the same replicas,
  switched in place (the limit travels in the deployments' ``user_config``), in
  ``--rounds`` alternating pairs per concurrency; the batching gain is the median of the
  pairs' ratios and each row the median run, because this machine's speed drifts by tens
  of percent within minutes (one run of each, a minute apart, gave 0.96x to 3.1x);
- the same loads on the trivial ``GET /ping`` deployment of ``recloop smoke`` — the
  floor of Serve's HTTP path on this machine; the ratio is the figure to compare;
- the batched loads again with ``serve.topology: inline`` (the arms' models in the
  Router's process: one hop less per request, one process's GIL for every arm);
- a promotion under load (concurrency 8): errors (must be 0) and the seconds until
  responses carry the new version;
- resident memory (RSS) of each Recommender replica and of the router.

    make bench-serving     # or: .venv/bin/python -m benchmarks.serving [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from recloop.config import PROJECT_ROOT, StackConfig

RESULTS = PROJECT_ROOT / "benchmarks" / "results"


def _say(msg: str) -> None:
    print(f"[bench-serving {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _with_batch(cfg: StackConfig, batch: int) -> StackConfig:
    return dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, max_batch_size=batch))


def _median_run(runs: list[dict]) -> dict:
    """The run of median requests/s, with every run's figure beside it."""
    ordered = sorted(runs, key=lambda r: r["rps"])
    return {**ordered[len(ordered) // 2], "rps_runs": [round(r["rps"], 1) for r in runs]}


def _config(home: Path, synthetic: bool) -> StackConfig:
    """The stack of the run; the live dashboard stays off (its monitor polls the loop
    every few seconds, and the /ping baseline runs without it)."""
    from recloop.stack import isolated_config

    return isolated_config(home, **{"data.synthetic": synthetic or None, "serve.dashboard": False})


async def _load(
    url: str, concurrency: int, seconds: float, users: list[int], post: bool
) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    versions: list[tuple[float, str | None]] = []
    stop = time.monotonic() + seconds

    async def worker(k: int, session: aiohttp.ClientSession) -> None:
        i = k
        while time.monotonic() < stop:
            user = users[i % len(users)]
            i += concurrency
            t = time.perf_counter()
            try:
                if post:
                    async with session.post(url, json={"user_id": user}) as r:
                        body = await r.json()
                        code = r.status
                        versions.append((time.monotonic(), body.get("model_version")))
                else:
                    async with session.get(url) as r:
                        await r.read()
                        code = r.status
            except Exception:
                code = 599
            latencies.append(time.perf_counter() - t)
            statuses[code] = statuses.get(code, 0) + 1

    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency)
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(worker(k, session) for k in range(concurrency)))
    wall = time.monotonic() - started
    lat = np.array(latencies) * 1000
    ok = statuses.get(200, 0)
    return {
        "concurrency": concurrency,
        "requests": int(lat.size),
        "errors": int(lat.size - ok),
        "statuses": {str(k): v for k, v in statuses.items()},
        "rps": ok / wall,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "_versions": versions,
    }


def _run_load(
    url: str, c: int, seconds: float, users: list[int], post: bool = True, app: str | None = None
) -> dict:
    """One closed-loop load; with ``app``, each replica's CPU use over it (cores: CPU
    seconds / wall seconds) and, for /recommend, each arm's batches in the window."""
    pids = _replicas(app) if app else {}
    cpu0 = _cpu_s(pids)
    arms0 = _arm_counts(url) if post else {}
    t0 = time.monotonic()
    out = asyncio.run(_load(url, c, seconds, users, post))
    wall = time.monotonic() - t0
    out.pop("_versions")
    if pids:
        cpu1 = _cpu_s(pids)
        out["replica_cpu_cores"] = {
            k: round((cpu1[k] - cpu0[k]) / wall, 3) for k in cpu1 if k in cpu0
        }
    if post:
        arms1 = _arm_counts(url)
        out["arm_batches"] = {}
        for arm, (b1, r1) in arms1.items():
            b0, r0 = arms0.get(arm, (0, 0))
            out["arm_batches"][arm] = {
                "batches": b1 - b0,
                "mean_batch": round((r1 - r0) / (b1 - b0), 2) if b1 > b0 else None,
            }
    return out


def _replicas(app_name: str) -> dict[str, int]:
    """Serve replica actor → its pid, for the deployments of ``app_name``."""
    import ray
    from ray.util.state import list_actors

    here = ray.get_runtime_context().gcs_address  # other Ray clusters may run beside it
    out = {}
    for a in list_actors(address=here, filters=[("state", "=", "ALIVE")], limit=1000):
        name = a.class_name or ""
        if name.startswith(f"ServeReplica:{app_name}:") and a.pid:
            out[f"{name.split(':')[-1]}-{a.actor_id[:6]}"] = a.pid
    return out


def _cpu_s(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for k, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[k] = t.user + t.system
        except psutil.Error:
            pass
    return out


def _arm_counts(recommend_url: str) -> dict[str, tuple[int, int]]:
    """Per arm: (batches, requests) its replicas have run so far (GET /arms)."""
    import urllib.request

    base = recommend_url.rsplit("/", 1)[0]
    try:
        with urllib.request.urlopen(f"{base}/arms", timeout=10) as r:
            arms = json.loads(r.read())
    except Exception:
        return {}
    return {
        a["arm"]: (
            sum(int(x.get("batches", 0)) for x in a["replicas"]),
            sum(int(x.get("requests", 0)) for x in a["replicas"]),
        )
        for a in arms
    }


def _replica_rss(app_name: str) -> dict[str, float]:
    import psutil

    out = {}
    for name, pid in _replicas(app_name).items():
        try:
            out[name] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            pass
    return out


def _push_histories(cfg: StackConfig, max_len: int = 50) -> list[int]:
    """Every user's latest items into Feast's online store; returns the user ids."""
    import pandas as pd

    from features.store import open_store, push
    from recloop.data import load

    data = load(cfg.data)
    r = data.ratings.sort_values(["user_id", "timestamp", "item_id"], kind="mergesort")
    hist = r.groupby("user_id")["item_id"].apply(lambda s: [int(x) for x in s.tolist()[-max_len:]])
    df = pd.DataFrame(
        {
            "user_id": hist.index.astype("int64"),
            "item_ids": hist.values,
            "history_len": [len(h) for h in hist.values],
            "event_timestamp": pd.Timestamp.now(tz="UTC"),
        }
    )
    push(open_store(cfg), "user_history_push", df, offline=False)
    return [int(u) for u in hist.index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks.serving", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--checkpoint", help="seed checkpoint (default: newest from pretrain)")
    parser.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating on/off pairs per concurrency"
    )
    parser.add_argument("--synthetic", action="store_true", help="generated data and a tiny model")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    parser.add_argument("--keep", action="store_true", help="leave the stack's home behind")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    from recloop import smoke_app as smoke
    from recloop.registry import open_registry
    from recloop.stack import Stack
    from serving.api import ensure_arms, latest_seed, promote
    from serving.app import deploy

    home = Path(tempfile.mkdtemp(prefix="rl-bs-", dir="/tmp"))
    cfg = _config(home, args.synthetic)
    checkpoint = Path(args.checkpoint) if args.checkpoint else latest_seed(cfg)
    if checkpoint is None:
        print("no checkpoint: run `recloop pretrain` or pass --checkpoint", file=sys.stderr)
        return 2
    stack = Stack(cfg)
    result: dict[str, Any] = {"checkpoint": str(checkpoint)}
    try:
        stack.up(_say)
        import ray

        from recloop.ray_head import connect

        connect(cfg)
        users = _push_histories(cfg)
        _say(f"{len(users)} user histories in Feast")
        ensure_arms(cfg, checkpoint, _say)
        base = f"http://{cfg.ray.host}:{cfg.ray.serve_port}"

        smoke.deploy()
        smoke.ping(cfg.ray.host, cfg.ray.serve_port, "warm")
        result["baseline_ping"] = {
            str(c): _run_load(f"{base}{smoke.ROUTE}", c, args.seconds, users, post=False)
            for c in levels
        }
        smoke.delete()
        _say(f"baseline: {json.dumps(result['baseline_ping'])}")

        # Batching on and off on the same replicas, in alternating pairs.
        batched = _with_batch(cfg, 16)
        _say("deploying the service (batched; off = a batch limit of 1, set in place)")
        deploy(batched)
        _run_load(f"{base}/recommend", 4, 3, users)  # warm-up
        result["batched"], result["unbatched"] = {}, {}
        for c in levels:
            runs: dict[str, list[dict]] = {"batched": [], "unbatched": []}
            for r in range(args.rounds):
                order = [("batched", 16), ("unbatched", 1)]
                for label, limit in order if r % 2 == 0 else order[::-1]:
                    deploy(batched, extra={"max_batch": limit})
                    runs[label].append(
                        _run_load(
                            f"{base}/recommend", c, args.seconds, users, app=cfg.serve.app_name
                        )
                    )
                    _say(f"{label} c={c} round {r + 1}: {runs[label][-1]['rps']:.1f} req/s")
            pairs = sorted(
                b["rps"] / u["rps"]
                for b, u in zip(runs["batched"], runs["unbatched"], strict=True)
                if u["rps"]
            )
            result["batched"][str(c)] = _median_run(runs["batched"])
            result["batched"][str(c)]["vs_unbatched_rps"] = (
                pairs[len(pairs) // 2] if pairs else None
            )
            result["batched"][str(c)]["vs_unbatched_rps_pairs"] = [round(x, 3) for x in pairs]
            result["unbatched"][str(c)] = _median_run(runs["unbatched"])
        result["rss_mb"] = _replica_rss(cfg.serve.app_name)
        deploy(batched)

        # The arms' models in the Router's process instead (one hop less per request).
        inline = dataclasses.replace(
            batched, serve=dataclasses.replace(batched.serve, topology="inline")
        )
        _say("deploying the service (inline)")
        deploy(inline)
        _run_load(f"{base}/recommend", 4, 3, users)  # warm-up
        result["inline"] = {}
        for c in levels:
            result["inline"][str(c)] = _run_load(
                f"{base}/recommend", c, args.seconds, users, app=cfg.serve.app_name
            )
            _say(f"inline c={c}: {json.dumps(result['inline'][str(c)])}")

        # Promotion under load, batching back on.
        cfg = _with_batch(cfg, 16)
        deploy(cfg)
        new = open_registry(cfg).publish("treatment", checkpoint)

        async def promote_under_load() -> dict:
            load = asyncio.create_task(_load(f"{base}/recommend", 8, args.seconds, users, True))
            await asyncio.sleep(2)
            t0 = time.monotonic()
            await asyncio.to_thread(promote, cfg, "treatment", new, _say)
            out = await load
            first = next((t - t0 for t, v in out.pop("_versions") if v == new and t > t0), None)
            return {**out, "promote_s": time.monotonic() - t0, "new_version_after_s": first}

        result["promotion"] = asyncio.run(promote_under_load())
        _say(f"promotion: {json.dumps(result['promotion'])}")
        ray.shutdown()
    finally:
        stack.down(_say)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)

    for c in map(str, levels):
        b, u, p = result["batched"][c], result["unbatched"][c], result["baseline_ping"][c]
        b["vs_ping_rps"] = b["rps"] / p["rps"] if p["rps"] else None
        i = result["inline"][c]
        i["vs_split_rps"] = i["rps"] / b["rps"] if b["rps"] else None
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"{'conc':>5} {'batched p50/p99 ms':>20} {'rps':>7} {'err':>4} "
        f"{'unbatched p50/p99':>19} {'rps':>7} {'ping rps':>9} {'batch gain':>10}"
    )
    for c in map(str, levels):
        b, u, p = result["batched"][c], result["unbatched"][c], result["baseline_ping"][c]
        print(
            f"{c:>5} {b['p50_ms']:>9.0f}/{b['p99_ms']:<10.0f} {b['rps']:>7.1f} {b['errors']:>4} "
            f"{u['p50_ms']:>9.0f}/{u['p99_ms']:<9.0f} {u['rps']:>7.1f} {p['rps']:>9.1f} "
            f"{b['vs_unbatched_rps']:>9.2f}x"
        )
    print("inline topology (models in the Router's process), batched:")
    for c in map(str, levels):
        i = result["inline"][c]
        print(
            f"{c:>5} {i['p50_ms']:>9.0f}/{i['p99_ms']:<10.0f} {i['rps']:>7.1f} {i['errors']:>4} "
            f"{i['vs_split_rps']:>6.2f}x the split topology"
        )
    pr = result["promotion"]
    print(
        f"promotion under load (c=8): {pr['errors']} errors of {pr['requests']}, "
        f"new version after {pr['new_version_after_s']} s; RSS MB {result['rss_mb']}"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
