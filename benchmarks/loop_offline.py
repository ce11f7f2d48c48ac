"""The loop offline: learning arms round after round against the frozen seed and popularity,
paired over the same simulated users, through the real round code but without the stack.

The demo and ``make bench-training`` answer "does learning online pay?" through Kafka, Ray
and Serve, in 10-20 minutes per run. This asks the same question in about a minute and a
half per run, so that how a round learns can be chosen on several runs, not on one:

1. every arm serves the same simulated users (the demo's run file: sequential hidden users
   fitted on MovieLens, its taste drift), one session per user per step (``--gap-h`` of
   virtual time apart), in batches of ``--chunk`` users; ``--users`` defaults to 236, the
   quarter of MovieLens' users each of the demo's four arms serves, and ``--steps`` to 4,
   the demo's sessions per user. Each arm's users have their own state (what an arm shows
   changes its users) and the same draws (common random numbers per user and step), so
   the arms differ only by what they serve;
2. each batch's sessions are committed to the arm's own lake (the lake's real format) and
   the arm's round runs: ``pipelines.continuous.run_round`` with a ``WarmTrainer``, the
   gate and registry promotion, the code ``recloop train`` runs (a popularity arm runs its
   recount round); the arm serves the version its registry promotes;
3. per arm and step: realised session watch time, the expected watch time of the served
   slate under the hidden model (mean field, less noisy), the oracle's (the hidden model's
   greedy best slate) and the distinct items served. Lifts are paired over users against
   the frozen ``control``, over the whole run and its last third.

A learning loop is path-dependent (what a round learns decides what the next one sees), so
one run is one trajectory; ``--seeds`` repeats the whole run under other traffic seeds
(other users, orders and draws) and the result gives each arm's lift per run, their mean
and the smallest.

Arms: ``control`` (frozen seed), ``popularity`` (the data's counts plus its clicks) and
``online`` (the stack's ``train`` config), plus any ``--arm NAME:key=value,...`` whose keys
override ``train.*`` for that arm (e.g. ``--arm online-ntp:reward_weighting=none``).

    make bench-loop-offline      # or: .venv/bin/python -m benchmarks.loop_offline
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recloop.config import PROJECT_ROOT, load_config

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
RUN_FILE = PROJECT_ROOT / "infra" / "experiments" / "demo.yaml"
T0 = 1_800_000_000_000
HISTORY_LEN = 50  # the history a request carries (Feast's user_history length)


def _say(msg: str) -> None:
    print(f"[loop-offline {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _value(text: str) -> Any:
    """An --arm value: an integer, a number, true/false, or the text itself."""
    t = text.strip()
    for kind in (int, float):
        try:
            return kind(t)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(t.lower(), t)


def parse_arm(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,key=value`` -> (NAME, {train.key: value})."""
    name, _, rest = spec.partition(":")
    if not name or name in ("control", "popularity"):
        raise ValueError(f"--arm {spec!r}: a new arm name first (NAME:key=value,...)")
    over: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"--arm {spec!r}: {part!r} is not key=value")
        over[f"train.{key.strip()}"] = _value(value)
    return name, over


