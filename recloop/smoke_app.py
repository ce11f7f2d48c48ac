"""A minimal Serve application that proves the stack can serve HTTP: ``GET /ping``
answers with the replica and node that handled it. Used by ``recloop smoke``
(``recloop.smoke``) and the stack's integration tests; nothing of the recommender, so it
sits with the stack on the ground floor."""

from __future__ import annotations

import time

import ray
import requests
from ray import serve
from starlette.requests import Request

APP_NAME = "recloop-smoke"
ROUTE = "/ping"


@serve.deployment(ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=32)
class Ping:
    def __call__(self, request: Request) -> dict:
        ctx = serve.get_replica_context()
        return {
            "ok": True,
            "echo": request.query_params.get("echo", ""),
            "replica": ctx.replica_tag if hasattr(ctx, "replica_tag") else str(ctx.replica_id),
            "node_id": ray.get_runtime_context().get_node_id(),
        }


def deploy() -> None:
    """Deploy the app on the Ray cluster this driver is connected to."""
    serve.run(Ping.bind(), name=APP_NAME, route_prefix=ROUTE, blocking=False)


def delete() -> None:
    serve.delete(APP_NAME)


def ping(host: str, port: int, echo: str, timeout_s: float = 60.0) -> dict:
    """GET the app until it answers 200 (replicas take a few seconds to come up)."""
    url = f"http://{host}:{port}{ROUTE}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            resp = requests.get(url, params={"echo": echo}, timeout=5)
            if resp.status_code == 200:
                return resp.json()
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.5)
