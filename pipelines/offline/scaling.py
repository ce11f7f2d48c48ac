"""Scaling study: held-out SID and InfoNCE losses against model size and data size.

    recloop scaling [--data ml-100k] [--dims 16,24,32,48,64,96] [--fractions 0.25,0.5,1]
                    [--epochs 3] [--out benchmarks/results/scaling_ml100k.json]

Every run trains OneRec with the joint objective (SID next-token loss + InfoNCE head) on
the same leave-one-out training split, for the same number of epochs and steps of data:
one run per model width on all the data, one run per data fraction (a seeded subset of
the users) at the widest model. The held-out losses are measured on each user's
validation item after their training history: the SID loss is the mean next-token
cross-entropy of the item's L codes; the InfoNCE loss is the cross-entropy of the head's
logits over the whole catalogue (so it does not depend on sampled negatives).

A power law L = A * X^(-alpha) is fitted to each loss by least squares in log-log space,
X = non-embedding parameters (Kaplan et al.'s convention; the id and code embedding
tables grow with the catalogue, not with the model) or training tokens (the decoder's
target tokens seen). The JSON holds every run, the exponents and R²; the PNG the log-log
plot. Sizes are small so the whole job fits this machine: it prints its progress and an
estimate of the time left after each run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.onerec import OneRec
from pipelines.offline.datasets import load_dataset
from pipelines.offline.evaluation import Split, leave_one_out
from pipelines.offline.train_onerec import (
    TrainConfig,
    build_tokenizer,
    code_table,
    pad_histories,
    train_onerec,
)

DEFAULT_DIMS = (16, 24, 32, 48, 64, 96)
DEFAULT_FRACTIONS = (0.25, 0.5, 1.0)


def _log(msg: str) -> None:
    print(f"[scaling {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def non_embedding_params(model: OneRec) -> int:
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


@torch.no_grad()
def held_out_losses(
    model: OneRec, codes: torch.Tensor, histories: Sequence[list[int]], targets: Sequence[int]
) -> dict[str, float]:
    """Mean SID next-token loss of the target item's codes, and the InfoNCE loss of the
    head over the full catalogue, on (history, target) pairs."""
    model.eval()
    cfg = model.cfg
    sid_sum, nce_sum, tokens, n = 0.0, 0.0, 0, 0
    all_items = torch.arange(len(codes))
    for lo in range(0, len(targets), 256):
        items = pad_histories(histories[lo : lo + 256], cfg.max_history)
        tgt = torch.as_tensor(targets[lo : lo + 256], dtype=torch.long)
        enc = model.encode(codes[items], items > 0, history_items=items)
        tok = model.target_tokens(codes[tgt][:, None])  # (B, L)
        start = torch.zeros(len(tgt), 1, dtype=torch.long)
        logits = model.decode(enc, torch.cat([start, tok[:, :-1]], dim=1))  # (B, L, K)
        sid_sum += float(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), codes[tgt].reshape(-1), reduction="sum"
            )
        )
        tokens += tok.numel()
        head = model.contrastive_scores(enc, all_items, codes)  # (B, N + 1)
        head[:, 0] = float("-inf")
        nce_sum += float(F.cross_entropy(head, tgt, reduction="sum"))
        n += len(tgt)
    return {"sid_loss": sid_sum / tokens, "infonce_loss": nce_sum / n}


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """L = A * x^(-alpha) by least squares on log L = log A - alpha log x; R² in log space."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(lx) < 2 or np.ptp(lx) == 0:
        raise ValueError("a power-law fit needs at least two distinct x values")
    slope, intercept = np.polyfit(lx, ly, 1)
    pred = intercept + slope * lx
    ss_res = float(((ly - pred) ** 2).sum())
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return {"alpha": float(-slope), "A": float(math.exp(intercept)), "r2": r2, "points": len(lx)}


def target_items(sequences: Sequence[Sequence[int]], session_len: int, stride: int) -> int:
    """Items in the targets of ``make_examples``' sessions (one every ``stride`` items
    from position 1, each the next ``session_len`` items or fewer at the end)."""
    return sum(
        min(session_len, len(seq) - p) for seq in sequences for p in range(1, len(seq), stride)
    )