class Arm:
    """One arm: its own home (lake, registry, train state), users' states and histories."""

    def __init__(self, name: str, home: Path, source: Path, overrides: dict, hidden, hist):
        from pipelines.continuous import WarmTrainer
        from recloop.lake import Lake
        from recloop.registry import ModelRegistry

        self.name = name
        self.cfg = load_config(
            overrides={"home": str(home), "train.arm": name, **overrides}, env={}
        )
        self.reg = ModelRegistry(self.cfg.registry_uri)
        self.reg.create_arm(name, name)
        self.reg.promote(name, self.reg.publish(name, source, version="v0"))
        self.lake = Lake(self.cfg.lake_dir)
        self.trainer = WarmTrainer(self.cfg)
        self.learning = name != "control"
        self.states = {u: hidden.new_state(u, T0, h) for u, h in hist.items()}
        self.histories = {u: list(h) for u, h in hist.items()}
        self.seq = 0
        self.version: str | None = None
        self.model: Any = None
        self.rounds: list[dict] = []
        self.reload()

    def reload(self) -> None:
        from recloop.inference import LoadedModel

        current = self.reg.current(self.name)
        if current != self.version:
            path = self.reg.fetch(self.name, current, cache_dir=self.cfg.home / "cache")
            self.model = LoadedModel.load(str(path), current)
            self.version = current

    def serve(self, users: list[int], beam: int) -> list[list[int]]:
        reqs = [{"history": self.histories[u][-HISTORY_LEN:], "exclude_seen": True} for u in users]
        out = []
        for lo in range(0, len(reqs), 64):
            out += [
                [i["item_id"] for i in r["items"]]
                for r in self.model.generate(reqs[lo : lo + 64], beam)
            ]
        return out

    def commit(self, rows: list[dict]) -> None:
        import pyarrow as pa

        from recloop.lake import SCHEMAS, SESSIONS, Entry

        self.seq += 1
        table = pa.Table.from_pylist(rows, schema=SCHEMAS[SESSIONS])
        files = self.lake.write_files(SESSIONS, table, "sim", self.seq)
        self.lake.commit(
            Entry("sim", self.seq, int(time.time() * 1000), files, {}, {"sessions": len(rows)})
        )

    def round(self) -> None:
        from pipelines.continuous import promote_registry, run_round

        if not self.learning:
            return
        while True:  # every round the new data allows (a capped round leaves the rest)
            rec = run_round(
                self.cfg, lambda m: None, promote=promote_registry, trainer=self.trainer
            )
            if rec is None:
                break
            self.rounds.append(
                {k: rec.get(k) for k in ("round", "status", "hq_sessions", "examples", "round_s")}
                | {"gate": (rec.get("gate") or {}).get("reason")}
            )
            if not rec.get("capped"):
                break
        self.reload()


def _row(arm: str, version: str, u: int, t: int, hist: list[int], items: list[int], r) -> dict:
    clicked = [bool(c) for c in r.clicked]
    watch = [float(w) for w in r.watch_time_s]
    return {
        "event_id": f"{arm}-{u}-{t}",
        "request_id": f"{arm}-{u}-{t}",
        "user_id": u,
        "arm": arm,
        "model_version": version,
        "event_time_ms": t,
        "history": hist,
        "items": items,
        "scores": [0.0] * len(items),
        "feedback": [True] * len(items),
        "clicked": clicked,
        "watch_time_s": watch,
        "liked": [bool(x) for x in r.liked],
        "followed": [bool(x) for x in r.followed],
        "n_feedback": len(items),
        "clicks": sum(clicked),
        "session_watch_s": float(sum(watch)),
        "likes": int(np.sum(r.liked)),
        "follows": int(np.sum(r.followed)),
        "last_feedback_ms": int(r.event_time_ms[-1]) if len(items) else t,
        "record_ts_ms": t,
        "closed_by": "complete",
        "context": "{}",
    }


