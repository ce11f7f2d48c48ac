"""Interaction logs as per-user item sequences, the input of sequential recommenders.

Three on-disk formats give the same ``SequenceDataset`` for the same interactions:

- a MovieLens-100k folder (``u.data``, via ``recloop.data.load_movielens``);
- a CSV or Parquet table with columns ``user_id, item_id, timestamp`` (others ignored);
- the SASRec text format: one ``user item`` pair per line, already in time order.

Every reader orders a user's interactions by timestamp, drops users with fewer than
``min_interactions`` and then maps ids to contiguous integers (items 1..N, 0 is padding;
users 1..U) in the order of their original ids. Interactions with the same timestamp
keep the file's order (``ties="file"``, a stable sort, as SASRec's own preprocessing
does) or are ordered by item id (``ties="item"``). The difference matters: MovieLens
users rate in bursts (44% of ML-100k's last two interactions share a second), and an
item-id order inside a burst is a pattern that a model with item-id embeddings learns
and that says nothing about behaviour.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recloop.data import InteractionData, load_movielens, synthetic

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")
TIES = ("file", "item")  # how interactions with the same timestamp are ordered
TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
TEXT_SUFFIXES = {".txt"}


@dataclass(frozen=True)
class SequenceDataset:
    """sequences: contiguous user id -> contiguous item ids (1..num_items), oldest first.
    item_id_map / user_id_map: original id -> contiguous id. timestamps: per user, the
    time of each interaction (aligned with ``sequences``), when the source has them."""

    sequences: dict[int, list[int]]
    num_items: int
    item_id_map: dict[Any, int]
    user_id_map: dict[Any, int]
    name: str
    timestamps: dict[int, list[int]] | None = None

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences.values())

    def summary(self) -> str:
        return (
            f"{self.name}: {self.num_users} users, {self.num_items} items, "
            f"{self.num_interactions} interactions"
        )


def from_frame(
    df: pd.DataFrame, name: str, min_interactions: int = 5, ties: str = "file"
) -> SequenceDataset:
    """Build a dataset from a frame with ``user_id, item_id, timestamp`` (others ignored),
    its rows in the file's order."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {', '.join(TIES)}, got {ties!r}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{name}: missing column(s) {', '.join(missing)}; need {', '.join(REQUIRED_COLUMNS)} "
            f"(found {', '.join(map(str, df.columns))})"
        )
    df = df[list(REQUIRED_COLUMNS)]
    if df.isna().any().any():
        raise ValueError(f"{name}: null values in {', '.join(REQUIRED_COLUMNS)}")
    # A stable sort on (user, time): ties keep the file's order, or go by item id.
    keys = ["user_id", "timestamp"] + (["item_id"] if ties == "item" else [])
    df = df.sort_values(keys, kind="mergesort")
    counts = df.groupby("user_id", sort=False)["item_id"].transform("size")
    df = df[counts >= min_interactions]
    if df.empty:
        raise ValueError(f"{name}: no user has at least {min_interactions} interactions")

    items = np.sort(df["item_id"].unique())
    users = np.sort(df["user_id"].unique())
    item_codes = np.searchsorted(items, df["item_id"].to_numpy()) + 1
    user_codes = np.searchsorted(users, df["user_id"].to_numpy()) + 1
    # Rows are grouped by user (sorted above), so each user is one contiguous slice.
    bounds = np.flatnonzero(np.diff(user_codes)) + 1
    user_chunks = np.split(user_codes, bounds)
    sequences = {
        int(u[0]): chunk.tolist()
        for u, chunk in zip(user_chunks, np.split(item_codes, bounds), strict=True)
    }
    times = np.split(df["timestamp"].to_numpy(), bounds)
    return SequenceDataset(
        sequences=sequences,
        num_items=len(items),
        item_id_map={k: i + 1 for i, k in enumerate(items.tolist())},
        user_id_map={k: i + 1 for i, k in enumerate(users.tolist())},
        name=name,
        timestamps={int(u[0]): t.tolist() for u, t in zip(user_chunks, times, strict=True)},
    )


