"""Security defaults on the real stack: every socket the stack opens listens on the
loopback interface, and with Ray's token authentication the admin path (the dashboard's
REST API that deploys, promotes and rolls back) refuses callers without the token."""

from __future__ import annotations

import shutil
import stat

import psutil
import pytest
import requests

from recloop.config import StackConfig
from recloop.ray_head import RayHead, auth_headers
from tests.conftest import isolated_config, short_home

pytestmark = pytest.mark.integration

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listening(pids: list[int]) -> list[tuple[int, str, int, str]]:
    out = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        out.append((p.pid, c.laddr.ip, c.laddr.port, p.name()))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    return out


def test_the_stacks_service_ports_listen_on_loopback_only(stack: StackConfig):
    """Kafka (broker and controller), the Ray dashboard (the admin REST API) and Serve's
    HTTP proxy listen on 127.0.0.1 only. Ray 2.60's own gRPC servers (the GCS, the Ray
    Client server, raylet, agents, workers) bind every interface or the machine's address
    whatever the node address (--node-ip-address=127.0.0.1 notwithstanding, and `ray start`
    cannot switch the client server off); they are listed, and Ray's token mode (below)
    is what guards them on a shared network."""
    from recloop.broker import KafkaBroker

    pids = [pid for pid in (RayHead(stack).pid(), KafkaBroker(stack).pid()) if pid]
    assert len(pids) == 2, "the session's stack runs a Ray head and a Kafka broker"
    sockets = _listening(pids)
    services = {
        stack.kafka.port: "kafka",
        stack.kafka.controller_port: "kafka controller",
        stack.ray.dashboard_port: "ray dashboard",
        stack.ray.serve_port: "serve http",
    }
    bound = {port: {ip for _, ip, p, _ in sockets if p == port} for port in services}
    for port, name in services.items():
        assert bound[port], f"{name} ({port}) is not listening"
        assert bound[port] <= LOOPBACK, f"{name} ({port}) listens on {bound[port]}"
    internal = sorted(
        {(name, ip) for _, ip, port, name in sockets if port not in services and ip not in LOOPBACK}
    )
    print(f"Ray-internal listeners beyond loopback: {internal}")


@pytest.mark.timeout(180)
def test_token_mode_refuses_admin_calls_without_the_token(monkeypatch):
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    home = short_home("tok")
    cfg = isolated_config(home, **{"ray.auth_mode": "token", "ray.num_cpus": 1})
    head = RayHead(cfg)
    try:
        head.start()
        token_file = cfg.home / "ray-auth-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600  # made for this head only
        api = f"http://{cfg.ray.host}:{cfg.ray.dashboard_port}/api/serve/applications/"
        config = {"applications": []}
        anonymous = requests.put(api, json=config, timeout=30)
        assert anonymous.status_code == 401, anonymous.text
        forged = requests.put(api, json=config, headers={"Authorization": "Bearer x"}, timeout=30)
        assert forged.status_code == 403, forged.text
        ok = requests.get(api, headers=auth_headers(cfg), timeout=30)
        assert ok.status_code == 200, ok.text
    finally:
        head.stop()
        shutil.rmtree(home, ignore_errors=True)
