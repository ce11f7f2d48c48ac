"""Data loaders: generated data is deterministic and MovieLens-shaped."""

from __future__ import annotations

import pandas as pd
import pytest

from recloop.config import DataConfig
from recloop.data import load, load_movielens, synthetic


def test_synthetic_data_is_deterministic_under_a_seed():
    a, b, c = synthetic(seed=3), synthetic(seed=3), synthetic(seed=4)
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    assert not a.ratings.equals(c.ratings)


def test_synthetic_data_has_movielens_shape_and_planted_taste():
    d = synthetic(n_users=50, n_items=80, n_ratings=1000, seed=1)
    assert len(d.users) == 50 and len(d.items) == 80
    assert d.ratings["user_id"].between(1, 50).all()
    assert d.ratings["item_id"].between(1, 80).all()
    assert d.ratings["rating"].between(1, 5).all()
    assert not d.ratings.duplicated(["user_id", "item_id"]).any()
    assert (d.ratings.groupby("user_id").size() >= 1).all()
    # Planted structure: a user rates their most-watched genre higher than the rest.
    genre_of = {r.item_id: r.genres[0] for r in d.items.itertuples()}
    r = d.ratings.assign(genre=d.ratings["item_id"].map(genre_of))
    top = r.groupby("user_id")["genre"].agg(lambda s: s.value_counts().index[0])
    r["top"] = r["genre"] == r["user_id"].map(top)
    assert r[r["top"]]["rating"].mean() > r[~r["top"]]["rating"].mean() + 0.3


def test_missing_movielens_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="MovieLens-100k not found"):
        load_movielens(tmp_path)


def test_load_falls_back_to_generated_data_when_movielens_is_absent(tmp_path):
    d = load(
        DataConfig(
            movielens_dir=tmp_path, synthetic_users=20, synthetic_items=40, synthetic_ratings=200
        )
    )
    assert d.source.startswith("synthetic") and len(d.users) == 20


def test_movielens_is_read_in_place_when_present():
    cfg = DataConfig()
    if cfg.use_synthetic:
        pytest.skip(f"MovieLens-100k not at {cfg.movielens_dir}")
    d = load_movielens(cfg.movielens_dir)
    assert (len(d.users), len(d.items), len(d.ratings)) == (943, 1682, 100_000)
    assert set(d.users.columns) >= {"user_id", "age", "gender", "occupation"}
    assert d.items.loc[d.items.item_id == 1, "genres"].iloc[0] == [
        "Animation",
        "Children's",
        "Comedy",
    ]
