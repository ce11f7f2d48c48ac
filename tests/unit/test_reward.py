"""The session reward model (OneRec §3.3.1): model, loss, metrics, data, training,
checkpoints and CLI, on tiny sizes. The learning test plants a signal that only target
attention to the history can find."""

from __future__ import annotations

import json
import math
import random

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models.reward import (
    TARGETS,
    RewardConfig,
    SessionRewardModel,
    auc,
    combine,
    concordance,
    reward_loss,
)
from pipelines.alignment.reward import (
    RewardTrainConfig,
    evaluate_reward,
    fit_reward,
    main,
    reward_data,
    split_holdout,
)
from recloop.checkpoint import (
    FILES,
    FORMAT,
    REWARD_FORMAT,
    CheckpointError,
    load_reward,
    save_reward,
    validate_checkpoint,
)

torch.set_num_threads(1)


def tiny(num_items: int = 20, **kw) -> RewardConfig:
    base = dict(num_items=num_items, dim=16, heads=2, layers=1, max_history=8, max_items=6)
    base.update(kw)
    return RewardConfig(**base)


def model_for(cfg: RewardConfig, seed: int = 0) -> SessionRewardModel:
    torch.manual_seed(seed)
    return SessionRewardModel(cfg).eval()


# --------------------------------------------------------------------------- planted signal
GROUPS, PER_GROUP, SLATE = 4, 15, 6


def planted_sessions(n: int, seed: int = 0) -> tuple[list[dict], list[int]]:
    """Items fall into groups; a user's history is drawn from one group; a served item is
    clicked w.p. 0.9 if it is in that group, else 0.05. Every item is in-group for a
    quarter of the users, so no per-item statistic predicts a click: only the history
    does. Clicked in-group items are watched ~30 s, others ~4 s; likes and follows
    follow clicks, more often in-group."""
    rng = random.Random(seed)
    item_ids = [1000 + 7 * i for i in range(GROUPS * PER_GROUP)]  # data ids != model ids
    group = {d: i // PER_GROUP for i, d in enumerate(item_ids)}
    rows = []
    for s in range(n):
        g = rng.randrange(GROUPS)
        mine = [d for d in item_ids if group[d] == g]
        items = rng.sample(item_ids, SLATE)
        row = {"clicked": [], "watch_time_s": [], "liked": [], "followed": []}
        for d in items:
            inside = group[d] == g
            c = rng.random() < (0.9 if inside else 0.05)
            row["clicked"].append(c)
            watch = (30.0 if inside else 4.0) * rng.lognormvariate(0, 0.3)
            row["watch_time_s"].append(watch if c else 0.0)
            row["liked"].append(c and rng.random() < (0.5 if inside else 0.05))
            row["followed"].append(c and rng.random() < (0.2 if inside else 0.02))
        row.update(
            history=[rng.choice(mine) for _ in range(rng.randint(3, 10))],
            items=items,
            feedback=[True] * SLATE,
            event_time_ms=1_000 * s,
            event_id=f"e{s:05d}",
        )
        rows.append(row)
    rng.shuffle(rows)  # reward_data sorts by time
    return rows, item_ids


def test_learns_a_history_dependent_signal():
    rows, item_ids = planted_sessions(1500)
    cfg = RewardConfig(num_items=len(item_ids), dim=32, max_history=10, max_items=8)
    data = reward_data(rows, item_ids, cfg.max_history, cfg.max_items)
    train = RewardTrainConfig(epochs=8, batch_size=64, lr=3e-3, seed=0)
    model, report = fit_reward(data, cfg, train, log=lambda m: None)
    assert report["train_sessions"] == 1200 and report["holdout_sessions"] == 300
    assert [e["epoch"] for e in report["epochs"]] == list(range(1, 9))
    assert report["epochs"][-1]["loss"] < report["epochs"][0]["loss"]
    trained = report["holdout"]
    print("planted signal, holdout:", json.dumps(trained))

    train_idx, hold = split_holdout(data, train.holdout_fraction)
    holdout = data.subset(hold)
    assert holdout.event_time_ms.min() > data.subset(train_idx).event_time_ms.max()
    untrained = evaluate_reward(model_for(cfg, seed=1), holdout)
    blind = holdout.subset(torch.arange(len(holdout)))
    blind.history = torch.zeros_like(blind.history)  # same model, history hidden
    no_history = evaluate_reward(model, blind)

    assert trained["auc"]["vtr"] > 0.85  # Bayes-optimal here is ~0.91
    assert abs(untrained["auc"]["vtr"] - 0.5) < 0.1
    assert trained["auc"]["vtr"] > untrained["auc"]["vtr"] + 0.25
    assert abs(no_history["auc"]["vtr"] - 0.5) < 0.1  # the signal lives in the history
    assert trained["auc"]["ltr"] > 0.8 and trained["auc"]["wtr"] > 0.75
    assert trained["swt_concordance"] > 0.75
    assert untrained["swt_concordance"] < 0.65
    assert trained["sessions"] == 300 and trained["items"] == 300 * SLATE


# --------------------------------------------------------------------------- metrics
def test_auc_by_hand():
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    # Pairs (pos, neg): (1 vs 1) tie = 1/2, (1 vs 0), (2 vs 1), (2 vs 0) = 1 each.
    assert auc(torch.tensor([1.0, 1.0, 2.0, 0.0]), torch.tensor([1, 0, 1, 0])) == 3.5 / 4
    assert auc(torch.tensor([3.0, 3.0, 3.0]), torch.tensor([1, 0, 0])) == 0.5
    assert auc(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])) == 0.0
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
    assert math.isnan(auc(torch.tensor([]), torch.tensor([])))


