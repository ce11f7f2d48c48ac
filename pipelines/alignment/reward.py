"""Training the session reward model (``models/reward``) on the lake's served sessions.

    python -m pipelines.alignment.reward --home DIR --checkpoint SEED_DIR [--epochs N] [--out DIR]

Each lake session row (one served session with its feedback joined position by
position) becomes one example: the user's history before the session, the served items,
and per position the labels clicked / liked / followed / watch seconds. Ids are the
model's (1-based, ``item_ids[m - 1]`` is model id m's data id, as in a OneRec seed
checkpoint): history items the model does not know are dropped, unknown served items
keep their slot as padding (0) and are masked, and so is every position no feedback
arrived for. Rows are in event-time order.

``fit_reward`` holds out the newest ``holdout_fraction`` of the sessions with feedback
(by event time: the reward model will score sessions newer than any it trained on) and
reports item-level AUCs of the three rate heads and the session-level concordance of
predicted and true session watch time on them. It is deterministic under its seed and
leaves the caller's global RNG state alone; ``init`` fine-tunes a copy of an existing
model. The CLI reads the whole lake, fits, prints the report as JSON on stdout and, with
``--out``, writes a ``recloop.reward/1`` checkpoint (``recloop/checkpoint.save_reward``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from models.reward import (
    LABELS,
    RATE_TARGETS,
    TARGETS,
    RewardConfig,
    SessionRewardModel,
    auc,
    concordance,
    expected_watch,
    reward_loss,
)


def _log(msg: str) -> None:
    print(f"[reward {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data
@dataclass
class RewardData:
    history: Tensor  # (N, H) model ids, left-padded
    items: Tensor  # (N, M) model ids, right-padded
    mask: Tensor  # (N, M) bool: a known item with feedback
    clicked: Tensor  # (N, M) float
    liked: Tensor  # (N, M) float
    followed: Tensor  # (N, M) float
    watch_s: Tensor  # (N, M) float
    event_time_ms: Tensor  # (N,)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, index: Tensor) -> RewardData:
        """Rows ``index`` (a long index or a bool mask)."""
        return RewardData(**{k: v[index] for k, v in vars(self).items()})

    def labels(self) -> dict[str, Tensor]:
        return {
            "clicked": self.clicked,
            "liked": self.liked,
            "followed": self.followed,
            "watch_s": self.watch_s,
        }


def _flags(values: Sequence | None, n: int) -> list[float]:
    v = list(values or [])[:n]
    return [float(bool(x)) for x in v] + [0.0] * (n - len(v))


def reward_data(
    rows: Iterable[Mapping],
    item_ids: Sequence[int],
    max_history: int,
    max_items: int,
) -> RewardData:
    """Lake session rows -> tensors in model ids (see the module docstring); the newest
    ``max_history`` known history items, the first ``max_items`` served positions."""
    to_model = {int(d): m for m, d in enumerate(item_ids, start=1)}
    ordered = sorted(rows, key=lambda r: (int(r["event_time_ms"]), str(r.get("event_id") or "")))
    n = len(ordered)
    history = torch.zeros(n, max_history, dtype=torch.long)
    items = torch.zeros(n, max_items, dtype=torch.long)
    mask = torch.zeros(n, max_items, dtype=torch.bool)
    labels = {k: torch.zeros(n, max_items) for k in ("clicked", "liked", "followed", "watch_s")}
    for i, r in enumerate(ordered):
        hist = (int(x) for x in (r.get("history") or []) if x is not None)
        h = [to_model[x] for x in hist if x in to_model]
        h = h[-max_history:]
        if h:
            history[i, max_history - len(h) :] = torch.tensor(h)
        served = list(r.get("items") or [])[:max_items]
        ids = [to_model.get(int(x), 0) if x is not None else 0 for x in served]
        items[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        fb = _flags(r.get("feedback"), max_items)
        mask[i] = (items[i] > 0) & (torch.tensor(fb) > 0)
        for key, col in (("clicked", "clicked"), ("liked", "liked"), ("followed", "followed")):
            labels[key][i] = torch.tensor(_flags(r.get(col), max_items))
        w = [float(x or 0.0) for x in list(r.get("watch_time_s") or [])[:max_items]]
        labels["watch_s"][i, : len(w)] = torch.tensor(w)
        for t in labels.values():  # no labels where nothing is known
            t[i] *= mask[i]
    times = torch.tensor([int(r["event_time_ms"]) for r in ordered], dtype=torch.long)
    return RewardData(history, items, mask, **labels, event_time_ms=times)


def split_holdout(data: RewardData, fraction: float) -> tuple[Tensor, Tensor]:
    """(train, holdout) row indices over the sessions with feedback: the newest
    ``fraction`` of them by event time are held out (at least one of two or more)."""
    rows = data.mask.any(dim=1).nonzero().flatten()
    order = rows[torch.argsort(data.event_time_ms[rows], stable=True)]
    n = len(order)
    k = min(n - 1, max(1, int(n * fraction))) if n >= 2 and fraction > 0 else 0
    return order[: n - k], order[n - k :]


# --------------------------------------------------------------------------- training
@dataclass
class RewardTrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.01
    holdout_fraction: float = 0.2
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def fit_reward(
    data: RewardData,
    cfg: RewardConfig,
    train: RewardTrainConfig | None = None,
    init: SessionRewardModel | None = None,
    log: Callable[[str], None] = _log,
) -> tuple[SessionRewardModel, dict]:
    """Train a reward model (from scratch, or a copy of ``init``); evaluate it on the
    held-out newest sessions. Returns the model (in eval mode) and the report."""
    train = train or RewardTrainConfig()
    if init is not None and init.cfg != cfg:
        raise ValueError(f"init has config {init.cfg}, expected {cfg}")
    started = time.monotonic()
    train_idx, hold_idx = split_holdout(data, train.holdout_fraction)
    part = data.subset(train_idx)
    epochs: list[dict] = []
    with torch.random.fork_rng(devices=[]):  # seeded init and dropout; caller's RNG intact
        torch.manual_seed(train.seed)
        gen = torch.Generator().manual_seed(train.seed)
        if init is not None:
            model = copy.deepcopy(init)
        else:
            model = SessionRewardModel(cfg)
            set_priors(model, part)
        opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        log(
            f"reward: {len(part)} train / {len(hold_idx)} held-out sessions, "
            f"{model.num_params()} params, {'fine-tuning' if init else 'from scratch'}"
        )
        for epoch in range(train.epochs if len(part) else 0):
            model.train()
            sums = dict.fromkeys(("loss", *TARGETS), 0.0)
            perm = torch.randperm(len(part), generator=gen)
            steps = 0
            for lo in range(0, len(part), train.batch_size):
                b = part.subset(perm[lo : lo + train.batch_size])
                out = model(b.history, b.items)
                loss, parts = reward_loss(out, b.labels(), b.mask)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                steps += 1
                sums["loss"] += float(loss.detach())
                for t in TARGETS:
                    sums[t] += parts[t]
            row = {"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}}
            epochs.append(row)
            log("reward: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"))
    model.eval()
    report = {
        "train_sessions": len(part),
        "holdout_sessions": len(hold_idx),
        "epochs": epochs,
        "holdout": evaluate_reward(model, data.subset(hold_idx)) if len(hold_idx) else None,
        "seconds": time.monotonic() - started,
    }
    return model, report


@torch.no_grad()
def set_priors(model: SessionRewardModel, data: RewardData) -> dict[str, float]:
    """Start each tower's output bias at the training data's prior: the logit of the base
    rate of views / likes / follows, the mean log1p watch of viewed items. From zero the
    watch head starts ~log1p(30 s) off, and its large early gradient (clipped together
    with the others) would swamp the rate heads for the first epochs."""
    m = data.mask
    if not m.any():
        return {}
    labels = data.labels()
    priors = {}
    for t in RATE_TARGETS:
        rate = float(labels[LABELS[t]][m].mean())
        rate = min(max(rate, 1e-4), 1 - 1e-4)
        priors[t] = math.log(rate / (1 - rate))
    viewed = m & (data.clicked > 0)
    priors["swt"] = (
        float(torch.log1p(data.watch_s[viewed].clamp(min=0)).mean()) if viewed.any() else 0.0
    )
    for t, v in priors.items():
        model.towers[t][-1].bias.fill_(v)
    return priors


def _finite(x: float) -> float | None:
    return None if x != x else x  # nan -> None (JSON has no NaN)


@torch.no_grad()
def evaluate_reward(model: SessionRewardModel, data: RewardData, batch_size: int = 512) -> dict:
    """Item-level AUCs of the rate heads over the items with feedback ("vtr": clicked,
    "ltr": liked, "wtr": followed; None with one class only) and the session-level
    concordance of predicted session watch (sum over the items with feedback of
    p(view) * E[watch | view]) with the true one, over the sessions with feedback."""
    was_training = model.training
    model.eval()
    outs: dict[str, list[Tensor]] = {t: [] for t in TARGETS}
    pred_watch = []
    for lo in range(0, len(data), batch_size):
        out = model(data.history[lo : lo + batch_size], data.items[lo : lo + batch_size])
        for t in TARGETS:
            outs[t].append(out[t])
        pred_watch.append(expected_watch(out))
    model.train(was_training)
    m = data.mask
    if not len(data):
        return {"auc": dict.fromkeys(RATE_TARGETS), "swt_concordance": None, "sessions": 0}
    cat = {t: torch.cat(v) for t, v in outs.items()}
    labels = data.labels()
    aucs = {t: _finite(auc(cat[t][m], labels[LABELS[t]][m])) for t in RATE_TARGETS}
    sessions = m.any(dim=1)
    pred = (torch.cat(pred_watch) * m).sum(dim=1)[sessions]
    truth = (data.watch_s * m).sum(dim=1)[sessions]
    return {
        "auc": aucs,
        "swt_concordance": _finite(concordance(pred, truth)),
        "sessions": int(sessions.sum()),
        "items": int(m.sum()),
    }


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.alignment.reward", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--home", required=True, help="the stack's home (its lake is home/lake)")
    parser.add_argument("--checkpoint", required=True, help="OneRec seed checkpoint (item ids)")
    parser.add_argument("--epochs", type=int, default=RewardTrainConfig.epochs)
    parser.add_argument("--out", help="write the reward checkpoint here (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    if args.epochs < 0:
        parser.error("--epochs must be >= 0")

    from recloop.checkpoint import CheckpointError, load_checkpoint, save_reward
    from recloop.lake import SESSIONS, Lake

    torch.set_num_threads(args.threads)
    seed = Path(args.checkpoint)
    try:
        item_ids = json.loads((seed / "config.json").read_text()).get("item_ids")
        if not item_ids:  # an old seed: the model numbers the data's items 1..N
            item_ids = list(range(1, load_checkpoint(seed).tokenizer.num_items + 1))
    except (OSError, ValueError, CheckpointError) as exc:
        print(f"error: cannot read item ids from {seed}: {exc}", file=sys.stderr)
        return 2
    columns = ["event_id", "event_time_ms", "history", "items", "feedback", "clicked"]
    columns += ["watch_time_s", "liked", "followed"]
    rows = Lake(Path(args.home) / "lake").read(SESSIONS, columns=columns).to_pylist()
    cfg = RewardConfig(num_items=len(item_ids))
    data = reward_data(rows, item_ids, cfg.max_history, cfg.max_items)
    _log(f"{len(rows)} lake sessions, {int(data.mask.any(dim=1).sum())} with feedback")
    train = RewardTrainConfig(epochs=args.epochs, seed=args.seed)
    model, report = fit_reward(data, cfg, train)
    out = {"report": report}
    if args.out:
        meta = {"train": train.to_dict(), "report": report, "seed_checkpoint": str(seed)}
        out["checkpoint"] = str(save_reward(args.out, model, item_ids, meta))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
