"""Small helpers for the processes the local stack runs: pid files, ports, log tails."""

from __future__ import annotations

import os
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


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now (for tests and ephemeral stacks)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no log at {path})"
