"""A/B analysis statistics: per-arm metrics, lifts, CIs, p-values and verdicts. Pure.

Input: a pandas DataFrame ``sessions``, one row per served session, with the columns
``user_id, arm, request_id, t_ms, n_items, views, watch_s, likes, follows`` and
optionally ``expected_watch_s`` (the hidden model's expected session watch time of the
served slate) and ``oracle_watch_s`` (the best achievable one at that moment). A NaN in an
optional column means "unknown for this session": that session is left out of the
metrics built on that column only.

Metrics (OneRec's, mapped onto the simulator); every one is a ratio of sums, and higher
is better for all of them:

=============== ============================================ ==========================
``swt``         session watch time                           sum(watch_s) / sessions
``vtr``         view rate                                    sum(views) / sum(n_items)
``ltr``         like rate                                    sum(likes) / sum(n_items)
``wtr``         follow rate                                  sum(follows) / sum(n_items)
``expected_swt`` mean expected_watch_s (if the column exists) sum(expected) / sessions
``oracle_swt``  mean oracle_watch_s (if the column exists)   sum(oracle) / sessions
``oracle_gap``  1 - sum(expected) / sum(oracle) (both exist) per arm only, no test
=============== ============================================ ==========================

Inference. The router randomizes USERS, so users are the independent units: every
metric is aggregated per user (numerator and denominator sums) and treated as a
ratio of means over users. A cluster-randomised experiment assigns whole clusters, so
its clusters are the units (``unit``: the column that names each session's cluster; the
same formulas with clusters in place of users). Per metric and non-control arm vs
control:

- absolute lift ``arm - control`` and relative lift ``arm / control - 1``;
- ``p_value``: two-sided z-test of the difference, each arm's variance by the delta
  method for a ratio of means, ``Var(R) = Var_u(N_u - R D_u) / (n mean(D)^2)``,
  unequal variances (Welch-like);
- ``ci_delta``: delta-method CI of the relative lift;
- ``ci_boot``: percentile CI of the relative lift, bootstrapping users within each arm
  (multinomial weights, ``n_boot`` replicates, seeded per arm from ``seed`` and the arm
  name, so results are deterministic and do not depend on which other arms exist);
  ``[None, None]`` when ``n_boot`` is 0. CIs are at level ``1 - alpha``;
- ``design="fixed"``: the verdict uses ``p_value``, and only once the horizon is
  reached (``horizon_sessions``: min sessions per arm, and/or ``horizon_ms``: virtual
  duration covered by ``t_ms``; with neither set the horizon counts as reached). Before
  it every comparison is ``interim`` with verdict :data:`NO_VERDICT_FIXED`;
- ``design="sequential"``: mixture SPRT (Johari et al., "always valid p-values") on the
  difference, normal mixing distribution N(0, tau2) with
  ``tau2 = tau2_rel * control_value^2`` (control value over all data). At each look
  (``looks`` cumulative prefixes, cut at equally spaced ``t_ms``) with difference ``d``
  and its delta-method variance ``V``:
  ``Lambda = sqrt(V / (V + tau2)) * exp(tau2 d^2 / (2 V (V + tau2)))``;
  ``p_always_valid`` is the running minimum of ``min(1, 1 / Lambda)`` and the verdict
  uses it, so peeking at every look does not inflate significance. ``p_fixed_looks``
  holds the ordinary z-test p-value at each look (for plots; taking its minimum is
  exactly the peeking that inflates false positives). ``interim`` is still reported.
- verdict: ``"win"`` / ``"loss"`` (significant at ``alpha``, by the sign of the
  difference) or ``"no significant difference"``.

Variance reduction (CUPED, Deng et al. WSDM 2013; for ratio metrics through the delta
method, Deng, Knoblich & Lu KDD 2018). ``covariates`` names columns of ``sessions``
that hold what was known of each user *before* the experiment (constant per user, e.g.
``pre_log_history``: how much history the user came with). Users differ far more from
each other than arms do, and what a user brought explains part of that spread; the
adjustment takes that part out of every comparison without moving its expectation.
Per metric, each user's linearised contribution ``L_u = (N_u - R D_u) / mean(D)`` is
regressed on the centred covariates within arms (one pooled ``theta`` per metric, arm
fixed effects), and each arm's value becomes ``R - theta . (mean_arm(X) - mean_all(X))``
with variance ``Var_u(L_u - theta . X_u) / n``. Randomisation makes the covariates'
arm means differ by chance only, so the adjusted difference has the same expectation
and a smaller variance (by ``1 - corr(L, X)^2`` with one covariate). Tests, intervals
(the bootstrap with ``theta`` held fixed) and sequential looks (``theta`` refitted on
each look's data) use the adjusted values; each comparison also carries the
``unadjusted`` figures and its ``variance_reduction``, and ``arms`` keeps the plain
metric values.

Result of :func:`analyze` (JSON-able: no NaN/inf, those become ``None``)::

    {
      "config": {...AnalysisConfig fields...},
      "policy": str,                        # carried verbatim
      "meta": dict,                         # carried verbatim ({} when None)
      "horizon_reached": bool,
      "bucket_ms": int,                     # width of the over_time buckets
      "looks_t_ms": [int, ...],             # sequential only: the look cut-offs
      "arms": {arm: {"users": int, "sessions": int,
                     "metrics": {"swt": float, "vtr": ..., "ltr": ..., "wtr": ...},
                     "expected_swt"?: float, "oracle_swt"?: float, "oracle_gap"?: float}},
      "comparisons": [{"arm", "control", "metric", "control_value", "arm_value",
                       "abs_lift", "rel_lift", "ci_boot": [lo, hi], "ci_delta": [lo, hi],
                       "p_value", "p_always_valid"?, "p_fixed_looks"?, "tau2"?,
                       "verdict", "interim": bool,
                       "unadjusted"?: {...}, "variance_reduction"?: float}],
      "adjustment"?: {"method": "cuped", "covariates": [...], "theta": {metric: [...]}},
      "over_time": {arm: [{"t_ms_start", "t_ms_end", "sessions", "swt", "vtr", "ltr",
                           "wtr", "expected_swt"?, "oracle_swt"?, "oracle_gap"?,
                           "<metric>_ci": [lo, hi] | None (95%, sessions as units)}]},
    }

``comparisons`` covers :data:`METRICS` and, when ``expected_watch_s`` is present,
``expected_swt`` (the same test on the model's expected watch time, far less noisy).
Arms are ordered control first, then by name. A user seen in several arms counts as
a separate unit in each.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

METRICS = ("swt", "vtr", "ltr", "wtr")
REQUIRED_COLUMNS = (
    "user_id",
    "arm",
    "request_id",
    "t_ms",
    "n_items",
    "views",
    "watch_s",
    "likes",
    "follows",
)
DESIGNS = ("fixed", "sequential")
NO_VERDICT_FIXED = "no verdict (fixed-horizon design, horizon not reached)"
WIN, LOSS, NO_DIFF = "win", "loss", "no significant difference"

_GAP = "_gap_ratio"  # internal: sum(expected) / sum(oracle) over sessions having both


@dataclass
class AnalysisConfig:
    control: str = "control"
    alpha: float = 0.05
    design: str = "fixed"  # or "sequential"
    horizon_sessions: int | None = None  # per arm; None = no session horizon
    horizon_ms: int | None = None  # virtual duration (max t_ms - min t_ms); None = none
    n_boot: int = 2000  # 0 = no bootstrap CI
    seed: int = 0
    looks: int = 10  # sequential design: number of equally spaced looks in t_ms
    tau2_rel: float = 0.01  # mSPRT mixing variance relative to control value squared
    buckets: int = 10  # over_time: range split into this many buckets ...
    bucket_ms: int | None = None  # ... unless a bucket width is given
    # Pre-experiment columns of ``sessions`` (constant per user) for CUPED; () = none.
    covariates: tuple[str, ...] = ()
    # The column of the randomisation unit: users, or the clusters a cluster-randomised
    # experiment assigns (``recloop.experiment``, ``unit: cluster``).
    unit: str = "user_id"

    def __post_init__(self) -> None:
        if isinstance(self.covariates, str):
            self.covariates = (self.covariates,)
        self.covariates = tuple(self.covariates)


@dataclass
class _ArmData:
    name: str
    codes: np.ndarray  # (sessions,) user index within the arm
    t: np.ndarray  # (sessions,) t_ms
    num: np.ndarray  # (sessions, k) per-session numerators
    den: np.ndarray  # (sessions, k) per-session denominators
    n_users: int
    cov: np.ndarray  # (sessions, p) pre-experiment covariates (p = 0: none)


def _clean(x: Any) -> float | None:
    """A finite Python float, or None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _p_two_sided(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2.0))


