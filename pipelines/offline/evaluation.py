"""Offline evaluation of next-item rankers: leave-one-out split, full and sampled ranking.

Protocol (the common one for SASRec-style models):

- leave-one-out: per user the last item is the test target, the one before it the
  validation target, the rest the training sequence;
- full ranking: the target is ranked against every item of the catalogue; items in the
  user's history are excluded (they cannot be recommended again), except the target
  itself should it also occur in the history;
- ties are broken pessimistically: rank = 1 + the number of other candidate items whose
  score is >= the target's, so a constant ranker gets the worst rank, not the best;
- sampled ranking: the target against ``num_negatives`` distinct items drawn uniformly
  from those not in the history and not the target (seeded), same tie rule.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from pipelines.offline.datasets import SequenceDataset


@runtime_checkable
class Ranker(Protocol):
    """Scores items for users given their histories (contiguous item ids 1..N, 0 = padding).

    ``candidates=None``: scores for every item, (B, N+1), column = item id, column 0 = -inf.
    ``candidates`` (B, C) int64: scores for those items, (B, C). Higher is better."""

    def score(
        self, histories: list[list[int]], candidates: torch.Tensor | None = None
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Split:
    """Leave-one-out split; all lists are aligned with ``users``."""

    users: list[int]
    train: list[list[int]]  # training sequences
    val_histories: list[list[int]]  # = train
    val_targets: list[int]
    test_histories: list[list[int]]  # = train + [val target]
    test_targets: list[int]
    num_items: int
    # Per user, whether the test target has the same timestamp as the item before it
    # (None when the data has no times): the order of such pairs is the file's, or the
    # item ids' (``pipelines.offline.datasets``), not the user's.
    test_tied: list[bool] | None = None


def leave_one_out(ds: SequenceDataset) -> Split:
    """Last item -> test, second-to-last -> validation, the rest -> training. Users with
    fewer than 3 interactions cannot be split and are left out."""
    users, train, val_t, test_h, test_t, tied = [], [], [], [], [], []
    for user in sorted(ds.sequences):
        seq = ds.sequences[user]
        if len(seq) < 3:
            continue
        users.append(user)
        train.append(list(seq[:-2]))
        val_t.append(seq[-2])
        test_h.append(list(seq[:-1]))
        test_t.append(seq[-1])
        if ds.timestamps is not None:
            times = ds.timestamps[user]
            tied.append(times[-1] == times[-2])
    return Split(
        users,
        train,
        train,
        val_t,
        test_h,
        test_t,
        ds.num_items,
        tied if ds.timestamps is not None else None,
    )


def hr_at_k(ranks: Sequence[int] | np.ndarray, k: int) -> float:
    """Hit rate: share of targets ranked in the top k (ranks are 1-based)."""
    r = np.asarray(ranks, dtype=np.float64)
    return float(np.mean(r <= k)) if r.size else float("nan")


def ndcg_at_k(ranks: Sequence[int] | np.ndarray, k: int) -> float:
    """NDCG with one relevant item: 1 / log2(rank + 1) when rank <= k, else 0; averaged."""
    r = np.asarray(ranks, dtype=np.float64)
    if not r.size:
        return float("nan")
    return float(np.mean(np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)))


class _Progress:
    """A line to stderr every ``every`` seconds; silent on short runs."""

    def __init__(self, what: str, total: int, every: float = 5.0):
        self.what, self.total, self.every = what, total, every
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every and done < self.total:
            self.last = now
            print(
                f"[{self.what}] {done}/{self.total} users, {now - self.start:.1f} s",
                file=sys.stderr,
                flush=True,
            )


def _check_inputs(histories: Sequence[list[int]], targets: Sequence[int]) -> None:
    if len(histories) != len(targets):
        raise ValueError(f"{len(histories)} histories but {len(targets)} targets")


def rank_full(
    ranker: Ranker,
    histories: Sequence[list[int]],
    targets: Sequence[int],
    batch_size: int = 256,
    exclude_history: bool = True,
    contexts: Sequence | None = None,
) -> np.ndarray:
    """1-based rank of each target among all items (see the module docstring for the
    rules). ``contexts``, one row per history, go to a ranker that takes them."""
    _check_inputs(histories, targets)
    ranks = np.empty(len(targets), dtype=np.int64)
    progress = _Progress("eval full", len(targets))
    for lo in range(0, len(targets), batch_size):
        hist = [list(h) for h in histories[lo : lo + batch_size]]
        scores = _score(ranker, hist, None, contexts, lo).detach()  # (B, N+1)
        b = len(hist)
        if scores.dim() != 2 or scores.shape[0] != b:
            raise ValueError(f"ranker returned {tuple(scores.shape)}, expected ({b}, N+1)")
        if torch.isnan(scores).any():
            raise ValueError("ranker returned NaN scores")
        dev = scores.device
        tgt = torch.as_tensor(targets[lo : lo + b], dtype=torch.long, device=dev)  # (B,)
        if int(tgt.min()) < 1 or int(tgt.max()) >= scores.shape[1]:
            raise ValueError(f"target ids outside 1..{scores.shape[1] - 1}")
        valid = torch.ones_like(scores, dtype=torch.bool)  # (B, N+1) items that compete
        valid[:, 0] = False
        if exclude_history:
            rows = [i for i, h in enumerate(hist) for _ in h]
            cols = [j for h in hist for j in h]
            r = torch.as_tensor(rows, dtype=torch.long, device=dev)
            valid[r, torch.as_tensor(cols, dtype=torch.long, device=dev)] = False
        rows_b = torch.arange(b, device=dev)
        valid[rows_b, tgt] = True  # a repeated target still competes
        target_score = scores[rows_b, tgt].unsqueeze(1)  # (B, 1)
        # Counts the target itself once: rank = 1 + others scoring >= the target.
        ranks[lo : lo + b] = ((scores >= target_score) & valid).sum(1).cpu().numpy()
        progress.update(lo + b)
    return ranks


def _score(ranker: Ranker, hist, cand, contexts: Sequence | None, lo: int):
    if contexts is None:
        return ranker.score(hist, cand)
    return ranker.score(hist, cand, contexts=contexts[lo : lo + len(hist)])


def evaluate_full(
    ranker: Ranker,
    histories: Sequence[list[int]],
    targets: Sequence[int],
    ks: Sequence[int] = (5, 10, 20),
    batch_size: int = 256,
    exclude_history: bool = True,
    contexts: Sequence | None = None,
) -> dict[str, float]:
    """HR@k and NDCG@k with the target ranked against the whole catalogue.

    Items in the user's history are excluded from the ranking (scored -inf) when
    ``exclude_history``, the common protocol; the target itself is never excluded. Ties are
    broken pessimistically: rank = 1 + number of other items scoring >= the target."""
    ranks = rank_full(ranker, histories, targets, batch_size, exclude_history, contexts)
    return ranks_to_metrics(ranks, ks)


def ranks_to_metrics(ranks: np.ndarray, ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """HR@k and NDCG@k of 1-based ranks, and the number of users."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"HR@{k}"] = hr_at_k(ranks, k)
    for k in ks:
        out[f"NDCG@{k}"] = ndcg_at_k(ranks, k)
    out["users"] = len(ranks)
    return out


