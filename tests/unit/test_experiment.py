"""A/B experiment config: validation, stable hashed assignment, and the shipped YAML."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from pydantic import ValidationError

from recloop.experiment import (
    DEFAULT_EXPERIMENT_PATH,
    ArmSpec,
    Experiment,
    load_experiment,
)


def _exp(salt: str = "s1", shares: tuple[float, ...] = (0.5, 0.5), **kw) -> Experiment:
    names = ["control", "treatment", "third", "fourth"]
    arms = [{"name": names[i], "share": s} for i, s in enumerate(shares)]
    return Experiment(name="e", salt=salt, arms=arms, **kw)


def test_shares_must_sum_to_one_and_the_error_shows_the_sum():
    with pytest.raises(ValidationError, match="sum to 0.9"):
        _exp(shares=(0.5, 0.4))
    assert _exp(shares=(0.1, 0.2, 0.7)).shares() == {"control": 0.1, "treatment": 0.2, "third": 0.7}
    assert _exp(shares=(1 / 3, 1 / 3, 1 / 3)).shares()["third"] == pytest.approx(1 / 3)


def test_arms_are_validated():
    with pytest.raises(ValidationError, match="duplicated: a"):
        Experiment(name="e", salt="s", arms=[{"name": "a", "share": 0.5}] * 2)
    with pytest.raises(ValidationError):
        Experiment(name="e", salt="s", arms=[])
    with pytest.raises(ValidationError):
        Experiment(name="e", salt="", arms=[{"name": "a", "share": 1.0}])
    for bad in (
        {"name": "a", "share": 0.0},
        {"name": "a", "share": 1.5},
        {"name": "a", "share": float("nan")},
        {"name": "Bad Name", "share": 1.0},
        {"name": "a", "share": 1.0, "replicas": 0},
    ):
        with pytest.raises(ValidationError):
            ArmSpec(**bad)
    arm = ArmSpec(name="a", share=1.0)
    assert arm.lineage == "a" and arm.replicas == 1 and arm.description == ""
    assert ArmSpec(name="a", share=1.0, lineage="other").lineage == "other"
    # what can learn: a model, or a popularity arm whose counts follow the clicks
    assert ArmSpec(name="a", share=1.0, model="popularity", learning="online")
    for model, learning in (("random", "online"), ("popularity", "online-ipa")):
        with pytest.raises(ValidationError, match="cannot learn"):
            ArmSpec(name="a", share=1.0, model=model, learning=learning)


def test_extra_keys_are_refused_and_models_are_frozen():
    with pytest.raises(ValidationError, match="extra"):
        Experiment(name="e", salt="s", arms=[{"name": "a", "share": 1.0}], bogus=1)
    with pytest.raises(ValidationError, match="extra"):
        Experiment(name="e", salt="s", arms=[{"name": "a", "share": 1.0, "weight": 2}])
    exp = _exp()
    with pytest.raises(ValidationError):
        exp.salt = "other"  # type: ignore[misc]


def test_assignment_is_deterministic_and_stable():
    a, b = _exp(), _exp()
    users = list(range(500))
    first = [a.assign(u) for u in users]
    assert first == [a.assign(u) for u in users] == [b.assign(u) for u in users]
    assert [a.assign(str(u)) for u in users] == first  # "7" and 7 are the same user
    assert a.assign(np.int64(7)) == a.assign(7)
    assert set(first) == {"control", "treatment"}
    with pytest.raises(TypeError):
        a.assign(True)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        a.assign(1.5)  # type: ignore[arg-type]


def test_assignment_matches_the_documented_hash():
    import hashlib

    exp = _exp(salt="pin", shares=(0.3, 0.7))
    for user in (0, 1, 42, "alice"):
        h = hashlib.sha256(f"pin:{user}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        assert exp.assign(user) == ("control" if u < 0.3 else "treatment")


def test_assignment_is_roughly_proportional_to_shares():
    exp = _exp(shares=(0.2, 0.3, 0.5))
    n = 20_000
    counts = Counter(exp.assign(u) for u in range(n))
    for name, share in exp.shares().items():
        assert abs(counts[name] / n - share) < 0.02, (name, counts[name] / n, share)


def test_changing_the_salt_reshuffles_users():
    a, b = _exp(salt="one"), _exp(salt="two")
    users = range(2000)
    moved = sum(a.assign(u) != b.assign(u) for u in users) / 2000
    assert 0.4 < moved < 0.6  # independent 50/50 splits disagree about half the time


def test_arm_lookup():
    exp = _exp()
    assert exp.arm("treatment").share == 0.5
    with pytest.raises(ValueError, match="known arms: control, treatment"):
        exp.arm("nope")


def test_the_shipped_experiment_loads():
    exp = load_experiment(DEFAULT_EXPERIMENT_PATH)
    assert exp == load_experiment()
    assert exp.name == "seed-vs-online" and exp.salt == "recloop-ab-1"
    assert exp.shares() == {"control": 0.5, "treatment": 0.5}
    assert [a.lineage for a in exp.arms] == ["control", "treatment"]
    assert exp.arm("control").description == "seed model, not retrained"
    assert exp.arm("treatment").description == "continuously retrained and promoted"


def test_load_experiment_errors_name_the_file(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("experiment: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml.*not valid YAML"):
        load_experiment(bad_yaml)

    no_key = tmp_path / "nokey.yaml"
    no_key.write_text("name: x\n")
    with pytest.raises(ValueError, match="nokey.yaml.*top-level 'experiment:'"):
        load_experiment(no_key)

    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(
        "experiment:\n  name: x\n  salt: s\n  arms:\n"
        "    - {name: a, share: 0.6}\n    - {name: b, share: 0.6}\n"
    )
    with pytest.raises(ValueError, match=r"(?s)invalid.yaml: invalid experiment.*sum to 1.2"):
        load_experiment(invalid)

    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_experiment(tmp_path / "missing.yaml")


# --- cluster randomisation ---------------------------------------------------------------


def test_cluster_randomisation_gives_every_user_of_a_cluster_one_arm():
    clusters = {str(u): f"g{u % 40}" for u in range(2000)}  # 40 clusters of 50 users
    exp = _exp(shares=(0.5, 0.5), unit="cluster", clusters=clusters)
    arms_of: dict[str, set[str]] = {}
    for u in range(2000):
        arms_of.setdefault(clusters[str(u)], set()).add(exp.assign(u))
        assert exp.cluster_of(u) == f"cluster:{clusters[str(u)]}"
    assert all(len(a) == 1 for a in arms_of.values())
    sides = Counter(next(iter(a)) for a in arms_of.values())
    assert set(sides) == {"control", "treatment"}  # the clusters spread over both arms
    # a cluster hashes as one key, the same for the same salt everywhere
    import hashlib

    h = hashlib.sha256(b"s1:cluster:g7").digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    assert exp.assign(7) == ("control" if u < 0.5 else "treatment")
    # a user the map does not name is a cluster of their own (their own hash)
    assert exp.assign(99_999) == _exp().assign(99_999)
    assert exp.cluster_of(99_999) == "user:99999"
    assert "randomised by cluster (40 clusters" in exp.policy_statement()
    # users as the unit: assignments as before
    assert [_exp().assign(u) for u in range(50)] == [_exp(unit="user").assign(u) for u in range(50)]


def test_cluster_randomisation_needs_its_map_and_only_then(tmp_path):
    with pytest.raises(ValidationError, match="unit: cluster needs 'clusters'"):
        _exp(unit="cluster")
    with pytest.raises(ValidationError, match="only read with unit: cluster"):
        _exp(clusters={"1": "a"})
    spec = (
        "experiment:\n  name: x\n  salt: s\n  unit: cluster\n  clusters: {path}\n  arms:\n"
        "    - {{name: a, share: 0.5}}\n    - {{name: b, share: 0.5}}\n"
    )
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "c.json").write_text('{"1": "drama", "2": "drama", "3": 7}')
    ok = tmp_path / "ok.yaml"
    ok.write_text(spec.format(path="maps/c.json"))  # relative to the experiment file
    exp = load_experiment(ok)
    assert exp.clusters == {"1": "drama", "2": "drama", "3": "7"}
    assert exp.assign(1) == exp.assign(2)
    missing = tmp_path / "missing.yaml"
    missing.write_text(spec.format(path="nope.json"))
    with pytest.raises(FileNotFoundError, match="missing.yaml: clusters file .*nope.json"):
        load_experiment(missing)
    (tmp_path / "bad.json").write_text('["not", "a", "map"]')
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec.format(path="bad.json"))
    with pytest.raises(ValueError, match="a JSON object of user id -> cluster label"):
        load_experiment(bad)


def test_recloop_clusters_writes_each_users_plurality_genre(tmp_path):
    import json

    from pipelines.analysis.clusters import clusters_of, main
    from recloop.data import synthetic
    from recloop.experiment import genre_clusters

    data = synthetic(n_users=40, n_items=60, n_ratings=600, seed=1)
    got = clusters_of(data)
    assert sorted(got) == sorted(int(u) for u in data.ratings["user_id"].unique())
    genres = set(g for gs in data.items["genres"] for g in gs)
    assert set(got.values()) <= genres
    assert genre_clusters({1: [10, 11, 12]}, {10: ["b"], 11: ["a", "b"], 12: ["a"]}) == {1: "a"}
    assert genre_clusters({2: [99]}, {}) == {2: "-"}
    out = tmp_path / "c.json"
    cfg = tmp_path / "stack.yaml"
    cfg.write_text(f"home: {tmp_path / 'home'}\ndata:\n  synthetic: true\n")
    assert main(["--out", str(out), "--config", str(cfg)]) == 0
    written = json.loads(out.read_text())
    assert written and all(isinstance(v, str) for v in written.values())
