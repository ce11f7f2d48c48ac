"""Offline evaluation job: leave-one-out split, train a model, rank the test targets.

    python -m pipelines.offline.evaluate --model pop --data /path/to/ml-100k
    python -m pipelines.offline.evaluate --model sasrec --data ratings.csv --epochs 50 --out r.json
    python -m pipelines.offline.evaluate --model pop,sasrec,onerec -o sasrec.lr=0.003 --out cmp.json
    python -m pipelines.offline.evaluate --model onerec,onerec:infonce,onerec:cascade \
        -o onerec.infonce_weight=1 -o onerec.cascade_weight=1

Several models in one run share the split and the seed and end in one comparison table;
``-o MODEL.KEY=VALUE`` gives an option to one of them.

Models come from ``MODELS``: a builder ``(split, seed, options) -> Ranker`` trains on
``split.train`` (``split.val_*`` is there for early stopping) and returns a ranker. A
builder may set ``ranker.train_info`` (a JSON-able dict) to have it written to the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.offline.datasets import TIES, load_dataset, movielens_folder
from pipelines.offline.evaluation import (
    Ranker,
    Split,
    evaluate_sampled,
    leave_one_out,
    rank_full,
    ranks_to_metrics,
)

# (split, seed, options, the dataset the split came from) -> a trained ranker
ModelBuilder = Callable[[Split, int, dict[str, Any], Any], Ranker]

PROTOCOL = {
    "split": "leave-one-out: last item = test, second-to-last = validation (early stopping)",
    "full": "target ranked against all items; items in the user's history excluded",
    "sampled": "target ranked against uniform negatives not in the history, seeded",
    "ties": "pessimistic: rank = 1 + number of other items scoring >= the target",
    "ndcg": "1/log2(rank+1) if rank <= k else 0, one relevant item",
    "filter": "users with fewer than min_interactions interactions dropped before the split",
    "order": "by timestamp; same-timestamp interactions in the file's order, or by item id "
    "(the result's `ties`)",
}


def build_pop(split: Split, seed: int, options: dict[str, Any], ds: Any = None) -> Ranker:
    from models.popularity import MostPopular

    return MostPopular(split.num_items).fit(split.train)


def build_sasrec(split: Split, seed: int, options: dict[str, Any], ds: Any = None) -> Ranker:
    """Options: epochs, batch_size, lr, patience, weight_decay, device, and any
    ``SASRecConfig`` field (max_len, dim, heads, layers, dropout)."""
    import inspect
    from dataclasses import asdict, fields

    from models.sasrec import SASRecConfig
    from pipelines.offline.train_sasrec import train_sasrec

    cfg_keys = {f.name for f in fields(SASRecConfig)} - {"num_items"}
    defaults = inspect.signature(train_sasrec).parameters
    train_keys = ("epochs", "batch_size", "lr", "patience", "weight_decay", "device")
    unknown = set(options) - cfg_keys - set(train_keys)
    if unknown:
        raise ValueError(f"unknown sasrec option(s): {', '.join(sorted(unknown))}")
    config = SASRecConfig(
        num_items=split.num_items, **{k: v for k, v in options.items() if k in cfg_keys}
    )
    train_kw = {k: options.get(k, defaults[k].default) for k in train_keys}
    model, history = train_sasrec(
        split.train,
        split.num_items,
        config,
        seed=seed,
        val=(split.val_histories, split.val_targets),
        **train_kw,
    )
    best = max(history, key=lambda r: r["val_ndcg@10"])
    model.train_info = {
        "config": asdict(config),
        "training": train_kw,
        "epochs_run": len(history),
        "best_epoch": best["epoch"],
        "best_val_ndcg@10": best["val_ndcg@10"],
        "history": history,
    }
    return model


def build_onerec(split: Split, seed: int, options: dict[str, Any], ds: Any = None) -> Ranker:
    """Options: epochs, stride, batch_size, lr, patience, val_users, and any ``OneRecConfig``
    field (dim, moe_experts, session_len, ...). Genres join the tokenizer's embeddings
    when the dataset is a MovieLens folder (``content_dir`` option)."""
    from dataclasses import fields, replace

    from models.onerec import OneRecConfig
    from pipelines.offline.pretrain import default_config, fit_onerec, genre_features
    from pipelines.offline.train_onerec import TrainConfig

    options = dict(options)
    content_dir = options.pop("content_dir", None)
    descriptors = bool(options.pop("descriptors", False))
    anchor_window = int(options.pop("anchor_window", 20))
    model_keys = {f.name for f in fields(OneRecConfig)}
    train_keys = {f.name for f in fields(TrainConfig)} - {"model", "tokenizer", "seed"}
    unknown = set(options) - model_keys - train_keys
    if unknown:
        raise ValueError(f"unknown onerec option(s): {', '.join(sorted(unknown))}")
    context = None
    if descriptors or options.get("anchors"):
        from pipelines.offline.context import OfflineContext

        if ds is None:
            raise ValueError("descriptors / anchors need the dataset the split came from")
        context = OfflineContext(
            ds,
            split,
            content_dir,
            descriptors=descriptors,
            anchors=int(options.get("anchors", 0)),
            window=anchor_window,
        )
        options["context_fields"] = context.fields
    model_options = {k: v for k, v in options.items() if k in model_keys}
    cfg = default_config(num_items=split.num_items, **model_options)
    cfg = replace(cfg, seed=seed, **{k: v for k, v in options.items() if k in train_keys})
    content = None
    if content_dir is not None:
        from pipelines.offline.datasets import load_dataset

        content = genre_features(load_dataset(content_dir), Path(content_dir))
    ranker, tokenizer, history, info = fit_onerec(split, cfg, content, context=context)
    if context is not None:
        ranker.test_contexts = context.rows("test")
        ranker.val_contexts = context.rows("val")
    ranker.train_info = {
        "config": info["config"],
        "params": ranker.model.num_params(),
        "epochs_run": len(history),
        "history": history,
        "tokenizer": {k: v for k, v in info["tokenizer"].items() if not isinstance(v, list)},
    }
    return ranker


MODELS: dict[str, ModelBuilder] = {
    "pop": build_pop,
    "sasrec": build_sasrec,
    "onerec": build_onerec,
}
# MODEL:SCORING ranks with another scoring of the same trained model (one training per
# run): onerec:infonce (the contrastive head alone), onerec:cascade (beam proposals
# re-ranked by the head; options cascade_weight, cascade_candidates).
SCORINGS: dict[str, tuple[str, ...]] = {"onerec": ("sid", "infonce", "cascade", "item", "hybrid")}
INFERENCE_OPTIONS: dict[str, tuple[str, ...]] = {
    "onerec": ("cascade_weight", "cascade_candidates", "hybrid_weight")
}


def parse_model(name: str) -> tuple[str, str | None]:
    """``onerec:cascade`` -> ("onerec", "cascade"); ``sasrec`` -> ("sasrec", None). A
    variant, ``onerec@k1:cascade``, is the base model with options of its own
    (``-o onerec@k1.latent_steps=1`` over the ``onerec.*`` ones)."""
    trained, sep, scoring = name.partition(":")
    base, at, label = trained.partition("@")
    if at and not label.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"variant label {label!r} of {name!r}: letters, digits, - and _")
    if base not in MODELS:
        raise ValueError(f"unknown model {base!r}; known: {', '.join(sorted(MODELS))}")
    if not sep:
        return base, None
    known = SCORINGS.get(base, ())
    if scoring not in known:
        hint = f"known: {', '.join(known)}" if known else f"{base} has one scoring"
        raise ValueError(f"unknown scoring {scoring!r} for {base}; {hint}")
    return base, scoring


def _table(result: dict[str, Any]) -> str:
    full, sampled = result["metrics"]["full"], result["metrics"]["sampled"]
    ks = [int(k.split("@")[1]) for k in full if k.startswith("HR@")]
    r = result
    lines = [
        f"{r['model']} on {r['dataset']}: {r['num_users']} users, {r['num_items']} items, "
        f"seed {r['seed']}, train {r['train_seconds']:.1f} s",
        f"{'protocol':<22}" + "".join(f"{'HR@' + str(k):>9}{'NDCG@' + str(k):>9}" for k in ks),
        f"{'full ranking':<22}"
        + "".join(f"{full[f'HR@{k}']:>9.4f}{full[f'NDCG@{k}']:>9.4f}" for k in ks),
    ]
    by_tie = result["metrics"].get("full_by_tie")
    if by_tie:
        share = by_tie["tied_share"]
        for part, label in (("tied", f"  tied ({share:.0%})"), ("untied", "  untied")):
            m = by_tie[part]
            lines.append(
                f"{label:<22}" + "".join(f"{m[f'HR@{k}']:>9.4f}{m[f'NDCG@{k}']:>9.4f}" for k in ks)
            )
    n = sampled["num_negatives"]
    pad = ks.index(10) if 10 in ks else 0
    lines.append(
        f"{f'sampled ({n} negatives)':<22}"
        + " " * 18 * pad
        + f"{sampled['HR@10']:>9.4f}{sampled['NDCG@10']:>9.4f}"
    )
    return "\n".join(lines)


def _write_json(path: Path | None, obj: dict, log: Callable[[str], None] | None) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    if log:
        log(f"wrote {path}")


def run_eval(
    model: str,
    dataset: str | Path,
    seed: int = 0,
    epochs: int | None = None,
    options: dict[str, Any] | None = None,
    min_interactions: int = 5,
    ks: Sequence[int] = (5, 10, 20),
    num_negatives: int = 100,
    out_json: Path | None = None,
    log: Callable[[str], None] | None = print,
    ties: str = "file",
    trained: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Split ``dataset`` leave-one-out, build ``model`` from ``MODELS`` on it, evaluate on
    the test targets (full ranking and sampled); print a table, write ``out_json``.
    ``model`` may name a scoring (``onerec:cascade``); ``trained``, a dict kept across
    calls, lets several scorings of one model share its training."""
    base, scoring = parse_model(model)
    options = dict(options or {})
    inference = {k: options.pop(k) for k in INFERENCE_OPTIONS.get(base, ()) if k in options}
    if epochs is not None:
        options["epochs"] = epochs
    folder = movielens_folder(dataset)
    if base == "onerec" and folder is not None:
        options.setdefault("content_dir", str(folder))  # genres feed the SID tokenizer
    ds = load_dataset(dataset, min_interactions=min_interactions, ties=ties)
    split = leave_one_out(ds)
    if log:
        log(f"{ds.summary()}; {len(split.users)} users evaluated")

    key = json.dumps([base, options, seed, str(dataset), ties, min_interactions], default=str)
    if trained is not None and key in trained:
        ranker, train_seconds = trained[key]
    else:
        start = time.monotonic()
        ranker = MODELS[base](split, seed, dict(options), ds)
        train_seconds = time.monotonic() - start
        if trained is not None:
            trained[key] = (ranker, train_seconds)
    if scoring is not None or inference:
        ranker = ranker.with_scoring(scoring or "sid", **inference)
    options = {**options, **inference}
    start = time.monotonic()
    contexts = getattr(ranker, "test_contexts", None)
    ranks = rank_full(ranker, split.test_histories, split.test_targets, contexts=contexts)
    full = ranks_to_metrics(ranks, ks)
    by_tie = None
    if split.test_tied is not None:
        tied = np.asarray(split.test_tied, dtype=bool)
        by_tie = {
            "tied_share": float(tied.mean()),
            "tied": ranks_to_metrics(ranks[tied], ks),
            "untied": ranks_to_metrics(ranks[~tied], ks),
        }
    sampled = evaluate_sampled(
        ranker,
        split.test_histories,
        split.test_targets,
        num_negatives=num_negatives,
        seed=seed,
        num_items=split.num_items,
        contexts=contexts,
    )
    eval_seconds = time.monotonic() - start
    # The same full ranking on the validation targets: what a choice between models or
    # scorings of one run may look at (the test split never chooses).
    val_ranks = rank_full(
        ranker,
        split.val_histories,
        split.val_targets,
        contexts=getattr(ranker, "val_contexts", None),
    )

    result: dict[str, Any] = {
        "model": model,
        "dataset": ds.name,
        "dataset_path": str(dataset),
        "seed": seed,
        "num_users": len(split.users),
        "num_items": ds.num_items,
        "num_interactions": ds.num_interactions,
        "min_interactions": min_interactions,
        "ties": ties,
        "scoring": scoring or getattr(ranker, "scoring", None),
        "options": options,
        "metrics": {
            "full": full,
            "sampled": sampled,
            "full_by_tie": by_tie,
            "val_full": ranks_to_metrics(val_ranks, ks),
        },
        # Per test user (split order), the target's full-ranking rank: for paired
        # comparisons between models of one run (same users, same targets).
        "test_ranks": [int(r) for r in ranks],
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "protocol": PROTOCOL,
        "train_info": getattr(ranker, "train_info", None),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if log:
        log(_table(result))
    _write_json(out_json, result, log)
    return result


def _comparison_table(results: list[dict[str, Any]]) -> str:
    ks = [int(k.split("@")[1]) for k in results[0]["metrics"]["full"] if k.startswith("NDCG@")]
    head = f"{'model':<16}" + "".join(f"{'HR@' + str(k):>9}{'NDCG@' + str(k):>9}" for k in ks)
    head += f"{'s-HR@10':>9}{'s-NDCG@10':>10}{'val N@10':>9}{'train s':>9}{'eval s':>8}"
    ties = 10 in ks and all(r["metrics"].get("full_by_tie") for r in results)
    if ties:  # NDCG@10 on test targets tied in time with the item before them, and not
        head += f"{'tied N@10':>10}{'untied N@10':>12}"
    lines = [head]
    for r in results:
        full, sampled = r["metrics"]["full"], r["metrics"]["sampled"]
        line = (
            f"{r['model']:<16}"
            + "".join(f"{full[f'HR@{k}']:>9.4f}{full[f'NDCG@{k}']:>9.4f}" for k in ks)
            + f"{sampled['HR@10']:>9.4f}{sampled['NDCG@10']:>10.4f}"
            + f"{r['metrics'].get('val_full', {}).get('NDCG@10', float('nan')):>9.4f}"
            + f"{r['train_seconds']:>9.1f}"
            + f"{r['eval_seconds']:>8.1f}"
        )
        if ties:
            t = r["metrics"]["full_by_tie"]
            line += f"{t['tied']['NDCG@10']:>10.4f}{t['untied']['NDCG@10']:>12.4f}"
        lines.append(line)
    return "\n".join(lines)


def run_compare(
    models: Sequence[str],
    dataset: str | Path,
    options: dict[str, dict[str, Any]] | None = None,
    out_json: Path | None = None,
    log: Callable[[str], None] | None = print,
    **kwargs: Any,
) -> dict[str, Any]:
    """``run_eval`` for each model on the same split and seed; one table, one JSON with
    every result under ``results`` (and each model's NDCG@10 over the best other's)."""
    for m in models:
        parse_model(m)
    options = options or {}
    trained: dict[str, Any] = {}
    results = []
    for m in models:
        variant = m.partition(":")[0]
        merged = {**options.get(variant.partition("@")[0], {}), **options.get(variant, {})}
        if log:
            log(f"== {m}")
        results.append(run_eval(m, dataset, options=merged, log=log, trained=trained, **kwargs))
        if len(results) < len(models):  # a long run keeps what it has so far
            _write_json(out_json, _comparison(models, results, done=False), None)
    out = _comparison(models, results, done=True)
    if log:
        log(f"== comparison on {out['dataset']} (seed {out['seed']})\n{out['table']}")
    _write_json(out_json, out, log)
    return out


def _comparison(models: Sequence[str], results: list[dict[str, Any]], done: bool) -> dict:
    return {
        "models": list(models),
        "complete": done,
        "dataset": results[0]["dataset"],
        "seed": results[0]["seed"],
        "ndcg10": {r["model"]: r["metrics"]["full"]["NDCG@10"] for r in results},
        "results": results,
        "table": _comparison_table(results),
    }


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.offline.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--model",
        required=True,
        help=f"one of {', '.join(sorted(MODELS))}, or several joined by commas (one run); "
        "onerec:infonce and onerec:cascade score the one trained onerec otherwise",
    )
    parser.add_argument(
        "--data",
        default="ml-100k",
        help="MovieLens-100k folder, .csv/.parquet (user_id,item_id,timestamp), .txt (SASRec), "
        "or a name: ml-100k (the configured folder), synthetic",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="maximum training epochs (trained models)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--min-interactions", type=int, default=5)
    parser.add_argument(
        "--ties",
        choices=TIES,
        default="file",
        help="order of interactions with the same timestamp: the file's (default, as "
        "SASRec's preprocessing) or by item id",
    )
    parser.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        type=_parse_option,
        metavar="KEY=VALUE",
        help="model option, e.g. -o dim=64 -o lr=0.001, or -o sasrec.lr=0.001 for one of "
        "several models (repeatable)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    try:
        if not models:
            raise ValueError(f"no model given; known: {', '.join(sorted(MODELS))}")
        common = dict(
            seed=args.seed,
            epochs=args.epochs,
            min_interactions=args.min_interactions,
            ties=args.ties,
        )
        if len(models) == 1:
            run_eval(models[0], args.data, options=dict(args.option), out_json=args.out, **common)
        else:
            per_model: dict[str, dict[str, Any]] = {}
            for m in models:
                parse_model(m)
                variant = m.partition(":")[0]
                per_model.update({variant: {}, variant.partition("@")[0]: {}})
            for key, value in args.option:
                target, dot, name = key.partition(".")
                if not dot or target not in per_model:
                    raise ValueError(
                        f"with several models, options are MODEL.KEY=VALUE (got {key!r})"
                    )
                per_model[target][name] = value
            run_compare(models, args.data, options=per_model, out_json=args.out, **common)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
