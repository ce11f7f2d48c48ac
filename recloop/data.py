"""Interaction data: MovieLens-100k read in place, or MovieLens-shaped synthetic data.

Both loaders return the same ``InteractionData``, so every job and test runs unchanged on
either. MovieLens' terms forbid redistributing it: it is read from its folder (a config
path), never copied into the repository.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
OCCUPATIONS = [
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
]


@dataclass(frozen=True)
class InteractionData:
    """ratings: user_id, item_id, rating (1-5), timestamp (Unix seconds)
    users: user_id, age, gender ('M'/'F'), occupation, zip_code
    items: item_id, title, genres (list of genre names)"""

    ratings: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    genres: list[str]
    source: str

    def summary(self) -> str:
        return (
            f"{self.source}: {len(self.users)} users, {len(self.items)} items, "
            f"{len(self.ratings)} ratings"
        )


def load_movielens(path: str | Path) -> InteractionData:
    """Read MovieLens-100k (``u.data``, ``u.user``, ``u.item``) from ``path``."""
    root = Path(path)
    missing = [f for f in ("u.data", "u.user", "u.item") if not (root / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"MovieLens-100k not found in {root} (missing {', '.join(missing)}); set "
            "data.movielens_dir (or RECLOOP_MOVIELENS_DIR), or use synthetic data"
        )
    ratings = pd.read_csv(
        root / "u.data",
        sep="\t",
        names=["user_id", "item_id", "rating", "timestamp"],
        dtype="int64",
    )
    users = pd.read_csv(
        root / "u.user",
        sep="|",
        names=["user_id", "age", "gender", "occupation", "zip_code"],
        dtype={"user_id": "int64", "age": "int64", "zip_code": str},
    )
    item_cols = ["item_id", "title", "release_date", "video_release_date", "url"] + ML100K_GENRES
    raw = pd.read_csv(root / "u.item", sep="|", names=item_cols, encoding="latin-1")
    flags = raw[ML100K_GENRES].to_numpy(dtype=bool)
    items = pd.DataFrame(
        {
            "item_id": raw["item_id"].astype("int64"),
            "title": raw["title"].astype(str),
            "genres": [[g for g, f in zip(ML100K_GENRES, row, strict=True) if f] for row in flags],
        }
    )
    return InteractionData(ratings, users, items, list(ML100K_GENRES), f"movielens:{root}")


def synthetic(
    n_users: int = 200,
    n_items: int = 300,
    n_ratings: int = 6000,
    n_genres: int = 8,
    seed: int = 0,
    start_ts: int = 880_000_000,
    days: int = 180,
) -> InteractionData:
    """MovieLens-shaped data with planted structure: users prefer a few genres, items
    have Zipf-like popularity, ratings are higher on preferred genres. Deterministic
    under ``seed``; ids start at 1 as in MovieLens."""
    if n_ratings > n_users * n_items // 2:
        raise ValueError("n_ratings must be at most half of n_users * n_items")
    rng = np.random.default_rng(seed)
    genres = [f"genre{g}" for g in range(n_genres)]
    item_genre = rng.integers(0, n_genres, size=n_items)
    second = rng.integers(0, n_genres, size=n_items)
    item_genres = [
        sorted({genres[a], genres[b]}) if rng.random() < 0.3 else [genres[a]]
        for a, b in zip(item_genre, second, strict=True)
    ]
    taste = rng.dirichlet(np.full(n_genres, 0.3), size=n_users)  # (U, G)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity = popularity[rng.permutation(n_items)]
    affinity = taste[:, item_genre] * popularity[None, :]  # (U, I)
    affinity /= affinity.sum(axis=1, keepdims=True)

    per_user = rng.multinomial(n_ratings - n_users, np.full(n_users, 1.0 / n_users)) + 1
    per_user = np.minimum(per_user, n_items // 2)
    user_ids, item_ids, stars, stamps = [], [], [], []
    for u in range(n_users):
        chosen = rng.choice(n_items, size=per_user[u], replace=False, p=affinity[u])
        rel = taste[u, item_genre[chosen]] / taste[u].max()  # 1 for the favourite genre
        score = np.clip(np.round(1.5 + 3.0 * rel + rng.normal(0, 0.7, size=len(chosen))), 1, 5)
        t0 = start_ts + int(rng.integers(0, days * 86400 // 2))
        ts = np.sort(t0 + rng.integers(0, days * 86400 // 2, size=len(chosen)))
        user_ids.append(np.full(len(chosen), u + 1))
        item_ids.append(chosen + 1)
        stars.append(score.astype(np.int64))
        stamps.append(ts)
    ratings = pd.DataFrame(
        {
            "user_id": np.concatenate(user_ids).astype("int64"),
            "item_id": np.concatenate(item_ids).astype("int64"),
            "rating": np.concatenate(stars).astype("int64"),
            "timestamp": np.concatenate(stamps).astype("int64"),
        }
    )
    users = pd.DataFrame(
        {
            "user_id": np.arange(1, n_users + 1, dtype="int64"),
            "age": rng.integers(15, 70, size=n_users).astype("int64"),
            "gender": rng.choice(["M", "F"], size=n_users),
            "occupation": rng.choice(OCCUPATIONS, size=n_users),
            "zip_code": [f"{z:05d}" for z in rng.integers(0, 100_000, size=n_users)],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, n_items + 1, dtype="int64"),
            "title": [f"item {i}" for i in range(1, n_items + 1)],
            "genres": item_genres,
        }
    )
    return InteractionData(ratings, users, items, genres, f"synthetic:seed={seed}")


def load(cfg) -> InteractionData:  # cfg: recloop.config.DataConfig
    """The data a run is configured for: MovieLens when present, synthetic otherwise
    (with a warning when MovieLens was wanted: ``resolve_movielens`` says why at a job's
    start, and fetches it)."""
    if cfg.use_synthetic:
        if not cfg.synthetic:
            logging.getLogger(__name__).warning(
                "MovieLens-100k is not at %s: generated data instead", cfg.movielens_dir
            )
        return synthetic(
            cfg.synthetic_users, cfg.synthetic_items, cfg.synthetic_ratings, seed=cfg.seed
        )
    return load_movielens(cfg.movielens_dir)


# --------------------------------------------------------------------------- first use
# Where GroupLens publishes MovieLens-100k, and the SHA-256 of the files recloop reads,
# taken from the copy this project runs on (../shared/data/ml-100k): a fetched copy whose
# files differ is refused.
MOVIELENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
MOVIELENS_SHA256 = {
    "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
    "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
}


def movielens_cache() -> Path:
    """Where a fetched MovieLens-100k is kept: the user's cache, outside any repository
    (its terms forbid redistributing it)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "recloop" / "ml-100k"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(root: Path, digests: dict[str, str]) -> str | None:
    """None if ``root`` holds every file of ``digests`` with that SHA-256, else why not."""
    for name, digest in digests.items():
        if not (root / name).exists():
            return f"{name} is missing"
        if _sha256(root / name) != digest:
            return f"{name} does not have the published SHA-256"
    return None


