"""``benchmarks.bias --workers N``: the worlds of a bias run as Ray tasks."""

from __future__ import annotations

import pytest

from benchmarks.bias import assign, everyone


@pytest.mark.integration
def test_worlds_as_ray_tasks_give_the_values_of_worlds_in_one_process(synthetic_checkpoint):
    """``--workers 2``: the worlds run as Ray tasks (the hidden model and the seed go as
    their files' bytes) and give each user the values the same worlds give in-process."""
    import argparse

    import numpy as np

    from actors.sim.user_model import HiddenUserModel
    from benchmarks.bias import run_worlds
    from recloop.data import synthetic

    data = synthetic(seed=0)  # what the synthetic checkpoint was trained on
    hidden = HiddenUserModel.fit(data, dim=8, epochs=2, seed=0)
    ratings = data.ratings.sort_values(["user_id", "timestamp"], kind="mergesort")
    hist = {int(u): [int(i) for i in g["item_id"]] for u, g in ratings.groupby("user_id")}
    users = sorted(hist)[:24]
    hist = {u: hist[u] for u in users}
    jobs = [
        dict(seed=0, served_by=everyone(users, "online"), design="own-arm", label="truth"),
        dict(seed=0, served_by=assign(users, "pooled", 0, 0.5, ("online", "control")),
             design="pooled", label=None),
    ]  # fmt: skip
    specs: dict[str, dict] = {"online": {}, "control": {}}
    args = argparse.Namespace(steps=2, gap_h=6.0, chunk=8, min_sessions=6, workers=1, address=None)
    alone = run_worlds(jobs, args, specs, hidden, hist, synthetic_checkpoint, None)
    args.workers = 2
    tasks = run_worlds(jobs, args, specs, hidden, hist, synthetic_checkpoint, None)
    assert len(alone) == len(tasks) == 2
    for one, other in zip(alone, tasks, strict=True):
        assert sorted(one) == sorted(other) == users
        for u in users:
            np.testing.assert_allclose(other[u], one[u], rtol=1e-9)
        assert all(one[u].shape == (2,) and np.isfinite(one[u]).all() for u in users)
