"""The A/B designs of the symbiosis-bias benchmark (``benchmarks/bias.py``): who each
design routes where, what each learning arm's lake receives, and the weights."""

from __future__ import annotations

import json

import pytest

from benchmarks.bias import (
    DESIGNS,
    POLICY,
    assign,
    everyone,
    interval,
    main,
    summarise,
    training_rows,
)
from recloop.examples import DATA_POLICIES
from recloop.experiment import genre_clusters

USERS = list(range(1, 201))


def _rows(arm: str, users: list[int]) -> list[dict]:
    return [
        {"event_id": f"{arm}-{u}", "request_id": f"{arm}-{u}", "user_id": u, "arm": arm}
        for u in users
    ]


def test_the_truths_runs_route_every_user_to_one_arm():
    assert everyone(USERS, "online") == dict.fromkeys(USERS, "online")
    assert set(everyone(USERS, "control").values()) == {"control"}


@pytest.mark.parametrize("design", ["own-arm", "pooled", "weighted"])
def test_user_randomised_designs_give_arm_a_its_share_by_seed(design):
    one = assign(USERS, design, 3, 0.25, ("a", "b"))
    assert sorted(one) == USERS and set(one.values()) == {"a", "b"}
    assert sum(v == "a" for v in one.values()) == 50
    assert assign(USERS, design, 3, 0.25, ("a", "b")) == one  # deterministic by seed
    assert assign(USERS, design, 4, 0.25, ("a", "b")) != one
    # The same users and seed give every user-randomised design the same split: the
    # designs differ only in what the arms learn from.
    assert one == assign(USERS, "own-arm", 3, 0.25, ("a", "b"))


def test_the_cluster_design_keeps_each_cluster_on_one_side():
    clusters = {u: f"g{u % 7}" for u in USERS}
    got = assign(USERS, "cluster", 1, 0.3, ("a", "b"), clusters)
    by_cluster: dict[str, set[str]] = {}
    for u, arm in got.items():
        by_cluster.setdefault(clusters[u], set()).add(arm)
    assert all(len(sides) == 1 for sides in by_cluster.values())
    n_a = sum(v == "a" for v in got.values())
    assert 0 < n_a < len(USERS) and abs(n_a - 60) <= 29  # within one cluster of the share
    with pytest.raises(ValueError, match="needs each user's cluster"):
        assign(USERS, "cluster", 1, 0.3, ("a", "b"))
    with pytest.raises(ValueError, match="unknown design"):
        assign(USERS, "switchback", 1, 0.3, ("a", "b"))
    with pytest.raises(ValueError, match="share must be within"):
        assign(USERS, "pooled", 1, 1.0, ("a", "b"))


def test_each_design_feeds_each_lake_exactly_the_data_it_promises():
    rows = {"a": _rows("a", [1, 2]), "b": _rows("b", [3, 4, 5, 6, 7, 8])}
    for design in ("own-arm", "cluster"):  # only the arm's own users' sessions
        assert training_rows(rows, design, "a") == rows["a"]
        assert training_rows(rows, design, "b") == rows["b"]
    pooled = training_rows(rows, "pooled", "a")
    assert pooled == rows["a"] + rows["b"] == training_rows(rows, "pooled", "b")
    assert training_rows(rows, "weighted", "a") == pooled  # weighed in the rounds
    assert {POLICY[d] for d in DESIGNS} <= set(DATA_POLICIES)
    assert set(DESIGNS) == {"own-arm", "pooled", "weighted", "cluster"}


def test_a_users_cluster_is_the_genre_its_history_holds_most():
    genres = {1: ["Drama"], 2: ["Comedy"], 3: ["Comedy", "Drama"], 4: []}
    got = genre_clusters({10: [1, 1, 3], 11: [2, 3], 12: [1, 2], 13: [4], 14: []}, genres)
    assert got == {10: "Drama", 11: "Comedy", 12: "Comedy", 13: "-", 14: "-"}


def test_the_summary_reports_bias_against_the_truth_with_its_interval(tmp_path):
    runs = {
        "pooled": [
            {"estimate": {"all": e}, "truth": {"all": t}}
            for e, t in [(0.12, 0.05), (0.10, 0.04), (0.14, 0.06), (0.11, 0.05), (0.13, 0.05)]
        ],
        "own-arm": [
            {"estimate": {"all": e}, "truth": {"all": t}}
            for e, t in [(0.06, 0.05), (0.03, 0.04), (0.07, 0.06), (0.04, 0.05), (0.05, 0.05)]
        ],
    }
    s = summarise(runs, "all")
    assert s["pooled"]["bias"]["mean"] == pytest.approx(0.07)
    assert s["pooled"]["bias"]["lo"] > 0 and not s["pooled"]["unbiased"]
    assert s["own-arm"]["bias"]["lo"] < 0 < s["own-arm"]["bias"]["hi"]
    assert s["own-arm"]["unbiased"]
    assert s["pooled"]["rmse"] > s["own-arm"]["rmse"]
    ci = interval([1.0, 1.0])
    assert ci["mean"] == 1.0 and ci["lo"] == ci["hi"] == 1.0
    # The figure is drawn from the result alone (--plot re-draws it from the JSON).
    result = {"designs": s, "runs": runs, "arms": {"a": "online", "b": "control"},
              "share": 0.25, "users": 10, "seeds": [0, 1, 2, 3, 4]}  # fmt: skip
    path = tmp_path / "bias.json"
    path.write_text(json.dumps(result))
    assert main(["--plot", str(path)]) == 0
    png = path.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def _run_file(tmp_path, arms: str) -> object:
    path = tmp_path / "run.yaml"
    path.write_text(f"experiment:\n  name: bias-test\n  salt: s\n  arms:\n{arms}")
    return path


def test_a_run_files_two_arms_are_what_the_bias_run_compares(tmp_path):
    """``recloop bias --run FILE``: A is the first arm, B the second, A's share the run
    file's, and whether each learns is its ``learning``; what the offline loop cannot run
    is refused with the reason."""
    from benchmarks.bias import run_arms

    two = _run_file(
        tmp_path,
        "    - {name: frozen, share: 0.2, learning: frozen}\n"
        "    - {name: learner, share: 0.8, learning: online}\n",
    )
    assert run_arms(two) == (("frozen", "learner"), 0.2, {"frozen": False, "learner": True})
    refused = {
        "two arms, not 3": "    - {name: a, share: 0.5, learning: online}\n"
        "    - {name: b, share: 0.25}\n    - {name: c, share: 0.25}\n",
        "seed-model arms with beam scoring": "    - {name: a, share: 0.5, learning: online}\n"
        "    - {name: pop, share: 0.5, model: popularity, learning: online}\n",
        "no arm learns": "    - {name: a, share: 0.5}\n    - {name: b, share: 0.5}\n",
    }
    for reason, arms in refused.items():
        with pytest.raises(SystemExit, match=reason):
            run_arms(_run_file(tmp_path, arms))
