"""Offline IPA: does DPO on reward-ranked pairs move OneRec towards sessions users watch longer?

The A/B of ``make bench-ipa`` cannot resolve effects of a few per cent (its CI half-width
is about 12% with ~300 users per arm). This is the paired, offline counterpart of the
paper's Table (IPA vs the base model), on the same data, the same seed and the same users
for every variant, without the stack:

1. the seed OneRec model serves ``--steps`` sessions to each training user (the top beam,
   history excluded); the hidden user model (``actors/sim``, fitted on MovieLens) answers
   them, and the users' states move on (watched items count as history);
2. a session reward model (``pipelines/alignment/reward``) is fitted on those logged sessions;
3. DPO pairs: ``ratio`` × the logged sessions are mirrored requests, drawn from the
   training users at their final state; ``dpo.candidates`` sessions from beam search,
   ranked by the reward model, give up to ``dpo.pairs_per_request`` pairs each as the
   sampler mines them (``actors.dpo_sampler.select_pairs``); reference log p from the
   seed (the generating version). How often a pair's chosen session is the better one
   by the hidden model's expected watch time (the truth) is reported per rank;
4. each variant fine-tunes the seed exactly like a training round (``train_worker``, one
   worker, the round's epochs, batch, lr and reward weighting): next-token on the
   high-quality logged sessions, plus the DPO term on the pairs of its ratio (0 = no
   DPO: the baseline; ``<ratio>/1`` = only the first pair of each request, as the
   sampler mined before ``pairs_per_request``);
5. on held-out users (never logged), each variant's top session is scored by the
   reward model and by the hidden model's expected watch time (the ground truth the
   reward model only estimates). Differences to the baseline are paired over users.

    .venv/bin/python -m benchmarks.ipa_offline [--ratios 0.01,0.05,0.2] [--steps 4]
        [--pairs-per-request K] [--candidates N] [--dpo-weight W] [--beta B]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from recloop.config import PROJECT_ROOT, load_config

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
T0 = 1_800_000_000_000
SESSION_GAP_MS = 6 * 3600 * 1000


def _say(msg: str) -> None:
    print(f"[ipa-offline {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _top_sessions(model, histories: list[list[int]], beam: int, batch: int = 64) -> list[list[int]]:
    out = []
    for lo in range(0, len(histories), batch):
        reqs = [{"history": h, "exclude_seen": True} for h in histories[lo : lo + batch]]
        out += [[i["item_id"] for i in r["items"]] for r in model.generate(reqs, beam)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="seed checkpoint (default: the newest pretrained)")
    ap.add_argument("--ratios", default="0.01,0.05,0.2", help="pairs per logged session")
    ap.add_argument("--steps", type=int, default=4, help="logged sessions per training user")
    ap.add_argument("--holdout-users", type=float, default=0.2)
    ap.add_argument("--beta", type=float)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs-per-request", type=int, help="default: dpo.pairs_per_request")
    ap.add_argument("--candidates", type=int, help="default: dpo.candidates")
    ap.add_argument("--dpo-weight", type=float, help="default: dpo.weight")
    ap.add_argument("--out", type=Path, default=RESULTS / "ipa_offline.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from actors.dpo_sampler import RewardScorer, select_pairs
    from actors.sim.runfile import SimulationConfig
    from actors.sim.user_model import HiddenUserModel
    from models.reward import RewardConfig
    from pipelines.alignment.ipa import build_pairs
    from pipelines.alignment.reward import RewardTrainConfig, fit_reward, reward_data
    from pipelines.continuous import (
        LocalIO,
        build_examples,
        is_high_quality,
        read_train_checkpoint,
        train_worker,
        worker_conf,
    )
    from recloop.checkpoint import load_checkpoint, save_reward
    from recloop.data import load
    from recloop.inference import LoadedModel
    from serving.api import latest_seed

    cfg = load_config(env={})
    seed_dir = Path(args.checkpoint) if args.checkpoint else latest_seed(cfg)
    if seed_dir is None:
        print("no seed checkpoint: run `recloop pretrain` or pass --checkpoint", file=sys.stderr)
        return 2
    beta = args.beta if args.beta is not None else cfg.dpo.beta
    per_request = args.pairs_per_request or cfg.dpo.pairs_per_request
    n_cand = args.candidates or cfg.dpo.candidates
    dpo_weight = args.dpo_weight if args.dpo_weight is not None else cfg.dpo.weight
    epochs = args.epochs or cfg.train.epochs
    started = time.monotonic()
    data = load(cfg.data)
    kind = SimulationConfig().user_model_kind  # the simulator's default users
    _say(f"fitting the {kind} hidden user model on {data.summary()}")
    hidden = HiddenUserModel.fit(data, seed=args.seed, kind=kind)
    policy = LoadedModel.load(str(seed_dir), "seed")
    item_ids = [policy.to_data[m] for m in range(1, len(policy.to_data))]
    mh = policy.ranker.model.cfg.max_history

    ratings = data.ratings.sort_values(["user_id", "timestamp"], kind="mergesort")
    hist = {int(u): [int(i) for i in g["item_id"]] for u, g in ratings.groupby("user_id")}
    users = sorted(hist)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(users))
    n_hold = int(len(users) * args.holdout_users)
    held = sorted(users[i] for i in perm[:n_hold])
    train_users = sorted(users[i] for i in perm[n_hold:])
    states = {u: hidden.new_state(u, T0, hist[u]) for u in users}
    histories = {u: list(hist[u]) for u in users}

    # 1. Logged traffic: the seed serves, the hidden users answer.
    rows = []
    for step in range(args.steps):
        t = T0 + step * SESSION_GAP_MS
        sessions = _top_sessions(policy, [histories[u][-mh:] for u in train_users], 32)
        for u, items in zip(train_users, sessions, strict=True):
            r = hidden.session_response(states[u], items, t, rng)
            clicked = [bool(c) for c in r.clicked]
            rows.append(
                {
                    "event_id": f"{u}-{step}",
                    "event_time_ms": t,
                    "arm": "offline",
                    "history": histories[u][-mh:],
                    "items": [int(i) for i in items],
                    "feedback": [True] * len(items),
                    "clicked": clicked,
                    "watch_time_s": [float(w) for w in r.watch_time_s],
                    "liked": [bool(x) for x in r.liked],
                    "followed": [bool(x) for x in r.followed],
                    "clicks": sum(clicked),
                    "session_watch_s": float(np.sum(r.watch_time_s)),
                    "likes": int(np.sum(r.liked)),
                    "follows": int(np.sum(r.followed)),
                }
            )
            histories[u] += [i for i, c in zip(items, clicked, strict=True) if c]
        _say(f"logged step {step + 1}/{args.steps}: {len(rows)} sessions")

    # 2. The reward model on the logged sessions.
    rdata = reward_data(rows, item_ids, mh, 16)
    rm, report = fit_reward(rdata, RewardConfig(num_items=len(item_ids), max_history=mh),
                            RewardTrainConfig(epochs=cfg.dpo.reward_epochs, seed=args.seed),
                            log=lambda m: None)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="rl-ipa-off-"))
    scorer = RewardScorer.load(
        str(save_reward(tmp / "rm", rm, item_ids)), "rm", cfg.dpo.reward_weights
    )
    _say(f"reward model: held-out {report['holdout']}")

    # 3. Pairs from the training users at their final state (the largest ratio's; the
    # smaller ratios take a prefix, so their pairs are subsets of the larger ones).
    ratios = [float(r) for r in args.ratios.split(",")]
    n_max = max(1, int(round(max(ratios) * len(rows))))
    pair_users = [train_users[i] for i in rng.integers(0, len(train_users), n_max)]
    from models.beam_search import beam_search
    from recloop.events import Preference

    t_eval = T0 + args.steps * SESSION_GAP_MS
    requests: list[list[Preference]] = []  # each mirrored request's pairs, best first
    truth_gaps: dict[int, list[float]] = {}  # by rank: E[watch](chosen) - E[watch](rejected)
    for lo in range(0, n_max, 32):
        part = pair_users[lo : lo + 32]
        h_model = [
            [policy.to_model[i] for i in histories[u][-mh:] if i in policy.to_model] for u in part
        ]
        with torch.no_grad():
            enc = policy.ranker.encode(h_model)
            beams = beam_search(
                policy.ranker.model, enc, policy.ranker.trie, max(cfg.dpo.beam_width, n_cand),
                exclude=h_model,
            )  # fmt: skip
        for b, u in enumerate(part):
            cands = [
                [policy.to_data[i] for i in beams.items[b, w].tolist() if i > 0]
                for w in range(n_cand)
            ]
            rewards = scorer.score(histories[u][-mh:], cands)
            mined = []
            for rank, (hi, lo_) in enumerate(select_pairs(rewards, per_request)):
                truth_gaps.setdefault(rank, []).append(
                    hidden.expected_value(states[u], cands[hi], t_eval)
                    - hidden.expected_value(states[u], cands[lo_], t_eval)
                )
                mined.append(
                    Preference(
                        event_time_ms=T0, request_id=f"p{len(requests)}", user_id=u,
                        model_version="seed", history=histories[u][-mh:], chosen=cands[hi],
                        rejected=cands[lo_], chosen_reward=rewards[hi],
                        rejected_reward=rewards[lo_], arm="offline",
                    )
                )  # fmt: skip
            requests.append(mined)
    pair_truth = {
        str(rank): {
            "pairs": len(g),
            "chosen_better": round(float(np.mean(np.array(g) > 0)), 4),
            "expected_watch_gap_s": round(float(np.mean(g)), 2),
        }
        for rank, g in sorted(truth_gaps.items())
    }
    _say(
        f"{sum(map(len, requests))} preference pairs from {len(requests)} requests "
        f"(ratio {max(ratios)}); the chosen one better by the truth: "
        + ", ".join(f"rank {r} {v['chosen_better']:.0%}" for r, v in pair_truth.items())
    )
    seed_ck = load_checkpoint(seed_dir)

    # 4. Fine-tune the seed per variant, exactly like a round's worker.
    hq = [r for r in rows if is_high_quality(r, cfg.train.min_clicks, cfg.train.min_watch_s)]
    ex = build_examples(hq, item_ids, mh, policy.session_len, 0.0)
    variants: dict[str, dict] = {
        "seed": {"pairs": 0, "requests": 0, "train_s": 0.0, "losses": [], "model": policy}
    }
    # "0" is the baseline; "0/seed+1" the same training under another seed: the noise
    # floor of one training run, which the paired SE over users does not include.
    runs = [("0", 0.0, args.seed, per_request), ("0/seed+1", 0.0, args.seed + 1, per_request)]
    for r in ratios:
        runs.append((f"{r:g}", r, args.seed, per_request))
        if per_request > 1:
            runs.append((f"{r:g}/1", r, args.seed, 1))
    for name, ratio, train_seed, k in runs:
        events = [p for mined in requests[: int(round(ratio * len(rows)))] for p in mined[:k]]
        n = len(events)
        plan = {
            "seed": train_seed, "epochs": epochs, "batch_size": cfg.train.batch_size,
            "lr": cfg.train.lr, "checkpoint_every_steps": 10**9,
        }  # fmt: skip
        conf = worker_conf(
            cfg, 1, plan, "offline", "seed", ex.histories, ex.targets, None,
            ex.target_weights(cfg.train.reward_weighting),
        )  # fmt: skip
        conf.update(model_dir=str(seed_dir), torch_threads=1)  # the seed from disk
        if n:
            pairs = build_pairs(
                events, "offline", item_ids, mh, policy.session_len, lambda v: seed_ck
            )
            conf.update(pairs=pairs.tensors(), dpo_beta=beta, dpo_weight=dpo_weight)
            n = len(pairs)
        io = LocalIO(tmp / f"run-{name.replace('/', '-')}")
        io.root.mkdir(parents=True)
        t0 = time.monotonic()
        train_worker(conf, io)
        out = read_train_checkpoint(io.latest())
        model = LoadedModel.load(str(seed_dir), name)
        model.ranker.model.load_state_dict(out["weights"])
        model.ranker.model.eval()
        variants[name] = {
            "pairs": n,
            "requests": int(round(ratio * len(rows))),
            "train_s": time.monotonic() - t0,
            "losses": out["state"]["epochs"],
            "model": model,
        }
        _say(f"{name}: {n} pairs, losses {out['state']['epochs']}")

    # 5. Held-out users: reward-model score and the hidden model's expected watch time.
    for v in variants.values():
        sessions = _top_sessions(v.pop("model"), [histories[u][-mh:] for u in held], 32)
        v["reward"] = [
            scorer.score(histories[u][-mh:], [s])[0] for u, s in zip(held, sessions, strict=True)
        ]
        v["expected_watch_s"] = [
            hidden.expected_value(states[u], s, t_eval) for u, s in zip(held, sessions, strict=True)
        ]  # fmt: skip
    base = variants["0"]
    summary = {}
    for name, v in variants.items():
        row = {"pairs": v["pairs"], "requests": v["requests"], "train_s": round(v["train_s"], 1)}
        for key in ("reward", "expected_watch_s"):
            x, b = np.array(v[key]), np.array(base[key])
            d = x - b
            row[key] = float(x.mean())
            row[f"{key}_lift"] = float(d.mean() / b.mean())
            row[f"{key}_lift_se"] = (
                float(d.std(ddof=1) / np.sqrt(len(d)) / b.mean()) if name != "0" else 0.0
            )
        summary[name] = row
    result = {
        "machine": platform.platform(),
        "checkpoint": str(seed_dir),
        "hidden_user_model": kind,
        "logged_sessions": len(rows),
        "hq_sessions": len(hq),
        "train_users": len(train_users),
        "heldout_users": len(held),
        "beta": beta,
        "dpo_weight": dpo_weight,
        "candidates": n_cand,
        "pairs_per_request": per_request,
        "pair_truth_by_rank": pair_truth,
        "epochs": epochs,
        "reward_weighting": cfg.train.reward_weighting,
        "reward_model": report["holdout"],
        "variants": {
            k: {x: v[x] for x in ("pairs", "requests", "losses")} for k, v in variants.items()
        },
        "summary": summary,
        "wall_s": round(time.monotonic() - started, 1),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(
        f"{'variant':>9} {'pairs':>6} {'RM reward':>10} {'lift':>14} "
        f"{'E[watch] s':>11} {'lift':>14}"
    )
    for name, r in summary.items():
        print(
            f"{name:>9} {r['pairs']:>6} {r['reward']:>10.2f} "
            f"{r['reward_lift'] * 100:>+7.2f}±{r['reward_lift_se'] * 100:.2f}% "
            f"{r['expected_watch_s']:>11.2f} "
            f"{r['expected_watch_s_lift'] * 100:>+7.2f}±{r['expected_watch_s_lift_se'] * 100:.2f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
