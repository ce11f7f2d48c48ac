"""A session-wise reward model (OneRec §3.3.1): how good is session S for user u?

The reward model scores a whole served session against the user's history. Each session
item first gets a *target-aware* representation: the item (query) attends to the user's
history items (keys/values; both layer-normed, the history with recency embeddings),
and what it finds, a, is fused with the item's own embedding e as Linear([e, a, e * a])
plus e and the embedding of the item's slot in the session (OneRec: e_i = TA(v_i, u)). The session's
items then interact through ``layers`` pre-LayerNorm self-attention blocks (eq. 5), and
one small MLP tower per target reads each item's final state (eq. 6):

    vtr  logit of a view (the item was clicked / watched)
    ltr  logit of a like
    wtr  logit of a follow
    swt  predicted log1p(watch seconds) *given a view*

The three rates are trained with binary cross-entropy (eq. 7) over every item that got
feedback. Watch time is trained separately from the view probability: MSE on
log1p(watch_s) over viewed items only, because an item that was not viewed has 0 s by
construction (the simulator and the lake write 0 for it) and belongs to the vtr tower.

Session rewards (``session_rewards``) come from the per-item heads:

    swt = sum over the session's real items of p(view) * expm1(predicted log1p watch)

i.e. E[watch] = P(view) * E[watch | view] per item, summed over the session, with
E[watch | view] estimated by expm1 of the predicted mean log watch. That is the
geometric mean of the viewed watch times (the median under log-normal noise): it
underestimates the arithmetic mean a little but is robust to the heavy tail of watch
times, and it is monotone in what the tower learned, which is what ranking sessions
needs. vtr / ltr / wtr rewards are the mean probability over the session's real items.

Robustness: ids outside 1..num_items are treated as padding; a user with no history
gets an exact zero target-attention vector (no NaN: a row with nothing to attend to
attends to its padding and the result is zeroed); a row whose items are all padding
is likewise finite (its outputs mean nothing and are masked by every consumer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TARGETS = ("swt", "vtr", "wtr", "ltr")  # session watch time, view, follow, like
RATE_TARGETS = ("vtr", "ltr", "wtr")  # binary heads
LABELS = {"vtr": "clicked", "ltr": "liked", "wtr": "followed"}  # head -> label name
MAX_LOG_WATCH = 15.0  # clamp of the log1p(watch) prediction: e^15 s ~ 38 days


@dataclass
class RewardConfig:
    num_items: int  # item ids 1..num_items; 0 = padding / unknown item
    dim: int = 32
    heads: int = 2
    layers: int = 1  # self-attention layers among the session's items
    max_history: int = 50
    max_items: int = 16  # session slots (position embeddings)
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if min(self.max_history, self.max_items) < 1 or self.layers < 0:
            raise ValueError("max_history and max_items must be >= 1, layers >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- blocks
class MaskedAttention(nn.Module):
    """Multi-head attention from queries ``x`` to ``memory`` with a key mask. A row whose
    keys are all masked gives exactly zero (not NaN): it attends to its padding, then its
    output is multiplied by 0, so no gradient flows from it either."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, D/H)
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, memory: Tensor, keep: Tensor) -> Tensor:
        """x (B, T, D), memory (B, S, D), keep (B, S) bool (True = a key to attend to)."""
        some = keep.any(dim=1)  # (B,)
        # Nothing to attend to: attend to everything, zeroed below (kernels differ on
        # fully masked rows: some return 0, others NaN).
        keep = keep | ~some[:, None]
        k, v = self.kv(memory).chunk(2, dim=-1)
        y = F.scaled_dot_product_attention(
            self._split(self.q(x)), self._split(k), self._split(v), attn_mask=keep[:, None, None]
        )
        b, h, t, hd = y.shape
        y = self.out(y.transpose(1, 2).reshape(b, t, h * hd))
        return y * some[:, None, None].to(y.dtype)


class SelfAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block among a session's items (padding keys masked)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MaskedAttention(dim, heads)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)
        # Residual branches start at zero, so a fresh block is the identity: the items'
        # target-aware representations reach the towers intact while the block learns
        # what the other items of the session add (it trains markedly faster this way).
        for last in (self.attn.out, self.ffn[-1]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, keep))
        return x + self.drop(self.ffn(self.ln2(x)))


