"""Small helpers for the processes the local stack runs: pid files, ports, log tails."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import psutil


class PrerequisiteMissing(RuntimeError):
    """A tool the stack needs (java, mvn, the broker's jars) is not there.

    The message says what is missing and how to fix it."""


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# Where free_port looks: below Linux's ephemeral range (32768-60999, which the OS hands to
# every bind to port 0, Ray's gRPC servers included) and above Ray's worker ports
# (10002-19999). A port taken from the ephemeral range can be handed to another process
# between the pick and the broker's bind, which happens when two stacks start at once.
FREE_PORTS = (20000, 32767)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now, outside the ranges the OS and Ray hand out (for
    tests, benchmarks and ephemeral stacks)."""
    rng = random.Random(os.urandom(8))
    for _ in range(200):
        port = rng.randint(*FREE_PORTS)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {FREE_PORTS[0]}-{FREE_PORTS[1]} on {host}")


def read_pid(pid_file: Path, marker: str) -> int | None:
    """The pid in ``pid_file`` if that process is alive and its command line contains
    ``marker`` (guards against a recycled pid); otherwise None (stale files removed)."""
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        proc = psutil.Process(pid)
        alive = proc.status() != psutil.STATUS_ZOMBIE and marker in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        alive = False
    if not alive:
        pid_file.unlink(missing_ok=True)
        return None
    return pid


def spawn(
    argv: Sequence[str], log_file: Path, pid_file: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached from our process group, output appended to ``log_file``,
    and record its pid (the pid of the program itself, not of a shell)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    pid_file.write_text(f"{proc.pid}\n")
    return proc


def terminate(pid: int, timeout_s: float = 30.0, group: bool = True) -> bool:
    """SIGTERM the process (and its process group), SIGKILL after ``timeout_s``.

    Returns True when it stopped gracefully."""

    def _signal(sig: int) -> None:
        try:
            if group:
                os.killpg(os.getpgid(pid), sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    _signal(signal.SIGTERM)
    try:
        psutil.Process(pid).wait(timeout=timeout_s)
        return True
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        _signal(signal.SIGKILL)
        try:
            psutil.Process(pid).wait(timeout=10)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass
        return False


def processes_matching(marker: str) -> list[psutil.Process]:
    """Live processes other than this one whose command line contains ``marker``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            if marker in " ".join(proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def session_members(sid: int) -> list[psutil.Process]:
    """Live processes of the session ``sid`` (what a process started with
    ``start_new_session`` and everything it spawned, unless they left the session)."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) == sid:
                members.append(proc)
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            continue
    return members


def reap(procs: list[psutil.Process], timeout_s: float) -> None:
    """Wait for ``procs`` to exit; SIGKILL whatever is still alive after ``timeout_s``."""
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def log_tail(path: Path, lines: int = 20, since: int = 0) -> str:
    """The last ``lines`` of a log from byte ``since`` on (a log appended across runs:
    this run's part), after its first ERROR lines (a process that fails logs why once,
    then pages of shutdown)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(since)
            text = fh.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return f"(no log at {path})"
    if not text:
        return f"(nothing in {path} yet)"
    tail = text[-lines:]
    errors = [ln for ln in text[:-lines] if " ERROR " in ln or ln.startswith("ERROR")][:5]
    return "\n".join([*errors, "...", *tail] if errors else tail)
