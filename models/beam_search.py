"""Trie-constrained beam search over semantic IDs, and teacher-forced item scoring.

``beam_search`` runs the encoder once per request and decodes all requests × beams in one
batch with the decoder's KV cache. Constraints: each item's codes must follow a path of
the trie of valid SIDs (so every emitted SID is a real item), an item never appears twice
in a session, and items of the history can be excluded. ``beam_search_reference`` is the
same search recomputing the whole decoder prefix at each step, without a cache: the twin
the tests compare against.

Scores are the model's log-probabilities of the generated tokens (log-softmax over all
K codes, so a session's score is its true log p under the model, not renormalised to the
constraint).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.onerec import Encoded, OneRec

NEG_INF = float("-inf")


class CompiledTrie:
    """Valid SIDs as tensors: ``child[node, code]`` is the next node (-1 if none) and
    ``leaf_item[node]`` the item whose SID ends at ``node`` (-1 for inner nodes)."""

    def __init__(self, codes: Tensor, item_ids: Tensor, codebook_size: int) -> None:
        # codes: (N, L) long, item_ids: (N,) long
        self.levels = int(codes.shape[1])
        self.codebook_size = codebook_size
        self._child: list[list[int]] = [[-1] * codebook_size]
        self._leaf: list[int] = [-1]
        for sid, item in zip(codes.tolist(), item_ids.tolist(), strict=True):
            self._insert(sid, item)
        self._freeze()

    def _insert(self, sid: Sequence[int], item: int) -> None:
        if len(sid) != self.levels:
            raise ValueError(f"SID {sid} has {len(sid)} codes, expected {self.levels}")
        node = 0
        for code in sid:
            if not 0 <= code < self.codebook_size:
                raise ValueError(f"code {code} outside [0, {self.codebook_size})")
            nxt = self._child[node][code]
            if nxt < 0:
                nxt = len(self._child)
                self._child.append([-1] * self.codebook_size)
                self._leaf.append(-1)
                self._child[node][code] = nxt
            node = nxt
        if self._leaf[node] >= 0 and self._leaf[node] != item:
            raise ValueError(f"SID {tuple(sid)} already belongs to item {self._leaf[node]}")
        self._leaf[node] = item

    def _freeze(self) -> None:
        self.child = torch.tensor(self._child, dtype=torch.long)  # (nodes, K)
        self.leaf_item = torch.tensor(self._leaf, dtype=torch.long)  # (nodes,)
        self.max_item = int(self.leaf_item.max())

    def add(self, sid: Sequence[int], item: int) -> None:
        """Insert a new item (cold start); decodable from the next search on."""
        self._insert(list(sid), item)
        self._freeze()

    @property
    def num_items(self) -> int:
        return int((self.leaf_item >= 0).sum())


@dataclass
class Beams:
    items: Tensor  # (B, W, M) item ids, -1 where a beam died (fewer valid sessions than W)
    scores: Tensor  # (B, W) log p of each session, best first
    codes: Tensor  # (B, W, M*L) generated codes
    item_scores: Tensor  # (B, W, M) log p of each item given the history and those before it


StepFn = Callable[[Encoded, Tensor, int, list[dict]], Tensor]


def _step_cached(model: OneRec, enc: Encoded, tokens: Tensor, t: int, caches: list[dict]) -> Tensor:
    return model.decode(enc, tokens[:, -1:], start_pos=t, caches=caches, past=tokens[:, :-1])[:, -1]


def _step_full(model: OneRec, enc: Encoded, tokens: Tensor, t: int, caches: list[dict]) -> Tensor:
    return model.decode(enc, tokens, start_pos=0)[:, -1]


@torch.no_grad()
def _search(
    model: OneRec,
    enc: Encoded,
    trie: CompiledTrie,
    beam_width: int,
    exclude: Sequence[Sequence[int]] | None,
    session_len: int | None,
    cached: bool,
) -> Beams:
    cfg = model.cfg
    L, K, W = cfg.levels, cfg.codebook_size, beam_width
    M = session_len or cfg.session_len
    if M > cfg.session_len:
        raise ValueError(f"session_len {M} exceeds the model's {cfg.session_len}")
    if trie.levels != L or trie.codebook_size != K:
        raise ValueError("the trie's levels/codebook size differ from the model's")
    B = enc.memory.shape[0]
    dev = enc.memory.device
    rows = torch.arange(B, device=dev).repeat_interleave(W)
    enc_b = enc.index_select(rows)  # (B*W, ...)
    child, leaf_item = trie.child.to(dev), trie.leaf_item.to(dev)

    scores = torch.full((B, W), NEG_INF, device=dev)
    scores[:, 0] = 0.0  # all beams start equal: expand only one of them at first
    node = torch.zeros(B * W, dtype=torch.long, device=dev)
    used = torch.zeros(B * W, trie.max_item + 1, dtype=torch.bool, device=dev)
    if exclude is not None:
        for b, seen in enumerate(exclude):
            ids = [i for i in seen if 0 <= i <= trie.max_item]
            if ids:
                used[b * W : (b + 1) * W, ids] = True
    tokens = torch.zeros(B * W, 1, dtype=torch.long, device=dev)  # start token
    codes = torch.zeros(B * W, 0, dtype=torch.long, device=dev)
    items = torch.zeros(B * W, 0, dtype=torch.long, device=dev)
    item_lp = torch.zeros(B * W, M, device=dev)
    caches: list[dict] = [{} for _ in model.dec_layers]
    step: StepFn = (
        (lambda e, tok, t, c: _step_cached(model, e, tok, t, c))
        if cached
        else (lambda e, tok, t, c: _step_full(model, e, tok, t, c))
    )

    for t in range(M * L):
        level = t % L
        logp = step(enc_b, tokens, t, caches).float().log_softmax(dim=-1)  # (B*W, K)
        nxt = child[node]  # (B*W, K)
        allowed = nxt >= 0
        if level == L - 1:  # completing an item: not one already in the session/excluded
            cand_items = leaf_item[nxt.clamp(min=0)]
            allowed &= ~used.gather(1, cand_items.clamp(min=0))
        cand = scores.reshape(-1, 1) + logp.masked_fill(~allowed, NEG_INF)
        top_scores, idx = cand.reshape(B, W * K).topk(W, dim=1)  # (B, W)
        src = (torch.arange(B, device=dev)[:, None] * W + idx // K).reshape(-1)
        code = (idx % K).reshape(-1)
        alive = top_scores.reshape(-1) > NEG_INF

        node = torch.where(alive, child[node[src], code], 0)
        gain = top_scores.reshape(-1) - scores.reshape(-1)[src]  # this token's log p
        item_lp = item_lp[src]
        item_lp[:, t // L] += torch.where(alive, gain, torch.zeros_like(gain))
        used, codes, items = used[src], codes[src], items[src]
        for c in caches:
            if c:
                c["k"], c["v"] = c["k"][src], c["v"][src]
        tokens = tokens[src]
        codes = torch.cat([codes, code[:, None]], dim=1)
        if level == L - 1:
            item = torch.where(alive, leaf_item[node.clamp(min=0)], -1)
            used[alive, item[alive]] = True
            items = torch.cat([items, item[:, None]], dim=1)
            node = torch.zeros_like(node)
        scores = top_scores
        tokens = torch.cat([tokens, (1 + level * K + code)[:, None]], dim=1)

    return Beams(items.view(B, W, M), scores, codes.view(B, W, M * L), item_lp.view(B, W, M))


def beam_search(
    model: OneRec,
    enc: Encoded,
    trie: CompiledTrie,
    beam_width: int = 32,
    exclude: Sequence[Sequence[int]] | None = None,
    session_len: int | None = None,
) -> Beams:
    """Top ``beam_width`` sessions per request, KV-cached, batched over requests."""
    return _search(model, enc, trie, beam_width, exclude, session_len, cached=True)


def beam_search_reference(
    model: OneRec,
    enc: Encoded,
    trie: CompiledTrie,
    beam_width: int = 32,
    exclude: Sequence[Sequence[int]] | None = None,
    session_len: int | None = None,
) -> Beams:
    """The same search without a cache: the whole prefix is decoded at every step."""
    return _search(model, enc, trie, beam_width, exclude, session_len, cached=False)


@torch.no_grad()
def score_items(model: OneRec, enc: Encoded, codes: Tensor) -> Tensor:
    """log p(SID(item) as the session's first item | history), teacher-forced.

    codes: (B, C, L) SIDs of C candidate items per request → (B, C) log-probabilities.
    The C candidates of a request share its encoder output (no copies)."""
    B, C, L = codes.shape
    offsets = torch.arange(L, device=codes.device) * model.cfg.codebook_size
    start = torch.zeros(B, C, 1, dtype=torch.long, device=codes.device)
    tokens = torch.cat([start, (codes + offsets + 1)[..., :-1]], dim=-1)  # (B, C, L)
    logp = model.decode(enc, tokens).float().log_softmax(dim=-1)  # (B, C, L, K)
    return logp.gather(-1, codes[..., None]).squeeze(-1).sum(dim=-1)


@torch.no_grad()
def score_all_items(model: OneRec, enc: Encoded, trie: CompiledTrie) -> Tensor:
    """log p(SID(item) as the first item | history) for every item of the trie at once.

    Walks the trie level by level with the KV cache: each distinct SID prefix is decoded
    once per request, one token per trie node, its parent's keys and values reused. The
    cost is the number of trie nodes, not items × L. Returns (B, max_item + 1); ids not in
    the trie score -inf."""
    B = enc.memory.shape[0]
    dev = enc.memory.device
    K = model.cfg.codebook_size
    child, leaf = trie.child.to(dev), trie.leaf_item.to(dev)
    nodes = torch.zeros(1, dtype=torch.long, device=dev)  # frontier: trie nodes at depth d
    path = torch.zeros(1, 1, dtype=torch.long, device=dev)  # each prefix's tokens so far
    acc = torch.zeros(B, 1, device=dev)  # log p of each frontier prefix
    caches: list[dict] = [{} for _ in model.dec_layers]
    for d in range(trie.levels):
        P = len(nodes)
        logits = model.decode(
            enc,
            path[:, -1:].expand(B, P, 1),
            start_pos=d,
            caches=caches,
            past=path[:, :-1].expand(B, P, d),
        )
        total = acc[:, :, None] + logits[:, :, -1].float().log_softmax(dim=-1)  # (B, P, K)
        nxt = child[nodes]  # (P, K)
        p_idx, code = (nxt >= 0).nonzero(as_tuple=True)
        acc = total[:, p_idx, code]  # (B, P')
        for c in caches:  # children inherit their parent prefix's keys and values
            for kv in ("k", "v"):
                x = c[kv]  # (B*P, H, d+1, hd)
                c[kv] = x.view(B, P, *x.shape[1:])[:, p_idx].reshape(-1, *x.shape[1:])
        nodes = nxt[p_idx, code]
        path = torch.cat([path[p_idx], (1 + d * K + code)[:, None]], dim=1)
    out = torch.full((B, trie.max_item + 1), NEG_INF, device=dev)
    out[:, leaf[nodes]] = acc
    return out
