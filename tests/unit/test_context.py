"""Context engineering: the offline context rows (descriptors, preference anchors) and the
model's context tokens (they change the encoder's output only when switched on, and per
prefix they equal encoding that prefix alone with its context)."""

from __future__ import annotations

import calendar

import pytest
import torch

from models.onerec import OneRec
from pipelines.offline.context import OfflineContext
from pipelines.offline.datasets import load_dataset
from pipelines.offline.evaluation import leave_one_out
from tests.unit.test_onerec import L, random_codes, tiny_config

N = 40
FIELDS = {"hour": 7, "weekday": 8}


def _movielens(tmp_path):
    """3 users; items 1-4 are genre 0 (popular: 1 > 2 > 3 > 4), items 5-8 genre 1."""
    t0 = calendar.timegm((2024, 1, 1, 9, 0, 0))  # a Monday, 09:00 UTC
    seqs = {
        1: [5, 6, 7, 1, 2, 8],  # mostly genre 1 in the recent window
        2: [1, 2, 3, 5, 1, 4],
        3: [1, 2, 3, 4, 5, 2],
    }
    rows = []
    for u, items in seqs.items():
        for j, i in enumerate(items):
            rows.append(f"{u}\t{i}\t4\t{t0 + 3600 * 24 * j + u}\n")
    ml = tmp_path / "ml"
    ml.mkdir()
    (ml / "u.data").write_text("".join(rows))
    (ml / "u.user").write_text("1|17|M|student|1\n2|30|F|writer|2\n3|60|M|other|3\n")

    def genres(i: int) -> str:
        flags = ["0"] * 19
        flags[0 if i <= 4 else 1] = "1"
        return "|".join(flags)

    (ml / "u.item").write_text(
        "".join(f"{i}|Item {i}|01-Jan-1995||http://x|{genres(i)}\n" for i in range(1, 9))
    )
    return ml


