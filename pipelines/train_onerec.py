"""Training OneRec on interaction sequences: tokenizer build, session examples, NTP loop.

Sessions are consecutive interactions in time order: an example is (the last
``max_history`` items before position p, the next M items from p). With ``stride = M``
the sequence is cut into consecutive sessions of M (the paper's session-wise data); a
smaller stride adds overlapping sessions. The job is deterministic under its seed.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from models.beam_search import CompiledTrie, beam_search, score_all_items, score_items
from models.onerec import OneRec, OneRecConfig
from models.tokenizer import SemanticIdTokenizer, TokenizerConfig, collaborative_item_embeddings


@dataclass
class TrainConfig:
    model: OneRecConfig = field(default_factory=OneRecConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    embedding_dim: int = 32  # collaborative item embeddings fed to the tokenizer
    content_weight: float = 0.5  # weight of genre features in those embeddings
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    stride: int | None = None  # default: session_len (consecutive sessions)
    seed: int = 0
    patience: int = 2  # epochs without validation gain before stopping
    item_embeddings: bool = True  # learned id embeddings for history items (item_vocab)
    val_users: int | None = None  # validate on a seeded subsample (None: all users)
    max_minutes: float | None = None  # stop after this wall time (checked per epoch)

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


def code_table(tokenizer: SemanticIdTokenizer, num_items: int) -> torch.Tensor:
    """(num_items + 1, L) codes by item id; row 0 (padding) is zeros."""
    table = torch.zeros(num_items + 1, tokenizer.levels, dtype=torch.long)
    table[1:] = tokenizer.codes(list(range(1, num_items + 1)))
    return table


def make_examples(
    sequences: Sequence[Sequence[int]], max_history: int, session_len: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(histories (N, H) left-padded with 0, targets (N, M) right-padded with 0)."""
    hists, tgts = [], []
    for seq in sequences:
        for p in range(1, len(seq), stride):
            h = list(seq[max(0, p - max_history) : p])
            t = list(seq[p : p + session_len])
            hists.append([0] * (max_history - len(h)) + h)
            tgts.append(t + [0] * (session_len - len(t)))
    if not hists:
        raise ValueError("no training examples: sequences need at least two items")
    return torch.tensor(hists, dtype=torch.long), torch.tensor(tgts, dtype=torch.long)


def pad_histories(histories: Sequence[Sequence[int]], max_history: int) -> torch.Tensor:
    out = torch.zeros(len(histories), max_history, dtype=torch.long)
    for i, h in enumerate(histories):
        h = list(h)[-max_history:]
        if h:
            out[i, max_history - len(h) :] = torch.tensor(h)
    return out


class OneRecRanker:
    """OneRec behind the evaluation harness's ``Ranker`` protocol: an item's score is
    log p(its SID as the first item of the next session | history)."""

    name = "onerec"

    def __init__(self, model: OneRec, codes: torch.Tensor, batch_size: int = 64) -> None:
        self.model = model.eval()
        self.codes = codes  # (N + 1, L)
        self.batch_size = batch_size
        n = codes.shape[0] - 1
        self.trie = CompiledTrie(codes[1:], torch.arange(1, n + 1), model.cfg.codebook_size)

    def encode(self, histories: Sequence[Sequence[int]]):
        items = pad_histories(histories, self.model.cfg.max_history)
        return self.model.encode(self.codes[items], items > 0, history_items=items)

    @torch.no_grad()
    def score(self, histories: list[list[int]], candidates: torch.Tensor | None) -> torch.Tensor:
        n_items = self.codes.shape[0] - 1
        outs = []
        for s in range(0, len(histories), self.batch_size):
            part = histories[s : s + self.batch_size]
            enc = self.encode(part)
            if candidates is None:  # every item: walk the trie once per SID prefix
                outs.append(score_all_items(self.model, enc, self.trie)[:, : n_items + 1])
            else:
                cand = candidates[s : s + self.batch_size]
                outs.append(score_items(self.model, enc, self.codes[cand]))
        return torch.cat(outs)

    @torch.no_grad()
    def recommend(
        self, histories: list[list[int]], beam_width: int = 32, exclude_seen: bool = True
    ):
        """Top ``beam_width`` sessions per history (trie-constrained beam search)."""
        enc = self.encode(histories)
        exclude = histories if exclude_seen else None
        return beam_search(self.model, enc, self.trie, beam_width, exclude=exclude)


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_onerec(
    sequences: Sequence[Sequence[int]],
    codes: torch.Tensor,  # (N + 1, L) from code_table
    cfg: TrainConfig,
    validate: Callable[[OneRecRanker], float] | None = None,
    init: OneRec | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> tuple[OneRec, list[dict]]:
    """Next-token training; keeps the weights of the best validation epoch."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    mc = cfg.model
    stride = cfg.stride or mc.session_len
    hist, tgt = make_examples(sequences, mc.max_history, mc.session_len, stride)
    model = init if init is not None else OneRec(mc)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(hist) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    history: list[dict] = []
    best, best_state, bad = -1.0, None, 0
    started = time.monotonic()
    step = 0
    log(f"onerec: {len(hist)} examples, {steps_per_epoch} steps/epoch, params {model.num_params()}")
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(hist), generator=gen)
        sums = {"ntp": 0.0, "moe_aux": 0.0}
        t0 = time.monotonic()
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            h, t = hist[idx], tgt[idx]
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, cfg)
            loss, parts = model(codes[h], h > 0, codes[t], t > 0, history_items=h)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            for k in sums:
                sums[k] += float(parts[k])
        row = {
            "epoch": epoch + 1,
            "ntp_loss": sums["ntp"] / steps_per_epoch,
            "moe_aux_loss": sums["moe_aux"] / steps_per_epoch,
            "expert_utilisation": model.expert_utilisation(),
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
                if k != "expert_utilisation"
            )
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
