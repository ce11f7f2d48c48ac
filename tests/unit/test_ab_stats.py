"""A/B analysis statistics: metric values, user-level inference (A/A calibration, planted
lifts, clustering), sequential always-valid p-values vs peeking, fixed-horizon interim
verdicts, JSON-ability, determinism and errors. Synthetic session frames only."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from recloop.ab_stats import (
    METRICS,
    NO_VERDICT_FIXED,
    AnalysisConfig,
    analyze,
    format_table,
)

T_MS = 1_000_000


def make_sessions(
    rng: np.random.Generator,
    *,
    n_users: int = 150,
    arms: tuple[str, ...] = ("control", "treatment"),
    lift: dict[str, float] | None = None,
    sessions_per_user: float = 8.0,
    user_sd: float = 0.6,
    oracle: bool = False,
    covariate_noise: float | None = None,
) -> pd.DataFrame:
    """Sessions with user-level random effects (watch time level, view propensity) and
    several sessions per user; ``lift`` multiplies an arm's watch time. With
    ``covariate_noise``, a pre-experiment column ``pre_x`` per user: the log of the user's
    level plus normal noise of that SD (0: the level itself; large: unrelated)."""
    frames = []
    uid0 = 0
    for arm in arms:
        ns = 1 + rng.poisson(sessions_per_user - 1, n_users)
        users = np.repeat(np.arange(uid0, uid0 + n_users), ns)
        uid0 += n_users
        user_level = rng.lognormal(3.0, user_sd, n_users)
        level = np.repeat(user_level, ns)
        p_view = np.repeat(rng.beta(4, 4, n_users), ns)
        n = len(users)
        items = np.full(n, 6)
        views = rng.binomial(items, p_view)
        watch = level * rng.gamma(2.0, 0.5, n) * (1.0 + (lift or {}).get(arm, 0.0))
        cols = {
            "user_id": users,
            "arm": arm,
            "request_id": [f"{arm}-{i}" for i in range(n)],
            "t_ms": rng.integers(0, T_MS, n),
            "n_items": items,
            "views": views,
            "watch_s": watch,
            "likes": rng.binomial(views, 0.2),
            "follows": rng.binomial(items, 0.02),
        }
        if covariate_noise is not None:
            pre = np.log(user_level) + rng.normal(0.0, covariate_noise, n_users)
            cols["pre_x"] = np.repeat(pre, ns)
        if oracle:
            cols["expected_watch_s"] = level
            cols["oracle_watch_s"] = level * 1.25
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True)


def comparison(result: dict, metric: str, arm: str = "treatment") -> dict:
    (row,) = [r for r in result["comparisons"] if r["metric"] == metric and r["arm"] == arm]
    return row


def naive_session_p(df: pd.DataFrame) -> float:
    """Welch z-test on session-level watch time, as if sessions were independent."""
    x = df.loc[df["arm"] == "control", "watch_s"]
    y = df.loc[df["arm"] == "treatment", "watch_s"]
    z = (y.mean() - x.mean()) / math.sqrt(x.var() / len(x) + y.var() / len(y))
    return math.erfc(abs(z) / math.sqrt(2.0))


# --- values -------------------------------------------------------------------------


def test_metric_values_are_ratios_of_sums():
    df = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 3, 4, 4],
            "arm": ["control", "control", "control", "b", "b", "b"],
            "request_id": list("abcdef"),
            "t_ms": [0, 10, 20, 5, 15, 100],
            "n_items": [5, 5, 10, 4, 4, 2],
            "views": [1, 2, 3, 4, 0, 1],
            "watch_s": [10.0, 20.0, 30.0, 1.0, 2.0, 3.0],
            "likes": [0, 1, 1, 2, 0, 0],
            "follows": [0, 0, 1, 0, 0, 1],
            "expected_watch_s": [8.0, 9.0, 10.0, 1.0, np.nan, 2.0],
            "oracle_watch_s": [10.0, 10.0, 10.0, 4.0, 4.0, 4.0],
        }
    )
    r = analyze(
        df,
        AnalysisConfig(n_boot=50),
        policy="own-arm: each learning arm trains only on its own arm's traffic",
        meta={"run": 7, "note": ["x"]},
    )
    c = r["arms"]["control"]
    assert (c["users"], c["sessions"]) == (2, 3)
    assert c["metrics"]["swt"] == pytest.approx(20.0)
    assert c["metrics"]["vtr"] == pytest.approx(6 / 20)
    assert c["metrics"]["ltr"] == pytest.approx(2 / 20)
    assert c["metrics"]["wtr"] == pytest.approx(1 / 20)
    assert c["expected_swt"] == pytest.approx(9.0)
    assert c["oracle_swt"] == pytest.approx(10.0)
    assert c["oracle_gap"] == pytest.approx(1 - 27 / 30)
    b = r["arms"]["b"]
    assert b["expected_swt"] == pytest.approx(1.5)  # the NaN session is left out
    assert b["oracle_gap"] == pytest.approx(1 - 3 / 8)
    row = comparison(r, "swt", arm="b")
    assert row["control_value"] == pytest.approx(20.0)
    assert row["arm_value"] == pytest.approx(2.0)
    assert row["abs_lift"] == pytest.approx(-18.0)
    assert row["rel_lift"] == pytest.approx(-0.9)
    assert {x["metric"] for x in r["comparisons"]} == {*METRICS, "expected_swt"}
    assert r["policy"].startswith("own-arm")
    assert r["meta"] == {"run": 7, "note": ["x"]}
    assert r["horizon_reached"] is True
    # over time: 10 buckets by default covering every session once, values per bucket
    for arm, n in (("control", 3), ("b", 3)):
        series = r["over_time"][arm]
        assert len(series) == 10
        assert sum(x["sessions"] for x in series) == n
    first = r["over_time"]["control"][0]
    assert first["t_ms_start"] == 0 and first["sessions"] == 2  # t = 0 and 10 (width 11)
    assert first["swt"] == pytest.approx(15.0)
    assert r["over_time"]["control"][5]["swt"] is None  # empty bucket
    custom = analyze(df, AnalysisConfig(n_boot=0, bucket_ms=50))
    assert [x["sessions"] for x in custom["over_time"]["b"]] == [2, 0, 1]
    assert custom["bucket_ms"] == 50


def test_json_serializable_deterministic_and_none_for_undefined():
    rng = np.random.default_rng(3)
    df = make_sessions(rng, n_users=60, arms=("control", "a", "b"), oracle=True)
    df.loc[df["arm"] == "control", "follows"] = 0  # control wtr 0: relative lift undefined
    cfg = AnalysisConfig(n_boot=300, seed=11)
    r1 = analyze(df, cfg)
    text = json.dumps(r1, allow_nan=False)
    assert json.loads(text) == r1
    assert json.dumps(analyze(df, cfg), allow_nan=False) == text
    wtr = comparison(r1, "wtr", arm="a")
    assert wtr["control_value"] == 0.0 and wtr["rel_lift"] is None
    assert wtr["ci_boot"] == [None, None] and wtr["ci_delta"] == [None, None]
    # another seed changes the bootstrap only
    r2 = analyze(df, AnalysisConfig(n_boot=300, seed=12))
    assert comparison(r2, "swt", "a")["ci_boot"] != comparison(r1, "swt", "a")["ci_boot"]
    assert comparison(r2, "swt", "a")["p_value"] == comparison(r1, "swt", "a")["p_value"]
    # per-arm bootstrap streams: dropping arm b leaves a-vs-control untouched
    r3 = analyze(df[df["arm"] != "b"], cfg)
    assert comparison(r3, "swt", "a")["ci_boot"] == comparison(r1, "swt", "a")["ci_boot"]
    seq = analyze(df, AnalysisConfig(n_boot=0, design="sequential"))
    json.dumps(seq, allow_nan=False)
    assert len(seq["looks_t_ms"]) == 10
    table = format_table(r1)
    for s in ("control", "a vs control", "b vs control", "swt", "oracle gap", "95% CI"):
        assert s in table
    assert "p (av)" in format_table(seq)


# --- inference ----------------------------------------------------------------------


def test_aa_calibration_user_level():
    rng = np.random.default_rng(20240601)
    runs = 200
    reject = boot_cover = delta_cover = 0
    for i in range(runs):
        df = make_sessions(rng)
        row = comparison(analyze(df, AnalysisConfig(n_boot=200, seed=i)), "swt")
        reject += row["p_value"] < 0.05
        boot_cover += row["ci_boot"][0] <= 0 <= row["ci_boot"][1]
        delta_cover += row["ci_delta"][0] <= 0 <= row["ci_delta"][1]
    print(
        f"A/A x{runs}: p < 0.05 in {reject / runs:.1%}; bootstrap CI covers 0 in "
        f"{boot_cover / runs:.1%}, delta-method in {delta_cover / runs:.1%}"
    )
    assert 0.01 <= reject / runs <= 0.10
    assert boot_cover / runs >= 0.90
    assert delta_cover / runs >= 0.90


def test_session_level_clustering_matters():
    """Strong user effects and ~20 sessions per user: treating sessions as independent
    rejects a true null far too often; the user-level test stays near alpha."""
    rng = np.random.default_rng(5)
    runs = 200
    user_rej = naive_rej = 0
    for _ in range(runs):
        df = make_sessions(rng, n_users=60, sessions_per_user=20, user_sd=0.8)
        user_rej += comparison(analyze(df, AnalysisConfig(n_boot=0)), "swt")["p_value"] < 0.05
        naive_rej += naive_session_p(df) < 0.05
    print(
        f"A/A x{runs}, clustered: session-level test rejects {naive_rej / runs:.1%}, "
        f"user-level {user_rej / runs:.1%}"
    )
    assert naive_rej / runs >= 0.25
    assert user_rej / runs <= 0.10


@pytest.mark.parametrize("lift, verdict", [(0.10, "win"), (-0.10, "loss")])
def test_planted_lift_detected(lift, verdict):
    rng = np.random.default_rng(42)
    df = make_sessions(rng, n_users=2000, user_sd=0.5, lift={"treatment": lift})
    r = analyze(df, AnalysisConfig(n_boot=500))
    row = comparison(r, "swt")
    assert row["p_value"] < 0.01
    assert row["verdict"] == verdict and row["interim"] is False
    assert row["rel_lift"] == pytest.approx(lift, abs=0.05)
    for lo, hi in (row["ci_boot"], row["ci_delta"]):
        assert lo < hi and (lo > 0 if lift > 0 else hi < 0)
    # the untouched metrics do not move
    assert comparison(r, "vtr")["verdict"] == "no significant difference"
    seq = comparison(analyze(df, AnalysisConfig(n_boot=0, design="sequential")), "swt")
    assert seq["p_always_valid"] < 0.05 and seq["verdict"] == verdict
    assert seq["p_always_valid"] >= seq["p_value"]  # the price of always-valid inference


def test_sequential_always_valid_vs_peeking():
    rng = np.random.default_rng(99)
    runs = 200
    cfg = AnalysisConfig(design="sequential", looks=10, n_boot=0)
    av_rej = peek_rej = 0
    for _ in range(runs):
        row = comparison(analyze(make_sessions(rng), cfg), "swt")
        assert row["p_fixed_looks"][-1] == pytest.approx(row["p_value"])
        av_rej += row["p_always_valid"] < 0.05
        peek_rej += min(p for p in row["p_fixed_looks"] if p is not None) < 0.05
    print(
        f"A/A x{runs}, 10 looks: peeking at fixed p rejects {peek_rej / runs:.1%}, "
        f"mSPRT {av_rej / runs:.1%}"
    )
    assert av_rej / runs <= 0.06
    assert peek_rej / runs >= 0.09
    assert peek_rej >= av_rej + 10


def test_sequential_looks_are_time_prefixes():
    rng = np.random.default_rng(8)
    df = make_sessions(rng, n_users=80)
    r = analyze(df, AnalysisConfig(design="sequential", looks=4, n_boot=0))
    row = comparison(r, "swt")
    cut = r["looks_t_ms"][1]
    prefix = analyze(df[df["t_ms"] <= cut], AnalysisConfig(n_boot=0))
    assert row["p_fixed_looks"][1] == pytest.approx(comparison(prefix, "swt")["p_value"])
    assert row["tau2"] == pytest.approx(0.01 * row["control_value"] ** 2)
    assert 0.0 < row["p_always_valid"] <= 1.0


def test_fixed_design_before_horizon_is_interim():
    rng = np.random.default_rng(1)
    df = make_sessions(rng, n_users=2000, user_sd=0.5, lift={"treatment": 0.2})
    n_min = int(df.groupby("arm").size().min())
    early = analyze(df, AnalysisConfig(n_boot=0, horizon_sessions=n_min + 1))
    assert early["horizon_reached"] is False
    for row in early["comparisons"]:
        assert row["interim"] is True and row["verdict"] == NO_VERDICT_FIXED
    assert comparison(early, "swt")["p_value"] < 0.01  # still reported
    by_time = analyze(df, AnalysisConfig(n_boot=0, horizon_ms=2 * T_MS))
    assert by_time["horizon_reached"] is False
    assert comparison(by_time, "swt")["verdict"] == NO_VERDICT_FIXED
    done = analyze(df, AnalysisConfig(n_boot=0, horizon_sessions=n_min, horizon_ms=T_MS // 2))
    assert done["horizon_reached"] is True
    assert comparison(done, "swt")["verdict"] == "win"
    assert comparison(done, "swt")["interim"] is False
    # sequential: verdicts are valid at any time, interim is only reported
    seq = analyze(df, AnalysisConfig(n_boot=0, design="sequential", horizon_sessions=n_min + 1))
    assert comparison(seq, "swt")["interim"] is True
    assert comparison(seq, "swt")["verdict"] == "win"


# --- errors -------------------------------------------------------------------------


def test_clear_errors():
    rng = np.random.default_rng(0)
    df = make_sessions(rng, n_users=10)
    with pytest.raises(ValueError, match="missing required column.*watch_s.*likes"):
        analyze(df.drop(columns=["watch_s", "likes"]))
    with pytest.raises(ValueError, match="no control arm 'baseline'.*control, treatment"):
        analyze(df, AnalysisConfig(control="baseline"))
    lonely = pd.concat([df, df[df["arm"] == "control"].head(3).assign(arm="solo", user_id=-1)])
    with pytest.raises(ValueError, match="at least 2 users.*'solo' has 1"):
        analyze(lonely)
    with pytest.raises(ValueError, match="design"):
        analyze(df, AnalysisConfig(design="bayesian"))
    with pytest.raises(ValueError, match="no control arm"):
        analyze(df.iloc[0:0])
    bad = df.copy()
    bad.loc[0, "views"] = np.nan
    with pytest.raises(ValueError, match="'views' has missing values"):
        analyze(bad)


# --- CUPED ------------------------------------------------------------------------------


def test_cuped_keeps_the_aa_false_positive_rate_and_narrows_the_test():
    """A/A with a pre-experiment covariate that tracks each user's level: the adjusted
    test still rejects ~alpha of true nulls, its estimates scatter less across runs than
    the plain ones, and each run reports the variance it took out."""
    rng = np.random.default_rng(2013)
    runs = 200
    reject = plain_reject = 0
    est, plain_est, reductions = [], [], []
    for _ in range(runs):
        df = make_sessions(rng, covariate_noise=0.3)
        row = comparison(analyze(df, AnalysisConfig(n_boot=0, covariates=("pre_x",))), "swt")
        reject += row["p_value"] < 0.05
        plain_reject += row["unadjusted"]["p_value"] < 0.05
        est.append(row["rel_lift"])
        plain_est.append(row["unadjusted"]["rel_lift"])
        reductions.append(row["variance_reduction"])
    sd, plain_sd = float(np.std(est)), float(np.std(plain_est))
    print(
        f"A/A x{runs} with CUPED: p < 0.05 in {reject / runs:.1%} "
        f"(plain {plain_reject / runs:.1%}); SD of the lift {sd:.4f} (plain {plain_sd:.4f}); "
        f"variance reduction median {np.median(reductions):.2f}"
    )
    assert 0.01 <= reject / runs <= 0.10
    assert abs(float(np.mean(est))) < 0.02  # no bias under the null
    assert sd < 0.8 * plain_sd
    assert float(np.median(reductions)) > 0.4


def test_cuped_recovers_a_planted_lift_with_a_tighter_interval():
    rng = np.random.default_rng(7)
    df = make_sessions(rng, n_users=600, lift={"treatment": 0.08}, covariate_noise=0.2)
    r = analyze(df, AnalysisConfig(n_boot=400, covariates=("pre_x",)))
    row = comparison(r, "swt")
    plain = comparison(analyze(df, AnalysisConfig(n_boot=400)), "swt")
    assert row["unadjusted"]["rel_lift"] == pytest.approx(plain["rel_lift"])
    assert row["unadjusted"]["p_value"] == pytest.approx(plain["p_value"])
    assert row["rel_lift"] == pytest.approx(0.08, abs=0.04)
    assert row["p_value"] < plain["p_value"]
    width = row["ci_delta"][1] - row["ci_delta"][0]
    assert width < 0.8 * (plain["ci_delta"][1] - plain["ci_delta"][0])
    lo, hi = row["ci_boot"]
    assert lo < row["rel_lift"] < hi and hi - lo < 0.8 * (plain["ci_boot"][1] - plain["ci_boot"][0])
    adj = r["adjustment"]
    assert adj["method"] == "cuped" and adj["covariates"] == ["pre_x"]
    assert adj["theta"]["swt"][0] > 0  # more history-level, more watch time
    from recloop.ab_stats import unadjusted_fields

    assert unadjusted_fields(row) == {
        "unadjusted_rel_lift": row["unadjusted"]["rel_lift"],
        "unadjusted_p_value": row["unadjusted"]["p_value"],
        "variance_reduction": row["variance_reduction"],
    }
    assert unadjusted_fields(plain) == {}
    # the arms keep their plain values; the sequential design adjusts each look
    assert r["arms"]["treatment"]["metrics"]["swt"] == pytest.approx(plain["arm_value"])
    seq = comparison(
        analyze(df, AnalysisConfig(n_boot=0, design="sequential", covariates=["pre_x"])), "swt"
    )
    plain_seq = comparison(analyze(df, AnalysisConfig(n_boot=0, design="sequential")), "swt")
    assert seq["p_always_valid"] <= plain_seq["p_always_valid"]
    json.dumps(r, allow_nan=False)


def test_cuped_with_an_unrelated_covariate_changes_little():
    rng = np.random.default_rng(11)
    df = make_sessions(rng, n_users=400, covariate_noise=50.0)
    row = comparison(analyze(df, AnalysisConfig(n_boot=0, covariates="pre_x")), "swt")
    assert abs(row["variance_reduction"]) < 0.05
    assert row["rel_lift"] == pytest.approx(row["unadjusted"]["rel_lift"], abs=0.01)


def test_cuped_refuses_covariates_that_are_not_pre_experiment():
    rng = np.random.default_rng(3)
    df = make_sessions(rng, n_users=20, covariate_noise=0.5)
    with pytest.raises(ValueError, match="not a column"):
        analyze(df, AnalysisConfig(covariates=("nope",)))
    moving = df.assign(pre_x=np.arange(len(df), dtype=float))  # differs per session
    with pytest.raises(ValueError, match="varies within unit"):
        analyze(moving, AnalysisConfig(covariates=("pre_x",)))
    holes = df.assign(pre_x=df["pre_x"].where(df.index > 0))
    with pytest.raises(ValueError, match="missing or non-numeric"):
        analyze(holes, AnalysisConfig(covariates=("pre_x",)))


# --- cluster randomisation -----------------------------------------------------------


def _clustered_aa(rng: np.random.Generator, clusters: int = 40, per: int = 15) -> pd.DataFrame:
    """A/A where whole clusters were assigned and users of a cluster share a level."""
    rows = []
    for c in range(clusters):
        arm = "control" if c % 2 == 0 else "treatment"
        level = rng.lognormal(3.0, 0.5)
        for k in range(per):
            u = c * per + k
            for s in range(4):
                rows.append(
                    {
                        "user_id": u,
                        "cluster": f"cluster:{c}",
                        "arm": arm,
                        "request_id": f"{u}-{s}",
                        "t_ms": int(rng.integers(0, T_MS)),
                        "n_items": 6,
                        "views": int(rng.binomial(6, 0.5)),
                        "watch_s": level * rng.lognormal(0.0, 0.3) * rng.gamma(2.0, 0.5),
                        "likes": 0,
                        "follows": 0,
                        "pre_x": float(u % 7),
                    }
                )
    return pd.DataFrame(rows)


def test_clusters_are_the_units_when_clusters_were_assigned():
    """Users of a cluster alike and the cluster assigned whole: a test with users as units
    rejects a true null far too often; with clusters as units it stays near alpha."""
    rng = np.random.default_rng(77)
    runs = 150
    user_rej = cluster_rej = 0
    for _ in range(runs):
        df = _clustered_aa(rng)
        user_rej += comparison(analyze(df, AnalysisConfig(n_boot=0)), "swt")["p_value"] < 0.05
        r = analyze(df, AnalysisConfig(n_boot=0, unit="cluster"))
        cluster_rej += comparison(r, "swt")["p_value"] < 0.05
    print(f"A/A x{runs}, clusters assigned: users as units reject {user_rej / runs:.1%}, "
          f"clusters {cluster_rej / runs:.1%}")  # fmt: skip
    assert user_rej / runs >= 0.25
    assert cluster_rej / runs <= 0.10
    assert r["arms"]["control"]["users"] == 20  # units: 20 clusters a side


def test_a_cluster_run_is_analysed_by_cluster_with_cluster_covariates():
    from pipelines.analysis.ab_analysis import randomisation_units

    df = _clustered_aa(np.random.default_rng(1), clusters=4, per=3).drop(columns="cluster")
    experiment = {
        "name": "e",
        "salt": "s",
        "unit": "cluster",
        "clusters": {str(u): f"g{u // 3}" for u in range(9)},  # users 9-11: no cluster
        "arms": [{"name": "control", "share": 0.5}, {"name": "treatment", "share": 0.5}],
    }
    out, settings = randomisation_units(df, experiment, {"covariates": ["pre_x"]})
    assert settings == {"covariates": ["pre_x"], "unit": "cluster"}
    assert out.loc[out["user_id"] == 4, "cluster"].unique().tolist() == ["cluster:g1"]
    assert out.loc[out["user_id"] == 10, "cluster"].unique().tolist() == ["user:10"]
    # each cluster's covariate: the mean of its users' (users 3, 4, 5: 3, 4, 5 -> 4)
    assert out.loc[out["cluster"] == "cluster:g1", "pre_x"].unique().tolist() == [4.0]
    same, kept = randomisation_units(df, {**experiment, "unit": "user", "clusters": {}}, {})
    assert same is df and kept == {}
    with pytest.raises(ValueError, match="column 'cluster' is missing"):
        analyze(df, AnalysisConfig(unit="cluster"))
