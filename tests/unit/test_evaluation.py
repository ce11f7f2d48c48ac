"""Evaluation protocol: dataset readers, leave-one-out split, metrics, full and sampled
ranking (history exclusion, pessimistic ties, seeded negatives)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.offline.datasets import (
    SequenceDataset,
    from_interaction_data,
    load_dataset,
    read_sasrec_text,
    read_table,
)
from pipelines.offline.evaluation import (
    Ranker,
    evaluate_full,
    evaluate_sampled,
    hr_at_k,
    leave_one_out,
    ndcg_at_k,
    rank_full,
    sample_negatives,
)
from recloop.data import synthetic


class TableRanker:
    """The same fixed score per item for every user."""

    def __init__(self, scores: list[float]):
        self.table = torch.tensor(scores, dtype=torch.float32)  # (N+1,)
        self.table[0] = float("-inf")

    def score(self, histories, candidates=None):
        full = self.table.expand(len(histories), -1).clone()  # (B, N+1)
        return full if candidates is None else full.gather(1, candidates)


class OracleRanker:
    """Knows each history's next item and scores it highest."""

    def __init__(self, histories, targets, num_items):
        self.next = {tuple(h): t for h, t in zip(histories, targets, strict=True)}
        self.num_items = num_items

    def score(self, histories, candidates=None):
        full = torch.zeros(len(histories), self.num_items + 1)
        full[:, 0] = float("-inf")
        for i, h in enumerate(histories):
            full[i, self.next[tuple(h)]] = 1.0
        return full if candidates is None else full.gather(1, candidates)


# ---------------------------------------------------------------- metrics


def test_metrics_match_hand_computed_values():
    ranks = [1, 3, 11]
    assert hr_at_k(ranks, 10) == pytest.approx(2 / 3)
    assert ndcg_at_k(ranks, 10) == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert ndcg_at_k(ranks, 10) == pytest.approx(0.5)
    assert hr_at_k(ranks, 1) == pytest.approx(1 / 3) and ndcg_at_k(ranks, 1) == pytest.approx(1 / 3)
    assert hr_at_k(ranks, 20) == 1.0
    assert ndcg_at_k(ranks, 20) == pytest.approx((1 + 0.5 + 1 / math.log2(12)) / 3)
    # The boundary is inclusive: rank k counts, rank k + 1 does not.
    assert ndcg_at_k([5], 5) == pytest.approx(1 / math.log2(6)) and ndcg_at_k([6], 5) == 0.0
    assert hr_at_k(np.array([5, 6]), 5) == 0.5


# ---------------------------------------------------------------- split


def _ds(sequences: dict[int, list[int]], num_items: int) -> SequenceDataset:
    return SequenceDataset(sequences, num_items, {i: i for i in range(1, num_items + 1)}, {}, "t")


def test_leave_one_out_holds_out_the_last_two_items():
    ds = _ds({1: [3, 1, 4, 1, 5], 2: [9, 2, 6], 3: [5, 3]}, num_items=9)
    s = leave_one_out(ds)
    assert s.users == [1, 2]  # user 3 has too few items to split
    assert s.train == [[3, 1, 4], [9]]
    assert s.val_histories == [[3, 1, 4], [9]] and s.val_targets == [1, 2]
    assert s.test_histories == [[3, 1, 4, 1], [9, 2]] and s.test_targets == [5, 6]
    assert s.num_items == 9


# ---------------------------------------------------------------- full ranking


def test_history_items_are_excluded_from_the_ranking():
    # Items 1 and 2 score highest but the user has seen them: target 3 is ranked first.
    ranker = TableRanker([0, 9, 8, 7, 6, 5])
    hist, tgt = [[1, 2]], [3]
    assert rank_full(ranker, hist, tgt).tolist() == [1]
    assert rank_full(ranker, hist, tgt, exclude_history=False).tolist() == [3]
    m = evaluate_full(ranker, hist, tgt, ks=(1,))
    assert m["HR@1"] == 1.0 and m["NDCG@1"] == 1.0 and m["users"] == 1


def test_an_item_in_the_history_is_never_ranked_first():
    # The ranker loves item 1; whatever the target, item 1 (seen) cannot take rank 1.
    ranker = TableRanker([0, 100, 1, 2, 3, 4])
    hist = [[1], [1, 5], [1, 4, 5]]
    tgt = [5, 4, 3]
    assert rank_full(ranker, hist, tgt).tolist() == [1, 1, 1]