def _validate(sessions: pd.DataFrame, config: AnalysisConfig) -> None:
    if not isinstance(sessions, pd.DataFrame):
        raise ValueError(f"sessions must be a pandas DataFrame, got {type(sessions).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in sessions.columns]
    if missing:
        raise ValueError(
            f"sessions is missing required column(s): {', '.join(missing)} "
            f"(required: {', '.join(REQUIRED_COLUMNS)})"
        )
    if config.design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {config.design!r}")
    if not 0.0 < config.alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {config.alpha}")
    if config.n_boot < 0 or config.looks < 1 or config.buckets < 1:
        raise ValueError("n_boot must be >= 0, looks >= 1 and buckets >= 1")
    if config.bucket_ms is not None and config.bucket_ms <= 0:
        raise ValueError(f"bucket_ms must be positive, got {config.bucket_ms}")
    for c in REQUIRED_COLUMNS:
        if sessions[c].isna().any():
            raise ValueError(f"column {c!r} has missing values")
    arms = set(sessions["arm"].astype(str).unique())
    if config.control not in arms:
        raise ValueError(
            f"no control arm {config.control!r} in sessions (arms present: "
            f"{', '.join(sorted(arms)) or 'none'})"
        )
    if config.unit not in sessions.columns or sessions[config.unit].isna().any():
        raise ValueError(
            f"the randomisation unit's column {config.unit!r} is missing or has missing values"
        )
    for c in config.covariates:
        if c not in sessions.columns:
            raise ValueError(
                f"covariate {c!r} is not a column of sessions (columns: "
                f"{', '.join(map(str, sessions.columns))})"
            )
        x = pd.to_numeric(sessions[c], errors="coerce")
        if not np.isfinite(x.to_numpy(dtype=float)).all():
            raise ValueError(f"covariate {c!r} has missing or non-numeric values")
        spread = x.groupby(sessions[config.unit]).nunique()
        if (spread > 1).any():
            u = spread.index[spread > 1][0]
            raise ValueError(
                f"covariate {c!r} varies within unit {u!r}: a covariate must be known "
                "before the experiment (one value per user or cluster), or the adjustment "
                "is biased"
            )
    users = sessions.groupby(sessions["arm"].astype(str))[config.unit].nunique()
    few = sorted(a for a, n in users.items() if n < 2)
    if few:
        what = (
            "users (users are the randomization unit)"
            if config.unit == "user_id"
            else f"units (the randomization unit: {config.unit})"
        )
        raise ValueError(
            f"every arm needs at least 2 {what}; "
            + ", ".join(f"arm {a!r} has {int(users[a])}" for a in few)
        )


def _metric_columns(sessions: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names and per-session numerator/denominator matrices of every ratio metric."""
    n = len(sessions)
    ones = np.ones(n)
    items = sessions["n_items"].to_numpy(dtype=float)
    names: list[str] = []
    nums: list[np.ndarray] = []
    dens: list[np.ndarray] = []

    def add(name: str, num: np.ndarray, den: np.ndarray) -> None:
        names.append(name)
        nums.append(num)
        dens.append(den)

    add("swt", sessions["watch_s"].to_numpy(dtype=float), ones)
    add("vtr", sessions["views"].to_numpy(dtype=float), items)
    add("ltr", sessions["likes"].to_numpy(dtype=float), items)
    add("wtr", sessions["follows"].to_numpy(dtype=float), items)
    exp = orc = None
    if "expected_watch_s" in sessions.columns:
        exp = pd.to_numeric(sessions["expected_watch_s"], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(exp)
        add("expected_swt", np.where(ok, exp, 0.0), ok.astype(float))
    if "oracle_watch_s" in sessions.columns:
        orc = pd.to_numeric(sessions["oracle_watch_s"], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(orc)
        add("oracle_swt", np.where(ok, orc, 0.0), ok.astype(float))
    if exp is not None and orc is not None:
        ok = np.isfinite(exp) & np.isfinite(orc)
        add(_GAP, np.where(ok, exp, 0.0), np.where(ok, orc, 0.0))
    return names, np.column_stack(nums), np.column_stack(dens)


def _user_sums(arm: _ArmData, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-user numerator and denominator sums (users with >= 1 session in the mask)."""
    codes, num, den = arm.codes, arm.num, arm.den
    if mask is not None:
        codes, num, den = codes[mask], num[mask], den[mask]
    count = np.bincount(codes, minlength=arm.n_users)
    keep = count > 0
    k = num.shape[1]
    N = np.empty((int(keep.sum()), k))
    D = np.empty_like(N)
    for j in range(k):
        N[:, j] = np.bincount(codes, weights=num[:, j], minlength=arm.n_users)[keep]
        D[:, j] = np.bincount(codes, weights=den[:, j], minlength=arm.n_users)[keep]
    return N, D


def _ratio_stats(N: np.ndarray, D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ratio of means over users and its delta-method variance, per metric column."""
    n = N.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        R = N.sum(axis=0) / D.sum(axis=0)
        if n < 2:
            return R, np.full_like(R, np.nan)
        resid = N - R * D
        var = resid.var(axis=0, ddof=1) / (n * D.mean(axis=0) ** 2)
    return R, var


def _boot_ratios(
    N: np.ndarray, D: np.ndarray, n_boot: int, rng: np.random.Generator, X: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(n_boot, k) bootstrap replicates of the ratios, resampling users (multinomial),
    and (n_boot, p) of the covariates' means in the same replicates."""
    n, k = N.shape
    ND = np.hstack([N, D, X])
    out = np.empty((n_boot, ND.shape[1]))
    chunk = max(1, 2_000_000 // max(n, 1))
    for s in range(0, n_boot, chunk):
        b = min(chunk, n_boot - s)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        W = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)
        out[s : s + b] = W @ ND
    with np.errstate(divide="ignore", invalid="ignore"):
        return out[:, :k] / out[:, k : 2 * k], out[:, 2 * k :] / n


def _user_covariates(arm: _ArmData, mask: np.ndarray | None = None) -> np.ndarray:
    """(users, p) each user's covariates, users in ``_user_sums``' order."""
    codes, cov = arm.codes, arm.cov
    if mask is not None:
        codes, cov = codes[mask], cov[mask]
    out = np.zeros((arm.n_users, cov.shape[1]))
    out[codes] = cov  # one value per user (checked): any of its sessions will do
    return out[np.bincount(codes, minlength=arm.n_users) > 0]


def _cuped(
    per_arm: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """CUPED for ratio metrics: ``per_arm`` maps an arm to its users' (N, D, X). Returns
    per arm (adjusted ratios, their variance, the arm's covariate means), ``theta``
    (p, k) and the pooled covariate means ``mu`` (p,)."""
    lin: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for a, (N, D, X) in per_arm.items():
        with np.errstate(divide="ignore", invalid="ignore"):
            R = N.sum(axis=0) / D.sum(axis=0)
            L = (N - R * D) / D.mean(axis=0)
        lin[a] = (R, L, X - X.mean(axis=0))
    Xc = np.vstack([x for _, _, x in lin.values()])
    Ls = np.vstack([L for _, L, _ in lin.values()])
    p, k = Xc.shape[1], Ls.shape[1]
    theta = np.zeros((p, k))
    for j in range(k):
        ok = np.isfinite(Ls[:, j])
        if ok.sum() > p + len(per_arm) and np.any(Xc[ok]):
            theta[:, j] = np.linalg.lstsq(Xc[ok], Ls[ok, j], rcond=None)[0]
    mu = np.vstack([X for _, _, X in per_arm.values()]).mean(axis=0)
    out = {}
    for a, (N, _, X) in per_arm.items():
        R, L, xc = lin[a]
        xbar = X.mean(axis=0)
        n = N.shape[0]
        with np.errstate(invalid="ignore"):
            adj = R - (xbar - mu) @ theta
            V = (L - xc @ theta).var(axis=0, ddof=1) / n if n >= 2 else np.full_like(R, np.nan)
        out[a] = (adj, V, xbar)
    return out, theta, mu


def _arm_rng(seed: int, arm: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(arm.encode("utf-8"))])


def _verdict(p: float | None, diff: float, alpha: float) -> str:
    if p is not None and p < alpha and diff != 0:
        return WIN if diff > 0 else LOSS
    return NO_DIFF


def analyze(
    sessions: pd.DataFrame,
    config: AnalysisConfig | None = None,
    *,
    policy: str = "",
    meta: dict | None = None,
) -> dict:
    """Analyze an A/B experiment from its served sessions; see the module docstring."""
    config = config if config is not None else AnalysisConfig()
    _validate(sessions, config)
    alpha = float(config.alpha)
    zq = NormalDist().inv_cdf(1.0 - alpha / 2.0)

    names, num, den = _metric_columns(sessions)
    col = {m: j for j, m in enumerate(names)}
    tested = [m for m in (*METRICS, "expected_swt") if m in col]
    arm_col = sessions["arm"].astype(str).to_numpy()
    t_all = sessions["t_ms"].to_numpy(dtype=np.int64)
    uid = sessions[config.unit].to_numpy()  # the units: users, or clusters of them
    cov_all = (
        sessions[list(config.covariates)].apply(pd.to_numeric).to_numpy(dtype=float)
        if config.covariates
        else np.zeros((len(sessions), 0))
    )
    adjust = bool(config.covariates)
    others = sorted(set(arm_col) - {config.control})
    order = [config.control, *others]

    arms: dict[str, _ArmData] = {}
    for a in order:
        sel = arm_col == a
        codes, uniq = pd.factorize(uid[sel], sort=True)
        arms[a] = _ArmData(
            a, codes.astype(np.int64), t_all[sel], num[sel], den[sel], len(uniq), cov_all[sel]
        )

    t0, t1 = int(t_all.min()), int(t_all.max())
    reached = True
    if config.horizon_sessions is not None:
        reached &= min(len(d.t) for d in arms.values()) >= config.horizon_sessions
    if config.horizon_ms is not None:
        reached &= (t1 - t0) >= config.horizon_ms
    reached = bool(reached)

    # Full-data statistics and bootstrap replicates per arm.
    # ``stats``: what the comparisons test (adjusted under CUPED); ``plain``: unadjusted.
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    plain: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    boots: dict[str, np.ndarray] = {}
    boot_x: dict[str, np.ndarray] = {}
    users: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    arms_out: dict[str, dict] = {}
    for a, d in arms.items():
        N, D = _user_sums(d)
        users[a] = (N, D, _user_covariates(d))
        R, V = _ratio_stats(N, D)
        stats[a] = plain[a] = (R, V)
        if config.n_boot > 0:
            boots[a], boot_x[a] = _boot_ratios(
                N, D, config.n_boot, _arm_rng(config.seed, a), users[a][2]
            )
        entry: dict[str, Any] = {
            "users": int(d.n_users),
            "sessions": int(len(d.t)),
            "metrics": {m: _clean(R[col[m]]) for m in METRICS},
        }
        for m in ("expected_swt", "oracle_swt"):
            if m in col:
                entry[m] = _clean(R[col[m]])
        if _GAP in col:
            entry["oracle_gap"] = _clean(1.0 - R[col[_GAP]])
        arms_out[a] = entry
    adjustment: dict[str, Any] | None = None
    if adjust:
        adjusted, theta, mu = _cuped(users)
        stats = {a: (R, V) for a, (R, V, _) in adjusted.items()}
        if config.n_boot > 0:
            boots = {a: boots[a] - (boot_x[a] - mu) @ theta for a in boots}
        adjustment = {
            "method": "cuped",
            "covariates": list(config.covariates),
            "covariate_means": {
                "all": [_clean(x) for x in mu],
                **{a: [_clean(x) for x in xb] for a, (_, _, xb) in adjusted.items()},
            },
            "theta": {m: [_clean(x) for x in theta[:, col[m]]] for m in tested},
        }

    # Sequential looks: per-arm statistics on cumulative prefixes in time order.
    look_cuts: list[int] = []
    look_stats: list[dict[str, tuple[np.ndarray, np.ndarray, int]]] = []
    if config.design == "sequential":
        for k in range(1, config.looks + 1):
            cut = t1 if k == config.looks else t0 + (t1 - t0) * k // config.looks
            look_cuts.append(int(cut))
            per_arm = {}
            look_users = {}
            for a, d in arms.items():
                N, D = _user_sums(d, d.t <= cut)
                R, V = _ratio_stats(N, D)
                per_arm[a] = (R, V, N.shape[0])
                look_users[a] = (N, D, _user_covariates(d, d.t <= cut))
            if adjust and all(N.shape[0] >= 2 for N, _, _ in look_users.values()):
                adj_k, _, _ = _cuped(look_users)  # theta from this look's data only
                per_arm = {a: (R, V, per_arm[a][2]) for a, (R, V, _) in adj_k.items()}
            look_stats.append(per_arm)

    comparisons = []
    c = config.control
    Rc, Vc = stats[c]
    for a in others:
        Ra, Va = stats[a]
        for m in tested:
            j = col[m]
            rc, ra, vc, va = float(Rc[j]), float(Ra[j]), float(Vc[j]), float(Va[j])
            diff, p, rel, ci_delta = _z_test(rc, vc, ra, va, zq)
            ci_boot: list[float | None] = [None, None]
            if config.n_boot > 0:
                with np.errstate(divide="ignore", invalid="ignore"):
                    rb = boots[a][:, j] / boots[c][:, j] - 1.0
                rb = rb[np.isfinite(rb)]
                if rb.size >= max(2, config.n_boot // 2):
                    lo, hi = np.quantile(rb, [alpha / 2.0, 1.0 - alpha / 2.0])
                    ci_boot = [_clean(lo), _clean(hi)]
            row: dict[str, Any] = {
                "arm": a,
                "control": c,
                "metric": m,
                "control_value": _clean(rc),
                "arm_value": _clean(ra),
                "abs_lift": _clean(diff),
                "rel_lift": _clean(rel),
                "ci_boot": ci_boot,
                "ci_delta": ci_delta,
                "p_value": _clean(p),
            }
            if adjust:
                (Rc0, Vc0), (Ra0, Va0) = plain[c], plain[a]
                rc0, vc0, ra0, va0 = float(Rc0[j]), float(Vc0[j]), float(Ra0[j]), float(Va0[j])
                _, p0, rel0, ci0 = _z_test(rc0, vc0, ra0, va0, zq)
                row["unadjusted"] = {
                    "control_value": _clean(rc0),
                    "arm_value": _clean(ra0),
                    "rel_lift": _clean(rel0),
                    "ci_delta": ci0,
                    "p_value": _clean(p0),
                }
                v0 = va0 + vc0
                row["variance_reduction"] = _clean(1.0 - (va + vc) / v0) if v0 > 0 else None
            p_decide = p
            if config.design == "sequential":
                scale = abs(rc) if rc != 0 and math.isfinite(rc) else abs(ra)
                tau2 = config.tau2_rel * (scale**2 if scale and math.isfinite(scale) else 1.0)
                p_av, p_looks = 1.0, []
                for per_arm in look_stats:
                    (rc_k, vc_k, nc_k), (ra_k, va_k, na_k) = per_arm[c], per_arm[a]
                    d_k = float(ra_k[j] - rc_k[j])
                    v_k = float(va_k[j] + vc_k[j])
                    if nc_k < 2 or na_k < 2 or not (math.isfinite(d_k) and math.isfinite(v_k)):
                        p_looks.append(None)
                        continue
                    if v_k <= 0:
                        p_looks.append(1.0 if d_k == 0 else 0.0)
                        continue
                    p_looks.append(_p_two_sided(d_k / math.sqrt(v_k)))
                    log_lam = 0.5 * math.log(v_k / (v_k + tau2)) + tau2 * d_k**2 / (
                        2.0 * v_k * (v_k + tau2)
                    )
                    p_av = min(p_av, math.exp(-log_lam) if log_lam > 0 else 1.0)
                row["p_always_valid"] = _clean(p_av)
                row["p_fixed_looks"] = [_clean(x) for x in p_looks]
                row["tau2"] = _clean(tau2)
                p_decide = p_av
            if config.design == "fixed" and not reached:
                row["verdict"] = NO_VERDICT_FIXED
            else:
                row["verdict"] = _verdict(p_decide, diff, alpha)
            row["interim"] = not reached
            comparisons.append(row)

    # Over time: per arm, per bucket, the metric values (not cumulative).
    if config.bucket_ms is not None:
        width = int(config.bucket_ms)
        n_buckets = (t1 - t0) // width + 1
    else:
        width = max(1, -(-(t1 - t0 + 1) // config.buckets))
        n_buckets = min(config.buckets, (t1 - t0) // width + 1)
    series_names = [m for m in (*METRICS, "expected_swt", "oracle_swt") if m in col]
    over_time: dict[str, list[dict]] = {}
    for a, d in arms.items():
        b = np.minimum((d.t - t0) // width, n_buckets - 1)
        count = np.bincount(b, minlength=n_buckets)
        sums_n = np.column_stack(
            [np.bincount(b, weights=d.num[:, j], minlength=n_buckets) for j in range(len(names))]
        )
        sums_d = np.column_stack(
            [np.bincount(b, weights=d.den[:, j], minlength=n_buckets) for j in range(len(names))]
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            vals = sums_n / sums_d
            # The ratio's linearised variance within the bucket, sessions as units (a
            # band for plots; the tests above use users as units).
            resid = d.num - vals[b] * d.den
            ss = np.column_stack(
                [
                    np.bincount(b, weights=resid[:, j] ** 2, minlength=n_buckets)
                    for j in range(len(names))
                ]
            )
            half = 1.96 * np.sqrt(ss) / sums_d
        rows = []
        for i in range(n_buckets):
            r: dict[str, Any] = {
                "t_ms_start": int(t0 + i * width),
                "t_ms_end": int(t0 + (i + 1) * width),
                "sessions": int(count[i]),
            }
            for m in series_names:
                r[m] = _clean(vals[i, col[m]])
                lo, hi = (
                    _clean(vals[i, col[m]] - half[i, col[m]]),
                    _clean(vals[i, col[m]] + half[i, col[m]]),
                )
                r[f"{m}_ci"] = (
                    [lo, hi] if lo is not None and hi is not None and count[i] > 1 else None
                )
            if _GAP in col:
                r["oracle_gap"] = _clean(1.0 - vals[i, col[_GAP]])
            rows.append(r)
        over_time[a] = rows

    result: dict[str, Any] = {
        "config": {**asdict(config), "covariates": list(config.covariates)},
        "policy": policy,
        "meta": meta if meta is not None else {},
        "horizon_reached": reached,
        "bucket_ms": int(width),
        "arms": arms_out,
        "comparisons": comparisons,
        "over_time": over_time,
    }
    if adjustment is not None:
        result["adjustment"] = adjustment
    if config.design == "sequential":
        result["looks_t_ms"] = look_cuts
    return result


def _z_test(
    rc: float, vc: float, ra: float, va: float, zq: float
) -> tuple[float, float | None, float, list[float | None]]:
    """Arm value ``ra`` (variance ``va``) against control ``rc`` (``vc``): the difference,
    the two-sided z-test's p-value, the relative lift and its delta-method CI."""
    diff = ra - rc
    se = math.sqrt(va + vc) if math.isfinite(va + vc) else float("nan")
    if not math.isfinite(diff) or not math.isfinite(se):
        p = None
    elif se > 0:
        p = _p_two_sided(diff / se)
    else:
        p = 1.0 if diff == 0 else 0.0
    rel = ra / rc - 1.0 if rc != 0 and math.isfinite(rc) else float("nan")
    ci: list[float | None] = [None, None]
    if math.isfinite(rel):
        se_rel = math.sqrt(va / rc**2 + ra**2 * vc / rc**4)
        ci = [_clean(rel - zq * se_rel), _clean(rel + zq * se_rel)]
    return diff, p, rel, ci


def unadjusted_fields(comparison: dict) -> dict[str, Any]:
    """A CUPED-adjusted comparison's plain figures as flat keys (``unadjusted_rel_lift``,
    ``unadjusted_p_value``, ``variance_reduction``) for a summary row; {} when the
    comparison was not adjusted."""
    if "unadjusted" not in comparison:
        return {}
    return {
        "unadjusted_rel_lift": comparison["unadjusted"]["rel_lift"],
        "unadjusted_p_value": comparison["unadjusted"]["p_value"],
        "variance_reduction": comparison["variance_reduction"],
    }


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:+.2f}%"


def format_table(result: dict) -> str:
    """A readable fixed-width table of an :func:`analyze` result."""
    cfg = result.get("config", {})
    lines: list[str] = []
    design = cfg.get("design", "fixed")
    alpha = cfg.get("alpha", 0.05)
    level = round(100 * (1 - alpha))
    lines.append(
        f"design: {design}  alpha: {alpha}  control: {cfg.get('control')}  "
        f"horizon reached: {'yes' if result.get('horizon_reached') else 'no'}"
    )
    if result.get("policy"):
        lines.append(f"policy: {result['policy']}")
    lines.append("")

    arms = result.get("arms", {})
    w = max([len("arm"), *(len(a) for a in arms)]) + 2
    head = f"{'arm':<{w}}{'sessions':>10}{'users':>8}" + "".join(f"{m:>11}" for m in METRICS)
    lines.append(head)
    lines.append("-" * len(head))
    for a, e in arms.items():
        lines.append(
            f"{a:<{w}}{e['sessions']:>10}{e['users']:>8}"
            + "".join(f"{_fmt(e['metrics'].get(m)):>11}" for m in METRICS)
        )

    comps = result.get("comparisons", [])
    if comps:
        lines.append("")
        seq = design == "sequential"
        cw = max(len(f"{r['arm']} vs {r['control']}") for r in comps) + 2
        ci_head = f"{level}% CI (boot)"
        head = (
            f"{'comparison':<{cw}}{'metric':<14}{'control':>10}{'arm':>10}{'lift':>10}"
            f"  {ci_head:<22}{'p':>9}" + (f"{'p (av)':>9}" if seq else "") + "  verdict"
        )
        lines.append(head)
        lines.append("-" * len(head))
        for r in comps:
            lo, hi = r["ci_boot"]
            if lo is None and hi is None:
                lo, hi = r["ci_delta"]
            ci = f"[{_pct(lo)}, {_pct(hi)}]"
            verdict = r["verdict"] + (" (interim)" if r.get("interim") and seq else "")
            lines.append(
                f"{r['arm'] + ' vs ' + r['control']:<{cw}}{r['metric']:<14}"
                f"{_fmt(r['control_value']):>10}{_fmt(r['arm_value']):>10}"
                f"{_pct(r['rel_lift']):>10}  {ci:<22}{_fmt(r['p_value'], '.3g'):>9}"
                + (f"{_fmt(r.get('p_always_valid'), '.3g'):>9}" if seq else "")
                + f"  {verdict}"
            )

    gaps = [(a, e) for a, e in arms.items() if "oracle_gap" in e or "expected_swt" in e]
    if gaps:
        lines.append("")
        lines.append("oracle gap (1 - expected / oracle session watch time):")
        for a, e in gaps:
            lines.append(
                f"  {a:<{w}}expected swt {_fmt(e.get('expected_swt'))}  "
                f"oracle swt {_fmt(e.get('oracle_swt'))}  gap {_fmt(e.get('oracle_gap'), '.2%')}"
            )
    return "\n".join(lines)
