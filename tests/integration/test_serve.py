"""Ray Serve on the stack's head answers over real HTTP."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_a_trivial_deployment_answers_over_http_on_the_stack_head(ray_driver):
    import ray

    from recloop import smoke_app as smoke

    assert ray.get_runtime_context().gcs_address.endswith(f":{ray_driver.ray.port}")
    smoke.deploy()
    try:
        body = smoke.ping(ray_driver.ray.host, ray_driver.ray.serve_port, echo="ping-42")
        assert body["ok"] is True and body["echo"] == "ping-42"
        head_node = ray.get_runtime_context().get_node_id()
        assert body["node_id"] == head_node
    finally:
        smoke.delete()