def test_ties_are_broken_pessimistically():
    # A constant ranker: the target is ranked last among the items that compete.
    const = TableRanker([0.0] * 11)  # 10 items
    assert rank_full(const, [[1, 2]], [3]).tolist() == [8]  # 10 - 2 seen
    assert rank_full(const, [[1, 2]], [3], exclude_history=False).tolist() == [10]
    # One other item ties with the target, one beats it: rank 3, not 2.
    ranker = TableRanker([0, 5, 4, 4, 1])
    assert rank_full(ranker, [[]], [2]).tolist() == [3]
    assert rank_full(ranker, [[]], [3]).tolist() == [3]


def test_a_repeated_target_still_competes():
    ranker = TableRanker([0, 1, 2, 3])
    assert rank_full(ranker, [[3, 1]], [3]).tolist() == [1]
    assert rank_full(ranker, [[3, 1]], [1]).tolist() == [2]  # item 3 seen, item 2 not


def test_full_ranking_batches_agree_and_check_the_ranker_contract():
    ranker = TableRanker([0, 3, 1, 4, 1, 5, 9, 2, 6])
    hist = [[1], [2, 3], [], [8, 7, 6], [5]] * 3
    tgt = [2, 4, 1, 3, 8] * 3
    assert (rank_full(ranker, hist, tgt, batch_size=2) == rank_full(ranker, hist, tgt)).all()

    class Bad:
        def score(self, histories, candidates=None):
            return torch.zeros(len(histories) + 1, 5)

    with pytest.raises(ValueError, match="expected"):
        rank_full(Bad(), [[1]], [2])
    assert isinstance(ranker, Ranker)


# ---------------------------------------------------------------- sampled ranking


def test_sampled_negatives_avoid_history_and_target_and_are_seeded():
    rng = np.random.default_rng(0)
    hist = [rng.choice(np.arange(1, 301), size=n, replace=False).tolist() for n in (5, 50, 150)]
    tgt = [h.pop() for h in hist]
    a = sample_negatives(hist, tgt, num_items=300, num_negatives=100, seed=7)
    assert a.shape == (3, 100)
    for row, h, t in zip(a, hist, tgt, strict=True):
        assert len(set(row.tolist())) == 100  # distinct
        assert not set(row.tolist()) & (set(h) | {t})
        assert row.min() >= 1 and row.max() <= 300
    assert (a == sample_negatives(hist, tgt, 300, 100, seed=7)).all()
    assert not (a == sample_negatives(hist, tgt, 300, 100, seed=8)).all()
    with pytest.raises(ValueError, match="only"):
        sample_negatives([list(range(1, 250))], [250], num_items=300, num_negatives=100)


def test_sampled_evaluation_oracle_and_constant_ranker():
    hist = [[1, 2, 3], [4, 5], [6]]
    tgt = [4, 6, 7]
    oracle = OracleRanker(hist, tgt, num_items=200)
    m = evaluate_sampled(oracle, hist, tgt, num_negatives=100, seed=0)
    assert m["HR@10"] == 1.0 and m["NDCG@10"] == 1.0 and m["users"] == 3
    # Ties are pessimistic here too: a constant ranker puts the target at rank 101.
    const = TableRanker([0.0] * 201)
    m = evaluate_sampled(const, hist, tgt, num_negatives=100, seed=0)
    assert m["HR@10"] == 0.0
    assert evaluate_sampled(const, hist, tgt, num_negatives=8)["NDCG@10"] == pytest.approx(
        1 / math.log2(10)
    )
    full = evaluate_full(oracle, hist, tgt)
    assert full["HR@5"] == 1.0 and full["NDCG@20"] == 1.0


# ---------------------------------------------------------------- dataset readers

# (user, item, timestamp); ids are not contiguous; user 4 and user 7 tie at a timestamp.
EVENTS = [
    (4, 30, 100), (4, 12, 100), (4, 55, 90), (4, 7, 120), (4, 12, 130), (4, 99, 140),
    (7, 55, 10), (7, 30, 20), (7, 99, 20), (7, 7, 5), (7, 41, 40),
    (2, 41, 1), (2, 30, 2), (2, 12, 3), (2, 7, 4), (2, 55, 5), (2, 8, 6),
    (9, 8, 1), (9, 13, 2), (9, 77, 3),  # too few interactions: dropped
]  # fmt: skip
EXPECTED_SEQUENCES = {  # users 2, 4, 7 -> 1, 2, 3; items 7 8 12 30 41 55 99 -> 1..7
    1: [5, 4, 3, 1, 6, 2],
    2: [6, 3, 4, 1, 3, 7],  # ts 100 tie: item 12 before item 30
    3: [1, 6, 4, 7, 5],  # ts 20 tie: item 30 before item 99
}


