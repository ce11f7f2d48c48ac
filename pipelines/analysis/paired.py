"""Paired comparison of two models of one ``recloop eval`` run, on the same test users.

    python -m pipelines.analysis.paired RESULT.json MODEL_A MODEL_B [--k 10] [--resamples 10000]

Reads each model's per-user test ranks (``test_ranks``, written by ``recloop eval``),
computes NDCG@k and HR@k per user, and bootstraps the users (the same resample for both
models) for the difference A − B: its mean, a 95% percentile interval, and the share of
resamples where A is ahead. Paired, the noise of which users happen to be in the test set
cancels out, so this interval is much narrower than either model's own.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def per_user(ranks: Sequence[int], k: int) -> dict[str, np.ndarray]:
    r = np.asarray(ranks, dtype=np.float64)
    hit = r <= k
    return {f"NDCG@{k}": np.where(hit, 1.0 / np.log2(r + 1.0), 0.0), f"HR@{k}": hit * 1.0}


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0
) -> dict[str, float]:
    """Mean of a − b over users with a 95% bootstrap interval and P(a ahead)."""
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError("paired comparison needs two equal-length, non-empty per-user arrays")
    diff = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {
        "a": float(a.mean()),
        "b": float(b.mean()),
        "diff": float(diff.mean()),
        "ci95": [float(lo), float(hi)],
        "p_a_ahead": float((means > 0).mean()),
        "users": len(diff),
    }


def compare(result: dict[str, Any], model_a: str, model_b: str, k: int = 10, **kw) -> dict:
    rows = {r["model"]: r for r in result.get("results", [result])}
    for m in (model_a, model_b):
        if m not in rows:
            raise ValueError(f"{m!r} is not in the result; it has {', '.join(rows)}")
        if "test_ranks" not in rows[m]:
            raise ValueError(f"{m!r} has no test_ranks: rerun recloop eval to get them")
    ua = per_user(rows[model_a]["test_ranks"], k)
    ub = per_user(rows[model_b]["test_ranks"], k)
    return {metric: paired_bootstrap(ua[metric], ub[metric], **kw) for metric in ua}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.analysis.paired", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("result", type=Path, help="a recloop eval JSON")
    parser.add_argument("model_a")
    parser.add_argument("model_b")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        out = compare(
            json.loads(args.result.read_text()),
            args.model_a,
            args.model_b,
            args.k,
            resamples=args.resamples,
            seed=args.seed,
        )
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for metric, r in out.items():
        print(
            f"{metric}: {args.model_a} {r['a']:.4f} vs {args.model_b} {r['b']:.4f}, "
            f"diff {r['diff']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] (95%, paired "
            f"bootstrap over {r['users']} users), {args.model_a} ahead in "
            f"{r['p_a_ahead']:.1%} of resamples"
        )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
