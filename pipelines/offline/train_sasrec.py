"""Training job for SASRec: windows of the training sequences, AdamW, early stopping on
validation NDCG@10 with full ranking. Deterministic under ``seed`` on a given machine."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch

from models.sasrec import SASRec, SASRecConfig
from pipelines.offline.evaluation import evaluate_full


def make_windows(sequences: Sequence[list[int]], max_len: int) -> torch.Tensor:
    """Cut each sequence from its end into windows of ``max_len + 1`` items, left-padded
    with 0: (W, max_len + 1). Consecutive windows overlap by one item, so every item but a
    sequence's first is a target exactly once; windows with no target are dropped."""
    rows: list[list[int]] = []
    for seq in sequences:
        end = len(seq)
        while end >= 2:
            chunk = list(seq[max(0, end - max_len - 1) : end])
            rows.append([0] * (max_len + 1 - len(chunk)) + chunk)
            end -= max_len
    if not rows:
        return torch.zeros(0, max_len + 1, dtype=torch.long)
    return torch.as_tensor(rows, dtype=torch.long)


def train_sasrec(
    train_sequences: Sequence[list[int]],
    num_items: int,
    config: SASRecConfig | None = None,
    epochs: int = 200,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    val: tuple[Sequence[list[int]], Sequence[int]] | None = None,
    patience: int = 10,
    weight_decay: float = 0.01,
    device: str = "cpu",
    log: Callable[[str], None] | None = print,
) -> tuple[SASRec, list[dict[str, float]]]:
    """Train SASRec with full softmax cross-entropy at every position.

    With ``val = (histories, targets)`` it evaluates NDCG@10 (full ranking, history
    excluded) after each epoch, stops after ``patience`` epochs without improvement and
    returns the best epoch's weights. Returns the model (eval mode) and one dict per epoch:
    epoch, loss, val_ndcg@10, val_hr@10 (when val), seconds (cumulative)."""
    config = config or SASRecConfig(num_items=num_items)
    if config.num_items != num_items:
        raise ValueError(f"config.num_items={config.num_items} but num_items={num_items}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SASRec(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    windows = make_windows(train_sequences, config.max_len)  # (W, L+1)
    if len(windows) == 0:
        raise ValueError("no training sequence has 2 items or more")

    history: list[dict[str, float]] = []
    best, best_state, stale = float("-inf"), None, 0
    start = time.monotonic()
    for epoch in range(1, epochs + 1):
        model.train()
        total, count = 0.0, 0
        for idx in torch.randperm(len(windows), generator=gen).split(batch_size):
            w = windows[idx]  # (B, L+1)
            # Drop columns that are padding in every row: positions are counted from the
            # right, so this changes nothing but the cost.
            first = int((w != 0).any(0).nonzero()[0])
            w = w[:, first:].to(device)
            _, loss = model(w[:, :-1], w[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            n = int((w[:, 1:] != 0).sum())
            total, count = total + float(loss.detach()) * n, count + n
        row: dict[str, float] = {"epoch": epoch, "loss": total / count}
        if val is not None:
            m = evaluate_full(model, val[0], val[1], ks=(10,))
            row["val_ndcg@10"], row["val_hr@10"] = m["NDCG@10"], m["HR@10"]
        row["seconds"] = time.monotonic() - start
        history.append(row)
        if log:
            v = f" val NDCG@10 {row['val_ndcg@10']:.4f}" if val is not None else ""
            log(f"epoch {epoch:3d} loss {row['loss']:.4f}{v} {row['seconds']:.1f} s")
        if val is None:
            continue
        if row["val_ndcg@10"] > best:
            best, best_state, stale = row["val_ndcg@10"], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= patience:
                if log:
                    log(f"early stop: best val NDCG@10 {best:.4f} at epoch {epoch - stale}")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), history
