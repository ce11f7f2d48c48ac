"""The loop on a local multi-node Ray cluster (``ray.cluster_utils.Cluster``): each part
on a node of its own, placed by the custom resources the nodes declare, as it would be
on a real cluster (``infra/ray/cluster.yaml`` names the same resources).

    python -m tests.integration.multinode --stack stack.json --work DIR --seed SEED \\
        --out result.json

``stack.json`` is a stack config (``StackConfig.to_dict``) whose Kafka broker and Feast
store are running; this script starts a cluster of its own (a head and three worker
nodes) and points Ray, Serve and the shared storage at it:

- node ``serve``: the router and the recommender replicas (Serve's proxy on the head);
- node ``ingest``: two ingestor actors in one consumer group, and the DPO sampler;
- node ``train``: the two Ray Train workers of a training round;
- the model registry as a ``file://`` URI and the lake on a directory every node sees.

It simulates traffic, kills one ingestor halfway (its partitions move to the other,
then back when it is restarted), runs a training round, promotes it, and writes what
it saw (placements, sessions landed, the round) to ``--out`` for the test to judge. It
runs as its own process because a process is the driver of one Ray cluster at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ARM = "mn"
NODES = {  # label -> (logical CPUs, custom resources)
    "serve": (1, {"recloop_serve": 10}),
    "ingest": (1, {"recloop_ingest": 10}),
    "train": (1, {"recloop_train": 10}),
}


def _say(msg: str) -> None:
    print(f"[multinode {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_file(work: Path, seed: int, sessions: int) -> Path:
    path = work / "multinode.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "experiment": {
                    "name": "multinode",
                    "salt": "multinode-salt",
                    "arms": [
                        {
                            "name": ARM,
                            "share": 1.0,
                            "model": "seed",
                            "learning": "online-ipa",
                            "replicas": 2,
                        }
                    ],
                },
                "simulation": {
                    "seed": seed,
                    "duration_s": 86400,
                    "max_sessions": sessions,
                    "sessions_per_user_day": 3,
                    "speedup": 0,
                    "concurrency": 8,
                    "shard_cpus": 0.1,
                },
                "analysis": {"control": ARM},
            }
        )
    )
    return path


def placements(nodes: dict[str, str]) -> dict[str, list[str]]:
    """Per actor class name, as Ray's state API gives it: the labels of the nodes its
    actors, alive or dead, ran on."""
    import ray
    from ray.util.state import list_actors

    here = ray.get_runtime_context().gcs_address  # the session's stack runs beside it
    out: dict[str, list[str]] = {}
    for a in list_actors(address=here, limit=10_000, raise_on_missing_output=False):
        if a.node_id:
            out.setdefault(a.class_name, []).append(nodes.get(a.node_id, f"?{a.node_id[:8]}"))
    return {k: sorted(v) for k, v in out.items()}


def task_placements(nodes: dict[str, str], names: tuple[str, ...]) -> list[str]:
    """The labels of the nodes that ran the tasks whose name holds one of ``names``
    (Ray Data names its tasks after the operators they run)."""
    import ray
    from ray.util.state import list_tasks

    here = ray.get_runtime_context().gcs_address
    return sorted(
        nodes.get(t.node_id, f"?{t.node_id[:8]}")
        for t in list_tasks(address=here, limit=10_000, raise_on_missing_output=False)
        if t.node_id and any(n in (t.name or "") for n in names)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seed-model", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--sessions", type=int, default=240)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import dataclasses

    import pyarrow.compute as pc
    import ray
    import requests
    from ray.cluster_utils import Cluster

    from actors import ingestor as ingest_actors
    from actors.dpo_sampler import sampler_stats, start_sampler, stop_sampler
    from actors.sim.driver import simulate
    from pipelines.continuous import run_round
    from recloop.config import StackConfig
    from recloop.lake import SESSIONS, Lake
    from recloop.procs import free_port
    from recloop.ray_head import connect
    from recloop.registry import open_registry
    from recloop.stack import Stack
    from serving.api import ensure_arms
    from serving.app import delete

    base = StackConfig.from_dict(json.loads(args.stack.read_text()))
    work = args.work
    shared = work / "shared"  # the "shared filesystem": every node reads and writes it
    shared.mkdir(parents=True, exist_ok=True)
    dash_port, serve_port = free_port(), free_port()

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dash_port,
            "object_store_memory": 200 * 1024 * 1024,
        },
    )
    result: dict[str, Any] = {"nodes": {}}
    try:
        labels = {cluster.head_node.node_id: "head"}
        for label, (cpus, res) in NODES.items():
            node = cluster.add_node(
                num_cpus=cpus, resources=res, object_store_memory=100 * 1024 * 1024
            )
            labels[node.node_id] = label
        cluster.wait_for_nodes()
        result["nodes"] = {label: nid for nid, label in labels.items()}
        _say(f"cluster up: {len(labels)} nodes at {cluster.address}")

        cfg = dataclasses.replace(
            base,
            ray=dataclasses.replace(
                base.ray,
                address=cluster.address,
                dashboard_port=dash_port,
                serve_port=serve_port,
            ),
            serve=dataclasses.replace(
                base.serve,
                registry_uri=(shared / "registry").as_uri(),
                experiment=run_file(work, args.seed, args.sessions),
                replica_resources={"recloop_serve": 0.01},
                router_resources={"recloop_serve": 0.01},
                proxy_location="HeadOnly",
                dashboard=False,
                dpo_fraction=0.2,
                dpo_actor="dpo_sampler_multinode",
            ),
            ingest=dataclasses.replace(
                base.ingest,
                group_id=f"multinode-{args.seed}-{int(time.time())}",
                consumers=2,
                consumer_cpus=0.1,
                consumer_resources={"recloop_ingest": 0.01},
                lake_dir=shared / "lake",
                flush_interval_s=0.5,
                max_wait_s=5.0,
                progress_s=0,
            ),
            dpo=dataclasses.replace(
                base.dpo, sampler_cpus=0.1, sampler_resources={"recloop_ingest": 0.01}
            ),
            train=dataclasses.replace(
                base.train,
                arm=ARM,
                workers=2,
                cpus_per_worker=0.2,
                worker_resources={"recloop_train": 0.01},
                min_sessions=20,
                epochs=1,
                min_clicks=1,
            ),
        )
        connect(cfg)
        Stack(cfg).start_serve(_say)
        ensure_arms(cfg, args.seed_model, _say)
        seed_version = open_registry(cfg).current(ARM)
        start_sampler(cfg, say=_say)
        ingest_actors.start_actors(cfg, _say)

        # Halfway through the traffic one ingestor dies; its partitions go to the
        # other member, and come back when it is started again.
        killed: dict[str, Any] = {}

        def consumed() -> int:
            """Records the ingestors have read so far (0 while they are starting)."""
            try:
                actors = ingest_actors.running_actors(cfg).values()
                return sum(ray.get(a.stats.remote(), timeout=10)["records"] for a in actors)
            except Exception:
                return 0

        def kill_one() -> None:
            # Mid-traffic, not mid-start-up: on a slow machine a fixed delay fell inside
            # the deployment, before the victim had even been placed on its node.
            deadline = time.monotonic() + 600
            while (read := consumed()) < 200 and time.monotonic() < deadline:
                time.sleep(0.5)
            killed["after_records"] = read
            victim = ray.get_actor(ingest_actors.actor_name(1))
            ray.kill(victim, no_restart=True)
            killed["at"] = time.time()
            _say("killed ingestor-1")
            time.sleep(8.0)
            ingest_actors.start_actors(cfg, _say)
            killed["restarted"] = time.time()

        killer = threading.Thread(target=kill_one, daemon=True)
        killer.start()
        manifest = simulate(cfg, cfg.serve.experiment, _say, deploy=True, learn=False)
        killer.join(timeout=60)
        result["killed_ingestor"] = "restarted" in killed
        result["killed_after_records"] = killed.get("after_records")
        result["simulation"] = {k: manifest["totals"][k] for k in ("sessions", "failed")}
        result["impressions_pending"] = manifest["impressions_pending"]
        result["impressions"] = manifest["service"].get("impressions", {})

        # Every session lands in the lake, each once (the preflight request has no
        # feedback and waits for the join window's wall-time bound).
        run_id = manifest["run_id"]

        def landed() -> list[dict]:
            """This run's sessions in the lake (none while nothing is committed)."""
            try:
                sessions = Lake(cfg.lake_dir).read(SESSIONS)
            except Exception:  # nothing committed yet
                return []
            mine = sessions.filter(pc.equal(sessions.column("arm"), ARM)).to_pylist()
            return [r for r in mine if json.loads(r["context"]).get("sim_run") == run_id]

        deadline = time.monotonic() + 180
        while len(landed()) < manifest["totals"]["sessions"] and time.monotonic() < deadline:
            time.sleep(2.0)
        time.sleep(3.0)  # a duplicate would land in a later commit: give it the chance
        ran = landed()
        ids = [r["request_id"] for r in ran]
        result["lake"] = {
            "sessions": len(ids),
            "distinct": len(set(ids)),
            "complete": sum(1 for r in ran if r["n_feedback"] == len(r["items"])),
        }
        stats = {
            name: ray.get(actor.stats.remote(), timeout=30)
            for name, actor in ingest_actors.running_actors(cfg).items()
        }
        result["ingestors"] = {
            n: {k: s[k] for k in ("partitions", "records", "duplicates", "late")}
            for n, s in stats.items()
        }
        result["sampler"] = (sampler_stats(cfg) or {}).get("counts", {})

        record = run_round(cfg, _say)
        result["round"] = {
            k: (record or {}).get(k)
            for k in ("status", "version", "sessions", "workers", "data_engine")
        }
        # The round's Ray Data tasks: the Delta read and the map to examples.
        result["data_tasks"] = task_placements(labels, ("ReadParquet", "to_examples"))
        url = f"http://{cfg.ray.host}:{cfg.ray.serve_port}/recommend"
        body = requests.post(url, json={"user_id": int(ran[0]["user_id"])}, timeout=60).json()
        result["served_after"] = {
            "model_version": body.get("model_version"),
            "seed_version": seed_version,
            "current": open_registry(cfg).current(ARM),
        }

        by_class = placements(labels)
        result["actors"] = by_class

        def where(suffix: str) -> list[str]:
            return sorted(n for cls, ns in by_class.items() if cls.endswith(suffix) for n in ns)

        result["placement"] = {
            "router": where(":Router"),
            "replicas": where(f":recommender-{ARM}"),
            "ingestors": where("IngestorActor"),
            "sampler": where("DpoSamplerActor"),
            "train_workers": where("RayTrainWorker"),
        }
        _say(f"placement: {result['placement']}")
        try:
            delete(cfg)
        except Exception as exc:  # the cluster goes down next anyway
            _say(f"could not delete the app: {exc!r}")
        ingest_actors.stop_actors(cfg, _say)
        stop_sampler(cfg, _say)
    finally:
        args.out.write_text(json.dumps(result, indent=1, default=str))
        try:
            ray.shutdown()
        finally:
            cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
