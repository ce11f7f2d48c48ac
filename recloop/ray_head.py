"""The local Ray head of the stack.

Run as ``ray start --head --block`` in its own session: on SIGTERM that command stops
every process it started (GCS, raylet, dashboard, workers), so ``stop`` ends exactly this
head and never a Ray the user runs elsewhere on the machine.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from recloop.config import ConfigError, StackConfig
from recloop.procs import (
    log_tail,
    port_open,
    processes_matching,
    read_pid,
    reap,
    session_members,
    spawn,
    terminate,
)

READY_LINE = "Ray runtime started"
NAMESPACE = "recloop"


def ingestor_actor_name(i: int) -> str:
    """The Ray name of the stack's ``i``-th ingestor actor (``actors.ingestor`` starts it,
    the monitor looks it up); the DPO sampler's is ``serve.dpo_actor``."""
    return f"ingestor-{i}"


def auth_token_path(cfg: StackConfig) -> Path:
    """Where the token of Ray's token authentication is read (RAY_AUTH_TOKEN_PATH wins)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or cfg.home / "ray-auth-token")


def auth_env(cfg: StackConfig) -> None:
    """Put the stack's Ray auth mode in this process's environment (children inherit).

    In ``token`` mode every client of the cluster (drivers, ``ray`` CLI, the dashboard's
    REST API that deploys, promotes and rolls back) must present the cluster's token. A
    head recloop starts gets a fresh random token in ``<home>/ray-auth-token`` (mode
    0600) unless ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` gives one."""
    os.environ.setdefault("RAY_AUTH_MODE", cfg.ray.auth_mode)
    if os.environ["RAY_AUTH_MODE"] != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = auth_token_path(cfg)
    if not path.exists() and cfg.ray.provisioned:
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(path))


def auth_headers(cfg: StackConfig) -> dict[str, str]:
    """HTTP headers for the dashboard's REST API: the bearer token in ``token`` mode."""
    auth_env(cfg)
    if os.environ["RAY_AUTH_MODE"] != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = auth_token_path(cfg)
        if not path.exists():
            raise ConfigError(
                f"ray.auth_mode is 'token' but there is no token: set RAY_AUTH_TOKEN, or "
                f"RAY_AUTH_TOKEN_PATH to the cluster's token file (looked at {path})"
            )
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def connect(cfg: StackConfig) -> None:
    """Connect this process as a driver to the stack's Ray (local head or cluster)."""
    import ray

    auth_env(cfg)
    if not ray.is_initialized():
        ray.init(address=cfg.ray.gcs_address, namespace=NAMESPACE, log_to_driver=False)


class RayHead:
    def __init__(self, cfg: StackConfig) -> None:
        if not cfg.ray.provisioned:
            raise ConfigError("ray.address is set: recloop does not start a Ray head")
        self.cfg = cfg
        self.rcfg = cfg.ray
        # Ray's socket paths must stay under ~107 characters: keep the temp dir short.
        self.temp_dir = cfg.home / "ray"
        self.pid_file = cfg.run_dir / "ray.pid"
        self.log_file = cfg.logs_dir / "ray-head.log"

    @property
    def marker(self) -> str:
        return str(self.temp_dir)

    def pid(self) -> int | None:
        return read_pid(self.pid_file, self.marker)

    def _ray_cli(self) -> str:
        exe = Path(sys.executable).parent / "ray"
        return str(exe) if exe.exists() else (shutil.which("ray") or "ray")

    def start(self, progress: Callable[[str], None] = lambda _: None) -> str:
        pid = self.pid()
        if pid is not None:
            return f"already running (pid {pid})"
        r = self.rcfg
        for port in (r.port, r.dashboard_port, r.client_port, r.agent_listen_port):
            if port_open(r.host, port):
                raise ConfigError(
                    f"{r.host}:{port} is taken by another process; stop it or set "
                    "ray.port / ray.dashboard_port / ray.client_port / ray.agent_listen_port"
                )
        if len(str(self.temp_dir)) > 60:
            raise ConfigError(
                f"Ray's temp dir {self.temp_dir} is too long for its Unix sockets; "
                "use a shorter home (RECLOOP_HOME)"
            )
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        num_cpus = r.num_cpus or os.cpu_count() or 1
        argv = [
            self._ray_cli(),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={r.host}",
            f"--port={r.port}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={r.object_store_mb * 1024 * 1024}",
            f"--temp-dir={self.temp_dir}",
            "--include-dashboard=true",
            f"--dashboard-host={r.host}",
            f"--dashboard-port={r.dashboard_port}",
            f"--ray-client-server-port={r.client_port}",
            f"--dashboard-agent-listen-port={r.agent_listen_port}",
            "--disable-usage-stats",
        ]
        auth_env(self.cfg)
        env = dict(os.environ)
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # On SIGTERM Ray drains the node for up to 30 s so Serve can move replicas to
        # other nodes; a single local head has none, so it stops at once.
        env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
        # Ray starts every worker process (actors, Serve replicas) at nice 15; the serving
        # replicas should run at normal priority and background work below them
        # (priority.background_nice), so workers start at ray.worker_niceness.
        env["RAY_worker_niceness"] = str(r.worker_niceness)
        # Idle task workers live on between training rounds (see ray.idle_worker_keep_s).
        env["RAY_idle_worker_killing_time_threshold_ms"] = str(int(r.idle_worker_keep_s * 1000))
        # The log file is appended across runs; readiness is judged on new lines only.
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        started = time.monotonic()
        proc = spawn(argv, self.log_file, self.pid_file, env=env)
        progress(f"starting a Ray head on {r.host}:{r.port} with {num_cpus} CPUs (pid {proc.pid})")
        deadline = started + r.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise RuntimeError(
                    f"the Ray head exited during start (code {proc.returncode}); last lines of "
                    f"{self.log_file}:\n{log_tail(self.log_file, since=offset)}"
                )
            with open(self.log_file, "rb") as fh:
                fh.seek(offset)
                if READY_LINE.encode() in fh.read() and port_open(r.host, r.port):
                    return f"started (pid {proc.pid}) in {time.monotonic() - started:.1f} s"
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"Ray did not start within {r.start_timeout_s} s; see {self.log_file}")

    def stop(self) -> str:
        pid = self.pid()
        if pid is None and not processes_matching(self.marker):
            return "not running"
        graceful = True
        if pid is not None:
            # Only `ray start --block` itself: it stops its children in order. Then wait
            # for the rest of its session (dashboard forkservers linger a few seconds).
            graceful = terminate(pid, timeout_s=30.0, group=False)
            reap(session_members(pid), timeout_s=10.0)
        # Anything of this head still alive outside that session goes now.
        reap(processes_matching(self.marker), timeout_s=5.0)
        self.pid_file.unlink(missing_ok=True)
        return "stopped" if graceful else "killed (did not stop within 30 s)"

    def status(self) -> tuple[bool, str]:
        pid = self.pid()
        r = self.rcfg
        if pid is None:
            return False, "not running"
        if not port_open(r.host, r.port):
            return False, f"pid {pid} alive but GCS {r.gcs_address} does not answer"
        serve = "Serve HTTP up" if port_open(r.host, r.serve_port) else "Serve HTTP down"
        return True, (
            f"head on {r.gcs_address}, pid {pid}, dashboard http://{r.host}:{r.dashboard_port}, "
            f"{serve} on port {r.serve_port}"
        )
