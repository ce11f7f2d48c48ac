"""Training OneRec on interaction sequences: tokenizer build, session examples, NTP loop.

Sessions are consecutive interactions in time order: an example is (up to
``max_history`` items before position p, the next M items from p). With ``stride = M``
the sequence is cut into consecutive sessions of M (the paper's session-wise data); the
default stride 1 starts a session after every item. Examples are stored as windows of a
user's sequence plus, per example, which window and which prefix of it is the history:
the causal encoder runs once per window for all of its examples (see ``models/onerec``).
The job is deterministic under its seed.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from models.onerec import OneRec, OneRecConfig
from models.ranker import OneRecRanker, code_table, pad_histories
from models.tokenizer import SemanticIdTokenizer, TokenizerConfig, collaborative_item_embeddings

# The ranker, code table and padding moved to models.ranker (serving loads models without
# training code); imported here for validation and re-exported for existing callers.
__all__ = [
    "ContextFn",
    "Examples",
    "OneRecRanker",
    "TrainConfig",
    "build_tokenizer",
    "code_table",
    "gini",
    "make_examples",
    "pad_histories",
    "train_onerec",
]


@dataclass
class TrainConfig:
    model: OneRecConfig = field(default_factory=OneRecConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    embedding_dim: int = 32  # collaborative item embeddings fed to the tokenizer
    content_weight: float = 0.5  # weight of genre features in those embeddings
    epochs: int = 10
    batch_size: int = 256  # examples (sessions) per step, rounded up to whole windows
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    stride: int = 1  # a session starts every `stride` items (session_len: disjoint)
    seed: int = 0
    patience: int = 2  # epochs without validation gain before stopping
    item_embeddings: bool = True  # learned id embeddings for history items (item_vocab)
    val_users: int | None = None  # validate on a seeded subsample (None: all users)
    max_minutes: float | None = None  # stop after this wall time (checked per epoch)
    # Training hygiene (OnePiece): embedding tables get their own learning rate (None: lr)
    # and, with embedding_clip, their values are clipped to [-clip, clip] after each step.
    embedding_lr: float | None = None
    embedding_clip: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def build_tokenizer(
    sequences: Sequence[Sequence[int]],
    num_items: int,
    cfg: TrainConfig,
    content: torch.Tensor | None = None,  # (num_items + 1, C), e.g. genre multi-hot
) -> SemanticIdTokenizer:
    emb = collaborative_item_embeddings(
        sequences,
        num_items,
        dim=cfg.embedding_dim,
        content=content,
        content_weight=cfg.content_weight,
    )  # (num_items + 1, D'), row 0 unused
    return SemanticIdTokenizer.fit(emb[1:], list(range(1, num_items + 1)), cfg.tokenizer)


@dataclass
class Examples:
    """Session examples grouped by window: example i has history = window
    ``window[i]`` up to encoder position ``prefix_end[i]`` (1 + index into the window
    row, left padding included) and target = ``target[i]`` (right-padded with 0)."""

    windows: torch.Tensor  # (W, H) items, left-padded with 0
    window: torch.Tensor  # (N,) window of each example, non-decreasing
    prefix_end: torch.Tensor  # (N,)
    target: torch.Tensor  # (N, M)
    context: torch.Tensor | None = None  # (N, context_width): each session's context

    def __len__(self) -> int:
        return len(self.window)

    def histories(self) -> torch.Tensor:
        """(N, H) each example's history alone, left-padded (for tests and checks)."""
        h = self.windows.shape[1]
        out = torch.zeros(len(self), h, dtype=torch.long)
        for i, (w, end) in enumerate(
            zip(self.window.tolist(), self.prefix_end.tolist(), strict=True)
        ):
            items = self.windows[w, :end]
            items = items[items > 0]
            out[i, h - len(items) :] = items
        return out

    def groups(self, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
        """Shuffled windows, grouped until a group holds ``batch_size`` examples (every
        window has at least one)."""
        counts = torch.bincount(self.window, minlength=len(self.windows)).tolist()
        group: list[int] = []
        size = 0
        for w in torch.randperm(len(self.windows), generator=generator).tolist():
            group.append(w)
            size += counts[w]
            if size >= batch_size:
                yield group
                group, size = [], 0
        if group:
            yield group

    def batches(self, batch_size: int, generator: torch.Generator):
        """Per group of ``groups``: (windows (B, H), prefix_end (B, C), target (B, C, M),
        context (B, C, F) or None) with C the most examples of a window in the group;
        missing examples have prefix_end 0, target 0 and context 0."""
        counts = torch.bincount(self.window, minlength=len(self.windows))
        starts = torch.cumsum(counts, 0) - counts
        m = self.target.shape[1]
        for group in self.groups(batch_size, generator):
            c = int(counts[group].max())
            ends = torch.zeros(len(group), c, dtype=torch.long)
            target = torch.zeros(len(group), c, m, dtype=torch.long)
            ctx = None
            if self.context is not None:
                ctx = torch.zeros(len(group), c, self.context.shape[1], dtype=torch.long)
            for i, g in enumerate(group):
                rows = slice(int(starts[g]), int(starts[g] + counts[g]))
                ends[i, : counts[g]] = self.prefix_end[rows]
                target[i, : counts[g]] = self.target[rows]
                if ctx is not None:
                    ctx[i, : counts[g]] = self.context[rows]
            yield self.windows[group], ends, target, ctx


ContextFn = Callable[[int, int], Sequence[int]]  # (sequence index, position p) -> row


def make_examples(
    sequences: Sequence[Sequence[int]],
    max_history: int,
    session_len: int,
    stride: int = 1,
    context: ContextFn | None = None,
) -> Examples:
    """A session starts at every ``stride``-th position p >= 1 of each sequence; its
    history is the up to ``max_history`` items before p. Windows of ``max_history`` items
    start every ``max_history // 2`` items, and each example goes to the window that
    gives it the longest history (at least half of ``max_history`` after the first).
    ``context(i, p)`` gives the context row of the session at position p of sequence i."""
    half = max(1, max_history // 2)
    windows: list[list[int]] = []
    window, ends, targets, rows = [], [], [], []
    for index, seq in enumerate(sequences):
        seq = list(seq)
        n = len(seq)
        by_start: dict[int, int] = {}
        for p in range(1, n, stride):
            s = 0 if p <= max_history else ((p - max_history - 1) // half + 1) * half
            if s not in by_start:
                chunk = seq[s : s + max_history]
                by_start[s] = len(windows)
                windows.append([0] * (max_history - len(chunk)) + chunk)
            pad = max_history - len(seq[s : s + max_history])
            window.append(by_start[s])
            ends.append(pad + (p - s))  # encoder position of item p - 1 (user token at 0)
            t = seq[p : p + session_len]
            targets.append(t + [0] * (session_len - len(t)))
            if context is not None:
                rows.append(list(context(index, p)))
    if not window:
        raise ValueError("no training examples: sequences need at least two items")
    return Examples(
        torch.tensor(windows, dtype=torch.long),
        torch.tensor(window, dtype=torch.long),
        torch.tensor(ends, dtype=torch.long),
        torch.tensor(targets, dtype=torch.long),
        torch.tensor(rows, dtype=torch.long) if context is not None else None,
    )


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def gini(shares: Sequence[float]) -> float:
    """Gini coefficient of a load over experts: 0 = perfectly even, (E-1)/E = one expert
    takes everything."""
    x = sorted(float(v) for v in shares)
    n, total = len(x), sum(x)
    if n == 0 or total <= 0:
        return 0.0
    weighted = sum((i + 1) * v for i, v in enumerate(x))
    return (2 * weighted) / (n * total) - (n + 1) / n


def _param_groups(model: OneRec, cfg: TrainConfig) -> list[dict]:
    """Embedding tables (with their own lr when ``embedding_lr``) and the dense rest."""
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    emb = [p for p in model.parameters() if id(p) in emb_ids]
    dense = [p for p in model.parameters() if id(p) not in emb_ids]
    lr_emb = cfg.lr if cfg.embedding_lr is None else cfg.embedding_lr
    return [
        {"params": emb, "lr": lr_emb, "base_lr": lr_emb, "name": "embedding"},
        {"params": dense, "lr": cfg.lr, "base_lr": cfg.lr, "name": "dense"},
    ]


@torch.no_grad()
def _clip_embeddings(model: OneRec, clip: float) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            m.weight.clamp_(-clip, clip)


def train_onerec(
    sequences: Sequence[Sequence[int]],
    codes: torch.Tensor,  # (N + 1, L) from code_table
    cfg: TrainConfig,
    validate: Callable[[OneRecRanker], float] | None = None,
    init: OneRec | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
    context: ContextFn | None = None,
) -> tuple[OneRec, list[dict]]:
    """Next-token training; keeps the weights of the best validation epoch. ``context``
    gives each session's context row when the model takes one (``context_width``)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    mc = cfg.model
    if mc.context_width and context is None:
        raise ValueError("the model takes a context (context_fields / anchors): pass context=")
    examples = make_examples(
        sequences, mc.max_history, mc.session_len, cfg.stride, context if mc.context_width else None
    )
    model = init if init is not None else OneRec(mc)
    model.set_leaf_items(codes)
    if cfg.embedding_clip is not None and cfg.embedding_clip <= 0:
        raise ValueError("embedding_clip must be > 0")
    opt = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = sum(1 for _ in examples.groups(cfg.batch_size, torch.Generator()))
    total = steps_per_epoch * cfg.epochs
    history: list[dict] = []
    best, best_state, bad = -1.0, None, 0
    started = time.monotonic()
    step = 0
    log(
        f"onerec: {len(examples)} examples in {len(examples.windows)} windows, "
        f"{steps_per_epoch} steps/epoch, params {model.num_params()}"
    )
    for epoch in range(cfg.epochs):
        model.train()
        sums = {"ntp": 0.0, "moe_aux": 0.0, "next_item": 0.0, "infonce": 0.0, "bce": 0.0}
        load = [torch.zeros(m.experts_n) for m in model.moe_layers()]
        t0 = time.monotonic()
        for h, end, t, ctx in examples.batches(cfg.batch_size, gen):
            scale = _lr_at(step, total, cfg) / cfg.lr
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
            loss, parts = model(
                codes[h],
                h > 0,
                codes[t],
                t > 0,
                history_items=h,
                prefix_end=end,
                target_items=t,
                context=ctx,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if cfg.embedding_clip is not None:
                _clip_embeddings(model, cfg.embedding_clip)
            step += 1
            for k in sums:
                sums[k] += float(parts.get(k, 0.0))
            for acc, m in zip(load, model.moe_layers(), strict=True):
                if m.last is not None:
                    acc += m.last.counts
        row = {
            "epoch": epoch + 1,
            "ntp_loss": sums["ntp"] / steps_per_epoch,
            "moe_aux_loss": sums["moe_aux"] / steps_per_epoch,
            "next_item_loss": sums["next_item"] / steps_per_epoch,
            "infonce_loss": sums["infonce"] / steps_per_epoch,
            "bce_loss": sums["bce"] / steps_per_epoch,
            "expert_utilisation": model.expert_utilisation(),
            # Over the epoch's tokens, per MoE layer: 0 = even load.
            "expert_load_gini": [gini((c / c.sum().clamp(min=1)).tolist()) for c in load],
            "epoch_s": time.monotonic() - t0,
        }
        if validate is not None:
            row["val_ndcg10"] = validate(OneRecRanker(model, codes))
        history.append(row)
        log(
            "onerec: "
            + ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in row.items()
                if k not in ("expert_utilisation", "expert_load_gini")
                and not (k.endswith("_loss") and v == 0.0)
            )
            + "".join(f", gini {g:.3f}" for g in row["expert_load_gini"])
        )
        metric = row.get("val_ndcg10", -row["ntp_loss"])
        if metric > best:
            best, bad = metric, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                log(f"onerec: early stop after epoch {epoch + 1}")
                break
        if cfg.max_minutes and time.monotonic() - started > cfg.max_minutes * 60:
            log(f"onerec: time budget of {cfg.max_minutes} min reached")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), history