def fetch_movielens(
    dest: Path,
    url: str = MOVIELENS_URL,
    digests: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> Path:
    """Download MovieLens-100k's zip from ``url``, check each file recloop reads against
    its SHA-256 and move the folder to ``dest`` (atomically: a partial download never
    looks like data). Raises OSError with the reason when it cannot."""
    import shutil
    import tempfile
    import urllib.request
    import zipfile

    digests = MOVIELENS_SHA256 if digests is None else digests
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        archive = Path(tmp) / "ml-100k.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(archive, "wb") as f:
                shutil.copyfileobj(resp, f)
            with zipfile.ZipFile(archive) as z:
                z.extractall(Path(tmp) / "x")
        except (OSError, zipfile.BadZipFile) as exc:  # URLError is an OSError
            raise OSError(f"fetching {url} failed: {exc}") from exc
        found = next((p.parent for p in (Path(tmp) / "x").rglob("u.data")), None)
        if found is None:
            raise OSError(f"{url} holds no u.data")
        why = _verified(found, digests)
        if why is not None:
            raise OSError(f"the copy fetched from {url} is refused: {why}")
        shutil.rmtree(dest, ignore_errors=True)
        found.rename(dest)
    return dest


def resolve_movielens(cfg, say=print, url: str = MOVIELENS_URL, cache: Path | None = None):
    """``cfg`` (a ``DataConfig``) pointing at MovieLens-100k when it can be had: the
    configured folder, else a copy fetched before (``movielens_cache``), else one fetched
    now (``data.fetch``); otherwise unchanged, and ``say`` tells why the run will use
    generated data, so it never switches silently."""
    import dataclasses

    if cfg.synthetic:
        return cfg
    if (cfg.movielens_dir / "u.data").exists():
        return cfg
    cache = movielens_cache() if cache is None else cache
    if _verified(cache, MOVIELENS_SHA256) is None:
        say(f"data: MovieLens-100k from {cache} (fetched before; not at {cfg.movielens_dir})")
        return dataclasses.replace(cfg, movielens_dir=cache)
    why = "data.fetch is off"
    if cfg.fetch:
        say(f"data: MovieLens-100k is not at {cfg.movielens_dir}; fetching it from {url}")
        try:
            fetch_movielens(cache, url)
        except OSError as exc:
            why = str(exc)
        else:
            say(f"data: MovieLens-100k fetched to {cache} (SHA-256 checked)")
            return dataclasses.replace(cfg, movielens_dir=cache)
    say(
        f"data: GENERATED data ({cfg.synthetic_users} users, {cfg.synthetic_items} items), "
        f"not MovieLens-100k: it is not at {cfg.movielens_dir} and {why}. Put the "
        "ml-100k folder there, or point data.movielens_dir (RECLOOP_MOVIELENS_DIR) at it"
    )
    return cfg