def _write_all_formats(tmp_path):
    df = pd.DataFrame(EVENTS, columns=["user_id", "item_id", "timestamp"])
    shuffled = df.sample(frac=1.0, random_state=3).assign(rating=4)
    shuffled.to_csv(tmp_path / "events.csv", index=False)
    shuffled.to_parquet(tmp_path / "events.parquet", index=False)
    ordered = df.sort_values(["user_id", "timestamp", "item_id"])
    (tmp_path / "events.txt").write_text(
        "".join(f"{r.user_id} {r.item_id}\n" for r in ordered.itertuples())
    )
    ml = tmp_path / "ml"
    ml.mkdir()
    rows = shuffled[["user_id", "item_id", "timestamp"]].itertuples(index=False)
    (ml / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in rows))
    users = sorted(df.user_id.unique())
    (ml / "u.user").write_text("".join(f"{u}|30|M|other|12345\n" for u in users))
    (ml / "u.item").write_text(
        "".join(f"{i}|Item {i}|01-Jan-1995||http://x" + "|0" * 19 + "\n" for i in range(1, 100))
    )
    return tmp_path


def test_the_readers_give_the_same_dataset_for_the_same_interactions(tmp_path):
    _write_all_formats(tmp_path)
    paths = ["events.csv", "events.parquet", "events.txt", "ml"]
    # The files hold the events in different orders: ties by item id order them alike.
    got = [load_dataset(tmp_path / p, min_interactions=5, ties="item") for p in paths]
    assert [d.name for d in got] == ["events", "events", "events", "ml"]
    first = got[0]
    assert first.sequences == EXPECTED_SEQUENCES
    assert first.num_items == 7
    assert first.item_id_map == {7: 1, 8: 2, 12: 3, 30: 4, 41: 5, 55: 6, 99: 7}
    assert first.user_id_map == {2: 1, 4: 2, 7: 3}
    for other in got[1:]:
        # Times are the file's own (the SASRec text format's clock is its line number).
        assert {u: len(t) for u, t in other.timestamps.items()} == {
            u: len(s) for u, s in first.sequences.items()
        }
        assert dataclasses.replace(other, name=first.name, timestamps=first.timestamps) == first
    # With a lower threshold user 9 stays, and its items get ids too.
    low = read_table(tmp_path / "events.csv", min_interactions=1)
    assert low.num_users == 4 and low.num_items == 9 and low.sequences[4] == [2, 4, 8]


def test_same_timestamp_interactions_keep_the_files_order_by_default(tmp_path):
    # EVENTS lists user 4's tie at ts 100 as item 30 then 12: not the item-id order.
    df = pd.DataFrame(EVENTS, columns=["user_id", "item_id", "timestamp"])
    df.to_csv(tmp_path / "events.csv", index=False)
    ds = load_dataset(tmp_path / "events.csv", min_interactions=5)
    assert ds.sequences != EXPECTED_SEQUENCES
    for user, ts in {4: 100, 7: 20}.items():  # the tied pairs
        in_file = df[(df.user_id == user) & (df.timestamp == ts)].item_id
        u = ds.user_id_map[user]
        seq = [i for i, t in zip(ds.sequences[u], ds.timestamps[u], strict=True) if t == ts]
        assert seq == [ds.item_id_map[i] for i in in_file]
    # ... and the item-id order is there when asked for; anything else is refused.
    assert load_dataset(tmp_path / "events.csv", ties="item").sequences == EXPECTED_SEQUENCES
    with pytest.raises(ValueError, match="ties must be one of"):
        load_dataset(tmp_path / "events.csv", ties="random")


def test_missing_columns_and_unknown_formats_are_clear_errors(tmp_path):
    pd.DataFrame({"user_id": [1], "item": [2], "ts": [3]}).to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(ValueError, match="missing column.*item_id, timestamp"):
        read_table(tmp_path / "x.csv")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="unknown format"):
        load_dataset(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "nope.csv")
    (tmp_path / "few.txt").write_text("1 2\n1 3\n")
    with pytest.raises(ValueError, match="at least 5"):
        read_sasrec_text(tmp_path / "few.txt")