def data_series(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs at the widest size, by training tokens: the data fractions and the full
    data."""
    widest = max(r["dim"] for r in runs if r["kind"] == "size")
    rows = [r for r in runs if r["kind"] == "data" or (r["kind"] == "size" and r["dim"] == widest)]
    return sorted(rows, key=lambda r: r["train_tokens"])


def _subset(split: Split, fraction: float, seed: int) -> list[list[int]]:
    seqs = list(split.train)
    if fraction >= 1.0:
        return seqs
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(seqs), generator=g)[: max(1, round(fraction * len(seqs)))]
    return [seqs[i] for i in sorted(keep.tolist())]


def _model_config(base: TrainConfig, dim: int, n_items: int) -> TrainConfig:
    heads = 4 if dim % 4 == 0 and dim >= 32 else 2
    model = replace(  # expert_hidden=None: recomputed for equal active parameters
        base.model,
        dim=dim,
        heads=heads,
        ffn_hidden=4 * dim,
        expert_hidden=None,
        item_vocab=n_items + 1,
    )
    return replace(base, model=model)


def run_study(
    data: str,
    dims: Sequence[int] = DEFAULT_DIMS,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    epochs: int = 3,
    seed: int = 0,
    stride: int = 5,
    log=_log,
) -> dict[str, Any]:
    from pipelines.offline.pretrain import default_config

    ds = load_dataset(data)
    split = leave_one_out(ds)
    base = default_config(infonce_weight=1.0)
    base = replace(
        base, epochs=epochs, seed=seed, stride=stride, patience=epochs + 1, warmup_steps=20
    )
    tokenizer = build_tokenizer(split.train, split.num_items, base)
    codes = code_table(tokenizer, split.num_items)
    widest = max(dims)
    plan = [("size", d, 1.0) for d in dims] + [("data", widest, f) for f in fractions if f < 1.0]
    log(
        f"{ds.summary()}: {len(plan)} runs ({len(dims)} widths, "
        f"{len(plan) - len(dims)} data fractions at dim {widest}), {epochs} epochs each"
    )
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    for i, (kind, dim, fraction) in enumerate(plan):
        cfg = _model_config(base, dim, split.num_items)
        seqs = _subset(split, fraction, seed)
        t0 = time.monotonic()
        model, history = train_onerec(seqs, codes, cfg, log=lambda m: None)
        losses = held_out_losses(model, codes, split.val_histories, split.val_targets)
        params = model.num_params()
        run = {
            "kind": kind,
            "dim": dim,
            "data_fraction": fraction,
            "params": params["total"],
            "non_embedding_params": non_embedding_params(model),
            "train_sequences": len(seqs),
            "train_tokens": target_items(seqs, cfg.model.session_len, stride)
            * cfg.model.levels
            * epochs,
            "train_s": round(time.monotonic() - t0, 1),
            "final_train_ntp": history[-1]["ntp_loss"],
            "final_train_infonce": history[-1]["infonce_loss"],
            **losses,
        }
        runs.append(run)
        spent = time.monotonic() - started
        left = spent / (i + 1) * (len(plan) - i - 1)
        log(
            f"[{i + 1}/{len(plan)}] {kind} dim {dim} data {fraction:g}: "
            f"{run['non_embedding_params']:,} non-embedding params, held-out SID loss "
            f"{losses['sid_loss']:.4f}, InfoNCE loss {losses['infonce_loss']:.4f} "
            f"({run['train_s']:.0f} s; about {left / 60:.1f} min left)"
        )
    sizes = [r for r in runs if r["kind"] == "size"]
    by_data = data_series(runs)
    fits: dict[str, Any] = {"params": {}, "tokens": {}}
    for loss in ("sid_loss", "infonce_loss"):
        fits["params"][loss] = fit_power_law(
            [r["non_embedding_params"] for r in sizes], [r[loss] for r in sizes]
        )
        if len(by_data) >= 2:
            fits["tokens"][loss] = fit_power_law(
                [r["train_tokens"] for r in by_data], [r[loss] for r in by_data]
            )
    return {
        "dataset": ds.name,
        "seed": seed,
        "epochs": epochs,
        "stride": stride,
        "runs": runs,
        "fits": fits,
        "wall_s": round(time.monotonic() - started, 1),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"torch_threads": torch.get_num_threads(), "torch": torch.__version__},
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r for r in result["runs"] if r["kind"] == "size"]
    by_data = data_series(result["runs"])
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = (
        ("params", "non_embedding_params", sizes, "non-embedding parameters"),
        ("tokens", "train_tokens", by_data, "training tokens"),
    )
    losses = (("sid_loss", "SID loss", "tab:blue"), ("infonce_loss", "InfoNCE loss", "tab:orange"))
    for row, (loss, name, colour) in enumerate(losses):
        for col, (key, field, rows, label) in enumerate(panels):
            ax = axes[row][col]
            fit = result["fits"][key].get(loss)
            if not rows or fit is None:
                ax.set_visible(False)
                continue
            x = np.array([r[field] for r in rows], float)
            ax.loglog(x, [r[loss] for r in rows], "o", color=colour)
            grid = np.geomspace(x.min(), x.max(), 50)
            ax.loglog(grid, fit["A"] * grid ** (-fit["alpha"]), "-", color=colour)
            ax.set_title(f"{name}: alpha {fit['alpha']:.3f}, R² {fit['r2']:.2f}", fontsize=10)
            ax.set_xlabel(label)
            ax.set_ylabel(f"held-out {name}")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
            ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"recloop scaling on {result['dataset']} ({result['epochs']} epochs per run)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recloop scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="ml-100k", help="as recloop eval's --data")
    parser.add_argument("--dims", default=",".join(map(str, DEFAULT_DIMS)))
    parser.add_argument("--fractions", default=",".join(map(str, DEFAULT_FRACTIONS)))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--stride", type=int, default=5, help="a session every N items")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="JSON path; the plot goes beside it (.png)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        dims = [int(d) for d in args.dims.split(",") if d.strip()]
        fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
        if len(dims) < 2 or any(d < 2 for d in dims):
            raise ValueError("--dims: at least two widths, each >= 2")
        if any(not 0 < f <= 1 for f in fractions):
            raise ValueError("--fractions: each in (0, 1]")
        result = run_study(args.data, dims, fractions, args.epochs, args.seed, args.stride)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = [
        f"{'kind':<5}{'dim':>5}{'data':>6}{'non-emb params':>16}{'SID loss':>10}{'NCE loss':>10}"
    ]
    for r in result["runs"]:
        table.append(
            f"{r['kind']:<5}{r['dim']:>5}{r['data_fraction']:>6g}{r['non_embedding_params']:>16,}"
            f"{r['sid_loss']:>10.4f}{r['infonce_loss']:>10.4f}"
        )
    for key, fits in result["fits"].items():
        for loss, fit in fits.items():
            table.append(f"fit vs {key:<6} {loss:<13} alpha {fit['alpha']:.4f}  R² {fit['r2']:.3f}")
    print("\n".join(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, args.out.with_suffix(".png"))
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
