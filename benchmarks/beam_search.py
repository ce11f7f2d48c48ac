"""Latency, throughput and MFU of trie-constrained beam search, with the matmul peak beside it.

Two models: the checkpoint serving runs (loaded by ``recloop.inference.LoadedModel.load``,
as a replica does; default: the newest ``.recloop/models/seed`` checkpoint) and the
default ``OneRecConfig`` with random weights on a random 1 682-item catalogue. For batch
sizes 1, 8 and 32 (beam 32, the model's M and L) it times encode + beam search per batch
over ``--reps`` (>= 200) timed searches: each request of a batch waits the batch's time,
so the batch latency percentiles are the per-request ones. The cache-less reference
decoder runs on the same inputs for the KV-cache speed-up.

FLOPs are the active ones: counted by torch's FlopCounterMode on a search that runs the
MoE by sort-and-split (each token through its top-k experts only), so the dense-gate
path's all-experts matmuls, which the timed search may take for small batches, do not
inflate them. MFU = active FLOPs / p50 latency / the fp32 matmul peak measured in the same
run on the same thread count (the best of several 1024² matmul runs, before and after).
torch runs 1 thread by default: a serving replica's share of this 2-core machine.

    make bench-beam   # or: .venv/bin/python -m benchmarks.beam_search [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.beam_search import CompiledTrie, beam_search, beam_search_reference
from models.onerec import OneRec, OneRecConfig

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def matmul_peak_gflops(n: int = 1024, reps: int = 20, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - started) / 1e9


def random_catalogue(n_items: int, cfg: OneRecConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    K, L = cfg.codebook_size, cfg.levels
    flat = torch.randperm(K**L, generator=g)[:n_items]
    codes = torch.stack([(flat // K ** (L - 1 - i)) % K for i in range(L)], dim=1)
    return CompiledTrie(codes, torch.arange(1, n_items + 1), K), codes


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def newest_seed() -> Path | None:
    root = ROOT / ".recloop" / "models" / "seed"
    found = sorted(
        (p for p in root.glob("*") if (p / "config.json").exists()),
        key=lambda p: p.stat().st_mtime,
    )
    return found[-1] if found else None


def served_model(path: Path):
    """The checkpoint as a serving replica loads it: model, trie, encode function."""
    from recloop.inference import LoadedModel

    loaded = LoadedModel.load(str(path), path.name)
    ranker = loaded.ranker
    n = ranker.codes.shape[0] - 1

    def encode(items: torch.Tensor):
        return ranker.encode(items.tolist())

    return ranker.model.eval(), ranker.trie, encode, n


def random_model(n_items: int):
    cfg = OneRecConfig()
    model = OneRec(cfg).eval()
    trie, codes = random_catalogue(n_items, cfg)
    codes = torch.cat([torch.zeros(1, cfg.levels, dtype=torch.long), codes])

    def encode(items: torch.Tensor):
        return model.encode(codes[items], items > 0)

    return model, trie, encode, n_items


def bench_model(name, model, trie, encode, n_items, args, peak) -> dict:
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        items = torch.randint(1, n_items + 1, (batch, cfg.max_history), generator=g)
        exclude = items.tolist()  # serving excludes the history

        def run(fn=beam_search, items=items, exclude=exclude, **kw):
            with torch.no_grad():
                return fn(model, encode(items), trie, args.beam, exclude=exclude, **kw)

        for _ in range(3):
            run()  # warm-up
        gc.collect()
        lat = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            run()
            lat.append(time.perf_counter() - t0)
        ref_lat = []
        for _ in range(args.ref_reps):
            t0 = time.perf_counter()
            run(beam_search_reference)
            ref_lat.append(time.perf_counter() - t0)
        with FlopCounterMode(display=False) as counter:
            run(moe_dense=False)  # sort-and-split: the top-k experts' FLOPs only
        active = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            run()
        executed = counter.get_total_flops()
        p50 = statistics.median(lat)
        ref_p50 = statistics.median(ref_lat)
        row = {
            "batch": batch,
            "searches_timed": len(lat),
            "p50_ms": p50 * 1e3,
            "p90_ms": percentile(lat, 0.9) * 1e3,
            "p99_ms": percentile(lat, 0.99) * 1e3,
            "mean_ms": statistics.fmean(lat) * 1e3,
            "requests_per_s": batch / statistics.fmean(lat),
            "reference_searches_timed": len(ref_lat),
            "reference_p50_ms": ref_p50 * 1e3,
            "kv_cache_speedup": ref_p50 / p50,
            "active_gflop_per_batch": active / 1e9,
            "executed_gflop_per_batch": executed / 1e9,
            "achieved_active_gflops": active / p50 / 1e9,
            "mfu": active / p50 / 1e9 / peak,
        }
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        print(
            f"{name[:24]:>24} {batch:>5} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} "
            f"{row['requests_per_s']:>8.1f} {row['reference_p50_ms']:>9.1f} "
            f"{row['kv_cache_speedup']:>8.2f} {row['achieved_active_gflops']:>8.2f} "
            f"{row['mfu']:>6.3f}",
            flush=True,
        )
    return {
        "name": name,
        "config": {
            "beam": args.beam,
            "session_len": cfg.session_len,
            "levels": cfg.levels,
            "codebook_size": cfg.codebook_size,
            "dim": cfg.dim,
            "heads": cfg.heads,
            "dec_layers": cfg.dec_layers,
            "experts": cfg.moe_experts,
            "top_k": cfg.moe_top_k,
            "expert_hidden": cfg.expert_hidden,
            "leaf_logits": cfg.leaf_logits,
            "tree_logits": cfg.tree_logits,
            "items": trie.num_items,
            "params": model.num_params(),
        },
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", help="the served checkpoint (default: the newest seed checkpoint)"
    )
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--beam", type=int, default=32)
    parser.add_argument("--items", type=int, default=1682, help="random model's catalogue")
    parser.add_argument("--reps", type=int, default=200, help="timed searches per batch")
    parser.add_argument("--ref-reps", type=int, default=5, help="timed reference searches")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "beam_search.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    peaks = [matmul_peak_gflops() for _ in range(3)]
    models = []
    ckpt = Path(args.checkpoint) if args.checkpoint else newest_seed()
    if ckpt is None:
        print("no served checkpoint found (recloop pretrain): random weights only")
    print(
        f"{'model':>24} {'batch':>5} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'ref p50':>9} "
        f"{'cache x':>8} {'GFLOP/s':>8} {'MFU':>6}   (peak so far {max(peaks):.1f} GFLOP/s)"
    )
    runs = []
    if ckpt is not None:
        runs.append((f"served checkpoint {ckpt.name}", *served_model(ckpt), str(ckpt)))
    runs.append(("default config, random weights", *random_model(args.items), None))
    results = []
    for name, model, trie, encode, n_items, path in runs:
        out = bench_model(name, model, trie, encode, n_items, args, max(peaks))
        out["checkpoint"] = path
        results.append(out)
        peaks.append(matmul_peak_gflops())
    peak = max(peaks)
    for out in results:  # MFU against the best peak of the whole run
        for r in out["rows"]:
            r["mfu"] = round(r["achieved_active_gflops"] / peak, 4)
        models.append(out)
    result = {
        "what": "encode + trie-constrained beam search per batch; per-request latency = the "
        "batch's; active FLOPs (top-k experts only); MFU vs the fp32 matmul peak of this run",
        "matmul_peak_gflops": round(peak, 2),
        "matmul_peak_runs_gflops": [round(p, 2) for p in peaks],
        "torch_threads": args.threads,
        "models": models,
        "machine": {
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for out in models:
        print(
            f"{out['name']}: " + ", ".join(f"b{r['batch']} MFU {r['mfu']:.3f}" for r in out["rows"])
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"matmul peak {peak:.1f} GFLOP/s; saved {args.out}")


if __name__ == "__main__":
    main()
