"""``benchmarks.bias --workers N``: the worlds of a bias run as Ray tasks.

The Ray half runs in a process of its own, as ``recloop bias --workers 2`` would: a Ray
started inside the test process would stay its Ray (its auth token cached) for the
integration tests that follow, which connect to their stack's own head."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recloop.config import PROJECT_ROOT

pytestmark = pytest.mark.integration

# Two small worlds on the generated data the synthetic checkpoint was trained on: the
# truth (online alone) and a pooled A/B, 24 users, two steps, rounds of 6 sessions.
WORLDS = """
import argparse, json, sys
from pathlib import Path
import torch
from actors.sim.user_model import HiddenUserModel
from benchmarks.bias import assign, everyone, run_worlds
from recloop.data import synthetic

torch.set_num_threads(1)
checkpoint, workers = Path(sys.argv[1]), int(sys.argv[2])
data = synthetic(seed=0)
hidden = HiddenUserModel.fit(data, dim=8, epochs=2, seed=0)
ratings = data.ratings.sort_values(["user_id", "timestamp"], kind="mergesort")
hist = {int(u): [int(i) for i in g["item_id"]] for u, g in ratings.groupby("user_id")}
users = sorted(hist)[:24]
hist = {u: hist[u] for u in users}
jobs = [
    dict(seed=0, served_by=everyone(users, "online"), design="own-arm", label="truth"),
    dict(seed=0, served_by=assign(users, "pooled", 0, 0.5, ("online", "control")),
         design="pooled", label=None),
]
args = argparse.Namespace(steps=2, gap_h=6.0, chunk=8, min_sessions=6, workers=workers,
                          address=None)
out = run_worlds(jobs, args, {"online": {}, "control": {}}, hidden, hist, checkpoint, None)
print("WORLDS " + json.dumps([{str(u): v.tolist() for u, v in w.items()} for w in out]))
"""


def _worlds(checkpoint: Path, workers: int) -> list[dict[str, list[float]]]:
    proc = subprocess.run(
        [sys.executable, "-c", WORLDS, str(checkpoint), str(workers)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("WORLDS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("WORLDS ") :])


def test_worlds_as_ray_tasks_give_the_values_of_worlds_in_one_process(synthetic_checkpoint):
    """``--workers 2``: the worlds run as Ray tasks (the hidden model and the seed go as
    their files' bytes) and give each user the values the same worlds give in-process."""
    alone = _worlds(synthetic_checkpoint, 1)
    tasks = _worlds(synthetic_checkpoint, 2)
    assert len(alone) == len(tasks) == 2
    for one, other in zip(alone, tasks, strict=True):
        assert sorted(one) == sorted(other) and len(one) == 24
        for u in one:
            assert len(one[u]) == 2 and np.isfinite(one[u]).all()
            np.testing.assert_allclose(other[u], one[u], rtol=1e-9)
