"""Symbiosis bias of A/B designs under online learning, measured against the simulator's
ground truth.

When both arms of an A/B test learn from logged traffic, what one arm serves can train the
other, so the test measures a mix of the policies rather than either alone (Brennan et
al., WWW 2025). In production nobody knows the truth; recloop's simulator does: the effect
of deploying arm A to everyone is what A achieves serving *every* user, against what B
achieves serving every user (the global treatment effect). This runs, per traffic seed:

1. **the truth**: A alone on all users, then B alone on the same users (common random
   numbers per user and step, as in ``benchmarks.loop_offline``); the true lift is A's
   mean expected session watch time over B's;
2. **each design**: an A/B on the same users, A serving ``--share`` of them, each learning
   arm training on the data its design gives it:

   - ``own-arm``: users randomised one by one; each arm learns from its own traffic only
     (recloop's default ``data_policy``);
   - ``pooled``: users randomised one by one; every learning arm learns from all traffic;
   - ``weighted``: pooled, each arm's sessions weighted by the inverse of its share of the
     round's sessions (``data_policy: weighted``: ``recloop.examples.arm_weights``), so
     each arm's traffic counts as much in total, as if the split were even (in the
     spirit of Si 2023);
   - ``cluster``: users randomised by cluster (the genre their history holds most) and
     each arm learns from its own traffic: no arm's model sees another arm's users, and
     users who are alike land on one side.

   The estimated lift is A's users' mean expected watch time over B's users'.

Per design: the estimate, the truth and the bias (estimate − truth) per seed, the mean
bias with its 95% interval over seeds, the estimate's standard deviation over seeds (the
design's variance) and its RMSE against the truth. Runs one world after the other on one
machine (each world is seconds to minutes of the round code, without the stack).

    make bench-bias                  # online vs control on the demo's users
    recloop bias --run FILE          # a run file's two arms, its share and its users
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from actors.sim.runfile import load_run
from benchmarks.loop_offline import (
    HISTORY_LEN,
    RUN_FILE,
    T0,
    Arm,
    _row,
    loop_args,
    parse_arm,
    seed_checkpoint,
    simulated_users,
)
from pipelines.analysis.clusters import clusters_of
from recloop.config import PROJECT_ROOT, load_config

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
DESIGNS = ("own-arm", "pooled", "weighted", "cluster")
# The data policy each design's learning arms train with (the stack's ``data_policy``).
POLICY = {"own-arm": "own-arm", "pooled": "pooled", "weighted": "weighted", "cluster": "own-arm"}


def _say(msg: str) -> None:
    print(f"[bias {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- designs
def assign(
    users: Sequence[int],
    design: str,
    seed: int,
    share: float,
    arms: tuple[str, str],
    clusters: dict[int, str] | None = None,
) -> dict[int, str]:
    """Which arm serves each user: ``round(share * n)`` users to ``arms[0]``, chosen one by
    one at random; for ``cluster``, whole clusters in random order until ``arms[0]`` has
    its share (the cluster that crosses it goes to whichever side it leaves nearer)."""
    if design not in DESIGNS:
        raise ValueError(f"unknown design {design!r}: one of {', '.join(DESIGNS)}")
    if not 0 < share < 1:
        raise ValueError(f"share must be within (0, 1): {share}")
    a, b = arms
    users = sorted(int(u) for u in users)
    want = round(share * len(users))
    rng = np.random.default_rng([seed, 2701])
    if design != "cluster":
        chosen = set(rng.permutation(users)[:want].tolist())
        return {u: a if u in chosen else b for u in users}
    if clusters is None:
        raise ValueError("the cluster design needs each user's cluster")
    members: dict[str, list[int]] = {}
    for u in users:
        members.setdefault(clusters[u], []).append(u)
    out, taken = {}, 0
    for c in rng.permutation(sorted(members)).tolist():
        n = len(members[c])
        side = a if taken < want and abs(taken + n - want) <= abs(want - taken) else b
        taken += n if side == a else 0
        out.update(dict.fromkeys(members[c], side))
    return out


def everyone(users: Sequence[int], arm: str) -> dict[int, str]:
    """The truth's routing: ``arm`` serves every user (the 100% deployment)."""
    return dict.fromkeys((int(u) for u in users), arm)


