"""The offline loop bench's own logic: its arm specs and its paired lifts (the loop itself
runs the real rounds, tested in test_continuous)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.loop_offline import across, paired, parse_arm


def test_an_arm_spec_overrides_train_settings_with_typed_values():
    assert parse_arm("slow:lr=1e-4,epochs=2,reward_weighting=none") == (
        "slow",
        {"train.lr": 1e-4, "train.epochs": 2, "train.reward_weighting": "none"},
    )
    assert parse_arm("same") == ("same", {})
    for bad in ("control:lr=1", "popularity", ":lr=1", "x:lr"):
        with pytest.raises(ValueError, match="--arm"):
            parse_arm(bad)


def test_paired_lift_and_its_standard_error_over_users():
    base = np.array([10.0, 20.0, 30.0, 40.0])
    lift, se = paired(base * 1.1, base)
    assert lift == pytest.approx(0.1)
    d = base * 0.1
    assert se == pytest.approx(d.std(ddof=1) / 2 / base.mean())
    runs = [
        {"summary": {"a": {"x": 0.1}, "b": {"x": -0.2}}},
        {"summary": {"a": {"x": 0.3}, "b": {"x": 0.0}}},
    ]
    assert across(runs, "x") == {
        "a": {"runs": [0.1, 0.3], "mean": 0.2, "min": 0.1},
        "b": {"runs": [-0.2, 0.0], "mean": -0.1, "min": -0.2},
    }
