"""OneRec against SASRec as the catalogue grows: training time per epoch, peak memory and
full-ranking evaluation time, in the same run.

For each catalogue size (``--sizes``) a synthetic dataset is drawn (``--users`` users of
``--per-user`` interactions; items have Zipf popularity and users a taste for one of 64
item groups, so sequences have structure for the tokenizer and the models to find), split
leave-one-out, and each model is trained for ``--epochs`` epoch(s) through the code
``recloop eval`` runs (``pipelines.offline.evaluate.build_onerec`` / ``build_sasrec``
with their default options; OneRec's codebook fits the catalogue by
``models.tokenizer.codebook_for``), then ranks the whole catalogue for ``--eval-users``
test users. Each (model, size) runs in a process of its own, so its peak resident memory
(``ru_maxrss``) is its own; a run past ``--timeout-min`` or killed (out of memory) is
recorded as such and the sweep goes on.

The figures to compare are the ratios OneRec / SASRec per size (issue: OneRec's epoch time
and peak memory within 2x SASRec's at every size up to 100 k items); absolute seconds
depend on the machine. Quality is not measured here (synthetic data; ``recloop eval`` on
MovieLens is the quality figure).

    make bench-scale     # or: .venv/bin/python -m benchmarks.scale [--sizes 2000,10000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # where ``-m benchmarks.scale`` resolves
RESULTS = ROOT / "benchmarks" / "results"
# ``onerec`` trains as ``recloop eval`` does: a session starts after every item (stride
# 1), so one epoch holds ~session_len times as many next-item targets as there are
# interactions. ``onerec-disjoint`` cuts each sequence into disjoint sessions (stride =
# session_len): every interaction is a target once per epoch, as in SASRec's epoch.
MODELS = ("onerec", "onerec-disjoint", "sasrec")
MARK = "SCALE_RESULT "


def _say(msg: str) -> None:
    print(f"[bench-scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dataset(num_items: int, users: int, per_user: int, seed: int = 0) -> Any:
    """``users`` sequences of ``per_user`` distinct items over ``num_items``: each user
    draws 80% of its items from its favourite of 64 groups (fewer below 640 items) and
    20% from the whole catalogue, both by Zipf(0.9) popularity."""
    import numpy as np

    from pipelines.offline.datasets import SequenceDataset

    if per_user * 2 > num_items:
        raise ValueError(f"--per-user {per_user} needs a catalogue of at least {2 * per_user}")
    rng = np.random.default_rng(seed)
    groups = max(1, min(64, num_items // 10))  # 64 from 640 items up
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.9
    popularity = popularity[rng.permutation(num_items)]
    group_of = rng.integers(0, groups, size=num_items)
    members = [np.flatnonzero(group_of == g) for g in range(groups)]
    weights = [popularity[m] / popularity[m].sum() if len(m) else m for m in members]
    filled = [g for g in range(groups) if len(members[g])]
    overall = popularity / popularity.sum()
    sequences: dict[int, list[int]] = {}
    for u in range(users):
        g = filled[int(rng.integers(len(filled)))]
        k_own = min(int(per_user * 0.8), len(members[g]))
        own = rng.choice(members[g], size=k_own, replace=False, p=weights[g])
        rest = rng.choice(num_items, size=per_user * 2, replace=False, p=overall)
        seq = list(dict.fromkeys([*own.tolist(), *rest.tolist()]))[:per_user]
        order = rng.permutation(len(seq))
        sequences[u + 1] = [int(seq[i]) + 1 for i in order]  # ids 1..num_items
    return SequenceDataset(
        sequences=sequences,
        num_items=num_items,
        item_id_map={i: i for i in range(1, num_items + 1)},
        user_id_map={u: u for u in sequences},
        name=f"synthetic-{num_items}",
    )


def child(model: str, num_items: int, args: argparse.Namespace) -> dict[str, Any]:
    """One model on one catalogue, in this process: train, then rank for the test users."""
    import psutil
    import torch

    from pipelines.offline.evaluate import MODELS as BUILDERS
    from pipelines.offline.evaluation import evaluate_full, leave_one_out

    torch.set_num_threads(args.threads)
    base_mb = psutil.Process().memory_info().rss / 2**20  # the imports' share of the peak
    t = time.perf_counter()
    split = leave_one_out(dataset(num_items, args.users, args.per_user))
    data_s = time.perf_counter() - t
    from models.onerec import OneRecConfig

    options: dict[str, Any] = {"epochs": args.epochs}
    if model.startswith("onerec"):
        options["val_users"] = args.eval_users
    else:
        options["patience"] = args.epochs
    if model == "onerec-disjoint":
        options["stride"] = OneRecConfig().session_len
    t = time.perf_counter()
    ranker = BUILDERS[model.split("-")[0]](split, 0, options)
    train_s = time.perf_counter() - t
    train_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = getattr(ranker, "train_info", {}) or {}
    history = info.get("history") or []
    n = min(args.eval_users, len(split.users))
    t = time.perf_counter()
    metrics = evaluate_full(ranker, split.test_histories[:n], split.test_targets[:n])
    eval_s = time.perf_counter() - t
    epoch_s = [r["epoch_s"] for r in history if "epoch_s" in r]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "model": model,
        "items": num_items,
        "data_s": round(data_s, 2),
        # The whole build: tokenizer (OneRec), --epochs epoch(s), each model's own
        # validation pass after each epoch
        "train_s": round(train_s, 2),
        "epoch_s": round(sum(epoch_s) / len(epoch_s), 2) if epoch_s else None,
        "eval_s": round(eval_s, 2),
        "eval_users": n,
        "eval_ms_per_user": round(1000 * eval_s / max(1, n), 2),
        # a check that the model ranks at all, not a quality figure (one epoch, synthetic)
        "ndcg@10": round(float(metrics["NDCG@10"]), 4),
        "peak_rss_mb": round(peak_mb, 1),
        "imports_rss_mb": round(base_mb, 1),
        "peak_rss_training_mb": round(train_peak_mb, 1),  # before the ranking
        "peak_above_imports_mb": round(peak_mb - base_mb, 1),
        "codebook_size": (info.get("config") or {}).get("model", {}).get("codebook_size"),
        "stride": options.get("stride", 1) if model.startswith("onerec") else None,
    }


def run(model: str, num_items: int, args: argparse.Namespace) -> dict[str, Any]:
    """``child`` in a fresh process, under the time limit."""
    cmd = [sys.executable, "-m", "benchmarks.scale", "--child", f"{model}:{num_items}"]
    cmd += ["--users", str(args.users), "--per-user", str(args.per_user)]
    cmd += ["--epochs", str(args.epochs), "--eval-users", str(args.eval_users)]
    cmd += ["--threads", str(args.threads)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.timeout_min * 60, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {
            "model": model,
            "items": num_items,
            "timed_out": True,
            "wall_s": round(time.perf_counter() - started, 1),
        }
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    return {
        "model": model,
        "items": num_items,
        "failed": proc.returncode,  # -9: killed, out of memory most likely
        "stderr_tail": proc.stderr[-1500:],
    }


def ratios(rows: list[dict[str, Any]], model: str = "onerec") -> dict[str, dict[str, float | None]]:
    """``model`` (a OneRec variant) / SASRec per catalogue size, for each figure."""
    out: dict[str, dict[str, float | None]] = {}
    by = {(r["model"], r["items"]): r for r in rows}
    for size in sorted({r["items"] for r in rows}):
        a, b = by.get((model, size), {}), by.get(("sasrec", size), {})
        out[str(size)] = {
            k: (round(a[k] / b[k], 2) if a.get(k) and b.get(k) else None)
            for k in ("train_s", "eval_s", "peak_rss_mb", "peak_above_imports_mb")
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2000,10000,50000,100000", help="catalogue sizes")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--per-user", type=int, default=40, help="interactions per user")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--eval-users", type=int, default=200, help="test users ranked")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--timeout-min", type=float, default=20.0, help="per (model, size) run")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        model, size = args.child.split(":")
        print(MARK + json.dumps(child(model, int(size), args)), flush=True)
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; of {MODELS}")
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for size in sizes:
        for model in models:
            _say(f"{model} on {size:,} items ...")
            rows.append(run(model, size, args))
            _say(json.dumps(rows[-1]))
    out = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "child")},
        "runs": rows,
        "onerec_over_sasrec": ratios(rows),
        "onerec_disjoint_over_sasrec": ratios(rows, "onerec-disjoint"),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out["onerec_over_sasrec"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