def paired(x: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """(lift of mean x over mean base, its SE), paired over users."""
    d = x - base
    return float(d.mean() / base.mean()), float(d.std(ddof=1) / np.sqrt(len(d)) / base.mean())


def run(args, seed: int, arms_spec, hidden, hist_all, seed_dir: Path, pop: Path, cfg) -> dict:
    """One closed-loop run under traffic seed ``seed``: per-arm metrics by step, lifts
    against control paired over users, and each arm's rounds."""
    users = sorted(hist_all)
    if args.users:
        rng = np.random.default_rng(seed)
        users = sorted(rng.choice(users, size=min(args.users, len(users)), replace=False).tolist())
    hist = {u: hist_all[u] for u in users}
    tmp = Path(tempfile.mkdtemp(prefix="rl-loop-off-"))
    arms = [
        Arm(
            name,
            tmp / name,
            pop if name == "popularity" else seed_dir,
            {"train.min_sessions": args.min_sessions, **over},
            hidden,
            hist,
        )
        for name, over in arms_spec
    ]
    beam = cfg.serve.beam_width
    k = arms[0].model.session_len
    gap_ms = int(args.gap_h * 3600 * 1000)
    # per arm: (steps, users) realised swt, expected swt, the oracle's, mean item duration
    keys = ("swt", "expected", "oracle", "duration")
    metrics = {a.name: {m: np.zeros((args.steps, len(users))) for m in keys} for a in arms}
    served: dict[str, list[set[int]]] = {a.name: [set() for _ in range(args.steps)] for a in arms}
    col = {u: j for j, u in enumerate(users)}
    for step in range(args.steps):
        order = np.random.default_rng([seed, step]).permutation(users).tolist()
        t_step = T0 + step * gap_ms
        for c, lo in enumerate(range(0, len(order), args.chunk)):
            part = order[lo : lo + args.chunk]
            t = t_step + c * 60_000  # a minute per chunk: event times stay in order
            for arm in arms:
                m = metrics[arm.name]
                rows = []
                for u, items in zip(part, arm.serve(part, beam), strict=True):
                    st, j = arm.states[u], col[u]
                    h = arm.histories[u][-HISTORY_LEN:]
                    m["expected"][step, j] = hidden.expected_value(st, items, t)
                    m["oracle"][step, j] = hidden.oracle(st, t, k, exclude=h)[1]
                    known = hidden.item_index(np.asarray(items, dtype=np.int64))
                    m["duration"][step, j] = float(hidden.duration_s[known[known >= 0]].mean())
                    served[arm.name][step].update(items)
                    r = hidden.session_response(
                        st, items, t, np.random.default_rng([seed, u, step])
                    )
                    m["swt"][step, j] = float(np.sum(r.watch_time_s))
                    arm.histories[u] += [i for i, cl in zip(items, r.clicked, strict=True) if cl]
                    rows.append(_row(arm.name, arm.version, u, t, h, items, r))
                arm.commit(rows)
                arm.round()
        line = "  ".join(
            f"{a.name} {metrics[a.name]['expected'][step].mean():.1f}"
            f" (r{len(a.rounds)}, {len(served[a.name][step])} items)"
            for a in arms
        )
        _say(f"seed {seed} step {step + 1}/{args.steps} expected swt: {line}")
    base = metrics["control"]
    third = max(1, args.steps // 3)
    summary: dict[str, Any] = {}
    for a in arms:
        m = metrics[a.name]
        row: dict[str, Any] = {
            "rounds": len(a.rounds),
            "promoted": sum(r["status"] == "promoted" for r in a.rounds),
            "by_step": {key: [round(float(v), 2) for v in m[key].mean(axis=1)] for key in m},
            "distinct_items_by_step": [len(x) for x in served[a.name]],
            "gap_to_oracle_by_step": [
                round(float(1 - m["expected"][s].mean() / m["oracle"][s].mean()), 4)
                for s in range(args.steps)
            ],
        }
        for key in ("swt", "expected"):
            for label, sl in (("all", slice(None)), ("last", slice(-third, None))):
                lift, se = paired(m[key][sl].mean(axis=0), base[key][sl].mean(axis=0))
                row[f"{key}_lift_{label}"] = round(lift, 4)
                row[f"{key}_lift_{label}_se"] = round(se, 4)
        summary[a.name] = row
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "seed": seed,
        "users": len(users),
        "summary": summary,
        "rounds": {a.name: a.rounds for a in arms},
    }


def across(runs: list[dict], key: str) -> dict[str, dict[str, Any]]:
    """Per arm: ``key`` (a lift) in each run, its mean and its smallest value."""
    out = {}
    for name in runs[0]["summary"]:
        vals = [r["summary"][name][key] for r in runs]
        out[name] = {"runs": vals, "mean": round(float(np.mean(vals)), 4), "min": min(vals)}
    return out


def loop_args(ap: argparse.ArgumentParser, users: int, users_help: str) -> None:
    """The options every offline-loop benchmark takes (this one, ``benchmarks.bias``)."""
    ap.add_argument("--checkpoint", help="seed checkpoint (default: the newest pre-trained)")
    ap.add_argument("--steps", type=int, default=4, help="sessions per user (one per step)")
    ap.add_argument("--gap-h", type=float, default=6.0, help="virtual hours between steps")
    ap.add_argument("--users", type=int, default=users, help=users_help)
    ap.add_argument("--chunk", type=int, default=16, help="users served between round attempts")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="traffic seeds: one run each")
    ap.add_argument("--min-sessions", type=int, default=40, help="train.min_sessions (the demo's)")
    ap.add_argument("--sim-seed", type=int, default=0, help="the hidden user model's fit")


