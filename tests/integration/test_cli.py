"""`recloop up && recloop status && recloop down`, twice in a row, as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recloop.procs import processes_matching
from tests.conftest import isolated_config, short_home

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECLOOP = str(Path(sys.executable).parent / "recloop")


def _run(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RECLOOP, *args, "--config", str(config)], capture_output=True, text=True, timeout=300
    )


def test_up_status_down_twice_leaves_nothing_behind(tmp_path):
    home = short_home("cli")
    cfg = isolated_config(home)
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "stack": {
                    "home": str(cfg.home),
                    "cache_dir": str(cfg.cache_dir),
                    "kafka": {"port": cfg.kafka.port, "controller_port": cfg.kafka.controller_port},
                    "ray": {
                        k: getattr(cfg.ray, k)
                        for k in (
                            "port",
                            "dashboard_port",
                            "client_port",
                            "agent_listen_port",
                            "serve_port",
                            "num_cpus",
                        )
                    },
                    "data": {"synthetic": True},
                }
            }
        )
    )
    try:
        for round_ in (1, 2):
            up = _run("up", config=config)
            assert up.returncode == 0, up.stdout + up.stderr
            assert "stack up in" in up.stdout
            if round_ == 2:
                assert "fetching Apache Kafka" not in up.stdout  # jars come from the cache
                assert "formatted KRaft storage" not in up.stdout  # data kept across down

            again = _run("up", config=config)  # idempotent while running
            assert again.returncode == 0 and "already running" in again.stdout

            status = _run("status", config=config)
            assert status.returncode == 0, status.stdout + status.stderr
            lines = status.stdout.strip().splitlines()
            assert [ln.split()[0] for ln in lines] == ["kafka", "ray", "feast"]
            assert all(ln.split()[1] == "ok" for ln in lines), status.stdout
            if round_ == 1:  # the loop's terminal view (no service deployed: empty parts)
                view = _run("status", "--watch", "--looks", "2", "--interval", "0.5", config=config)
                assert view.returncode == 0, view.stdout + view.stderr
                assert view.stdout.count("recloop loop at") == 2, view.stdout
                assert "serving:" in view.stdout and "ingest:" in view.stdout

            down = _run("down", config=config)
            assert down.returncode == 0, down.stdout + down.stderr
            assert "no process left behind" in down.stdout
            assert processes_matching(str(home)) == []

            status = _run("status", config=config)
            assert status.returncode == 1 and "DOWN" in status.stdout
    finally:
        _run("down", config=config)
        shutil.rmtree(home, ignore_errors=True)
