"""Fixtures: an isolated local stack (real Kafka, real Ray head, real Feast) for the
integration tests, on free ports and a throw-away home, sharing the jar cache."""

from __future__ import annotations

import json
import os
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


# `make test` runs the suite on two pytest-xdist workers (--dist loadgroup). The tests on
# the session stack form one group, run in order by one worker (one stack, one driver);
# each module that brings up a stack or a broker of its own is a group of its own; unit
# tests go wherever a worker is free. Most of an integration test's time is waiting (on a
# JVM, a Ray head, a deployment, virtual traffic), so two of them overlap well on 2 cores.
#
# The groups are computed here and handed to a scheduler of our own: xdist 3.8 groups by
# a suffix it writes to the private ``_nodeid``, which pytest 9.2 no longer reads (nodeid
# is derived from ``_id``), so its own loadgroup runs a group's tests on any worker. Each
# worker writes {nodeid: group} to a folder the controller names (GROUPS_ENV) while it
# collects; the controller's scheduler reads the files once every worker has collected.
SESSION_STACK_FIXTURES = frozenset({"stack", "ray_driver", "feature_store", "topic_factory"})
GROUPS_ENV = "RECLOOP_TEST_GROUPS"


def pytest_configure(config: pytest.Config) -> None:
    # On a 2-core machine shared with a Ray head and a broker, torch's worker threads
    # spin waiting for each other and small ops slow down by ~100x; tests check
    # behaviour, not speed, so one thread is the right setting.
    import torch

    torch.set_num_threads(1)
    workers = getattr(config.option, "numprocesses", None)
    if workers and not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller, before
        os.environ[GROUPS_ENV] = tempfile.mkdtemp(prefix="recloop-groups-")  # it spawns


def pytest_unconfigure(config: pytest.Config) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(GROUPS_ENV):
        shutil.rmtree(os.environ.pop(GROUPS_ENV), ignore_errors=True)


def xdist_group_of(item: pytest.Item) -> str | None:
    """The worker group of an integration test (None: a unit test, free to go anywhere)."""
    if item.get_closest_marker("integration") is None:
        return None
    if SESSION_STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "session-stack"
    return item.module.__name__ if isinstance(item, pytest.Function) else item.nodeid


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    worker, folder = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get(GROUPS_ENV)
    if worker and folder:  # before the worker reports its collection to the controller
        groups = {i.nodeid: g for i in items if (g := xdist_group_of(i)) is not None}
        (Path(folder) / f"{worker}.json").write_text(json.dumps(groups))


def pytest_xdist_make_scheduler(config: pytest.Config, log):  # noqa: ANN201 (xdist's type)
    folder = os.environ.get(GROUPS_ENV)
    if config.getvalue("dist") != "loadgroup" or not folder:
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        """xdist's scope scheduling with our groups as the scopes (a test of no group is
        a scope of its own); the biggest group goes out first."""

        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:
                self.groups = {}
                for f in sorted(Path(folder).glob("*.json")):
                    self.groups.update(json.loads(f.read_text()))
            return self.groups.get(nodeid, nodeid)

    return GroupScheduling(config, log)


def run_shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every xdist worker of this run sees (the run's base temp folder; without
    xdist, this process's own)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


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


def shared_quick_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, name: str, seed: int, *extra: str
) -> Path:
    """``quick_checkpoint(seed, *extra)`` built once per test run, by whichever test (or
    xdist worker) needs it first; ``name`` tells the variants apart."""
    from filelock import FileLock

    root = run_shared_dir(tmp_path_factory) / "ckpts"
    root.mkdir(parents=True, exist_ok=True)
    out, done = root / name, root / f"{name}.done"
    with FileLock(f"{root / name}.lock"):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            quick_checkpoint(out, seed, *extra)
            done.touch()
    return out


@pytest.fixture(scope="session")
def synthetic_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """Two quick seed checkpoints on the generated data (seeds 0 and 1)."""
    return (
        shared_quick_checkpoint(tmp_path_factory, "a", 0),
        shared_quick_checkpoint(tmp_path_factory, "b", 1),
    )


@pytest.fixture(scope="session")
def synthetic_checkpoint(tmp_path_factory) -> Path:
    """The first of ``synthetic_checkpoints`` alone (the unit tests need no second)."""
    return shared_quick_checkpoint(tmp_path_factory, "a", 0)


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
    from filelock import FileLock

    records: list[dict] = []
    yield records
    if not records:
        return
    FAULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # xdist: each worker adds its own
    with FileLock(f"{FAULTS_JSON}.lock"):
        earlier: list[dict] = []
        if run and FAULTS_JSON.exists():
            prev = json.loads(FAULTS_JSON.read_text())
            earlier = prev["faults"] if prev.get("run") == run else []
        doc = {"run": run, "faults": earlier + records}
        FAULTS_JSON.write_text(json.dumps(doc, indent=1))


@pytest.fixture
def fault_record(_fault_records: list[dict], request: pytest.FixtureRequest):
    """Record what a fault-injection test measured (``benchmarks.faults`` renders them)."""

    def record(**fields: object) -> None:
        _fault_records.append({"test": request.node.nodeid, **fields})

    return record