def test_concordance_by_hand():
    assert concordance(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])) == 1.0
    assert concordance(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([10.0, 20.0, 30.0])) == 0.0
    # truth ties are not pairs: only (0,2) discordant and (1,2) concordant count.
    assert concordance(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 2.0])) == 0.5
    # pred ties count 1/2: (0,1) tie, (0,2) and (1,2) concordant.
    assert concordance(torch.tensor([5.0, 5.0, 6.0]), torch.tensor([1.0, 2.0, 3.0])) == 2.5 / 3
    assert math.isnan(concordance(torch.tensor([1.0, 2.0]), torch.tensor([4.0, 4.0])))
    # chunked == brute force
    g = torch.Generator().manual_seed(0)
    p, t = torch.randint(0, 5, (50,), generator=g), torch.randint(0, 4, (50,), generator=g)
    good = pairs = 0.0
    for i in range(50):
        for j in range(50):
            if t[i] < t[j]:
                pairs += 1
                good += 1.0 if p[i] < p[j] else 0.5 if p[i] == p[j] else 0.0
    assert concordance(p.float(), t.float(), chunk=7) == pytest.approx(good / pairs)


def test_reward_loss_by_hand():
    out = {
        "vtr": torch.tensor([[0.5, -1.0, 2.0]]),
        "ltr": torch.tensor([[0.0, 1.0, -2.0]]),
        "wtr": torch.tensor([[1.5, 0.2, 0.3]]),
        "swt": torch.tensor([[2.0, 1.0, 9.0]]),
    }
    labels = {
        "clicked": torch.tensor([[1.0, 0.0, 1.0]]),
        "liked": torch.tensor([[1.0, 0.0, 0.0]]),
        "followed": torch.tensor([[0.0, 0.0, 1.0]]),
        "watch_s": torch.tensor([[10.0, 0.0, 99.0]]),
    }
    mask = torch.tensor([[True, True, False]])  # the third item has no feedback
    total, parts = reward_loss(out, labels, mask)
    bce = F.binary_cross_entropy_with_logits
    want = {
        "vtr": bce(torch.tensor([0.5, -1.0]), torch.tensor([1.0, 0.0])),
        "ltr": bce(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])),
        "wtr": bce(torch.tensor([1.5, 0.2]), torch.tensor([0.0, 0.0])),
        "swt": (torch.tensor(2.0) - math.log1p(10.0)) ** 2,  # the only viewed, masked item
    }
    for t in TARGETS:
        assert parts[t] == pytest.approx(float(want[t]), rel=1e-6)
    assert float(total) == pytest.approx(sum(float(v) for v in want.values()), rel=1e-6)
    none, none_parts = reward_loss(out, labels, torch.zeros(1, 3, dtype=torch.bool))
    assert float(none) == 0.0 and all(v == 0.0 for v in none_parts.values())


