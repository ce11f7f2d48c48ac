"""Which hidden user model behaves most like the data? The simulator's choice, on real data.

The simulator's ground truth must be chosen by how well it fits held-out real behaviour,
never by which arm it makes win. This fits every kind of hidden model
(``actors.sim.user_model.KINDS``: ``static``, taste and fatigue only; ``sequential``, the
recent watches move the watch head) on each user's first 90 % of ratings and scores it
on the last 10 %:

- the watch head's log-loss and AUC on the held-out ratings against as many sampled
  unrated items (the likelihood of real held-out behaviour: the criterion);
- the like and follow heads' AUC on the held-out ratings;
- how well the watch head ranks each user's actual next item (the first held-out
  rating, NDCG@10 / HR@10 against the full catalogue minus the user's history), beside
  popularity and a SASRec trained on the same training prefixes (early stopping on each
  prefix's last item).

The default kind is the one with the lowest held-out watch log-loss; the JSON says which
kind wins each measure.

    make bench-sim-fit     # or: .venv/bin/python -m benchmarks.sim_fit [--synthetic]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from recloop.config import PROJECT_ROOT, DataConfig

RESULTS = PROJECT_ROOT / "benchmarks" / "results"


def _say(msg: str) -> None:
    print(f"[bench-sim-fit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _fit_row(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("watch_logloss", "watch_auc", "like_auc", "follow_auc", "like_logloss", "fit_s")
    row = {k: report[k] for k in keys}
    row["next_item"] = report["next_item"]["model"]
    return row


def sasrec_next_item(split: Any, epochs: int, seed: int) -> dict[str, Any]:
    """SASRec trained on the training prefixes (item rows + 1 as ids), early-stopped on
    each prefix's last item, then scored on the first held-out item with the prefix as
    history (the hidden models' protocol)."""
    from pipelines.offline.evaluation import evaluate_full
    from pipelines.offline.train_sasrec import train_sasrec

    hists, targets, _ = split.next_item_targets()
    prefixes = [[int(i) + 1 for i in h] for h in hists]
    keep = [k for k, p in enumerate(prefixes) if len(p) >= 3]
    train = [prefixes[k][:-1] for k in keep]
    val = ([prefixes[k][:-1] for k in keep], [prefixes[k][-1] for k in keep])
    started = time.monotonic()
    model, history = train_sasrec(
        train,
        len(split.item_ids),
        epochs=epochs,
        lr=3e-3,
        seed=seed,
        val=val,
        patience=5,
        log=lambda m: _say(f"sasrec {m}"),
    )
    train_s = time.monotonic() - started
    metrics = evaluate_full(model, prefixes, [t + 1 for t in targets], ks=(10,))
    return {
        "HR@10": metrics["HR@10"],
        "NDCG@10": metrics["NDCG@10"],
        "users": int(metrics["users"]),
        "epochs_run": len(history),
        "train_s": round(train_s, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic", action="store_true", help="generated data, not MovieLens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sasrec-epochs", type=int, default=40)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    from actors.sim.user_model import KINDS, NEXT_ITEM_PROTOCOL, HeldOut, HiddenUserModel
    from recloop.data import load_movielens, synthetic

    torch.set_num_threads(1)  # the hidden model's fits are bit-for-bit reproducible so
    if args.synthetic:
        data, name = synthetic(seed=args.seed), "synthetic"
    else:
        data, name = load_movielens(DataConfig().movielens_dir), "ml100k"
    out_path = args.out or RESULTS / f"sim_fit_{name}.json"
    _say(f"data {data.summary()}")
    started = time.monotonic()
    kinds: dict[str, Any] = {}
    report: dict[str, Any] = {}
    for kind in KINDS:
        model = HiddenUserModel.fit(data, seed=args.seed, kind=kind, progress=_say)
        report = model.report
        kinds[kind] = _fit_row(report)
        _say(f"{kind}: {json.dumps(kinds[kind])}")
    popularity = {
        "watch_auc": report["popularity"]["watch_auc"],
        "like_auc": report["popularity"]["like_auc"],
        "follow_auc": report["popularity"]["follow_auc"],
        "next_item": report["next_item"]["popularity"],
    }
    sasrec = sasrec_next_item(HeldOut.of(data), args.sasrec_epochs, args.seed)
    _say(f"sasrec: {json.dumps(sasrec)}")

    def best(key: str, lower: bool = False) -> str:
        value = {k: kinds[k][key] if "@" not in key else kinds[k]["next_item"][key] for k in kinds}
        return (min if lower else max)(value, key=value.get)

    default = best("watch_logloss", lower=True)
    out = {
        "data": name,
        "split": "each user's last 10% of ratings (at least one) held out, in time order",
        "criterion": "lowest held-out watch log-loss (the likelihood of the held-out "
        "ratings against as many sampled unrated items)",
        "default": default,
        "best_by": {
            "watch_logloss": default,
            "watch_auc": best("watch_auc"),
            "like_auc": best("like_auc"),
            "next_item_NDCG@10": best("NDCG@10"),
        },
        "kinds": kinds,
        "popularity": popularity,
        "sasrec_next_item": sasrec,
        "next_item_protocol": NEXT_ITEM_PROTOCOL,
        "n_train": report["n_train"],
        "n_test": report["n_test"],
        "wall_s": round(time.monotonic() - started, 1),
        "machine": {"platform": platform.platform(), "torch_threads": 1},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("default", "best_by")}, indent=2))
    print(f"saved {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
