"""Fit the simulator's hidden user-response model and write it with its held-out report.

    python -m actors.sim.fit_user_model [--data DIR|synthetic] [--out DIR] [--epochs N] [--seed S]

Reads MovieLens-100k in place (default: ``DataConfig().movielens_dir``) or generates the
synthetic stand-in, fits ``actors.sim.user_model.HiddenUserModel`` (``--kind``) on each
user's first 90 % of ratings, reports held-out AUC / log-loss of the watch, like and
follow heads beside a popularity baseline and how well the watch head ranks each user's
actual next item, and saves the model directory (``weights.safetensors``, ``model.json``,
``report.json``) to ``--out`` (default ``.recloop/sim/user_model/<ml100k|synthetic>-<kind>``).
The report is printed as JSON on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from actors.sim.user_model import KINDS
from recloop.config import PROJECT_ROOT, DataConfig


def _log(msg: str) -> None:
    print(f"[fit_user_model {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m actors.sim.fit_user_model", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--data",
        default=str(DataConfig().movielens_dir),
        help="MovieLens-100k folder, or 'synthetic' (default: data.movielens_dir)",
    )
    parser.add_argument("--out", help="model directory (default .recloop/sim/user_model/<name>)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="sequential",
        help="sequential (recent watches move the watch head; the default) or static",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: fastest on 2 shared cores)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.dim < 1:
        parser.error("--epochs and --dim must be positive")

    import torch

    from actors.sim.user_model import HiddenUserModel
    from recloop.data import load_movielens, synthetic

    torch.set_num_threads(args.threads)
    if args.data == "synthetic":
        data, name = synthetic(seed=args.seed), "synthetic"
    else:
        try:
            data, name = load_movielens(args.data), "ml100k"
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    default = PROJECT_ROOT / ".recloop" / "sim" / "user_model" / f"{name}-{args.kind}"
    out = Path(args.out) if args.out else default
    _log(
        f"data {data.summary()}; {args.kind} model, dim {args.dim}, {args.epochs} epochs, "
        f"seed {args.seed}"
    )
    model = HiddenUserModel.fit(
        data, dim=args.dim, epochs=args.epochs, seed=args.seed, progress=_log, kind=args.kind
    )
    path = model.save(out)
    rep = model.report
    pop = rep["popularity"]
    for head in ("watch", "like", "follow"):
        _log(
            f"held-out {head:6s} AUC {rep[f'{head}_auc']:.4f} (popularity "
            f"{pop[f'{head}_auc']:.4f}), log-loss {rep[f'{head}_logloss']:.4f}"
        )
    nxt = rep["next_item"]
    _log(
        f"next item NDCG@10 {nxt['model']['NDCG@10']:.4f} (popularity "
        f"{nxt['popularity']['NDCG@10']:.4f}) over {nxt['users']} users"
    )
    _log(f"fit {rep['fit_s']:.1f}s on {rep['n_train']} ratings, {rep['n_test']} held out")
    _log(f"saved {path}")
    print(json.dumps({"model": str(path), "report": rep}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
