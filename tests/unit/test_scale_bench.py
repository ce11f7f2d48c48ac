"""benchmarks.scale: its synthetic catalogues, its ratios, and one end-to-end sweep on a
tiny catalogue (both models trained and ranked in processes of their own)."""

from __future__ import annotations

import json

import pytest

from benchmarks import scale


def test_the_synthetic_catalogue_has_distinct_items_in_range_and_is_reproducible():
    ds = scale.dataset(num_items=300, users=40, per_user=12, seed=3)
    assert ds.num_items == 300 and ds.num_users == 40
    for seq in ds.sequences.values():
        assert len(seq) == 12 and len(set(seq)) == 12
        assert all(1 <= i <= 300 for i in seq)
    again = scale.dataset(num_items=300, users=40, per_user=12, seed=3)
    assert again.sequences == ds.sequences
    other = scale.dataset(num_items=300, users=40, per_user=12, seed=4)
    assert other.sequences != ds.sequences
    with pytest.raises(ValueError, match="catalogue of at least"):
        scale.dataset(num_items=10, users=2, per_user=8)


def test_ratios_are_onerec_over_sasrec_and_missing_runs_give_none():
    rows = [
        {
            "model": "onerec",
            "items": 100,
            "train_s": 30.0,
            "eval_s": 2.0,
            "peak_rss_mb": 900.0,
            "peak_above_imports_mb": 300.0,
        },
        {
            "model": "sasrec",
            "items": 100,
            "train_s": 10.0,
            "eval_s": 1.0,
            "peak_rss_mb": 600.0,
            "peak_above_imports_mb": 100.0,
        },
        {"model": "onerec", "items": 200, "timed_out": True},
        {
            "model": "sasrec",
            "items": 200,
            "train_s": 12.0,
            "eval_s": 1.0,
            "peak_rss_mb": 650.0,
            "peak_above_imports_mb": 120.0,
        },
    ]
    r = scale.ratios(rows)
    assert r["100"] == {
        "train_s": 3.0,
        "eval_s": 2.0,
        "peak_rss_mb": 1.5,
        "peak_above_imports_mb": 3.0,
    }
    assert set(r["200"].values()) == {None}


def test_a_tiny_sweep_trains_and_ranks_both_models(tmp_path):
    out = tmp_path / "scale.json"
    args = ["--sizes", "120", "--users", "60", "--per-user", "8", "--eval-users", "20"]
    assert scale.main([*args, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    runs = {r["model"]: r for r in res["runs"]}
    assert set(runs) == {"onerec", "onerec-disjoint", "sasrec"}
    # stride 1 (recloop eval's), and disjoint sessions: each interaction a target once
    assert runs["onerec"]["stride"] == 1 and runs["onerec-disjoint"]["stride"] == 5
    for r in runs.values():
        assert r["items"] == 120 and r["train_s"] > 0 and r["eval_users"] == 20
        assert r["peak_rss_mb"] >= r["imports_rss_mb"] > 0
        assert 0.0 <= r["ndcg@10"] <= 1.0
    assert runs["onerec"]["codebook_size"] >= 2
    assert res["onerec_over_sasrec"]["120"]["train_s"] > 0
    assert res["onerec_disjoint_over_sasrec"]["120"]["train_s"] > 0