def test_generated_data_becomes_contiguous_sequences():
    data = synthetic(n_users=40, n_items=60, n_ratings=800, seed=2)
    ds = from_interaction_data(data, min_interactions=5)
    kept = data.ratings.groupby("user_id").size()
    kept = kept[kept >= 5]
    assert ds.num_users == len(kept) and ds.num_interactions == kept.sum()
    assert sorted(ds.sequences) == list(range(1, ds.num_users + 1))
    seen = {i for s in ds.sequences.values() for i in s}
    assert seen == set(range(1, ds.num_items + 1))
    # Each sequence is its user's ratings in time order.
    inv = {v: k for k, v in ds.item_id_map.items()}
    orig_user = {v: k for k, v in ds.user_id_map.items()}[1]
    r = data.ratings[data.ratings.user_id == orig_user].sort_values(["timestamp", "item_id"])
    assert [inv[i] for i in ds.sequences[1]] == r.item_id.tolist()


def test_beam_retrieval_counts_a_target_no_beam_proposes_as_a_miss():
    from types import SimpleNamespace

    import torch

    from pipelines.offline.ablations import beam_ranks
    from pipelines.offline.evaluation import hr_at_k

    class Fixed:  # two beams per request; first items 5 then 7
        def recommend(self, histories, beam_width):
            items = torch.tensor([[[5, 1], [7, 2]]] * len(histories))
            return SimpleNamespace(items=items)

    ranks = beam_ranks(Fixed(), [[1], [1], [1]], [5, 7, 9], beam=2)
    assert ranks[:2].tolist() == [1, 2]
    assert hr_at_k(ranks, 10) == 2 / 3  # target 9 is missed even at k > beam width


def test_model_names_with_variants_and_scorings():
    from pipelines.offline.evaluate import parse_model

    assert parse_model("sasrec") == ("sasrec", None)
    assert parse_model("onerec:cascade") == ("onerec", "cascade")
    assert parse_model("onerec@k1:infonce") == ("onerec", "infonce")
    for bad, why in (
        ("onerec:magic", "unknown scoring"),
        ("sasrec:cascade", "one scoring"),
        ("nope@x", "unknown model"),
        ("onerec@a b", "variant label"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_model(bad)


def test_scorings_of_a_variant_share_one_training_and_variants_get_their_options(tmp_path):
    from pipelines.offline.evaluate import run_compare

    base = {"dim": 16, "ffn_hidden": 32, "epochs": 1, "infonce_weight": 1.0}
    out = run_compare(
        ["onerec", "onerec:cascade", "onerec@b", "onerec@b:infonce"],
        "synthetic",
        options={"onerec": base, "onerec@b": {"bce_weight": 0.5}},
        log=None,
        out_json=tmp_path / "cmp.json",
    )
    import json

    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["complete"] is True and len(saved["results"]) == 4
    rows = {r["model"]: r for r in out["results"]}
    info = {m: r["train_info"]["config"]["model"] for m, r in rows.items()}
    assert info["onerec"]["bce_weight"] == 0.0 and info["onerec@b"]["bce_weight"] == 0.5
    assert info["onerec@b"]["dim"] == 16  # the base options reach the variant
    assert rows["onerec:cascade"]["train_seconds"] == rows["onerec"]["train_seconds"]
    assert rows["onerec@b:infonce"]["train_seconds"] == rows["onerec@b"]["train_seconds"]
    assert [rows[m]["scoring"] for m in rows] == ["sid", "cascade", "sid", "infonce"]


def test_paired_comparison_of_two_models_on_the_same_users(tmp_path):
    import json

    from pipelines.analysis.paired import compare, main, per_user

    ndcg = per_user([1, 3, 11], 10)["NDCG@10"]
    assert ndcg.tolist() == pytest.approx([1.0, 1 / math.log2(4), 0.0])
    result = {
        "results": [
            {"model": "a", "test_ranks": [1] * 50 + [20] * 50},
            {"model": "b", "test_ranks": [2] * 50 + [20] * 50},  # a is ahead on every user
            {"model": "old"},
        ]
    }
    out = compare(result, "a", "b", resamples=500)
    r = out["NDCG@10"]
    assert r["diff"] == pytest.approx(0.5 * (1 - 1 / math.log2(3)))
    assert r["ci95"][0] > 0 and r["p_a_ahead"] == 1.0 and r["users"] == 100
    assert out["HR@10"]["diff"] == 0.0
    with pytest.raises(ValueError, match="no test_ranks"):
        compare(result, "a", "old")
    with pytest.raises(ValueError, match="not in the result"):
        compare(result, "a", "zzz")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    assert main([str(path), "a", "b", "--resamples", "200"]) == 0
    assert main([str(path), "a", "zzz"]) == 2
