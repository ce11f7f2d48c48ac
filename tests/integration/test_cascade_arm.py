"""A/B arms re-ranking their beams on the real stack (Ray Serve over HTTP, Kafka, the
registry): one by cascade (OnePiece's contrastive head), one by the hybrid (the encoder's
next-item head), beside a beam arm on the same checkpoint; all log their sessions."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from recloop.config import StackConfig
from tests.conftest import experiment_service, logged_impressions, quick_checkpoint

pytestmark = pytest.mark.integration

EXPERIMENT = """\
experiment:
  name: beam-vs-cascade
  salt: cascade-test
  arms:
    - name: beam
      share: 0.34
    - name: cascade
      share: 0.33
      scoring: cascade
      cascade_weight: 1.0
    - name: hybrid
      share: 0.33
      scoring: hybrid
"""


@pytest.fixture(scope="module")
def head_checkpoint(tmp_path_factory) -> Path:
    """A quick seed checkpoint trained with the contrastive head."""
    out = tmp_path_factory.mktemp("ckpt-head") / "seed"
    return quick_checkpoint(out, 0, "--infonce-weight", "1", "--bce-weight", "0.1")


@pytest.fixture(scope="module")
def cascade_service(ray_driver: StackConfig, head_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    with experiment_service(ray_driver, root, EXPERIMENT, head_checkpoint) as service:
        yield service


def test_a_cascade_arm_serves_sessions_and_logs_them(cascade_service):
    from recloop.experiment import load_experiment

    cfg, base = cascade_service
    exp = load_experiment(cfg.serve.experiment)
    users = [u for u in range(5000, 5200) if exp.assign(u) == "cascade"][:10]
    hybrid_users = [u for u in range(5000, 5200) if exp.assign(u) == "hybrid"][:10]
    beam_users = [u for u in range(5000, 5200) if exp.assign(u) == "beam"][:5]
    served = {}
    for user in users + hybrid_users + beam_users:
        r = requests.post(f"{base}/recommend", json={"user_id": user}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        served[body["request_id"]] = body
    cascade = [b for b in served.values() if b["arm"] == "cascade"]
    hybrid = [b for b in served.values() if b["arm"] == "hybrid"]
    assert len(cascade) == len(users) and len(hybrid) == len(hybrid_users)
    for body in cascade + hybrid:
        items = [i["item_id"] for i in body["items"]]
        assert len(items) == 5 and len(set(items)) == 5  # a whole session, no repeats
    arms = {a["arm"]: a for a in requests.get(f"{base}/arms", timeout=10).json()}
    assert arms["cascade"]["scoring"] == "cascade"
    assert [r["scoring"] for r in arms["cascade"]["replicas"]] == ["cascade"]
    assert [r["scoring"] for r in arms["beam"]["replicas"]] == ["beam"]
    assert [r["scoring"] for r in arms["hybrid"]["replicas"]] == ["hybrid"]

    found = logged_impressions(cfg, served)
    assert set(found) == set(served)
    for rid, ev in found.items():
        assert ev.arm == served[rid]["arm"]
        assert [i.item_id for i in ev.items] == [i["item_id"] for i in served[rid]["items"]]
