"""Latency and throughput of trie-constrained beam search, with the matmul peak beside it.

For batch sizes 1, 8 and 32 (beam 32, M=5, L=3 by default) it times encode + beam search
per batch and reports p50/p99 latency per request batch and requests/s; it times the
cache-less reference decoder on the same inputs for the KV-cache speed-up; it counts the
FLOPs of one search (torch's FlopCounterMode) to give the achieved GFLOP/s, and divides by
the fp32 matmul peak measured in the same run: the model-FLOPs utilisation.

    make bench-beam   # or: .venv/bin/python -m benchmarks.beam_search [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
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


def matmul_peak_gflops(n: int = 1024, reps: int = 20, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - started) / 1e9


def random_catalogue(n_items: int, cfg: OneRecConfig, seed: int = 0) -> CompiledTrie:
    g = torch.Generator().manual_seed(seed)
    K, L = cfg.codebook_size, cfg.levels
    flat = torch.randperm(K**L, generator=g)[:n_items]
    codes = torch.stack([(flat // K ** (L - 1 - i)) % K for i in range(L)], dim=1)
    return CompiledTrie(codes, torch.arange(1, n_items + 1), K), codes


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a OneRec checkpoint (default: random weights)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--beam", type=int, default=32)
    parser.add_argument("--items", type=int, default=1682)
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "beam_search.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.checkpoint:
        from recloop.checkpoint import load_checkpoint

        ck = load_checkpoint(args.checkpoint)
        model, cfg = ck.model, ck.model.cfg
        ids = torch.tensor(ck.tokenizer.item_ids)
        codes = ck.tokenizer.codes(ids)
        trie = CompiledTrie(codes, ids, cfg.codebook_size)
    else:
        cfg = OneRecConfig()
        model = OneRec(cfg)
        trie, codes = random_catalogue(args.items, cfg)
    model.eval()
    peak = matmul_peak_gflops()
    print(
        f"model {model.num_params()}, {trie.num_items} items, beam {args.beam}, "
        f"M={cfg.session_len}, L={cfg.levels}; fp32 matmul peak {peak:.1f} GFLOP/s"
    )

    g = torch.Generator().manual_seed(1)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        hist = codes[torch.randint(0, len(codes), (batch, cfg.max_history), generator=g)]
        mask = torch.ones(batch, cfg.max_history, dtype=torch.bool)
        exclude = [[0]] * batch

        def run(fn=beam_search, hist=hist, mask=mask, exclude=exclude):
            with torch.no_grad():
                enc = model.encode(hist, mask)
                return fn(model, enc, trie, args.beam, exclude=exclude)

        run()  # warm-up
        lat = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            run()
            lat.append(time.perf_counter() - t0)
        ref_lat = []
        for _ in range(max(2, args.reps // 4)):
            t0 = time.perf_counter()
            run(beam_search_reference)
            ref_lat.append(time.perf_counter() - t0)
        with FlopCounterMode(display=False) as counter:
            run()
        flops = counter.get_total_flops()
        p50 = statistics.median(lat)
        row = {
            "batch": batch,
            "p50_ms": p50 * 1e3,
            "p99_ms": percentile(lat, 0.99) * 1e3,
            "requests_per_s": batch / p50,
            "reference_p50_ms": statistics.median(ref_lat) * 1e3,
            "kv_cache_speedup": statistics.median(ref_lat) / p50,
            "gflop_per_batch": flops / 1e9,
            "achieved_gflops": flops / p50 / 1e9,
        }
        row["mfu"] = row["achieved_gflops"] / peak
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})

    print(
        f"{'batch':>5} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'ref p50':>9} "
        f"{'cache x':>8} {'GFLOP/s':>8} {'MFU':>6}"
    )
    for r in rows:
        print(
            f"{r['batch']:>5} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
            f"{r['requests_per_s']:>8.1f} {r['reference_p50_ms']:>9.1f} "
            f"{r['kv_cache_speedup']:>8.2f} {r['achieved_gflops']:>8.2f} {r['mfu']:>6.3f}"
        )
    result = {
        "config": {
            "beam": args.beam,
            "session_len": cfg.session_len,
            "levels": cfg.levels,
            "codebook_size": cfg.codebook_size,
            "dim": cfg.dim,
            "experts": cfg.moe_experts,
            "items": trie.num_items,
            "params": model.num_params(),
            "checkpoint": args.checkpoint,
        },
        "matmul_peak_gflops": round(peak, 2),
        "rows": rows,
        "machine": {
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
