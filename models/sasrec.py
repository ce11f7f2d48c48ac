"""SASRec (Kang & McAuley, 2018): a causal Transformer over the user's item sequence.

Differences from the paper, all common in later re-implementations: pre-LayerNorm blocks
with a GELU MLP (nanoGPT style), and a full softmax cross-entropy over the catalogue at
every position instead of one sampled negative with binary cross-entropy. Item ids are
1..N, 0 is padding; sequences are left-padded so the latest item is always at the last
position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SASRecConfig:
    num_items: int
    max_len: int = 50
    dim: int = 64
    heads: int = 2
    layers: int = 2
    dropout: float = 0.2


class CausalSelfAttention(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        assert config.dim % config.heads == 0
        self.heads = config.heads
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.dim, 3 * config.dim)
        self.c_proj = nn.Linear(config.dim, config.dim)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.dim, 4 * config.dim)
        self.c_proj = nn.Linear(4 * config.dim, config.dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.dim)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.dim)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        self.num_items = config.num_items
        self.item_emb = nn.Embedding(config.num_items + 1, config.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.layers)])
        self.ln_f = nn.LayerNorm(config.dim)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) left-padded item ids -> hidden states (B, T, C)."""
        B, T = idx.shape
        assert T <= self.config.max_len, f"sequence of {T} > max_len {self.config.max_len}"
        pos = torch.arange(self.config.max_len - T, self.config.max_len, device=idx.device)
        x = self.drop(self.item_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        real = idx != 0  # (B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
        eye = torch.eye(T, dtype=torch.bool, device=idx.device)
        # Never attend to padding; every position sees itself, so no row is all-masked.
        mask = (causal & (real[:, None, :] | eye)).unsqueeze(1)  # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., N+1) scores tied to the item embedding; column 0 is -inf."""
        out = h @ self.item_emb.weight.T
        pad = torch.zeros(out.shape[-1], dtype=torch.bool, device=out.device)
        pad[0] = True
        return out.masked_fill(pad, float("-inf"))

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets (B, T), targets 0 where there is nothing to predict. Returns the
        logits of the last position (B, N+1) and, with targets, the mean cross-entropy over
        every non-padding position of the full catalogue."""
        h = self.hidden(idx)  # (B, T, C)
        if targets is None:
            return self.logits(h[:, -1]), None
        keep = (targets != 0) & (idx != 0)  # (B, T) a real item predicting a real item
        # Only real positions get the (M, N+1) logits: saves most of the memory.
        loss = F.cross_entropy(self.logits(h[keep]), targets[keep])
        return self.logits(h[:, -1]), loss

    def encode_histories(self, histories: list[list[int]]) -> torch.Tensor:
        """Last ``max_len`` items of each history, left-padded with 0: (B, max_len)."""
        L = self.config.max_len
        out = torch.zeros(len(histories), L, dtype=torch.long)
        for i, h in enumerate(histories):
            tail = list(h[-L:])
            if tail:
                out[i, L - len(tail) :] = torch.as_tensor(tail, dtype=torch.long)
        return out.to(self.item_emb.weight.device)

    @torch.no_grad()
    def score(
        self, histories: list[list[int]], candidates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Ranker protocol: (B, N+1) with column 0 = -inf, or (B, C) for ``candidates``."""
        was_training = self.training
        self.eval()
        try:
            h = self.hidden(self.encode_histories(histories))[:, -1]  # (B, C)
            full = self.logits(h)  # (B, N+1)
        finally:
            self.train(was_training)
        if candidates is None:
            return full
        return full.gather(1, candidates.to(full.device).long())  # (B, C)