def from_interaction_data(
    data: InteractionData, min_interactions: int = 5, name: str | None = None, ties: str = "file"
) -> SequenceDataset:
    """Every rating is one interaction (implicit feedback), whatever its value."""
    return from_frame(data.ratings, name or data.source, min_interactions, ties)


def read_movielens(
    path: str | Path, min_interactions: int = 5, name: str | None = None, ties: str = "file"
) -> SequenceDataset:
    """A MovieLens-100k folder, read in place (``u.data``'s line order breaks ties)."""
    data = load_movielens(path)
    return from_interaction_data(data, min_interactions, name or Path(path).name, ties)


def read_table(
    path: str | Path, min_interactions: int = 5, name: str | None = None, ties: str = "file"
) -> SequenceDataset:
    """A CSV or Parquet file with ``user_id, item_id, timestamp``."""
    path = Path(path)
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind == "csv":
        df = pd.read_csv(path)
    elif kind == "parquet":
        df = pd.read_parquet(path)
    else:
        raise ValueError(f"{path}: not a table (expected one of {', '.join(TABLE_SUFFIXES)})")
    return from_frame(df, name or path.stem, min_interactions, ties)


def read_sasrec_text(
    path: str | Path, min_interactions: int = 5, name: str | None = None
) -> SequenceDataset:
    """SASRec's format: ``user item`` per line (whitespace separated), in time order."""
    path = Path(path)
    df = pd.read_csv(path, sep=r"\s+", header=None, usecols=[0, 1], names=["user_id", "item_id"])
    # The line number is the clock: it keeps the file's order through the shared sort.
    df["timestamp"] = np.arange(len(df), dtype=np.int64)
    return from_frame(df, name or path.stem, min_interactions)


def movielens_folder(path_or_name: str | Path) -> Path | None:
    """The MovieLens folder ``path_or_name`` stands for (the name ``ml-100k`` means the
    configured one), or None when it is not a MovieLens folder."""
    if str(path_or_name) == "ml-100k" and not Path("ml-100k").exists():
        from recloop.config import DataConfig

        path = Path(os.environ.get("RECLOOP_MOVIELENS_DIR") or DataConfig().movielens_dir)
    else:
        path = Path(path_or_name)
    return path if (path / "u.item").exists() else None


def load_dataset(
    path_or_name: str | Path, min_interactions: int = 5, ties: str = "file"
) -> SequenceDataset:
    """Pick the reader from the path: a folder with ``u.data`` (MovieLens-100k), ``.csv``,
    ``.parquet``/``.pq``, ``.txt`` (SASRec). Names: ``ml-100k`` (the configured MovieLens
    folder, env ``RECLOOP_MOVIELENS_DIR``) and ``synthetic`` (``recloop.data.synthetic()``).
    ``ties``: see the module docstring (the SASRec text format has none)."""
    if str(path_or_name) == "synthetic":
        return from_interaction_data(synthetic(), min_interactions, "synthetic", ties)
    if str(path_or_name) == "ml-100k" and not Path("ml-100k").exists():
        from recloop.config import DataConfig

        folder = os.environ.get("RECLOOP_MOVIELENS_DIR") or DataConfig().movielens_dir
        return read_movielens(folder, min_interactions, "ml-100k", ties)
    path = Path(path_or_name)
    if path.is_dir():
        if (path / "u.data").exists():
            return read_movielens(path, min_interactions, ties=ties)
        raise ValueError(f"{path}: a folder without u.data (only MovieLens-100k folders are read)")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        return read_table(path, min_interactions, ties=ties)
    if suffix in TEXT_SUFFIXES:
        return read_sasrec_text(path, min_interactions)
    raise ValueError(
        f"{path}: unknown format {suffix!r}; expected a MovieLens-100k folder, .csv, "
        ".parquet/.pq or .txt (SASRec 'user item' lines)"
    )