# --------------------------------------------------------------------------- data
def test_reward_data_maps_masks_and_sorts():
    item_ids = [100, 200, 300]  # model ids 1, 2, 3
    rows = [
        {
            "event_id": "b",
            "event_time_ms": 50,
            "history": [300, 999, 100, 200],  # 999 unknown: dropped
            "items": [200, 777, 100, 300],  # 777 unknown: slot kept, masked
            "feedback": [True, True, True, False],  # no feedback for 300
            "clicked": [True, True, False, True],
            "watch_time_s": [12.5, 3.0, 0.0, 8.0],
            "liked": [True, False, False, True],
            "followed": [False, False, True, False],
        },
        {
            "event_id": "a",
            "event_time_ms": 50,
            "history": [],
            "items": [300],
            "feedback": [True],
            "clicked": [False],
            "watch_time_s": [0.0],
            "liked": [False],
            "followed": [False],
        },
        {"event_id": "z", "event_time_ms": 10, "history": [100] * 9, "items": [100]},
    ]
    d = reward_data(rows, item_ids, max_history=3, max_items=3)
    assert len(d) == 3
    assert d.event_time_ms.tolist() == [10, 50, 50]  # by time, then event id
    assert d.history.tolist() == [[1, 1, 1], [0, 0, 0], [3, 1, 2]]  # newest 3, left-padded
    assert d.items.tolist() == [[1, 0, 0], [3, 0, 0], [2, 0, 1]]  # first max_items served
    assert d.mask.tolist() == [
        [False, False, False],  # no feedback lists at all
        [True, False, False],
        [True, False, True],
    ]
    assert d.clicked[2].tolist() == [1.0, 0.0, 0.0]  # unknown item's click is not a label
    assert d.liked[2].tolist() == [1.0, 0.0, 0.0]
    assert d.followed[2].tolist() == [0.0, 0.0, 1.0]
    assert d.watch_s[2].tolist() == [12.5, 0.0, 0.0]
    train, hold = split_holdout(d, 0.5)  # only the two sessions with feedback count
    assert train.tolist() == [1] and hold.tolist() == [2]


# --------------------------------------------------------------------------- model
def test_outputs_are_finite_for_empty_histories_short_and_empty_sessions():
    cfg = tiny()
    m = model_for(cfg)
    history = torch.tensor([[0, 0, 0, 0], [0, 0, 3, 4], [1, 2, 3, 4]])
    items = torch.tensor([[5, 6, 0], [7, 0, 0], [0, 0, 0]])  # full, one item, all padding
    for training in (False, True):
        out = m.train(training)(history, items)
        assert set(out) == set(TARGETS)
        assert all(v.shape == (3, 3) and torch.isfinite(v).all() for v in out.values())
    m.train()
    loss, _ = reward_loss(
        m(history, items),
        {k: torch.ones(3, 3) for k in ("clicked", "liked", "followed", "watch_s")},
        items > 0,
    )
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    m.eval()
    r = m.session_rewards(history, items)
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in r.values())
    assert r["swt"][2] == 0 and r["vtr"][2] == 0  # no real items, no reward
    # No history at all (zero columns) is an empty history.
    none = m(torch.zeros(3, 0, dtype=torch.long), items)
    assert torch.allclose(none["vtr"][0], m(history, items)["vtr"][0])


def test_padding_and_unknown_ids_do_not_change_real_items():
    cfg = tiny()
    m = model_for(cfg)
    h, i = torch.tensor([[0, 3, 4, 5]]), torch.tensor([[6, 7]])
    base = m(h, i)
    longer = m(torch.tensor([[0, 0, 0, 3, 4, 5]]), torch.tensor([[6, 7, 0, 0]]))
    unknown = m(torch.tensor([[99, 3, 4, 5]]), torch.tensor([[6, 7, 123]]))  # > num_items
    for t in TARGETS:
        assert torch.allclose(base[t], longer[t][:, :2], atol=1e-6)
        assert torch.allclose(base[t], unknown[t][:, :2], atol=1e-6)
    assert torch.allclose(
        m.session_rewards(h, i)["swt"], m.session_rewards(h, torch.tensor([[6, 7, 0]]))["swt"]
    )
    # ... while the history does matter.
    assert not torch.allclose(base["vtr"], m(torch.tensor([[0, 8, 9, 10]]), i)["vtr"])
    with pytest.raises(ValueError, match="slots"):
        m(h, torch.ones(1, cfg.max_items + 1, dtype=torch.long))