# --------------------------------------------------------------------------- model
class SessionRewardModel(nn.Module):
    def __init__(self, cfg: RewardConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.item_emb = nn.Embedding(cfg.num_items + 1, d, padding_idx=0)
        self.hist_pos = nn.Embedding(cfg.max_history, d)  # recency: 0 = the newest item
        self.slot_pos = nn.Embedding(cfg.max_items, d)
        self.ln_hist, self.ln_item = nn.LayerNorm(d), nn.LayerNorm(d)
        self.target_attn = MaskedAttention(d, cfg.heads)
        # Fuse [item, what it found in the history, their product] into one vector: the
        # product makes "this item is like what the user watched" a linear feature.
        self.fuse = nn.Linear(3 * d, d)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(d, cfg.heads, cfg.dropout) for _ in range(cfg.layers)
        )
        self.ln = nn.LayerNorm(d)
        self.towers = nn.ModuleDict(
            {t: nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1)) for t in TARGETS}
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        # Linear layers keep PyTorch's default (Kaiming-uniform) init; embeddings start at
        # N(0, 1/dim). Whether an item matches the history is a product of two learned
        # representations; with std-0.02 inits and no layer norms before the target
        # attention that product starts ~1e-4 and the planted-signal test needed several
        # times the steps to pick it up. At these scales it is learned in ~100 steps.
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=self.cfg.dim**-0.5)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def _known(self, ids: Tensor) -> Tensor:
        return (ids > 0) & (ids <= self.cfg.num_items)

    def forward(self, history: Tensor, items: Tensor) -> dict[str, Tensor]:
        """history (B, H) long, LEFT-padded with 0; items (B, M) long, RIGHT-padded with 0
        (M <= max_items). Returns per-item predictions (B, M): "vtr", "ltr", "wtr" logits,
        "swt" predicted log1p(watch seconds | viewed)."""
        cfg = self.cfg
        b, m = items.shape
        if m > cfg.max_items:
            raise ValueError(f"{m} session items, the model has {cfg.max_items} slots")
        history = history[:, -cfg.max_history :]
        if history.shape[1] == 0:  # no history column at all: one padding slot
            history = history.new_zeros(b, 1)
        h_keep, i_keep = self._known(history), self._known(items)
        hist = self.item_emb(history * h_keep)
        recency = torch.arange(history.shape[1] - 1, -1, -1, device=history.device)
        hist = self.drop(self.ln_hist(hist + self.hist_pos(recency)))
        e = self.ln_item(self.item_emb(items * i_keep))  # (B, M, D)
        a = self.target_attn(e, hist, h_keep)  # (B, M, D), zero without history
        slots = self.slot_pos(torch.arange(m, device=items.device))
        x = self.drop(e + self.fuse(torch.cat([e, a, e * a], dim=-1)) + slots)
        for block in self.blocks:
            x = block(x, i_keep)
        x = self.ln(x)
        return {t: tower(x).squeeze(-1) for t, tower in self.towers.items()}

    def session_rewards(self, history: Tensor, items: Tensor) -> dict[str, Tensor]:
        """(B,) per target for whole sessions: "swt" = predicted session watch seconds,
        sum over the real items of p(view) * expm1(predicted log1p watch | view); "vtr",
        "ltr", "wtr" = mean probability over the real items (0 for a session without
        any). Runs in the model's current mode: call ``eval()`` first for scoring."""
        out = self(history, items)
        real = self._known(items).to(out["vtr"].dtype)
        n = real.sum(dim=1).clamp(min=1)
        rewards = {"swt": (expected_watch(out) * real).sum(dim=1)}
        for t in RATE_TARGETS:
            rewards[t] = (torch.sigmoid(out[t]) * real).sum(dim=1) / n
        return rewards

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def expected_watch(out: dict[str, Tensor]) -> Tensor:
    """Per-item expected watch seconds (B, M): p(view) * expm1(log1p watch | view)."""
    given_view = torch.expm1(out["swt"].clamp(0.0, MAX_LOG_WATCH))
    return torch.sigmoid(out["vtr"]) * given_view


def combine(rewards: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """The (B,) weighted sum of per-target session rewards; an unknown target name, or a
    weighted target missing from ``rewards``, is a ValueError."""
    if not weights:
        raise ValueError(f"no reward weights given; targets are {TARGETS}")
    unknown = sorted(set(weights) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown reward target(s) {unknown}; known: {TARGETS}")
    missing = sorted(set(weights) - set(rewards))
    if missing:
        raise ValueError(f"weights for {missing}, but the rewards hold only {sorted(rewards)}")
    return sum(float(w) * rewards[t] for t, w in weights.items())  # type: ignore[return-value]


def reward_loss(
    out: dict[str, Tensor], labels: dict[str, Tensor], mask: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """labels: "clicked", "liked", "followed" (B, M) float 0/1, "watch_s" (B, M) float
    seconds; mask (B, M) bool (True = an item with feedback).

    BCE over the masked items for vtr / ltr / wtr; MSE of log1p(watch_s) over the masked
    *viewed* items (clicked) for swt, the conditional the swt tower estimates. Each part
    is a mean over its items (0 when it has none); the total is their sum."""
    m = mask.to(out["vtr"].dtype)
    n = m.sum().clamp(min=1)
    parts: dict[str, Tensor] = {}
    for t in RATE_TARGETS:
        bce = F.binary_cross_entropy_with_logits(out[t], labels[LABELS[t]], reduction="none")
        parts[t] = (bce * m).sum() / n
    viewed = m * (labels["clicked"] > 0).to(m.dtype)
    err = (out["swt"] - torch.log1p(labels["watch_s"].clamp(min=0))) ** 2
    parts["swt"] = (err * viewed).sum() / viewed.sum().clamp(min=1)
    total = sum(parts[t] for t in TARGETS)
    return total, {t: float(parts[t].detach()) for t in TARGETS}  # type: ignore[return-value]


# --------------------------------------------------------------------------- metrics
def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of ``x``, ties sharing their average rank."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)  # unique values come sorted
    return (ends - (counts.to(torch.float64) - 1) / 2)[inverse]


def auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (Mann-Whitney U; tied scores count
    1/2); nan when only one class is present."""
    s = scores.detach().flatten().to(torch.float64)
    y = labels.detach().flatten() > 0.5
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def concordance(pred: Tensor, truth: Tensor, chunk: int = 2048) -> float:
    """Fraction of the pairs with different ``truth`` that ``pred`` orders the same way
    (ties in ``pred`` count 1/2); nan when there is no such pair. Exact, O(n²) in chunks
    of ``chunk`` rows (holdouts are thousands of sessions, not millions)."""
    p = pred.detach().flatten().to(torch.float64)
    t = truth.detach().flatten().to(torch.float64)
    good, pairs = 0.0, 0
    for lo in range(0, len(p), chunk):
        dt = t[lo : lo + chunk, None] - t[None, :]  # count each pair once: truth_i < truth_j
        dp = p[lo : lo + chunk, None] - p[None, :]
        below = dt < 0
        pairs += int(below.sum())
        good += float((below & (dp < 0)).sum()) + 0.5 * float((below & (dp == 0)).sum())
    return good / pairs if pairs else math.nan