def test_offline_rows_carry_time_demographics_and_genre_anchors(tmp_path):
    ml = _movielens(tmp_path)
    ds = load_dataset(ml, min_interactions=1)
    split = leave_one_out(ds)
    ctx = OfflineContext(ds, split, ml, descriptors=True, anchors=2, window=3)
    assert list(ctx.fields) == ["hour", "weekday", "age", "gender", "occupation"]
    assert ctx.width == 7
    val = ctx.rows("val")
    # User 1 (ids are contiguous = the file's here): validation request at day 4, 09:00.
    hour, weekday, age, gender, occupation = val[0][:5]
    assert (hour, weekday) == (9 // 4 + 1, (0 + 4) % 7 + 1)
    assert (age, gender) == (1, 1)  # under 18, M
    assert occupation > 0
    assert ctx.rows("val")[1][2:4] == [3, 2]  # 30 -> the 25-34 group; F
    # Anchors: user 1's validation history is 5, 6, 7, 1; its last 3 (6, 7, 1) vote
    # genre 1. Training popularity of genre 1: 5 (2), 6 and 7 (1 each); 8 is never in
    # training. 6 and 7 are in the window, so the one anchor is 5 (and a padding 0).
    assert val[0][5:] == [5, 0]
    # Training rows: the session at position p sees the history before p only.
    row = ctx.train_row(1, 3)  # user 2's history 1, 2, 3: genre 0, by popularity 1, 2, 3, 4
    assert row[5:] == [4, 0]  # 1-3 are in the window; only 4 is left
    test = ctx.rows("test")
    assert len(test) == 3 and all(len(r) == 7 for r in test)


def test_anchors_need_genres_and_descriptors_need_times(tmp_path):
    ml = _movielens(tmp_path)
    ds = load_dataset(ml, min_interactions=1)
    with pytest.raises(ValueError, match="genres"):
        OfflineContext(ds, leave_one_out(ds), None, anchors=2)


def _model(**kw) -> tuple[OneRec, torch.Tensor]:
    torch.manual_seed(5)
    model = OneRec(tiny_config(item_vocab=N + 1, **kw)).eval()
    codes = torch.cat([torch.zeros(1, L, dtype=torch.long), random_codes(N)])
    model.set_leaf_items(codes)
    return model, codes


def test_context_changes_the_encoder_output_only_when_switched_on():
    hist = torch.randint(1, N + 1, (2, 6))
    on, codes = _model(context_fields=FIELDS, anchors=2)
    a = on.encode(
        codes[hist], hist > 0, history_items=hist, context=torch.tensor([[1, 2, 3, 4]] * 2)
    )
    b = on.encode(
        codes[hist], hist > 0, history_items=hist, context=torch.tensor([[5, 6, 7, 8]] * 2)
    )
    assert not torch.allclose(a.summary, b.summary)
    anchors_only = torch.tensor([[1, 2, 9, 10]] * 2)  # same descriptors, other anchors
    c = on.encode(codes[hist], hist > 0, history_items=hist, context=anchors_only)
    assert not torch.allclose(a.summary, c.summary)
    # Switched off: the same model as without the feature, whatever is passed.
    off, _ = _model()
    x = off.encode(codes[hist], hist > 0, history_items=hist)
    y = off.encode(codes[hist], hist > 0, history_items=hist, context=torch.tensor([[5, 6]] * 2))
    assert torch.equal(x.summary, y.summary) and y.layer_kv is None
    with pytest.raises(ValueError, match="columns"):
        on.encode(codes[hist], hist > 0, history_items=hist, context=torch.tensor([[1, 2]] * 2))


def test_each_prefix_reads_its_own_context():
    model, codes = _model(context_fields=FIELDS, anchors=1, latent_steps=1)
    window = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10, 11, 12]])
    ctx = torch.tensor([[[3, 4, 17], [6, 1, 2]]])  # (B, C, width) for prefixes 4 and 6
    ends = torch.tensor([[4, 6]])
    enc = model.encode(codes[window], window > 0, history_items=window, with_tail=False)
    pos = torch.arange(enc.memory.shape[1])
    visible = (pos[None, None, :] <= ends[:, :, None]) & enc.mask[:, 0]
    got = model.reason(enc.prefixes(ends, 1), visible, ctx)  # (1, 2, D)
    for c, alone in enumerate(
        (torch.tensor([[0] * 8 + [5, 6]]), torch.tensor([[0] * 6 + [5, 6, 7, 8]]))
    ):
        ref = model.encode(codes[alone], alone > 0, history_items=alone, context=ctx[:, c])
        assert torch.allclose(got[:, c], ref.summary, atol=1e-5)


# --------------------------------------------------------------------------- serving
@pytest.fixture(scope="module")
def context_checkpoint(tmp_path_factory):
    """A quick seed checkpoint on generated data trained with descriptors and 3 anchors."""
    from tests.conftest import quick_checkpoint

    out = tmp_path_factory.mktemp("ckpt-ctx") / "seed"
    return quick_checkpoint(out, 0, "--descriptors", "--anchors", "3")


def _offline(seed: int = 0):
    from pipelines.offline.datasets import from_interaction_data
    from recloop.data import synthetic

    data = synthetic(seed=seed)
    ds = from_interaction_data(data)
    split = leave_one_out(ds)
    return data, ds, split, OfflineContext(ds, split, data, descriptors=True, anchors=3)