def simulated_users(
    cfg: Any, sim_seed: int, run_file: Path = RUN_FILE
) -> tuple[Any, Any, dict[int, list[int]], Any]:
    """The simulated users of ``run_file`` (the demo's by default): (the data, the hidden
    user model fitted on it with the run file's response, each user's history oldest
    first, the run file's simulation)."""
    from actors.sim.runfile import load_run
    from actors.sim.user_model import HiddenUserModel, ResponseConfig
    from recloop.data import load

    sim = load_run(run_file).simulation
    data = load(cfg.data)
    _say(f"fitting the {sim.user_model_kind} hidden user model on {data.summary()}")
    hidden = HiddenUserModel.fit(data, seed=sim_seed, kind=sim.user_model_kind)
    hidden = hidden.with_config(ResponseConfig.from_dict(sim.response))
    ratings = data.ratings.sort_values(["user_id", "timestamp"], kind="mergesort")
    hist = {int(u): [int(i) for i in g["item_id"]] for u, g in ratings.groupby("user_id")}
    return data, hidden, hist, sim


def seed_checkpoint(cfg: Any, given: str | None) -> Path | None:
    """``--checkpoint``, or the newest pre-trained seed (None: none; the caller says so)."""
    from serving.api import latest_seed

    seed_dir = Path(given) if given else latest_seed(cfg)
    if seed_dir is None:
        print("no seed checkpoint: run `recloop pretrain` or pass --checkpoint", file=sys.stderr)
    return seed_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    loop_args(ap, 236, "users per run (0: all); the demo gives each of its four arms a "
              "quarter of MovieLens' 943")  # fmt: skip
    ap.add_argument("--arm", action="append", default=[], help="NAME:key=value,... (train.*)")
    ap.add_argument("--no-online", action="store_true", help="leave out the default online arm")
    ap.add_argument("--out", type=Path, default=RESULTS / "loop_offline.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from serving.api import baseline_checkpoint

    cfg = load_config(env={})
    seed_dir = seed_checkpoint(cfg, args.checkpoint)
    if seed_dir is None:
        return 2
    arms_spec: list[tuple[str, dict]] = [("control", {}), ("popularity", {})]
    if not args.no_online:
        arms_spec.append(("online", {}))
    arms_spec += [parse_arm(s) for s in args.arm]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    started = time.monotonic()
    data, hidden, hist, sim = simulated_users(cfg, args.sim_seed)
    pop = baseline_checkpoint(cfg, "popularity", _say)
    runs = [run(args, sd, arms_spec, hidden, hist, seed_dir, pop, cfg) for sd in seeds]
    result = {
        "machine": platform.platform(),
        "checkpoint": str(seed_dir),
        "data": data.source,
        "run_file": str(RUN_FILE.relative_to(PROJECT_ROOT)),
        "hidden_user_model": sim.user_model_kind,
        "response": sim.response,
        "users": runs[0]["users"],
        "steps": args.steps,
        "gap_h": args.gap_h,
        "chunk": args.chunk,
        "min_sessions": args.min_sessions,
        "seeds": seeds,
        "arms": {name: over for name, over in arms_spec},
        "train": {k: v for k, v in vars(cfg.train).items() if k in TRAIN_KEYS},
        "lift_all": across(runs, "expected_lift_all"),
        "lift_last": across(runs, "expected_lift_last"),
        "runs": runs,
        "wall_s": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"expected session watch time vs control, {len(runs)} runs of {result['users']} users")
    print(f"{'arm':>12} {'whole run: mean [min]':>24} {'last third: mean [min]':>26}")
    for name in result["lift_all"]:
        a, z = result["lift_all"][name], result["lift_last"][name]
        print(
            f"{name:>12} {a['mean'] * 100:>+14.1f}% [{a['min'] * 100:+.1f}%]"
            f" {z['mean'] * 100:>+16.1f}% [{z['min'] * 100:+.1f}%]"
        )
    _say(f"wrote {args.out} in {result['wall_s']:.0f} s")
    return 0


# the train.* settings a run's learning arms start from (before their --arm overrides)
TRAIN_KEYS = ("epochs", "batch_size", "lr", "min_clicks", "min_watch_s", "holdout_fraction",
              "tolerance", "reward_weighting")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