def test_session_rewards_follow_the_item_heads():
    m = model_for(tiny())
    h, items = torch.tensor([[1, 2, 3], [0, 0, 4]]), torch.tensor([[5, 6, 7], [8, 0, 0]])
    out, r = m(h, items), m.session_rewards(h, items)
    real = (items > 0).float()
    watch = torch.sigmoid(out["vtr"]) * torch.expm1(out["swt"].clamp(min=0))
    assert torch.allclose(r["swt"], (watch * real).sum(1))
    for t in ("vtr", "ltr", "wtr"):
        want = (torch.sigmoid(out[t]) * real).sum(1) / real.sum(1)
        assert torch.allclose(r[t], want)


def test_combine_weights_and_refuses_unknown_targets():
    r = {"swt": torch.tensor([10.0, 20.0]), "vtr": torch.tensor([0.5, 0.1])}
    assert combine(r, {"swt": 0.1, "vtr": 2.0}).tolist() == pytest.approx([2.0, 2.2])
    assert combine(r, {"vtr": -1.0}).tolist() == pytest.approx([-0.5, -0.1])
    with pytest.raises(ValueError, match="unknown reward target"):
        combine(r, {"watch": 1.0})
    with pytest.raises(ValueError, match="ltr"):
        combine(r, {"ltr": 1.0})  # known, but not in the rewards
    with pytest.raises(ValueError):
        combine(r, {})


# --------------------------------------------------------------------------- training
def test_fit_is_deterministic_and_init_starts_from_the_given_weights():
    rows, item_ids = planted_sessions(200, seed=3)
    cfg = tiny(num_items=len(item_ids), max_history=10, max_items=8)
    data = reward_data(rows, item_ids, cfg.max_history, cfg.max_items)
    one = RewardTrainConfig(epochs=1, batch_size=32, seed=5)
    quiet = {"log": lambda m: None}
    a, rep_a = fit_reward(data, cfg, one, **quiet)
    b, rep_b = fit_reward(data, cfg, one, **quiet)
    assert rep_a["epochs"] == rep_b["epochs"] and rep_a["holdout"] == rep_b["holdout"]
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k

    init = model_for(cfg, seed=7)
    before = {k: v.clone() for k, v in init.state_dict().items()}
    zero, rep0 = fit_reward(data, cfg, RewardTrainConfig(epochs=0), init=init, **quiet)
    assert rep0["epochs"] == []
    for t, v in zero(data.history, data.items).items():
        assert torch.equal(v, init(data.history, data.items)[t])
    assert rep0["holdout"] == evaluate_reward(init, data.subset(split_holdout(data, 0.2)[1]))

    tuned, _ = fit_reward(data, cfg, one, init=init, **quiet)
    assert all(torch.equal(v, before[k]) for k, v in init.state_dict().items())  # a copy
    assert not torch.equal(tuned.item_emb.weight, init.item_emb.weight)
    scratch = fit_reward(data, cfg, RewardTrainConfig(epochs=0), **quiet)[0]
    assert not torch.equal(
        scratch(data.history, data.items)["vtr"], init(data.history, data.items)["vtr"]
    )
    with pytest.raises(ValueError, match="config"):
        fit_reward(data, tiny(num_items=len(item_ids), dim=8), one, init=init, **quiet)