def training_rows(rows: dict[str, list[dict]], design: str, arm: str) -> list[dict]:
    """The sessions ``arm``'s lake receives under ``design`` (``rows``: this batch's
    sessions by the arm that served them): its own (own-arm, cluster) or everyone's
    (pooled, weighted: the weighted policy's rounds weigh them by arm)."""
    if design not in DESIGNS:
        raise ValueError(f"unknown design {design!r}: one of {', '.join(DESIGNS)}")
    if POLICY[design] == "own-arm":
        return list(rows.get(arm, []))
    return [r for served_by in sorted(rows) for r in rows[served_by]]


# --------------------------------------------------------------------------- one world
class PolicyArm(Arm):
    """An arm of ``benchmarks.loop_offline`` whose rounds learn with a data ``policy`` from
    its lake (which holds what its design gives it)."""

    def __init__(
        self, *args: Any, policy: str = "own-arm", learning: bool | None = None, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.policy = policy
        if learning is not None:  # a run file's arm says; otherwise "control" is frozen
            self.learning = learning

    def round(self) -> None:
        from pipelines.continuous import promote_registry, run_round

        if not self.learning:
            return
        while True:
            rec = run_round(
                self.cfg,
                lambda m: None,
                policy=self.policy,
                promote=promote_registry,
                trainer=self.trainer,
            )
            if rec is None:
                break
            keep = ("round", "status", "hq_sessions", "arm_weights")
            self.rounds.append({k: rec.get(k) for k in keep})
            if not rec.get("capped"):
                break
        self.reload()


def world(
    args: Any,
    seed: int,
    served_by: dict[int, str],
    design: str,
    specs: dict[str, dict],
    hidden: Any,
    hist: dict[int, list[int]],
    seed_dir: Path,
    label: str | None = None,
    learns: dict[str, bool] | None = None,
) -> dict[int, np.ndarray]:
    """Run one world: each user served by ``served_by[user]`` one session per step, each
    learning arm's lake fed by ``design``. Returns each user's expected session watch
    time per step. ``label``: what the progress lines call the world."""
    tmp = Path(tempfile.mkdtemp(prefix="rl-bias-"))
    try:
        names = sorted(set(served_by.values()))
        arms = {
            name: PolicyArm(
                name,
                tmp / name,
                seed_dir,
                {"train.min_sessions": args.min_sessions, **specs[name]},
                hidden,
                {u: hist[u] for u, a in served_by.items() if a == name},
                policy=POLICY[design],
                learning=(learns or {}).get(name),
            )
            for name in names
        }
        beam = load_config(env={}).serve.beam_width
        gap_ms = int(args.gap_h * 3600 * 1000)
        value = {u: np.zeros(args.steps) for u in served_by}
        users = sorted(served_by)
        for step in range(args.steps):
            order = np.random.default_rng([seed, step]).permutation(users).tolist()
            t_step = T0 + step * gap_ms
            for c, lo in enumerate(range(0, len(order), args.chunk)):
                part = order[lo : lo + args.chunk]
                t = t_step + c * 60_000
                rows: dict[str, list[dict]] = {}
                for name, arm in arms.items():
                    mine = [u for u in part if served_by[u] == name]
                    if not mine:
                        continue
                    for u, items in zip(mine, arm.serve(mine, beam), strict=True):
                        st = arm.states[u]
                        h = arm.histories[u][-HISTORY_LEN:]
                        value[u][step] = hidden.expected_value(st, items, t)
                        r = hidden.session_response(
                            st, items, t, np.random.default_rng([seed, u, step])
                        )
                        arm.histories[u] += [
                            i for i, cl in zip(items, r.clicked, strict=True) if cl
                        ]
                        rows.setdefault(name, []).append(_row(name, arm.version, u, t, h, items, r))
                for name, arm in arms.items():
                    if arm.learning:
                        feed = training_rows(rows, design, name)
                        if feed:
                            arm.commit(feed)
                        arm.round()
            _say(
                f"seed {seed} {label or design} step {step + 1}/{args.steps}: "
                + ", ".join(
                    f"{n} {np.mean([value[u][step] for u in users if served_by[u] == n]):.1f}"
                    f" (r{len(a.rounds)})"
                    for n, a in arms.items()
                )
            )
        return value
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- many worlds
def _files(path: Path) -> dict[str, bytes]:
    """A flat model directory's files (safetensors weights, JSON metadata) as bytes."""
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()}


