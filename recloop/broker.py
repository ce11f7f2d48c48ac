"""The local Apache Kafka broker: fetched from Maven Central, KRaft, one combined node.

Lifecycle: ``ensure_jars`` (Maven copies ``kafka_2.13`` and a log4j2 backend into the
cache once), ``format`` (KRaft storage, once per data folder), ``start`` (idempotent,
returns when the broker answers a metadata request), ``stop`` (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from recloop.config import PROJECT_ROOT, ConfigError, StackConfig
from recloop.procs import (
    PrerequisiteMissing,
    log_tail,
    port_open,
    read_pid,
    spawn,
    terminate,
)

HERE = PROJECT_ROOT / "infra" / "kafka"  # the broker's assets: its POM and log4j2 config
POM = HERE / "pom.xml"
LOG4J_CONFIG = HERE / "log4j2.properties"

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def kafka_version() -> str:
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text())
    assert match, "pom.xml declares kafka.version"
    return match.group(1)


def probe(bootstrap: str, timeout_s: float = 3.0) -> dict | None:
    """Ask the cluster for its metadata; None when no broker answers in time."""
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="recloop-probe",
            request_timeout_ms=int(timeout_s * 1000),
            bootstrap_timeout_ms=int(timeout_s * 1000),
        )
    except (KafkaError, OSError, ValueError):
        return None
    try:
        return admin.describe_cluster()
    except (KafkaError, OSError):
        return None
    finally:
        admin.close()


class KafkaBroker:
    """One KRaft node (broker + controller) bound to the configured host."""

    def __init__(self, cfg: StackConfig) -> None:
        if not cfg.kafka.provisioned:
            raise ConfigError("kafka.bootstrap_servers is set: recloop does not run a broker")
        self.cfg = cfg
        self.kcfg = cfg.kafka
        self.version = kafka_version()
        assert cfg.cache_dir is not None
        self.m2_dir = cfg.cache_dir / "m2"
        self.libs_dir = cfg.cache_dir / f"kafka-{self.version}" / "libs"
        self.base_dir = cfg.home / "kafka"
        self.data_dir = self.base_dir / "data"
        self.properties = self.base_dir / "server.properties"
        self.pid_file = cfg.run_dir / "kafka.pid"
        self.log_file = cfg.logs_dir / "kafka.log"

    # ---------------------------------------------------------------- prerequisites
    def check_java(self) -> str:
        java = shutil.which(self.kcfg.java)
        if java is None:
            raise PrerequisiteMissing(
                f"Java not found (looked for {self.kcfg.java!r} on PATH). The local Kafka broker "
                "needs Java 17 or newer: install it (Debian: apt-get install "
                "openjdk-17-jre-headless) or set kafka.java, or point kafka.bootstrap_servers "
                "at a Kafka you already run."
            )
        out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
        match = re.search(r'version "(\d+)', out)
        if match and int(match.group(1)) < 17:
            raise PrerequisiteMissing(
                f"{java} is Java {match.group(1)}; Kafka {self.version} needs Java 17 or newer."
            )
        return java

    def _stamp(self) -> str:
        return hashlib.sha256(POM.read_bytes()).hexdigest()

    def jars_ready(self) -> bool:
        stamp = self.libs_dir / ".complete"
        return stamp.exists() and stamp.read_text().strip() == self._stamp()

    def ensure_jars(self, progress: Progress = _quiet) -> Path:
        """Fetch the broker's jars with Maven once; later calls return at once."""
        if self.jars_ready():
            return self.libs_dir
        mvn = shutil.which(self.kcfg.mvn)
        if mvn is None:
            raise PrerequisiteMissing(
                f"Maven not found (looked for {self.kcfg.mvn!r} on PATH) and the Kafka jars are "
                f"not cached in {self.libs_dir}. Install Maven (Debian: apt-get install maven) "
                "or set kafka.mvn; it is needed once, to fetch Apache Kafka from Maven Central."
            )
        tmp = self.libs_dir.with_name("libs.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        argv = [
            mvn,
            "-B",
            "-f",
            str(POM),
            f"-Dmaven.repo.local={self.m2_dir}",
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}",
            "-DincludeScope=runtime",
        ]
        progress(f"fetching Apache Kafka {self.version} jars with Maven (first time only)")
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        lines: list[str] = []
        fetched = 0
        last_report = started
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("Downloaded from"):
                fetched += 1
                if time.monotonic() - last_report > 2.0:
                    last_report = time.monotonic()
                    progress(f"  {fetched} artifacts fetched ({last_report - started:.0f} s)")
        if proc.wait() != 0:
            tail = "\n".join(lines[-25:])
            raise PrerequisiteMissing(
                f"Maven could not fetch the Kafka jars (exit {proc.returncode}). Maven Central "
                f"must be reachable the first time; after that the jars are cached in "
                f"{self.libs_dir}.\n{tail}"
            )
        jars = list(tmp.glob("*.jar"))
        if not any(j.name.startswith("kafka_2.13-") for j in jars):
            raise PrerequisiteMissing(f"Maven finished but {tmp} holds no kafka_2.13 jar")
        shutil.rmtree(self.libs_dir, ignore_errors=True)
        tmp.rename(self.libs_dir)
        (self.libs_dir / ".complete").write_text(self._stamp())
        progress(
            f"  {len(jars)} jars ready in {self.libs_dir} ({time.monotonic() - started:.0f} s)"
        )
        return self.libs_dir

    # ---------------------------------------------------------------- storage
    def _java_argv(self, main: str, *args: str, heap_mb: int = 128) -> list[str]:
        if not self.jars_ready():
            raise PrerequisiteMissing(
                f"the Kafka jars are missing from {self.libs_dir}: run `recloop up` (it fetches "
                "them with Maven) or `make kafka-jars`"
            )
        return [
            self.check_java(),
            f"-Xmx{heap_mb}m",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-Dlog4j2.shutdownHookEnabled=false",
            "-cp",
            f"{self.libs_dir}/*",
            main,
            *args,
        ]

    def write_properties(self) -> Path:
        k = self.kcfg
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{k.host}:{k.controller_port}",
            "listeners": f"PLAINTEXT://{k.host}:{k.port},CONTROLLER://{k.host}:{k.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{k.host}:{k.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            # Topics come from recloop/topics.py or are created explicitly by tests.
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        self.base_dir.mkdir(parents=True, exist_ok=True)
        body = "".join(f"{key}={value}\n" for key, value in props.items())
        self.properties.write_text("# written by recloop; edit recloop's config instead\n" + body)
        return self.properties

    @staticmethod
    def new_cluster_id() -> str:
        """A KRaft cluster id: 16 random bytes, base64url without padding, as Kafka's
        own ``random-uuid`` makes them (never starting with '-')."""
        while True:
            cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            if not cid.startswith("-"):
                return cid

    @property
    def _ports_file(self) -> Path:
        return self.base_dir / "formatted-with.json"

    def format(self) -> bool:
        """Format KRaft storage unless already formatted. True when it formatted."""
        ports = {"host": self.kcfg.host, "controller_port": self.kcfg.controller_port}
        if (self.data_dir / "meta.properties").exists():
            recorded = (
                json.loads(self._ports_file.read_text()) if self._ports_file.exists() else ports
            )
            if recorded != ports:
                raise ConfigError(
                    f"the broker data in {self.data_dir} was formatted for controller "
                    f"{recorded['host']}:{recorded['controller_port']}, not "
                    f"{ports['host']}:{ports['controller_port']}; use the old setting or run "
                    "`recloop down --purge` to start from empty storage"
                )
            return False
        self.write_properties()
        argv = self._java_argv(
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "-t",
            self.new_cluster_id(),
            "-c",
            str(self.properties),
        )
        res = subprocess.run(argv, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"formatting Kafka storage failed:\n{res.stdout}\n{res.stderr}")
        self._ports_file.write_text(json.dumps(ports))
        return True

    # ---------------------------------------------------------------- process
    def pid(self) -> int | None:
        return read_pid(self.pid_file, str(self.properties))

    def start(self, progress: Progress = _quiet) -> str:
        """Start the broker if it is not running; return when it answers metadata."""
        self.ensure_jars(progress)
        pid = self.pid()
        if pid is not None:
            self.wait_ready(pid)
            return f"already running (pid {pid})"
        for port in (self.kcfg.port, self.kcfg.controller_port):
            if port_open(self.kcfg.host, port):
                raise ConfigError(
                    f"{self.kcfg.host}:{port} is taken by another process; stop it or choose "
                    "other ports (kafka.port / kafka.controller_port, or RECLOOP_KAFKA_PORT)"
                )
        if self.format():
            progress(f"formatted KRaft storage in {self.data_dir}")
        self.write_properties()
        argv = self._java_argv("kafka.Kafka", str(self.properties), heap_mb=self.kcfg.heap_mb)
        argv.insert(2, f"-Xms{min(self.kcfg.heap_mb, 256)}m")
        argv.insert(3, "-Drecloop.kafka.loglevel=INFO")
        started = time.monotonic()
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        proc = spawn(argv, self.log_file, self.pid_file)
        progress(f"starting Kafka {self.version} on {self.kcfg.bootstrap} (pid {proc.pid})")
        self.wait_ready(proc.pid, proc, offset)
        return f"started (pid {proc.pid}) in {time.monotonic() - started:.1f} s"

    def wait_ready(
        self, pid: int, proc: subprocess.Popen[bytes] | None = None, log_from: int = 0
    ) -> None:
        """Until the broker answers. ``proc``: the process just spawned, judged alive by
        its exit status; its command line can read empty or be the launcher's while the
        JVM starts (seen on a loaded machine), so the pid-file check (command line has
        our properties file) is kept for a broker started earlier."""
        deadline = time.monotonic() + self.kcfg.start_timeout_s
        while time.monotonic() < deadline:
            exited = (
                proc.poll() is not None
                if proc is not None
                else read_pid(self.pid_file, str(self.properties)) != pid
            )
            if exited:
                code = f" (code {proc.returncode})" if proc is not None else ""
                self.pid_file.unlink(missing_ok=True)
                raise RuntimeError(
                    f"the Kafka broker exited during start{code}; last lines of "
                    f"{self.log_file}:\n" + log_tail(self.log_file, since=log_from)
                )
            if port_open(self.kcfg.host, self.kcfg.port) and probe(self.kcfg.bootstrap, 2.0):
                return
            time.sleep(0.3)
        raise TimeoutError(
            f"Kafka did not answer on {self.kcfg.bootstrap} within {self.kcfg.start_timeout_s} s;"
            f" see {self.log_file}"
        )

    def stop(self) -> str:
        pid = self.pid()
        if pid is None:
            return "not running"
        graceful = terminate(pid, timeout_s=30.0)
        self.pid_file.unlink(missing_ok=True)
        return "stopped" if graceful else "killed (did not stop within 30 s)"

    def purge(self) -> None:
        """Delete the broker's data (the jars in the cache stay)."""
        if self.pid() is not None:
            raise RuntimeError("stop the broker before purging its data")
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def status(self) -> tuple[bool, str]:
        pid = self.pid()
        if pid is None:
            return False, f"not running (jars {'cached' if self.jars_ready() else 'not fetched'})"
        meta = probe(self.kcfg.bootstrap, 2.0)
        if not meta:
            return False, f"pid {pid} alive but {self.kcfg.bootstrap} does not answer"
        return True, (
            f"Kafka {self.version} on {self.kcfg.bootstrap}, pid {pid}, "
            f"cluster {meta.get('cluster_id', '?')}"
        )