# --------------------------------------------------------------------------- checkpoints
def test_save_load_round_trip_and_refusals(tmp_path):
    cfg = tiny()
    m = model_for(cfg)
    ids = [10 * i for i in range(1, cfg.num_items + 1)]
    path = save_reward(tmp_path / "rw", m, ids, meta={"report": {"x": 1}, "format": "evil"})
    assert sorted(p.name for p in path.iterdir()) == sorted(FILES[REWARD_FORMAT])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    ck = load_reward(path)
    assert ck.item_ids == ids and ck.meta["report"] == {"x": 1}
    assert ck.meta["format"] == REWARD_FORMAT and ck.meta["reward"] == cfg.to_dict()
    assert ck.model.cfg == cfg and not ck.model.training
    h, i = torch.tensor([[0, 1, 2, 3]]), torch.tensor([[4, 5, 0]])
    for t, v in m(h, i).items():
        assert torch.equal(v, ck.model(h, i)[t])
    validate_checkpoint(path)
    with pytest.raises(FileExistsError):
        save_reward(path, m, ids)
    with pytest.raises(CheckpointError, match="item ids"):
        save_reward(tmp_path / "short", m, ids[:-1])

    def variant(name: str, weights=None, config=None):
        import shutil

        dst = tmp_path / name
        shutil.copytree(path, dst)
        if weights is not None:
            save_file(weights, str(dst / "model.safetensors"))
        if config is not None:
            (dst / "config.json").write_text(json.dumps(config))
        return dst

    w = load_file(str(path / "model.safetensors"))
    conf = json.loads((path / "config.json").read_text())
    nan = dict(w, **{"fuse.weight": w["fuse.weight"].clone().fill_(float("nan"))})
    cases = {
        "nan": (variant("nan", weights=nan), "non-finite"),
        "fmt": (variant("fmt", config={**conf, "format": FORMAT}), "format"),
        "missing": (
            variant("missing", weights={k: v for k, v in w.items() if k != "ln.bias"}),
            "Missing",
        ),
        "extra": (variant("extra", weights={**w, "surprise": torch.zeros(2)}), "Unexpected"),
        "shape": (
            variant("shape", config={**conf, "reward": {**conf["reward"], "num_items": 25}}),
            "size mismatch",
        ),
        "ids": (variant("ids", config={**conf, "item_ids": ids[:3]}), "item_ids"),
        "badcfg": (variant("badcfg", config={**conf, "reward": {"dims": 3}}), "config"),
    }
    for bad, msg in cases.values():
        with pytest.raises(CheckpointError, match=msg):
            load_reward(bad)
        with pytest.raises(CheckpointError):
            validate_checkpoint(bad)


def test_a_reward_checkpoint_publishes_to_the_registry(tmp_path):
    from recloop.registry import ModelRegistry, RegistryError

    cfg = tiny()
    m = model_for(cfg)
    good = save_reward(tmp_path / "good", m, list(range(1, cfg.num_items + 1)))
    reg = ModelRegistry(str(tmp_path / "registry"))
    assert reg.publish("reward", good, version="r1") == "r1"
    with torch.no_grad():
        m.item_emb.weight[1, 0] = float("inf")
    bad = save_reward(tmp_path / "bad", m, list(range(1, cfg.num_items + 1)))
    with pytest.raises(RegistryError, match="non-finite"):
        reg.publish("reward", bad, version="r2")


# --------------------------------------------------------------------------- CLI
def test_cli_reads_the_lake_fits_and_saves(tmp_path, capsys):
    from recloop.lake import SCHEMAS, SESSIONS, Entry, Lake

    rows, item_ids = planted_sessions(120, seed=4)
    home = tmp_path / "home"
    lake = Lake(home / "lake")
    full = []
    for r in rows:
        n = len(r["items"])
        full.append(
            {
                **r,
                "request_id": r["event_id"],
                "user_id": 1,
                "arm": "control",
                "model_version": "v0",
                "scores": [0.0] * n,
                "event_time_ms": 1_700_000_000_000 + r["event_time_ms"],
                "record_ts_ms": 1_700_000_000_000,
            }
        )
    files = lake.write_files(
        SESSIONS, pa.Table.from_pylist(full, schema=SCHEMAS[SESSIONS]), "test", 1
    )
    lake.commit(Entry("test", 1, 0, files, {}, {}))
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "config.json").write_text(json.dumps({"format": FORMAT, "item_ids": item_ids}))
    out = tmp_path / "reward"
    argv = ["--home", str(home), "--checkpoint", str(seed), "--epochs", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report"]["train_sessions"] == 96
    assert printed["report"]["holdout_sessions"] == 24
    assert printed["checkpoint"] == str(out)
    ck = load_reward(out)
    assert ck.item_ids == item_ids and ck.meta["report"]["holdout_sessions"] == 24
    assert main(["--home", str(home), "--checkpoint", str(tmp_path / "nowhere")]) == 2