def _remote_world(shared: dict[str, Any], job: dict[str, Any]) -> dict[int, list[float]]:
    """One world in a Ray task: the hidden user model and the seed checkpoint arrive as
    their files' bytes (safetensors and JSON, written to a folder of the task's own on
    its node and removed with it), the rest as plain data. Returns each user's values."""
    import torch

    from actors.sim.user_model import HiddenUserModel

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="rl-bias-models-") as tmp:
        root = Path(tmp)
        for sub in ("hidden", "seed"):
            (root / sub).mkdir()
            for name, data in shared[sub].items():
                (root / sub / name).write_bytes(data)
        value = world(
            argparse.Namespace(**shared["args"]),
            job["seed"],
            job["served_by"],
            job["design"],
            shared["specs"],
            HiddenUserModel.load(root / "hidden"),
            shared["hist"],
            root / "seed",
            label=job["label"],
            learns=shared["learns"],
        )
    return {u: v.tolist() for u, v in value.items()}


def run_worlds(
    jobs: list[dict[str, Any]],
    args: Any,
    specs: dict[str, dict],
    hidden: Any,
    hist: dict[int, list[int]],
    seed_dir: Path,
    learns: dict[str, bool] | None,
) -> list[dict[int, np.ndarray]]:
    """Every world of ``jobs`` (seed, served_by, design, label): one after the other in
    this process (``args.workers`` 1), or as Ray tasks of one CPU each, as many at once
    as the cluster has room for (on ``args.address``, or on a Ray of ``args.workers``
    CPUs started for the run). The worlds are independent, so both give the same values."""
    if args.workers <= 1:
        return [
            world(args, j["seed"], j["served_by"], j["design"], specs, hidden, hist, seed_dir,
                  label=j["label"], learns=learns)
            for j in jobs
        ]  # fmt: skip
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        if args.address:
            ray.init(address=args.address, log_to_driver=True)
        else:
            ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=True)
    tmp = Path(tempfile.mkdtemp(prefix="rl-bias-hidden-"))
    try:
        hidden.save(tmp / "hidden")
        shared = {
            "hidden": _files(tmp / "hidden"),
            "seed": _files(seed_dir),
            "args": {k: getattr(args, k) for k in ("steps", "gap_h", "chunk", "min_sessions")},
            "specs": specs,
            "hist": hist,
            "learns": learns,
        }
        ref = ray.put(shared)
        task = ray.remote(num_cpus=1, max_retries=0)(_remote_world)
        pending = {task.remote(ref, j): i for i, j in enumerate(jobs)}
        out: list[dict[int, np.ndarray] | None] = [None] * len(jobs)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        _say(f"{len(jobs)} worlds as Ray tasks, up to {min(cpus, len(jobs))} at once")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            out[i] = {u: np.asarray(v) for u, v in ray.get(done[0]).items()}
            j = jobs[i]
            _say(f"world {len(jobs) - len(pending)}/{len(jobs)} done: seed {j['seed']} "
                 f"{j['label'] or j['design']}")  # fmt: skip
        return [v for v in out if v is not None]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if started_ray:
            ray.shutdown()


def lift(value: dict[int, np.ndarray], a_users: list[int], b_users: list[int], sl: slice) -> float:
    """Mean expected watch time of ``a_users`` over ``b_users``' (steps ``sl``), minus one."""
    a = np.mean([value[u][sl].mean() for u in a_users])
    b = np.mean([value[u][sl].mean() for u in b_users])
    return float(a / b - 1)


