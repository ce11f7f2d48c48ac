"""The loop on a local multi-node Ray cluster: serving, the ingestors and the sampler,
and the training workers each on a node of their own; registry and lake on storage
every node shares; one of two ingestors killed mid-traffic. The cluster is driven by
``tests/integration/multinode.py`` in a process of its own (a process is the driver of
one Ray cluster, and this one is already connected to the session stack's)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from recloop.config import PROJECT_ROOT, StackConfig
from tests.conftest import broker_and_feast

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]


@pytest.fixture(scope="module")
def own_stack() -> Iterator[StackConfig]:
    with broker_and_feast("mn") as cfg:
        yield cfg


def test_each_part_runs_on_its_own_node_and_nothing_is_lost_or_doubled(
    own_stack: StackConfig, synthetic_checkpoints, tmp_path: Path, fault_record
) -> None:
    stack_json = tmp_path / "stack.json"
    stack_json.write_text(json.dumps(own_stack.to_dict(), default=str))
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "tests.integration.multinode", "--stack", str(stack_json)]
    cmd += ["--work", str(tmp_path), "--seed-model", str(synthetic_checkpoints[0])]
    cmd += ["--out", str(out)]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, timeout=900, capture_output=True, text=True)
    print(proc.stdout[-6000:], proc.stderr[-6000:], sep="\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())

    # Placement: each part where the nodes' resources sent it, three nodes in all.
    p = r["placement"]
    assert p["router"] == ["serve"] and p["replicas"] == ["serve", "serve"], p
    assert set(p["ingestors"]) == {"ingest"} and len(p["ingestors"]) >= 3, p  # + restart
    assert p["sampler"] == ["ingest"], p
    assert p["train_workers"] == ["train", "train"], p

    # Traffic: every session served, logged and landed once, with its feedback, across
    # the kill of one ingestor and its restart.
    sim = r["simulation"]
    assert sim["failed"] == 0 and r["killed_ingestor"]
    assert r["killed_after_records"] >= 200, r["killed_after_records"]  # killed mid-traffic
    assert r["impressions_pending"] == 0 and r["impressions"].get("dropped") == 0
    lake = r["lake"]
    assert lake["sessions"] == lake["distinct"] == sim["sessions"], lake
    assert lake["complete"] == sim["sessions"], lake
    assert r["sampler"].get("offered", 0) > 0, r["sampler"]

    # Training on the train node: the round is promoted and served from the shared registry.
    rnd = r["round"]
    assert rnd["status"] == "promoted", rnd
    # Its data came through Ray Data, in tasks on the train node (train.worker_resources).
    assert rnd["data_engine"] == "ray" and r["data_tasks"], r["data_tasks"]
    assert set(r["data_tasks"]) == {"train"}, r["data_tasks"]
    served = r["served_after"]
    assert served["model_version"] == served["current"] == rnd["version"] != served["seed_version"]
    fault_record(
        fault="multi-node cluster: an ingestor killed and restarted during traffic",
        load=f"{sim['sessions']} sessions on 4 nodes",
        survived=True,
        produced=sim["sessions"],
        landed=lake["distinct"],
        detail="router + 2 replicas, 2 ingestors + sampler, 2 train workers on 3 nodes",
    )
