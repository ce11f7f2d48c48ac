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


# ------------------------------------------------------------------ first use: fetching
class _ZipServer:
    """A real HTTP server on loopback serving one zip at /ml-100k.zip."""

    def __init__(self, body: bytes) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                self.send_response(200 if self.path == "/ml-100k.zip" else 404)
                self.end_headers()
                if self.path == "/ml-100k.zip":
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/ml-100k.zip"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _fake_archive() -> tuple[bytes, dict[str, str]]:
    """A zip shaped like GroupLens' (files under ml-100k/), with made-up content (the
    real data may not be copied), and the SHA-256 of its files."""
    import hashlib
    import io
    import zipfile

    files = {"u.data": b"1\t2\t5\t881250949\n", "u.item": b"2|x|||", "u.user": b"1|24|M|x|1"}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(f"ml-100k/{name}", data)
    return buf.getvalue(), {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}


def test_movielens_is_fetched_checked_against_its_sha256_and_kept_whole(tmp_path):
    from recloop.data import fetch_movielens

    body, digests = _fake_archive()
    server = _ZipServer(body)
    try:
        dest = fetch_movielens(tmp_path / "cache" / "ml-100k", server.url, digests)
        assert (dest / "u.data").read_bytes() == b"1\t2\t5\t881250949\n"
        # a copy whose files differ from the published digests is refused, nothing kept
        wrong = {**digests, "u.data": "0" * 64}
        with pytest.raises(OSError, match="refused: u.data does not have the published"):
            fetch_movielens(tmp_path / "other" / "ml-100k", server.url, wrong)
        assert not (tmp_path / "other" / "ml-100k").exists()
        with pytest.raises(OSError, match="fetching .*nope.zip failed"):
            fetch_movielens(tmp_path / "x", server.url.replace("ml-100k.zip", "nope.zip"))
    finally:
        server.close()


def test_a_run_without_movielens_fetches_it_once_or_says_why_it_uses_generated_data(
    tmp_path, monkeypatch
):
    import recloop.data as data

    absent = DataConfig(movielens_dir=tmp_path / "nowhere")
    said: list[str] = []
    # offline (a closed port): generated data, and the reason in plain words
    got = data.resolve_movielens(absent, said.append, "http://127.0.0.1:9/x.zip", tmp_path / "c")
    assert got is absent and got.use_synthetic
    assert "GENERATED data (200 users, 300 items)" in said[-1]
    assert str(tmp_path / "nowhere") in said[-1] and "failed" in said[-1]
    said.clear()
    data.resolve_movielens(DataConfig(movielens_dir=tmp_path / "n", fetch=False), said.append)
    assert "data.fetch is off" in said[-1]

    body, digests = _fake_archive()
    monkeypatch.setattr(data, "MOVIELENS_SHA256", digests)
    server = _ZipServer(body)
    try:
        got = data.resolve_movielens(absent, said.append, server.url, tmp_path / "c" / "ml")
    finally:
        server.close()
    assert got.movielens_dir == tmp_path / "c" / "ml" and not got.use_synthetic
    # fetched before: used without the network
    again = data.resolve_movielens(
        absent, said.append, "http://127.0.0.1:9/", tmp_path / "c" / "ml"
    )
    assert again.movielens_dir == tmp_path / "c" / "ml" and "fetched before" in said[-1]
    # configured data, or synthetic asked for: nothing to do, nothing said
    said.clear()
    here = DataConfig(movielens_dir=tmp_path / "c" / "ml")
    assert data.resolve_movielens(here, said.append) is here
    assert data.resolve_movielens(DataConfig(synthetic=True), said.append).synthetic
    assert said == []