# Student's t, 97.5% quantile by degrees of freedom (1..10); past 10, the value at the
# smallest df of its band (a slightly wider interval, never a narrower one).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _t975(df: int) -> float:
    if df <= len(_T975):
        return _T975[df - 1]
    return 2.201 if df <= 20 else 2.080 if df <= 30 else 2.040


def interval(values: Sequence[float]) -> dict[str, float]:
    """Mean and 95% t-interval over seeds."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    mean = float(v.mean())
    if n < 2:
        return {"mean": round(mean, 4), "lo": math.nan, "hi": math.nan}
    half = float(_t975(n - 1) * v.std(ddof=1) / math.sqrt(n))
    return {"mean": round(mean, 4), "lo": round(mean - half, 4), "hi": round(mean + half, 4)}


def summarise(per_seed: dict[str, list[dict]], key: str) -> dict[str, dict[str, Any]]:
    """Per design, over seeds: estimate, truth, bias (interval), SD and RMSE of ``key``."""
    out = {}
    for design, runs in per_seed.items():
        est = [r["estimate"][key] for r in runs]
        truth = [r["truth"][key] for r in runs]
        bias = [e - t for e, t in zip(est, truth, strict=True)]
        out[design] = {
            "estimate": interval(est),
            "truth": interval(truth),
            "bias": interval(bias),
            "estimate_sd": round(float(np.std(est, ddof=1)) if len(est) > 1 else math.nan, 4),
            "rmse": round(float(np.sqrt(np.mean(np.square(bias)))), 4),
            "unbiased": bool(interval(bias)["lo"] <= 0 <= interval(bias)["hi"]),
        }
    return out


def run_arms(path: Path) -> tuple[tuple[str, str], float, dict[str, bool]]:
    """A run file's two arms for the bias measurement: ((A, B), A's share, whether each
    learns). Refuses what the offline loop cannot run, saying why."""
    exp = load_run(path).experiment
    if len(exp.arms) != 2:
        raise SystemExit(f"{path}: the bias measurement compares two arms, not {len(exp.arms)}")
    for arm in exp.arms:
        if arm.model != "seed" or arm.scoring != "beam" or arm.learning == "online-ipa":
            raise SystemExit(
                f"{path}: arm {arm.name!r} ({arm.model}, {arm.scoring}, {arm.learning}): the "
                "offline loop runs seed-model arms with beam scoring, frozen or online"
            )
    if all(arm.learning == "frozen" for arm in exp.arms):
        raise SystemExit(f"{path}: no arm learns, so no design can bias the test")
    a, b = exp.arms
    return (a.name, b.name), a.share, {x.name: x.learning == "online" for x in exp.arms}


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def plot(result: dict[str, Any], path: Path) -> None:
    """The figure of a result: per design, each seed's estimated lift against its true
    lift (the diagonal: no bias), and the bias with its 95% interval over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    designs = list(result["designs"])
    colours = dict(zip(designs, plt.get_cmap("tab10").colors, strict=False))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    lo, hi = 0.0, 0.0
    for d in designs:
        runs = result["runs"][d]
        t = [100 * r["truth"]["all"] for r in runs]
        e = [100 * r["estimate"]["all"] for r in runs]
        left.plot(t, e, "o", color=colours[d], label=d)
        lo, hi = min(lo, *t, *e), max(hi, *t, *e)
    pad = 0.05 * (hi - lo or 1.0)
    left.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "-", color="grey", lw=1)
    left.axhline(0, color="grey", lw=0.5)
    left.set_xlabel("true lift, % (A alone vs B alone)")
    left.set_ylabel("A/B estimate, %")
    left.set_title("each seed: estimate vs truth (diagonal: unbiased)", fontsize=10)
    left.legend(fontsize=8)
    for k, d in enumerate(designs):
        b = result["designs"][d]["bias"]
        m, err = 100 * b["mean"], [[100 * (b["mean"] - b["lo"])], [100 * (b["hi"] - b["mean"])]]
        right.errorbar([k], [m], yerr=err, fmt="o", color=colours[d], capsize=4)
        seeds = [100 * (r["estimate"]["all"] - r["truth"]["all"]) for r in result["runs"][d]]
        right.plot([k + 0.15] * len(seeds), seeds, ".", color=colours[d], alpha=0.5)
    right.axhline(0, color="grey", lw=1)
    right.set_xticks(range(len(designs)), designs)
    right.set_ylabel("bias, points (estimate − truth)")
    right.set_title("bias: mean and 95% interval over seeds", fontsize=10)
    a, b2 = result["arms"]["a"], result["arms"]["b"]
    fig.suptitle(
        f"{a} vs {b2}: {a} on {result['share']:.0%} of {result['users']} users, "
        f"{len(result['seeds'])} seeds"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    loop_args(ap, 236, "users per run (0: all); 236: the demo's users per arm")
    ap.add_argument(
        "--run",
        type=Path,
        help="a run file of two arms (model: seed; learning: frozen or online): A is its "
        "first arm, B its second, A's share its share, the users its simulation's "
        "(default: --a, --b, --share on the demo's users)",
    )
    ap.add_argument("--a", default="online", help="arm A: online, or NAME:key=value (train.*)")
    ap.add_argument("--b", default="control", help="arm B: control (frozen) or NAME:key=value")
    ap.add_argument("--share", type=float, default=0.25, help="A's share of the users")
    ap.add_argument("--designs", default=",".join(DESIGNS))
    ap.add_argument(
        "--out",
        type=Path,
        help="the JSON (default: benchmarks/results/bias.json; with --run, "
        "<home>/reports/bias-<experiment>.json); the figure goes beside it (.png)",
    )
    ap.add_argument("--plot", type=Path, metavar="JSON", help="only draw the figure of a result")
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worlds run at once as Ray tasks of one CPU (on --address, or on a Ray of that "
        "many CPUs started for the run); 1 (default): one after the other in this process",
    )
    ap.add_argument(
        "--address",
        default=None,
        help="a Ray cluster to run the worlds on (with --workers > 1; default: the stack's "
        "ray.address when set)",
    )
    args = ap.parse_args(argv)
    if args.plot is not None:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        print(f"wrote {args.plot.with_suffix('.png')}")
        return 0
    import torch

    torch.set_num_threads(1)

    def spec(text: str) -> tuple[str, dict]:
        return (text, {}) if text in ("online", "control") else parse_arm(text)

    run_file, learns = RUN_FILE, None
    if args.run is not None:
        (a, b), args.share, learns = run_arms(args.run)
        a_over = b_over = {}
        run_file = args.run
    else:
        (a, a_over), (b, b_over) = spec(args.a), spec(args.b)
    if a == b:
        raise SystemExit("--a and --b must name two arms")
    specs = {a: a_over, b: b_over}
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    for d in designs:
        if d not in DESIGNS:
            raise SystemExit(f"unknown design {d!r}: one of {', '.join(DESIGNS)}")
    cfg = load_config(env={})
    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    if args.address is None and args.workers > 1 and not cfg.ray.provisioned:
        args.address = cfg.ray.address  # the stack runs on a cluster: use it
    if args.address and args.workers > 1:
        from recloop.ray_head import auth_env

        auth_env(cfg)  # the cluster's auth mode and token, as every recloop driver
    if args.out is None:
        name = f"bias-{load_run(args.run).experiment.name}.json" if args.run else None
        args.out = cfg.home / "reports" / name if name else RESULTS / "bias.json"
    seed_dir = seed_checkpoint(cfg, args.checkpoint)
    if seed_dir is None:
        return 2
    started = time.monotonic()
    data, hidden, hist_all, _ = simulated_users(cfg, args.sim_seed, run_file)
    clusters_all = clusters_of(data)  # what `recloop clusters` writes for unit: cluster
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    third = max(1, args.steps // 3)
    cuts = {"all": slice(None), "last": slice(-third, None)}
    per_seed: dict[str, list[dict]] = {d: [] for d in designs}
    truths = []
    # Every world of every seed first (they are independent: in parallel on a cluster),
    # then the lifts. Per seed: the truth (each arm alone, serving every user), then each
    # design's A/B on the same users.
    jobs: list[dict[str, Any]] = []
    seed_users: dict[int, list[int]] = {}
    for sd in seeds:
        users = sorted(hist_all)
        if args.users:
            rng = np.random.default_rng(sd)
            users = sorted(rng.choice(users, size=min(args.users, len(users)), replace=False))
        users = seed_users[sd] = [int(u) for u in users]
        for arm in (a, b):
            jobs.append(dict(seed=sd, served_by=everyone(users, arm), design="own-arm",
                             label=f"truth ({arm} alone)"))  # fmt: skip
        for design in designs:
            served_by = assign(users, design, sd, args.share, (a, b), clusters_all)
            jobs.append(dict(seed=sd, served_by=served_by, design=design, label=None))
    hist = {u: hist_all[u] for us in seed_users.values() for u in us}
    values = iter(run_worlds(jobs, args, specs, hidden, hist, seed_dir, learns))
    for sd in seeds:
        users = seed_users[sd]
        alone = {arm: next(values) for arm in (a, b)}
        truth = {}
        for cut, sl in cuts.items():
            ta = np.mean([alone[a][u][sl].mean() for u in users])
            tb = np.mean([alone[b][u][sl].mean() for u in users])
            truth[cut] = float(ta / tb - 1)
        truths.append({"seed": sd, **truth})
        _say(
            f"seed {sd}: true lift {truth['all'] * 100:+.1f}% "
            f"(last third {truth['last'] * 100:+.1f}%)"
        )
        for design in designs:
            served_by = assign(users, design, sd, args.share, (a, b), clusters_all)
            a_users = [u for u in users if served_by[u] == a]
            b_users = [u for u in users if served_by[u] == b]
            shares = {a: len(a_users) / len(users), b: len(b_users) / len(users)}
            value = next(values)
            est = {cut: lift(value, a_users, b_users, sl) for cut, sl in cuts.items()}
            per_seed[design].append(
                {
                    "seed": sd,
                    "users": {a: len(a_users), b: len(b_users)},
                    "shares": {k: round(v, 4) for k, v in shares.items()},
                    "estimate": est,
                    "truth": truth,
                }
            )
            _say(
                f"seed {sd} {design}: estimate {est['all'] * 100:+.1f}% vs true "
                f"{truth['all'] * 100:+.1f}% (bias {(est['all'] - truth['all']) * 100:+.1f} pts)"
            )
    result = {
        "machine": platform.platform(),
        "checkpoint": str(seed_dir),
        "data": data.source,
        "run_file": _shown(run_file),
        "learning": learns or {a: a != "control", b: b != "control"},
        "arms": {"a": a, "b": b, "overrides": specs},
        "share": args.share,
        "users": len(users),  # per seed (each seed draws its own)
        "steps": args.steps,
        "gap_h": args.gap_h,
        "chunk": args.chunk,
        "min_sessions": args.min_sessions,
        "seeds": seeds,
        "metric": "expected session watch time under the hidden model (mean field)",
        "designs": summarise(per_seed, "all"),
        "designs_last_third": summarise(per_seed, "last"),
        "truth_by_seed": truths,
        "runs": per_seed,
        "wall_s": round(time.monotonic() - started, 1),
        "workers": args.workers,  # worlds at once (Ray tasks when > 1)
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    plot(result, args.out.with_suffix(".png"))
    print(f"{a} vs {b}, {a} on {args.share:.0%} of {len(users)} users, {len(seeds)} seeds")
    print(f"{'design':>9} {'estimate':>9} {'truth':>8} {'bias [95% CI]':>24} {'SD':>6} {'RMSE':>6}")
    for design, s in result["designs"].items():
        e, t, bi = s["estimate"], s["truth"], s["bias"]
        print(
            f"{design:>9} {e['mean'] * 100:>+8.1f}% {t['mean'] * 100:>+7.1f}% "
            f"{bi['mean'] * 100:>+7.1f} [{bi['lo'] * 100:+.1f}, {bi['hi'] * 100:+.1f}] pts "
            f"{s['estimate_sd'] * 100:>5.1f} {s['rmse'] * 100:>5.1f}"
        )
    _say(f"wrote {args.out} and its figure (.png) in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
