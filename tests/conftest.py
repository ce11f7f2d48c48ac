"""Fixtures: an isolated local stack (real Kafka, real Ray head, real Feast) for the
integration tests, on free ports and a throw-away home, sharing the jar cache."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from recloop.config import PROJECT_ROOT, StackConfig

SHARED_CACHE = PROJECT_ROOT / ".recloop" / "cache"


def pytest_configure(config: pytest.Config) -> None:
    # On a 2-core machine shared with a Ray head and a broker, torch's worker threads
    # spin waiting for each other and small ops slow down by ~100x; tests check
    # behaviour, not speed, so one thread is the right setting.
    import torch

    torch.set_num_threads(1)


def isolated_config(home: Path, **extra: object) -> StackConfig:
    """A stack config on free ports under ``home``, with generated data."""
    from recloop.stack import isolated_config as make

    return make(home, SHARED_CACHE, **extra)


def short_home(prefix: str) -> Path:
    # Ray's Unix socket paths live under the home: keep it short.
    return Path(tempfile.mkdtemp(prefix=f"rl-{prefix}-", dir="/tmp"))


@contextmanager
def broker_and_feast(prefix: str) -> Iterator[StackConfig]:
    """A Kafka broker with the loop's topics and a Feast store, of their own, on free
    ports under a throw-away home (no Ray): for tests that break or replace parts the
    session stack's other users rely on."""
    from features import store
    from recloop.broker import KafkaBroker
    from recloop.data import load
    from recloop.topics import TOPICS, ensure_topics

    home = short_home(prefix)
    cfg = isolated_config(home)
    broker = KafkaBroker(cfg)
    try:
        broker.start()
        ensure_topics(cfg.kafka.bootstrap, TOPICS)
        store.apply(cfg, load(cfg.data).users)
        yield cfg
    finally:
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def stack() -> Iterator[StackConfig]:
    """The stack for the whole session: started once, stopped at the end."""
    from recloop.stack import Stack

    home = short_home("it")
    cfg = isolated_config(home)
    st = Stack(cfg)
    started = time.monotonic()
    try:
        st.up(progress=lambda m: print(f"[stack] {m}", flush=True))
        print(f"[stack] up in {time.monotonic() - started:.1f} s", flush=True)
        yield cfg
    finally:
        try:
            import ray

            ray.shutdown()
        except Exception:
            pass
        leftovers = st.down(progress=lambda m: print(f"[stack] {m}", flush=True))
        shutil.rmtree(home, ignore_errors=True)
        assert not leftovers, f"processes left behind: {leftovers}"


@pytest.fixture
def topic_factory(stack: StackConfig) -> Iterator:
    """Create uniquely named topics for one test; delete them afterwards."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=stack.kafka.bootstrap, client_id="recloop-tests")
    created: list[str] = []

    def make(prefix: str, partitions: int = 1) -> str:
        name = f"test.{prefix}.{uuid.uuid4().hex[:10]}"
        admin.create_topics([NewTopic(name, partitions, 1)])
        created.append(name)
        return name

    yield make
    try:
        admin.delete_topics(created)
    finally:
        admin.close()


@pytest.fixture(scope="session")
def feature_store(stack: StackConfig):
    from features import store

    return store.open_store(stack)


def logged_impressions(cfg: StackConfig, request_ids, timeout_s: float = 60.0) -> dict:
    """The impressions of ``request_ids`` on the impressions topic, read from the start
    until all are found or ``timeout_s`` passes: request id -> Impression."""
    from kafka import KafkaConsumer

    from recloop.events import Impression, decode

    wanted = set(request_ids)
    consumer = KafkaConsumer(
        Impression.topic,
        bootstrap_servers=cfg.kafka.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=2000,
    )
    found = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < len(wanted) and time.monotonic() < deadline:
            for rec in consumer:
                ev = decode(Impression, rec.value)
                if ev.request_id in wanted:
                    found[ev.request_id] = ev
    finally:
        consumer.close()
    return found


@contextmanager
def deployed_service(cfg: StackConfig, seed: Path) -> Iterator[str]:
    """The recommendation service deployed for ``cfg`` from ``seed``, healthy: yields
    its base URL, and deletes the application after."""
    import requests

    from serving.api import serve_up
    from serving.app import delete

    serve_up(cfg, seed=seed, progress=print)
    base = f"http://{cfg.ray.host}:{cfg.ray.serve_port}"
    deadline = time.monotonic() + 120
    while requests.get(f"{base}/healthz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "service not healthy"
        time.sleep(1)
    try:
        yield base
    finally:
        delete(cfg)


@contextmanager
def experiment_service(
    cfg: StackConfig, root: Path, experiment: str, seed: Path, **serve: object
) -> Iterator[tuple[StackConfig, str]]:
    """``deployed_service`` for an experiment file (YAML text) and a registry of its own
    under ``root``, with ``serve`` overriding other serve settings: yields the config it
    deployed and the base URL."""
    import dataclasses

    (root / "experiment.yaml").write_text(experiment)
    settings = dataclasses.replace(
        cfg.serve, registry_uri=str(root / "registry"), experiment=root / "experiment.yaml", **serve
    )
    cfg = dataclasses.replace(cfg, serve=settings)
    with deployed_service(cfg, seed) as base:
        yield cfg, base


def quick_checkpoint(out: Path, seed: int, *extra: str) -> Path:
    """A seed checkpoint pre-trained in seconds on generated data; ``extra``: more
    `recloop pretrain` flags."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pipelines.offline.pretrain", "--data", "synthetic", "--quick"]
    cmd += ["--dim", "32", "--threads", "1", "--seed", str(seed), "--out", str(out), *extra]
    subprocess.run(cmd, check=True, cwd=PROJECT_ROOT, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="session")
def synthetic_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """Two quick seed checkpoints on the generated data (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("ckpts")
    return quick_checkpoint(root / "a", 0), quick_checkpoint(root / "b", 1)


@pytest.fixture(scope="session")
def ray_driver(stack: StackConfig) -> Iterator[StackConfig]:
    """This test process connected to the stack's Ray head as a driver."""
    import ray

    from recloop.ray_head import connect

    connect(stack)
    yield stack
    ray.shutdown()


FAULTS_JSON = PROJECT_ROOT / "tests" / "artifacts" / "faults.json"


@pytest.fixture(scope="session")
def _fault_records() -> Iterator[list[dict]]:
    records: list[dict] = []
    yield records
    if records:
        import json

        FAULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        FAULTS_JSON.write_text(json.dumps({"faults": records}, indent=1))


@pytest.fixture
def fault_record(_fault_records: list[dict], request: pytest.FixtureRequest):
    """Record what a fault-injection test measured (``benchmarks.faults`` renders them)."""

    def record(**fields: object) -> None:
        _fault_records.append({"test": request.node.nodeid, **fields})

    return record
