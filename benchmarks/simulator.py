"""How much load the traffic simulator can offer, beside a plain HTTP client.

Starts its own Kafka broker (temporary home, free ports, the shared jar cache) and a
stub recommendation server in a subprocess: an aiohttp app with the real ``/recommend``
request and response shapes that answers at once with random items, i.e. a server that
keeps up. Then it measures, with the same concurrency:

- ``raw``: a plain aiohttp client posting the same payloads as fast as it can (no user
  model, no events): the ceiling of this machine's client + server pair;
- ``simulator``: the real ``Simulator`` (schedule, per-user ordering, hidden user model
  fitted on the data, oracle, one ``Interaction`` per shown item to Kafka with acks=all)
  playing the run as fast as the server answers (speed-up 0).

The ratio simulator / raw is the figure to compare across machines.

    make bench-simulator     # or: .venv/bin/python -m benchmarks.simulator [--synthetic]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from recloop.config import PROJECT_ROOT, load_config
from recloop.procs import free_port

RESULTS = PROJECT_ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------- stub server
def serve_stub(port: int, n_items: int, session: int) -> None:
    """A server that keeps up: valid /recommend answers with random items, no model."""
    from aiohttp import web

    rng = random.Random(0)
    items = list(range(1, n_items + 1))

    async def recommend(request: web.Request) -> web.Response:
        body = await request.json()
        picked = rng.sample(items, session)
        return web.json_response(
            {
                "request_id": uuid.uuid4().hex,
                "arm": "a" if body["user_id"] % 2 else "b",
                "model_version": "stub",
                "items": [
                    {"item_id": i, "score": -1.0, "position": p} for p, i in enumerate(picked)
                ],
            }
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/recommend", recommend)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _wait_http(url: str, timeout_s: float = 30) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not answering")


# --------------------------------------------------------------------------- clients
async def raw_client(url: str, n: int, concurrency: int, users: list[int]) -> float:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def one(i: int) -> None:
            async with sem:
                payload = {"user_id": users[i % len(users)], "event_time_ms": i}
                async with s.post(url, json=payload) as resp:
                    await resp.json()

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - started)


def simulator_run(cfg, data, model, url: str, n: int, concurrency: int) -> dict:
    from actors.sim.runfile import SimulationConfig
    from actors.sim.simulator import KafkaSink, Population, Simulator, http_transport, schedule

    sim = SimulationConfig(
        seed=1, speedup=0.0, concurrency=concurrency, max_sessions=n, duration_s=30 * 86400
    )
    pop = Population.from_data(data, None, sim.seed)
    arrivals = schedule(pop, sim)
    sink = KafkaSink(cfg.kafka.bootstrap, "bench-sim")

    async def main() -> dict:
        post, close = http_transport(url, concurrency, 30.0)
        simulator = Simulator("bench", sim, model, pop, arrivals, 1_800_000_000_000, post, sink)
        try:
            return await simulator.run()
        finally:
            await close()

    started = time.perf_counter()
    summary = asyncio.run(main())
    sink.close()
    wall = time.perf_counter() - started  # including the final flush: events are acked
    return {
        "sessions": summary["done"],
        "failed": summary["failed"],
        "events": sink.sent,
        "requests_per_s": round(summary["done"] / wall, 1),
        "events_per_s": round(sink.sent / wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--session-size", type=int, default=5)
    parser.add_argument("--synthetic", action="store_true", help="generated data, not MovieLens")
    parser.add_argument("--serve-stub", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stub-items", type=int, default=1682, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "simulator.json")
    args = parser.parse_args()
    if args.serve_stub:
        serve_stub(args.serve_stub, args.stub_items, args.session_size)
        return

    from actors.sim.runfile import SimulationConfig
    from actors.sim.user_model import HiddenUserModel
    from recloop.broker import KafkaBroker
    from recloop.data import load
    from recloop.topics import ensure_topics

    home = Path(tempfile.mkdtemp(prefix="rl-bench-", dir="/tmp"))
    cfg = load_config(
        overrides={
            "home": str(home),
            "cache_dir": str(PROJECT_ROOT / ".recloop" / "cache"),
            "kafka.port": free_port(),
            "kafka.controller_port": free_port(),
            "data.synthetic": True if args.synthetic else None,
        },
        env={},
    )
    data = load(cfg.data)
    print(f"data: {data.summary()}", flush=True)
    started = time.perf_counter()
    model = HiddenUserModel.fit(
        data, progress=lambda m: print(m, flush=True), kind=SimulationConfig().user_model_kind
    )
    fit_s = time.perf_counter() - started
    port = free_port()
    n_items = int(data.items["item_id"].max())
    stub = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.simulator", "--serve-stub", str(port)]
        + ["--stub-items", str(n_items), "--session-size", str(args.session_size)],
        cwd=PROJECT_ROOT,
    )
    broker = KafkaBroker(cfg)
    try:
        print(f"broker: {broker.start(print)}", flush=True)
        ensure_topics(cfg.kafka.bootstrap)
        url = f"http://127.0.0.1:{port}/recommend"
        _wait_http(f"http://127.0.0.1:{port}/healthz")
        users = [int(u) for u in data.users["user_id"]]
        asyncio.run(raw_client(url, 500, args.concurrency, users))  # warm up
        raw = asyncio.run(raw_client(url, args.sessions, args.concurrency, users))
        sim = simulator_run(cfg, data, model, url, args.sessions, args.concurrency)
        result = {
            "data": data.source.split(":")[0],
            "sessions": args.sessions,
            "concurrency": args.concurrency,
            "session_size": args.session_size,
            "hidden_model_fit_s": round(fit_s, 1),
            "raw_requests_per_s": round(raw, 1),
            "simulator": sim,
            "ratio_simulator_to_raw": round(sim["requests_per_s"] / raw, 3),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    finally:
        stub.terminate()
        stub.wait(timeout=10)
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
