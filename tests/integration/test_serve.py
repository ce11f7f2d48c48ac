"""Ray Serve on the stack's head answers over real HTTP."""

from __future__ import annotations

import time

import pytest
import requests

pytestmark = pytest.mark.integration


def test_a_trivial_deployment_answers_over_http_on_the_stack_head(ray_driver):
    import ray

    from serving import smoke

    assert ray.get_runtime_context().gcs_address.endswith(f":{ray_driver.ray.port}")
    smoke.deploy()
    try:
        url = f"http://{ray_driver.ray.host}:{ray_driver.ray.serve_port}{smoke.ROUTE}"
        deadline = time.monotonic() + 60
        while True:
            try:
                resp = requests.get(url, params={"echo": "ping-42"}, timeout=5)
                if resp.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.5)
        body = resp.json()
        assert body["ok"] is True and body["echo"] == "ping-42"
        head_node = ray.get_runtime_context().get_node_id()
        assert body["node_id"] == head_node
    finally:
        smoke.delete()