def sample_negatives(
    histories: Sequence[list[int]],
    targets: Sequence[int],
    num_items: int,
    num_negatives: int = 100,
    seed: int = 0,
) -> np.ndarray:
    """(B, num_negatives) distinct items per user drawn uniformly from 1..num_items minus
    the history and the target. Reproducible: depends only on the inputs and ``seed``."""
    _check_inputs(histories, targets)
    rng = np.random.default_rng(seed)
    out = np.empty((len(targets), num_negatives), dtype=np.int64)
    for i, (hist, tgt) in enumerate(zip(histories, targets, strict=True)):
        banned = set(hist)
        banned.add(tgt)
        free = num_items - len({j for j in banned if 1 <= j <= num_items})
        if free < num_negatives:
            raise ValueError(
                f"user #{i}: only {free} items outside the history, {num_negatives} negatives asked"
            )
        if free < 2 * num_negatives:
            # Few items left: draw from the explicit pool rather than rejecting forever.
            pool = np.setdiff1d(np.arange(1, num_items + 1), np.fromiter(banned, np.int64))
            out[i] = rng.choice(pool, size=num_negatives, replace=False)
            continue
        picked: dict[int, None] = {}  # insertion-ordered set: reproducible draw order
        while len(picked) < num_negatives:
            for j in rng.integers(1, num_items + 1, size=2 * num_negatives).tolist():
                if j not in banned and j not in picked:
                    picked[j] = None
                    if len(picked) == num_negatives:
                        break
        out[i] = list(picked)
    return out


def evaluate_sampled(
    ranker: Ranker,
    histories: Sequence[list[int]],
    targets: Sequence[int],
    num_negatives: int = 100,
    seed: int = 0,
    num_items: int | None = None,
    k: int = 10,
    batch_size: int = 256,
    contexts: Sequence | None = None,
) -> dict[str, float]:
    """HR@k and NDCG@k with the target ranked against ``num_negatives`` sampled items
    (see ``sample_negatives``); pessimistic ties. ``num_items`` defaults to the width of
    the ranker's full scores."""
    _check_inputs(histories, targets)
    if num_items is None:
        num_items = _score(ranker, [list(histories[0])], None, contexts, 0).shape[1] - 1
    negatives = sample_negatives(histories, targets, num_items, num_negatives, seed)
    cands = torch.cat(
        [torch.as_tensor(list(targets), dtype=torch.long)[:, None], torch.from_numpy(negatives)],
        dim=1,
    )  # (U, 1 + num_negatives), target first
    ranks = np.empty(len(targets), dtype=np.int64)
    progress = _Progress("eval sampled", len(targets))
    for lo in range(0, len(targets), batch_size):
        hist = [list(h) for h in histories[lo : lo + batch_size]]
        c = cands[lo : lo + len(hist)]
        scores = _score(ranker, hist, c, contexts, lo).detach().cpu()  # (B, 1 + num_negatives)
        if tuple(scores.shape) != tuple(c.shape):
            raise ValueError(f"ranker returned {tuple(scores.shape)}, expected {tuple(c.shape)}")
        if torch.isnan(scores).any():
            raise ValueError("ranker returned NaN scores")
        ranks[lo : lo + len(hist)] = (1 + (scores[:, 1:] >= scores[:, :1]).sum(1)).numpy()
        progress.update(lo + len(hist))
    return {
        f"HR@{k}": hr_at_k(ranks, k),
        f"NDCG@{k}": ndcg_at_k(ranks, k),
        "users": len(ranks),
        "num_negatives": num_negatives,
    }
