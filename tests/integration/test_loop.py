"""The whole loop once, on the real stack: simulated users → Serve → Kafka → ingestor →
Feast + lake → a training round (Ray Train, 2 workers) → gate → promotion → the next
requests are served by the new version, with the earlier feedback in their history."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.compute as pc
import pytest
import requests
import yaml

from recloop.config import StackConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARM = "loop"


def test_feedback_reaches_the_weights_and_the_features(
    ray_driver: StackConfig, synthetic_checkpoints, tmp_path: Path
) -> None:
    from actors.ingestor import Ingestor
    from actors.sim.driver import simulate
    from pipelines.continuous import run_round
    from recloop.lake import SESSIONS, Lake
    from recloop.registry import open_registry
    from recloop.train_state import read_rounds
    from serving.api import ensure_arms
    from serving.app import delete

    run = tmp_path / "loop.yaml"
    run.write_text(
        yaml.safe_dump(
            {
                "experiment": {
                    "name": "loop",
                    "salt": "loop-salt",
                    "arms": [{"name": ARM, "share": 1.0, "model": "seed", "learning": "online"}],
                },
                "simulation": {
                    "seed": 5,
                    "duration_s": 2 * 86400,
                    "max_sessions": 400,
                    "sessions_per_user_day": 3,
                    "speedup": 0,
                    "concurrency": 16,
                    "shard_cpus": 0.1,
                },
                "analysis": {"control": ARM},
            }
        )
    )
    cfg = dataclasses.replace(
        ray_driver,
        serve=dataclasses.replace(
            ray_driver.serve, registry_uri=str(tmp_path / "registry"), experiment=run
        ),
        ingest=dataclasses.replace(
            ray_driver.ingest,
            group_id="loop-test",
            lake_dir=tmp_path / "lake",
            flush_interval_s=0.5,
            max_wait_s=2.0,
            progress_s=0,
        ),
        train=dataclasses.replace(
            ray_driver.train, arm=ARM, workers=2, min_sessions=20, epochs=1, min_clicks=1
        ),
    )
    ensure_arms(cfg, synthetic_checkpoints[0], print)
    reg = open_registry(cfg)
    seed_version = reg.current(ARM)
    try:
        manifest = simulate(cfg, run, print, deploy=True, learn=False)
        assert manifest["totals"]["failed"] == 0
        imp = manifest["service"]["impressions"]  # every served session reached Kafka
        assert manifest["impressions_pending"] == imp["dropped"] == imp["failed"] == 0, imp
        stats = Ingestor(cfg, 0, print).run(until_idle_s=3.0, progress_s=0)
        assert stats["open_sessions"] == 0  # (dead letters: other tests' bad records)

        lake = Lake(cfg.lake_dir)
        sessions = lake.read(SESSIONS)
        mine = sessions.filter(pc.equal(sessions.column("arm"), ARM))
        run_id = manifest["run_id"]
        ran = [r for r in mine.to_pylist() if json.loads(r["context"]).get("sim_run") == run_id]
        # every simulated session once (the preflight request is the one without feedback)
        assert len(ran) == manifest["totals"]["sessions"] == mine.num_rows - 1

        record = run_round(cfg, print)
        assert record is not None and record["status"] == "promoted", record
        new_version = record["version"]
        assert new_version != seed_version and reg.current(ARM) == new_version
        assert read_rounds(cfg, ARM)[-1]["version"] == new_version

        # The next request is served by the new version, and the user's history holds
        # what they clicked in the simulated sessions.
        rows = mine.to_pylist()
        user, clicked = next(
            (r["user_id"], [i for i, c in zip(r["items"], r["clicked"], strict=True) if c])
            for r in sorted(rows, key=lambda r: -r["event_time_ms"])
            if r["clicks"]
        )
        from features.store import open_store

        hist = (
            open_store(cfg)
            .get_online_features(
                features=["user_history:item_ids"], entity_rows=[{"user_id": user}]
            )
            .to_dict()["item_ids"][0]
        )
        assert set(clicked) <= set(hist)
        url = f"http://{cfg.ray.host}:{cfg.ray.serve_port}/recommend"
        body = requests.post(url, json={"user_id": user}, timeout=60).json()
        assert body["arm"] == ARM and body["model_version"] == new_version
        assert not set(clicked) & {it["item_id"] for it in body["items"]}  # seen: excluded
    finally:
        delete(cfg)
