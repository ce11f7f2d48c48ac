"""OneRec ablations on one dataset, in one run, against the same split.

    recloop ablate [--data ../shared/data/ml-100k] [--epochs N] [--out JSON]

- MoE decoder vs a dense FFN with the same active parameters per token;
- session-wise (M = 5) vs point-wise (M = 1) training;
- beam width 8 / 32 / 128 for generative retrieval: the test target's rank among the
  sessions' first items, ordered by session score (an item no beam proposes is missed).

Full-ranking metrics score every item by log p(SID | history) and do not depend on the
beam; the beam rows show what serving, which only sees what the beam search proposes,
would retrieve.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipelines.offline.datasets import load_dataset
from pipelines.offline.evaluation import evaluate_full, hr_at_k, leave_one_out, ndcg_at_k
from pipelines.offline.pretrain import default_config, fit_onerec, genre_features
from pipelines.offline.train_onerec import OneRecRanker
from recloop.config import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
MISSED = 10**9


def beam_ranks(
    ranker: OneRecRanker,
    histories: list[list[int]],
    targets: list[int],
    beam: int,
    batch_size: int = 32,
) -> np.ndarray:
    """1-based rank of each target among the distinct first items of the ``beam`` best
    sessions (best session first); a target no beam starts with is missed (rank
    ``MISSED``, beyond every cut-off: a narrow beam must not count as a hit at k > beam)."""
    ranks = np.full(len(targets), MISSED, dtype=np.int64)
    for lo in range(0, len(targets), batch_size):
        out = ranker.recommend(histories[lo : lo + batch_size], beam_width=beam)
        for i, row in enumerate(out.items[:, :, 0].tolist()):
            order = list(dict.fromkeys(x for x in row if x > 0))
            tgt = targets[lo + i]
            if tgt in order:
                ranks[lo + i] = order.index(tgt) + 1
    return ranks


def _beam_rows(ranker: OneRecRanker, split, args: argparse.Namespace) -> dict:
    """Generative retrieval at each beam width on a seeded subsample of test users."""
    g = torch.Generator().manual_seed(args.seed)
    n = len(split.test_targets)
    users = sorted(torch.randperm(n, generator=g)[: min(n, args.beam_users)].tolist())
    hist = [split.test_histories[i] for i in users]
    tgt = [split.test_targets[i] for i in users]
    beams = {}
    for width in [int(b) for b in args.beams.split(",")]:
        t0 = time.monotonic()
        r = beam_ranks(ranker, hist, tgt, width)
        beams[str(width)] = {
            "HR@5": hr_at_k(r, 5),
            "HR@10": hr_at_k(r, 10),
            "NDCG@10": ndcg_at_k(r, 10),
            "users": len(users),
            "seconds": round(time.monotonic() - t0, 1),
        }
        print(f"beam {width}: {beams[str(width)]}", file=sys.stderr, flush=True)

    return beams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recloop ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(PROJECT_ROOT.parent / "shared/data/ml-100k"))
    parser.add_argument("--epochs", type=int, help="per variant (default: the seed model's)")
    parser.add_argument("--beams", default="8,32,128")
    parser.add_argument("--codebook-size", type=int, help="K of the seed config (default 16)")
    parser.add_argument(
        "--beam-users", type=int, default=300, help="users for the beam rows (seeded subsample)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "ablations_ml100k.json")
    parser.add_argument(
        "--beams-only",
        metavar="CHECKPOINT",
        help="skip training: beam rows for this checkpoint, merged into --out",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    ds = load_dataset(args.data)
    split = leave_one_out(ds)
    if args.beams_only:
        from pipelines.offline.train_onerec import code_table
        from recloop.checkpoint import load_checkpoint

        ck = load_checkpoint(args.beams_only)
        ranker = OneRecRanker(ck.model, code_table(ck.tokenizer, split.num_items))
        result = json.loads(args.out.read_text()) if args.out.exists() else {}
        result["beam_retrieval"] = _beam_rows(ranker, split, args)
        result["beam_checkpoint"] = str(args.beams_only)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["beam_retrieval"], indent=2))
        return 0
    content = genre_features(ds, Path(args.data)) if Path(args.data).is_dir() else None
    base = default_config(**({"codebook_size": args.codebook_size} if args.codebook_size else {}))
    base = replace(base, epochs=args.epochs or base.epochs, seed=args.seed)
    variants = {
        "moe_session5": base,
        "dense_session5": replace(base, model=replace(base.model, moe_experts=0)),
        "moe_point1": replace(base, model=replace(base.model, session_len=1)),
    }
    rows: dict[str, dict] = {}
    rankers: dict[str, OneRecRanker] = {}
    for name, cfg in variants.items():
        t0 = time.monotonic()
        ranker, _, history, _ = fit_onerec(split, cfg, content)
        rankers[name] = ranker
        rows[name] = {
            "test_full": evaluate_full(ranker, split.test_histories, split.test_targets),
            "params": ranker.model.num_params(),
            "epochs_run": len(history),
            "wall_s": round(time.monotonic() - t0, 1),
        }
        print(f"{name}: {json.dumps(rows[name]['test_full'])}", file=sys.stderr, flush=True)

    beams = _beam_rows(rankers["moe_session5"], split, args)

    result = {
        "dataset": ds.name,
        "seed": args.seed,
        "epochs": base.epochs,
        "variants": rows,
        "beam_retrieval": beams,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
