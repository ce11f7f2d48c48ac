"""The simulator's hidden user-response model, on synthetic data (fast, CPU)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from actors.sim.user_model import (
    CONTEXT_LEN,
    HiddenUserModel,
    ResponseConfig,
    SessionResponse,
    UserState,
    auc,
)
from recloop.data import synthetic

T0 = 1_700_000_000_000  # simulation epoch, ms
DAY_MS = 86_400_000
UNKNOWN = 10**9  # an item id no model knows


@pytest.fixture(scope="module")
def data():
    return synthetic(seed=0)


@pytest.fixture(scope="module")
def model(data) -> HiddenUserModel:
    return HiddenUserModel.fit(data, epochs=4, seed=0)


@pytest.fixture(scope="module")
def seq(data) -> HiddenUserModel:
    """The sequential kind: the recent watches move the watch head."""
    return HiddenUserModel.fit(data, epochs=4, seed=0, kind="sequential")


@pytest.fixture(scope="module", params=["static", "sequential"])
def either(request, model, seq) -> HiddenUserModel:
    return model if request.param == "static" else seq


@pytest.fixture(scope="module")
def still(model) -> HiddenUserModel:
    """The same model without taste drift, for comparisons across time."""
    return model.with_config(ResponseConfig(drift_strength=0.0))


def attraction(m: HiddenUserModel, p_click: float, position: int) -> float:
    """The attraction logit behind a click probability at ``position``."""
    p = p_click * (1.0 + position) ** m.config.position_decay
    return math.log(p / (1.0 - p))


def p_first(m: HiddenUserModel, state: UserState, item: int, t_ms: int) -> float:
    """P(click) of ``item`` alone at position 0; the state is left unchanged."""
    r = m.session_response(copy.deepcopy(state), [item], t_ms, np.random.default_rng(0))
    return float(r.p_click[0])


def mid_item(m: HiddenUserModel, state: UserState) -> int:
    """An item of middling attraction for the user (so penalties show in p_click)."""
    u = m.user_vector(state, state.epoch_ms)
    logit = m.V @ u + m.b
    return int(m.item_ids[np.argmin(np.abs(logit - 0.5))])


def same(a: SessionResponse, b: SessionResponse) -> bool:
    fields = ("items", "position", "event_time_ms", "p_click", "clicked", "watch_time_s")
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in fields) and (
        np.array_equal(a.liked, b.liked)
        and np.array_equal(a.followed, b.followed)
        and a.expected_watch_s == b.expected_watch_s
    )


# ------------------------------------------------------------------ fitting


def test_fit_report_beats_popularity_on_planted_structure(model, data):
    rep = model.report
    for head in ("watch", "like", "follow"):
        assert 0.0 <= rep[f"{head}_auc"] <= 1.0
        assert 0.0 <= rep["popularity"][f"{head}_auc"] <= 1.0
        assert rep[f"{head}_logloss"] > 0
    assert rep["watch_auc"] > max(0.6, rep["popularity"]["watch_auc"])
    assert rep["like_auc"] > rep["popularity"]["like_auc"]
    assert rep["n_train"] + rep["n_test"] == len(data.ratings)
    assert rep["n_test"] >= data.ratings["user_id"].nunique()  # at least one per user
    assert rep["fit_s"] > 0
    json.dumps(rep, allow_nan=False)  # JSON-able
    assert np.array_equal(model.item_ids, np.sort(data.items["item_id"].to_numpy()))
    assert np.array_equal(model.user_ids, np.sort(data.users["user_id"].to_numpy()))


def test_fit_is_deterministic_under_a_seed(data):
    small = synthetic(n_users=40, n_items=60, n_ratings=600, seed=2)
    a = HiddenUserModel.fit(small, dim=8, epochs=1, seed=5)
    b = HiddenUserModel.fit(small, dim=8, epochs=1, seed=5)
    assert np.array_equal(a.U, b.U) and np.array_equal(a.V, b.V)
    assert a.report["watch_auc"] == b.report["watch_auc"]


def test_auc_counts_ties_half():
    assert auc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert auc(np.array([0.5, 0.5]), np.array([False, True])) == 0.5
    assert math.isnan(auc(np.array([0.5]), np.array([True])))


# ------------------------------------------------------------------ responses


def test_same_rng_seed_same_response_other_seed_differs(model):
    slate = model.item_ids[:30]
    a = model.session_response(model.new_state(3, T0), slate, T0, np.random.default_rng(7))
    b = model.session_response(model.new_state(3, T0), slate, T0, np.random.default_rng(7))
    c = model.session_response(model.new_state(3, T0), slate, T0, np.random.default_rng(8))
    assert same(a, b)
    assert not same(a, c)


def test_session_response_shapes_times_and_state_updates(model):
    state = model.new_state(5, T0)
    slate = model.item_ids[10:40]
    r = model.session_response(state, slate, T0 + 1000, np.random.default_rng(1))
    n = len(slate)
    assert len(r) == n and r.event_time_ms.dtype == np.int64
    assert np.array_equal(r.position, np.arange(n))
    assert r.event_time_ms[0] == T0 + 1000
    gaps = np.diff(r.event_time_ms) / 1000.0
    expect = model.config.browse_s + r.watch_time_s[:-1]
    assert np.allclose(gaps, expect, atol=1e-3)
    assert r.clicked.any()
    dur = model.duration_s[model.item_index(slate)]
    assert np.all(r.watch_time_s[~r.clicked] == 0)
    assert np.all((r.watch_time_s[r.clicked] > 0) & (r.watch_time_s[r.clicked] <= dur[r.clicked]))
    assert not (r.liked & ~r.clicked).any() and not (r.followed & ~r.clicked).any()
    assert np.all((r.p_click >= 0) & (r.p_click <= 1))
    assert math.isfinite(r.expected_watch_s) and r.expected_watch_s > 0
    # the state remembers what was shown and watched, with times
    assert len(state.shown) == n
    watched = {int(i) for i in slate[r.clicked]}
    assert set(state.consumed) == watched
    assert [i for i, _ in state.watched] == [int(i) for i in slate[r.clicked]]
    assert set(state.skipped) == {int(i) for i in slate[~r.clicked]}
    assert state.n_sessions == 1 and state.last_t_ms == T0 + 1000


def test_durations_are_deterministic_lognormal_and_clipped(model, data):
    d = model.duration_s
    assert np.all((d >= 10) & (d <= 300))
    assert 30 <= np.median(d) <= 60
    again = HiddenUserModel(
        model.user_ids, model.item_ids, model._w, seed=model.seed, config=model.config
    )
    assert np.array_equal(d, again.duration_s)
    other = HiddenUserModel(model.user_ids, model.item_ids, model._w, seed=model.seed + 1)
    assert not np.array_equal(d, other.duration_s)


def test_position_bias_lowers_p_click_down_the_slate(model):
    state = model.new_state(7, T0)
    item = mid_item(model, state)
    # unknown fillers are never watched, so nothing but the position differs
    r0 = model.session_response(copy.deepcopy(state), [item], T0, np.random.default_rng(0))
    r9 = model.session_response(
        copy.deepcopy(state), [UNKNOWN] * 9 + [item], T0, np.random.default_rng(0)
    )
    assert r9.p_click[9] < r0.p_click[0]
    assert r9.p_click[9] == pytest.approx(r0.p_click[0] / 10**0.6, rel=1e-6)


def test_history_item_is_penalised_and_the_penalty_decays(still):
    m, cfg = still, still.config
    base = m.new_state(9, T0)
    item = mid_item(m, base)
    fresh = p_first(m, base, item, T0)
    # history without times: long ago, only the lasting share of the repeat penalty
    old = m.new_state(9, T0, history=[item])
    p_old = p_first(m, old, item, T0)
    assert p_old < 0.5 * fresh
    assert attraction(m, fresh, 0) - attraction(m, p_old, 0) == pytest.approx(
        cfg.repeat_penalty * cfg.repeat_floor, abs=1e-6
    )
    # watched a minute ago: the full penalty (and a near-duplicate of itself)
    recent = m.new_state(9, T0, history=[item], history_times_ms=[T0 - 60_000])
    p_recent = p_first(m, recent, item, T0)
    assert p_recent < p_old
    # a month later it has recovered to the lasting share
    p_later = p_first(m, recent, item, T0 + 30 * DAY_MS)
    assert p_recent < p_later == pytest.approx(p_old, rel=1e-4)


def test_near_duplicate_watched_just_before_lowers_p_click(still):
    m, cfg = still, still.config
    base = m.new_state(11, T0)
    item = mid_item(m, base)
    row = int(m.item_index([item])[0])
    cos = m.Vn @ m.Vn[row]
    cos[row] = -np.inf
    twin = int(np.argmax(cos))
    assert cos[twin] > cfg.similar_threshold  # genre structure makes near-duplicates
    twin_id = int(m.item_ids[twin])
    fresh = p_first(m, base, item, T0)
    after = m.new_state(11, T0, history=[twin_id], history_times_ms=[T0 - 60_000])
    p_after = p_first(m, after, item, T0)
    assert p_after < fresh
    expect = cfg.similar_penalty * (cos[twin] - cfg.similar_threshold)
    expect /= 1 - cfg.similar_threshold
    drop = attraction(m, fresh, 0) - attraction(m, p_after, 0)
    assert drop == pytest.approx(expect, rel=2e-3)
    # a month later the near-duplicate no longer matters
    assert p_first(m, after, item, T0 + 30 * DAY_MS) == pytest.approx(fresh, rel=1e-4)


def test_skipped_impression_lowers_p_click_then_recovers(still):
    m = still
    state = m.new_state(13, T0)
    item = mid_item(m, state)
    fresh = p_first(m, state, item, T0)
    rng = np.random.default_rng(0)
    for _ in range(50):  # show it until it is skipped
        trial = copy.deepcopy(state)
        if not m.session_response(trial, [item], T0, rng).clicked[0]:
            state = trial
            break
    assert item in state.skipped and item not in state.consumed
    t = state.skipped[item]
    assert p_first(m, state, item, t + 1000) < fresh
    assert p_first(m, state, item, t + 30 * DAY_MS) == pytest.approx(fresh, rel=1e-4)


def test_watching_in_a_session_fatigues_later_positions(still):
    m = still
    state = m.new_state(15, T0)
    item = mid_item(m, state)
    rng = np.random.default_rng(3)
    seen = False
    for _ in range(200):  # sample until the first copy is watched
        r = m.session_response(copy.deepcopy(state), [item, item], T0, rng)
        if r.clicked[0]:
            seen = True
            break
    assert seen
    p_alone = p_first(m, state, item, T0)
    assert r.p_click[1] < p_alone / 2**0.6 * 0.5


def test_taste_drift_starts_at_u0_and_moves_towards_the_target(model, data):
    state = model.new_state(17, T0)
    row = model.user_index(17)
    assert np.array_equal(model.user_vector(state, T0), model.U[row])
    assert np.array_equal(model.user_vector(state, T0 - DAY_MS), model.U[row])
    target = model.target_user(17)
    assert target != 17 and target == model.target_user(17)
    u_target = model.U[model.user_index(target)]
    late = T0 + int(20 * model.config.drift_days * DAY_MS)
    u_late = model.user_vector(state, late)
    s = model.config.drift_strength
    assert np.allclose(u_late, model.U[row] + s * (u_target - model.U[row]), atol=1e-9)
    assert np.linalg.norm(u_late - u_target) < np.linalg.norm(model.U[row] - u_target)
    slate = model.oracle(state, T0, 10)[0]
    assert model.expected_value(state, slate, late) != pytest.approx(
        model.expected_value(state, slate, T0), rel=1e-3
    )
    # the target depends on the model seed
    other = HiddenUserModel(model.user_ids, model.item_ids, model._w, seed=1)
    targets = [model.target_user(int(u)) for u in model.user_ids[:20]]
    assert targets != [other.target_user(int(u)) for u in model.user_ids[:20]]


# ------------------------------------------------------------------ oracle


def test_oracle_beats_random_and_popular_slates_and_leaves_the_state(either, data):
    model = either
    rng = np.random.default_rng(0)
    pop = data.ratings["item_id"].value_counts().index.to_numpy()
    for uid in (1, 2, 3):
        hist = data.ratings[data.ratings["user_id"] == uid]
        state = model.new_state(uid, T0, hist["item_id"].tolist(), [T0 - DAY_MS] * len(hist))
        before = state.to_dict()
        slate, value = model.oracle(state, T0, 10)
        assert state.to_dict() == before
        assert len(slate) == len(set(slate)) == 10
        assert value == pytest.approx(model.expected_value(state, slate, T0), rel=1e-12)
        for _ in range(20):
            rand = rng.choice(model.item_ids, 10, replace=False)
            assert value >= model.expected_value(state, rand, T0)
        unseen = [int(i) for i in pop if int(i) not in state.consumed][:10]
        assert value >= model.expected_value(state, pop[:10], T0)
        assert value >= model.expected_value(state, unseen, T0)
        assert state.to_dict() == before


def test_oracle_excludes_and_matches_greedy_over_all_items(either):
    model = either
    state = model.new_state(21, T0)
    rng = np.random.default_rng(4)
    for s in range(5):  # some recent watches, so the near-duplicate term is at play
        model.session_response(state, rng.choice(model.item_ids, 10), T0 + s * 60_000, rng)
    t = T0 + 10 * 60_000
    slate, _ = model.oracle(state, t, 10)
    excl = slate[:5] + [UNKNOWN]
    slate2, _ = model.oracle(state, t, 10, exclude=excl)
    assert not set(slate2) & set(excl)
    assert len(slate2) == 10
    # the candidate pruning is exact: same picks as greedy over every item
    for k, ex in ((10, None), (10, excl), (25, None)):
        got, _ = model.oracle(state, t, k, exclude=ex)
        ui, u = model._user(state, t)
        cons_t, skip_t = model._state_arrays(state)[:2]
        cfg, lam = model.config, model._lam
        rep = np.exp(-np.maximum(0.0, t - cons_t) * lam)
        base = (
            model.V @ (u + model.context_vector(state))
            + model.b
            + cfg.click_offset
            - cfg.repeat_penalty
            * (cons_t > -np.inf)
            * (cfg.repeat_floor + (1 - cfg.repeat_floor) * rep)
            - cfg.shown_penalty * np.exp(-np.maximum(0.0, t - skip_t) * lam)
        )
        p_like = 1 / (1 + np.exp(-(model.VL @ u + model.bl + model.ul[ui])))
        ew = model.duration_s * np.minimum(1.0, 0.2 + 0.75 * p_like)
        allowed = np.ones(len(model.item_ids), dtype=bool)
        if ex:
            idx = model.item_index(ex)
            allowed[idx[idx >= 0]] = False
        cand = np.flatnonzero(allowed)
        sim = model._similar(state, t, cand)
        full = model._greedy(cand, -np.inf, base, ew, sim, k)
        assert got == [int(i) for i in model.item_ids[full]]
    # k beyond the catalogue: every allowed item once
    everything, _ = model.oracle(model.new_state(21, T0), T0, 10_000, exclude=excl)
    assert len(everything) == len(model.item_ids) - 5
    assert model.oracle(state, t, 0) == ([], 0.0)


def test_a_sequential_model_responds_to_the_recent_watches_and_only_to_them(seq, model):
    """Two users alike but for what they watched lately (long ago for fatigue: 100 days
    at a 24 h half-life): the sequential model's P(click) of an unwatched item differs,
    the static model's does not; watches older than the last CONTEXT_LEN change
    nothing."""
    rng = np.random.default_rng(5)
    items = [int(i) for i in rng.permutation(seq.item_ids)]
    recent_a, recent_b = items[:CONTEXT_LEN], items[CONTEXT_LEN : 2 * CONTEXT_LEN]
    older_a, older_b = items[100:110], items[110:120]
    probe = items[200:230]
    past = T0 - 100 * DAY_MS

    def state(m, older, recent):
        hist = older + recent
        return m.new_state(3, T0, hist, [past + k for k in range(len(hist))])

    def p_click(m, st):
        return [p_first(m, st, i, T0) for i in probe]

    a, b = state(seq, older_a, recent_a), state(seq, older_a, recent_b)
    assert not np.allclose(seq.context_vector(a), seq.context_vector(b))
    assert max(abs(x - y) for x, y in zip(p_click(seq, a), p_click(seq, b), strict=True)) > 1e-3
    # the same recent watches after other old ones: the same responses
    a_old = state(seq, older_b, recent_a)
    assert np.array_equal(seq.context_vector(a), seq.context_vector(a_old))
    assert p_click(seq, a) == p_click(seq, a_old)
    # the static model reads no context
    sa, sb = state(model, older_a, recent_a), state(model, older_a, recent_b)
    assert not model.context_vector(sa).any()
    assert p_click(model, sa) == pytest.approx(p_click(model, sb), abs=1e-12)


def test_the_fit_report_ranks_the_next_item_beside_popularity(seq):
    rep = seq.report
    assert rep["kind"] == "sequential" and 0.0 < seq.context_decay < 1.0
    nxt = rep["next_item"]
    assert nxt["users"] > 0
    for name in ("model", "popularity"):
        assert 0.0 <= nxt[name]["NDCG@10"] <= nxt[name]["HR@10"] <= 1.0
    with pytest.raises(ValueError, match="kind"):
        HiddenUserModel.fit(synthetic(seed=0), epochs=1, kind="markov")


# ------------------------------------------------------------------ robustness


def test_unknown_item_ids_are_never_clicked_and_never_crash(model):
    state = model.new_state(23, T0)
    a, b = int(model.item_ids[0]), int(model.item_ids[1])
    r = model.session_response(state, [a, UNKNOWN, b, -5], T0, np.random.default_rng(0))
    assert r.p_click[1] == 0 and r.p_click[3] == 0
    assert not r.clicked[1] and r.watch_time_s[1] == 0 and not r.liked[1]
    assert UNKNOWN not in {i for i, _, _ in state.shown}
    only = model.session_response(state, [UNKNOWN], T0, np.random.default_rng(0))
    assert only.p_click[0] == 0 and only.expected_watch_s == 0
    empty = model.session_response(state, [], T0, np.random.default_rng(0))
    assert len(empty) == 0 and empty.expected_watch_s == 0
    assert model.expected_value(state, [UNKNOWN, a], T0) > 0
    unknown_hist = model.new_state(23, T0, history=[UNKNOWN, a])
    assert set(unknown_hist.consumed) == {a}
    with pytest.raises(KeyError, match="unknown user"):
        model.new_state(10**6, T0)


def test_expected_value_leaves_the_state_unchanged(model):
    state = model.new_state(25, T0, history=[int(model.item_ids[0])])
    before = state.to_dict()
    v = model.expected_value(state, model.item_ids[:10], T0)
    assert v > 0 and state.to_dict() == before


def test_state_round_trips_through_a_dict(model):
    state = model.new_state(27, T0)
    rng = np.random.default_rng(5)
    model.session_response(state, model.item_ids[:20], T0, rng)
    clone = UserState.from_dict(json.loads(json.dumps(state.to_dict())))
    a = model.session_response(state, model.item_ids[20:40], T0 + DAY_MS, np.random.default_rng(9))
    b = model.session_response(clone, model.item_ids[20:40], T0 + DAY_MS, np.random.default_rng(9))
    assert same(a, b)


def test_response_config_round_trip_and_validation():
    cfg = ResponseConfig(position_decay=0.8, browse_s=3.0)
    assert ResponseConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    d = ResponseConfig().to_dict()
    assert d["position_decay"] == 0.6 and d["repeat_penalty"] == 3.0
    assert d["follow_scale"] == 0.15 and d["fatigue_half_life_h"] == 24
    with pytest.raises(ValueError, match="unknown"):
        ResponseConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="similar_threshold"):
        ResponseConfig(similar_threshold=1.0)


# ------------------------------------------------------------------ persistence


def test_save_load_round_trip_gives_identical_responses(either, tmp_path):
    model = either
    path = model.save(tmp_path / "um")
    assert {p.name for p in path.iterdir()} == {"weights.safetensors", "model.json", "report.json"}
    loaded = HiddenUserModel.load(path)
    assert loaded.report == model.report and loaded.config == model.config
    assert loaded.kind == model.kind
    assert np.array_equal(loaded.item_ids, model.item_ids)
    slate = model.item_ids[:25]
    for uid in (1, 2):
        a = model.session_response(model.new_state(uid, T0), slate, T0, np.random.default_rng(2))
        b = loaded.session_response(loaded.new_state(uid, T0), slate, T0, np.random.default_rng(2))
        assert same(a, b)
    assert model.oracle(model.new_state(1, T0), T0, 10) == loaded.oracle(
        loaded.new_state(1, T0), T0, 10
    )
    # saving again replaces the directory whole
    model.with_config(ResponseConfig(browse_s=5.0)).save(path)
    assert HiddenUserModel.load(path).config.browse_s == 5.0
    assert [p.name for p in tmp_path.iterdir()] == ["um"]


def test_load_refuses_non_finite_weights(model, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = model.save(tmp_path / "um")
    arrays = load_file(str(path / "weights.safetensors"))
    arrays["item_emb"][3, 1] = np.nan
    save_file(arrays, str(path / "weights.safetensors"))
    with pytest.raises(ValueError, match=r"weights\.safetensors.*item_emb"):
        HiddenUserModel.load(path)


def test_fit_job_writes_a_loadable_model(tmp_path, capsys):
    from actors.sim.fit_user_model import main

    out = tmp_path / "job"
    assert (
        main(
            [
                "--data",
                "synthetic",
                "--out",
                str(out),
                "--epochs",
                "1",
                "--dim",
                "8",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == str(out)
    assert "watch_auc" in printed["report"]
    assert json.loads((out / "report.json").read_text()) == printed["report"]
    assert HiddenUserModel.load(out).dim == 8