def test_serving_builds_the_context_rows_the_model_was_trained_on(context_checkpoint):
    """Through the checkpoint (JSON sorts its keys, so the field order is the model's
    own after loading), a request with the user's Feast profile and the session's time
    gets exactly the offline row, columns in the order the loaded model reads them."""
    from serving.app import LoadedModel

    data, ds, split, offline = _offline()
    loaded = LoadedModel.load(str(context_checkpoint), "v1")
    ctx = loaded.context
    assert ctx is not None and ctx.anchors == 3
    model_fields = list(loaded.ranker.model.cfg.context_fields)
    assert list(ctx.fields) == model_fields != list(offline.fields)  # reordered on disk
    profiles = {int(r.user_id): r._asdict() for r in data.users.itertuples()}
    raw_user = {u: raw for raw, u in ds.user_id_map.items()}
    order = [list(offline.fields).index(f) for f in model_fields]
    for i, (user, want) in enumerate(zip(split.users, offline.rows("test"), strict=True)):
        hist = split.test_histories[i]
        when = ds.timestamps[user][len(hist)]
        profile = {k: profiles[raw_user[user]][k] for k in ("age", "gender", "occupation")}
        got = ctx.row(hist, when, profile)
        assert got == [want[j] for j in order] + want[len(order) :]
    # generate() feeds the rows: another time and profile give another encoder state.
    hist = [loaded.to_data[i] for i in split.test_histories[0]]
    reqs = [
        {"history": hist, "exclude_seen": True, "request_time_s": 1.7e9, "profile": profiles[1]},
        {"history": hist, "exclude_seen": True, "request_time_s": 1.7e9 + 12 * 3600},
    ]
    model_hist = [[loaded.to_model[i] for i in hist]] * 2
    rows = loaded.contexts(reqs, model_hist)
    assert rows[0] != rows[1]
    enc = loaded.ranker.encode(model_hist, rows)
    assert not torch.allclose(enc.summary[0], enc.summary[1])
    for out in loaded.generate(reqs, beam_width=8):
        ids = [i["item_id"] for i in out["items"]]
        assert len(ids) == 5 == len(set(ids)) and not set(ids) & set(hist)


def test_live_clicks_move_an_item_into_its_genres_anchors(context_checkpoint):
    from serving.app import LoadedModel

    loaded = LoadedModel.load(str(context_checkpoint), "v1")
    ctx = loaded.context
    genre = 0
    members = [i for i in range(1, len(ctx.genres)) if ctx.genres[i, genre] > 0]
    history = members[:2]  # a history of the genre's items votes for it
    before = ctx.row(history, None, None)[-3:]
    cold = next(i for i in reversed(members) if i not in before and i not in history)
    clicked = loaded.update_popularity({loaded.to_data[cold]: 10**6, 10**9: 5})  # + unknown id
    assert clicked == 1
    assert ctx.row(history, None, None)[-3:][0] == cold
    assert loaded.update_popularity({}) == 0  # clicks replace, never accumulate
    assert ctx.row(history, None, None)[-3:] == before


def test_a_context_checkpoint_without_its_spec_is_never_served(context_checkpoint, tmp_path):
    import json
    import shutil

    from recloop.checkpoint import CheckpointError, validate_checkpoint
    from serving.app import LoadedModel

    bad = tmp_path / "no-spec"
    shutil.copytree(context_checkpoint, bad)
    conf = json.loads((bad / "config.json").read_text())
    del conf["context"]
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="no context spec"):
        validate_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no context spec"):
        LoadedModel.load(str(bad), "v1")
    conf["context"] = {**json.loads((context_checkpoint / "config.json").read_text())["context"]}
    conf["context"]["fields"] = {"hour": 7}
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="not the model's"):
        validate_checkpoint(bad)
    validate_checkpoint(context_checkpoint)


def test_request_tags_hash_to_stable_buckets_and_are_unknown_when_absent():
    from recloop.context import ContextBuilder, tag_bucket

    b = ContextBuilder({"hour": 7, "weekday": 8, "tag:surface": 17})
    home = b.row([], None, None, {"surface": "home"})
    assert home[:2] == [0, 0] and 1 <= home[2] <= 16
    assert b.row([], None, None, {"surface": "home", "device": "tv"}) == home
    assert b.row([], None, None, {"surface": "search"})[2] == tag_bucket("search", 16)
    assert tag_bucket("home", 16) != tag_bucket("search", 16)
    assert b.row([], None, None, None)[2] == 0 == b.row([], None, None, {"surface": ""})[2]
    with pytest.raises(ValueError, match="unknown context field"):
        ContextBuilder({"tag:": 3})
