"""The broker's provisioning logic, without starting it: prerequisites and settings."""

from __future__ import annotations

import re

import pytest

from recloop.broker import KafkaBroker, kafka_version
from recloop.config import ConfigError, load_config
from recloop.procs import PrerequisiteMissing
from recloop.topics import TOPICS


def _cfg(tmp_path, **kw):
    return load_config(
        overrides={"home": str(tmp_path / "home"), "cache_dir": str(tmp_path / "cache"), **kw},
        env={},
    )


def test_missing_java_says_what_and_how_to_fix(tmp_path):
    broker = KafkaBroker(_cfg(tmp_path, **{"kafka.java": "/nonexistent/java"}))
    with pytest.raises(PrerequisiteMissing) as err:
        broker.check_java()
    msg = str(err.value)
    assert "Java not found" in msg and "Java 17" in msg and "bootstrap_servers" in msg


def test_missing_maven_without_cached_jars_says_what_and_how_to_fix(tmp_path):
    broker = KafkaBroker(_cfg(tmp_path, **{"kafka.mvn": "/nonexistent/mvn"}))
    with pytest.raises(PrerequisiteMissing) as err:
        broker.ensure_jars()
    assert "Maven not found" in str(err.value) and "apt-get install maven" in str(err.value)


def test_missing_jars_block_the_java_tools_with_a_clear_message(tmp_path):
    broker = KafkaBroker(_cfg(tmp_path))
    with pytest.raises(PrerequisiteMissing, match="jars are missing"):
        broker.format()


def test_cached_jars_need_no_maven(tmp_path):
    broker = KafkaBroker(_cfg(tmp_path, **{"kafka.mvn": "/nonexistent/mvn"}))
    broker.libs_dir.mkdir(parents=True)
    (broker.libs_dir / f"kafka_2.13-{broker.version}.jar").write_bytes(b"")
    (broker.libs_dir / ".complete").write_text(broker._stamp())
    assert broker.ensure_jars() == broker.libs_dir


def test_broker_binds_loopback_with_bounded_heap_and_no_topic_autocreation(tmp_path):
    broker = KafkaBroker(_cfg(tmp_path, **{"kafka.port": 19092, "kafka.controller_port": 19093}))
    props = dict(
        line.split("=", 1)
        for line in broker.write_properties().read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["process.roles"] == "broker,controller"
    assert props["auto.create.topics.enable"] == "false"
    assert props["log.dirs"].startswith(str(tmp_path / "home"))


def test_cluster_ids_look_like_kafkas_own():
    ids = {KafkaBroker.new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", i) for i in ids)


def test_formatted_storage_refuses_a_changed_controller_port(tmp_path):
    broker = KafkaBroker(_cfg(tmp_path))
    broker.data_dir.mkdir(parents=True)
    (broker.data_dir / "meta.properties").write_text("node.id=1\n")
    broker._ports_file.write_text('{"host": "127.0.0.1", "controller_port": 1234}')
    with pytest.raises(ConfigError, match="recloop down --purge"):
        broker.format()


def test_external_kafka_is_never_provisioned(tmp_path):
    with pytest.raises(ConfigError, match="does not run a broker"):
        KafkaBroker(_cfg(tmp_path, **{"kafka.bootstrap_servers": "elsewhere:9092"}))


def test_topics_are_declared_once_with_the_loops_names():
    assert [t.name for t in TOPICS] == [
        "recloop.impressions",
        "recloop.interactions",
        "recloop.preferences",
        "recloop.dlq",
    ]
    assert all(t.partitions >= 1 and t.retention_ms > 0 for t in TOPICS)
    assert kafka_version().startswith("4.")


def test_free_ports_come_from_outside_the_ranges_the_os_and_ray_hand_out():
    import socket

    from recloop.procs import FREE_PORTS, free_port

    ports = {free_port() for _ in range(20)}
    assert all(FREE_PORTS[0] <= p <= FREE_PORTS[1] for p in ports)
    assert FREE_PORTS[1] < 32768 and FREE_PORTS[0] > 19999  # ephemeral; Ray's workers
    with socket.socket() as s:  # free: it binds
        s.bind(("127.0.0.1", ports.pop()))


def test_a_log_tail_leads_with_the_error_that_preceded_the_shutdown(tmp_path):
    from recloop.procs import log_tail

    log = tmp_path / "kafka.log"
    lines = [f"[t{i}] INFO starting {i}" for i in range(10)]
    lines.append("[t10] ERROR Socket server failed to bind to 127.0.0.1:23456")
    lines += [f"[t{i}] INFO shutting down {i}" for i in range(11, 60)]
    log.write_text("\n".join(lines) + "\n")
    tail = log_tail(log, lines=5).splitlines()
    assert tail[0].endswith("failed to bind to 127.0.0.1:23456") and tail[1] == "..."
    assert tail[2:] == lines[-5:]
    assert log_tail(tmp_path / "none.log").startswith("(no log at")


def test_a_spawned_broker_is_judged_by_its_exit_status_not_its_command_line(tmp_path):
    import subprocess

    from recloop.procs import free_port

    port = free_port()
    broker = KafkaBroker(_cfg(tmp_path, **{"kafka.port": port, "kafka.start_timeout_s": 1.0}))
    broker.log_file.parent.mkdir(parents=True, exist_ok=True)
    broker.log_file.write_text("[t0] INFO an earlier run's shutdown\n")
    since = broker.log_file.stat().st_size
    # Alive but not a broker (no pid file, a command line without our properties file,
    # as a JVM's can read while it starts): not "exited", it times out.
    alive = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(TimeoutError):
            broker.wait_ready(alive.pid, alive, since)
    finally:
        alive.kill()
        alive.wait()
    with open(broker.log_file, "a") as log:
        log.write("[t1] ERROR Socket server failed to bind\n[t2] INFO shutting down\n")
    dead = subprocess.Popen(["sh", "-c", "exit 3"])
    dead.wait()
    with pytest.raises(RuntimeError, match=r"exited during start \(code 3\)") as err:
        broker.wait_ready(dead.pid, dead, since)
    assert "failed to bind" in str(err.value) and "earlier run" not in str(err.value)
