"""Trie-constrained beam search over semantic IDs, and teacher-forced item scoring.

``beam_search`` runs the encoder once per request and decodes all requests × beams in one
batch on the decode fast path (``_decode_fast``, ``decode_step``): the W beams of a
request share its encoder output (they are one block of queries against its
cross-attention keys/values, no per-beam copies); step 0 decodes one row per request
(the W starting beams are identical); self-attention keys/values live in a preallocated
(T, 2*layers, N, D) buffer that follows the beams by one index_select per step; the
weights are fused and transposed once per model version (``DecodeWeights``), the
summary's conditioning and position embeddings once per search; the MoE runs as batched
matmuls with no balance loss (dense gate for few rows, sort-and-split for many).
Constraints: each item's codes must follow a path of the trie of valid SIDs (so every
emitted SID is a real item), an item never appears twice in a session, and items of the
history can be excluded. ``beam_search_reference`` is the same search recomputing the
whole decoder prefix at each step through ``OneRec.decode``, each beam with its own copy
of the encoder output: the twin the tests compare against.

torch.compile of the step was measured and not kept (figures in
``benchmarks/beam_search.py``): compiled per position with exact shapes, or per batch
bucket with fixed shapes, it ran slower than this eager step on this CPU.

Scores are the model's log-probabilities of the generated tokens (log-softmax over all
K codes, so a session's score is its true log p under the model, not renormalised to the
constraint).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.onerec import DENSE_GATE_MAX, Encoded, MoEFFN, OneRec

NEG_INF = float("-inf")
# From this many decoder rows on, the step's k and v are computed straight into the KV
# cache (two more matmuls) instead of one fused q/k/v matmul and a strided copy.
SPLIT_QKV_ROWS = 256
# From this many decoder rows on, self-attention over the cache is elementwise (products
# and sums over a position's slab of every row) instead of one tiny matmul per row and
# head, whose per-call overhead dominates when rows are many and positions few.
ELEMENTWISE_ATTN_ROWS = 256


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


def _step_full(model: OneRec, enc: Encoded, tokens: Tensor, t: int, caches: list[dict]) -> Tensor:
    return model.decode(enc, tokens, start_pos=0)[:, -1]


@torch.no_grad()
def _search_reference(
    model: OneRec,
    enc: Encoded,
    trie: CompiledTrie,
    beam_width: int,
    exclude: Sequence[Sequence[int]] | None,
    session_len: int | None,
) -> Beams:
    """The plain search: every beam its own copy of the encoder output, the whole prefix
    re-decoded at each step by ``OneRec.decode``, every state tensor reordered by copy."""
    cfg = model.cfg
    L, K, W = cfg.levels, cfg.codebook_size, beam_width
    M = _session_len(model, trie, session_len)
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

    for t in range(M * L):
        level = t % L
        logp = _step_full(model, enc_b, tokens, t, caches).float().log_softmax(dim=-1)
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


def _session_len(model: OneRec, trie: CompiledTrie, session_len: int | None) -> int:
    cfg = model.cfg
    M = session_len or cfg.session_len
    if M > cfg.session_len:
        raise ValueError(f"session_len {M} exceeds the model's {cfg.session_len}")
    if trie.levels != cfg.levels or trie.codebook_size != cfg.codebook_size:
        raise ValueError("the trie's levels/codebook size differ from the model's")
    return M


# --------------------------------------------------------------------------- fast path
class DecodeWeights:
    """The decoder's weights laid out for one-token steps, taken once per search: the
    self-attention's q, k, v projections fused into one matrix, the attention scale
    folded into the query projections, the experts packed side by side with the router's
    columns after them (one matmul gives hidden units and router logits), the head split
    per level. Plain tensors, so a step sees no module."""

    def __init__(self, model: OneRec) -> None:
        cfg = model.cfg
        self.heads, self.dim = cfg.heads, cfg.dim
        scale = 1.0 / math.sqrt(cfg.dim // cfg.heads)
        self.layers: list[dict[str, Tensor]] = []
        for layer in model.dec_layers:
            sa, ca, ffn = layer.self_attn, layer.cross_attn, layer.ffn
            w = {
                "ln1_w": layer.ln1.weight,
                "ln1_b": layer.ln1.bias,
                # Transposed (in, out) for addmm; q first, then k, v.
                "qkv_w": torch.cat([sa.q.weight * scale, sa.kv.weight]).T.contiguous(),
                "qkv_b": torch.cat([sa.q.bias * scale, sa.kv.bias]),
                "so_w": sa.out.weight.T.contiguous(),
                "so_b": sa.out.bias,
                "ln2_w": layer.ln2.weight,
                "ln2_b": layer.ln2.bias,
                "cq_w": (ca.q.weight * scale).T.contiguous(),
                "cq_b": ca.q.bias * scale,
                "co_w": ca.out.weight.T.contiguous(),
                "co_b": ca.out.bias,
                "ln3_w": layer.ln3.weight,
                "ln3_b": layer.ln3.bias,
            }
            if isinstance(ffn, MoEFFN):
                w_up, b_up, w_down = ffn.packed()
                router = ffn.router.weight  # (E, D)
                w.update(
                    up_router=torch.cat([w_up, router.T], dim=1),  # (D, E*H + E)
                    up_router_b=torch.cat([b_up, b_up.new_zeros(router.shape[0])]),
                    router=router,
                    down_all=w_down,
                    w_up=ffn.w_up,
                    b_up=ffn.b_up,
                    w_down=ffn.w_down,
                    b_down=ffn.b_down,
                )
            else:
                w.update(up=ffn.up.weight.T.contiguous(), up_b=ffn.up.bias)
                w.update(down=ffn.down.weight.T.contiguous(), down_b=ffn.down.bias)
            self.layers.append(w)
        self.top_k = cfg.moe_top_k
        self.ln_w, self.ln_b = model.dec_ln.weight, model.dec_ln.bias
        # Level l's head, transposed: (L, D, K).
        self.head = model.head.weight.view(cfg.levels, cfg.codebook_size, cfg.dim)
        self.head = self.head.transpose(1, 2).contiguous()
        self.tok = model.dec_tok.weight
        self.pos = model.dec_pos.weight
        self.cond_w, self.cond_b = model.dec_cond.weight, model.dec_cond.bias

    @classmethod
    def of(cls, model: OneRec) -> DecodeWeights:
        """The model's decode weights, rebuilt only when a parameter changed (an
        optimizer step or a load bumps its version) since the last search."""
        key = tuple((p.data_ptr(), p._version) for p in model.parameters())
        cached = _DECODE_WEIGHTS.get(model)
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, cached
                cached = (key, cls(model))
            _DECODE_WEIGHTS[model] = cached
        return cached[1]


_DECODE_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class CrossMemory:
    """A batch's encoder output as the decode step reads it, once per search: per layer
    the keys transposed (B*H, hd, S) and values (B*H, S, hd), and the padding mask as an
    additive bias (B*H, 1, S). The C beams of request b are one block of C queries
    against batch entry b: no per-beam copies."""

    keys: list[Tensor]
    values: list[Tensor]
    bias: Tensor | None  # None: no padding anywhere in the batch

    @classmethod
    def of(cls, enc: Encoded) -> CrossMemory:
        b, h, s, hd = enc.cross_kv[0][0].shape
        bias = torch.zeros(b, 1, 1, s, device=enc.mask.device).masked_fill(~enc.mask, NEG_INF)
        return cls(
            [k.transpose(-1, -2).reshape(b * h, hd, s) for k, _ in enc.cross_kv],
            [v.reshape(b * h, s, hd) for _, v in enc.cross_kv],
            None if bool(enc.mask.all()) else bias.expand(b, h, 1, s).reshape(b * h, 1, s),
        )


def _moe(x: Tensor, w: dict[str, Tensor], top_k: int, dense: bool) -> Tensor:
    """``MoEFFN.infer`` on plain tensors (x: (N, D))."""
    n, d = x.shape
    experts = w["b_down"].shape[0]
    if dense:
        both = torch.addmm(w["up_router_b"], x, w["up_router"])  # (N, E*H + E)
        top_l, top_i = both[:, -experts:].topk(top_k, dim=-1)
        g = x.new_zeros(n, experts).scatter_(1, top_i, top_l.softmax(dim=-1))
        hid = F.gelu(both[:, :-experts]).view(n, experts, -1)
        return torch.addmm(g @ w["b_down"], (hid * g[..., None]).view(n, -1), w["down_all"])
    top_l, top_i = F.linear(x, w["router"]).topk(top_k, dim=-1)
    gates = top_l.softmax(dim=-1)
    slot = top_i.flatten()
    order = slot.argsort(stable=True)
    token = order // top_k
    counts = torch.bincount(slot, minlength=experts).tolist()
    parts = []
    for e, xe in enumerate(x.index_select(0, token).split(counts)):
        if counts[e]:
            hid = F.gelu(torch.addmm(w["b_up"][e], xe, w["w_up"][e]))
            parts.append(torch.addmm(w["b_down"][e], hid, w["w_down"][e]))
    y = torch.cat(parts) * gates.flatten()[order, None]
    return x.new_zeros(n, d).index_add_(0, token, y)


def decode_step(
    dw: DecodeWeights,
    x: Tensor,  # (N, D): this step's input embeddings, B requests × C beams, row-major
    c: int,  # beams per request
    t: int,  # the position of this step
    kv: Tensor,  # (T, 2 * layers, N_max, D): self-attention keys/values of positions < t
    mem: CrossMemory,
    moe_dense: bool | None = None,
) -> Tensor:
    """One decoder step for B × C beams; writes position t's keys/values into ``kv``
    and returns the final hidden states (N, D). The beams of request b share its
    cross-attention keys/values: the C of them are one query block, no copies."""
    n, d = x.shape
    b, heads = n // c, dw.heads
    hd = d // heads
    if moe_dense is None:
        moe_dense = n * len(dw.layers[0].get("b_down", ())) < DENSE_GATE_MAX
    for i, w in enumerate(dw.layers):
        h = F.layer_norm(x, (d,), w["ln1_w"], w["ln1_b"])
        if n < SPLIT_QKV_ROWS:  # one matmul, then k and v copied into the cache
            qkv = torch.addmm(w["qkv_b"], h, w["qkv_w"]).view(n, 3, d)
            kv[t, 2 * i : 2 * i + 2, :n] = qkv[:, 1:].transpose(0, 1)
            q, v_t = qkv[:, 0], qkv[:, 2]
        else:  # many rows: k and v written straight into the cache, no strided copy
            qkv_w, qkv_b = w["qkv_w"], w["qkv_b"]
            q = torch.addmm(qkv_b[:d], h, qkv_w[:, :d])
            torch.addmm(qkv_b[d : 2 * d], h, qkv_w[:, d : 2 * d], out=kv[t, 2 * i, :n])
            torch.addmm(qkv_b[2 * d :], h, qkv_w[:, 2 * d :], out=kv[t, 2 * i + 1, :n])
            v_t = kv[t, 2 * i + 1, :n]
        if t == 0:  # one key: the softmax is 1
            y = v_t
        else:  # q is pre-scaled
            # A position's keys (values) of all rows are one contiguous slab: both
            # products are batched matmuls over (row, head), no copies.
            k = kv[: t + 1, 2 * i, :n].reshape(t + 1, n * heads, hd)
            v = kv[: t + 1, 2 * i + 1, :n].reshape(t + 1, n * heads, hd)
            if n >= ELEMENTWISE_ATTN_ROWS:  # softmax over positions, each a wide row
                s = (k * q.reshape(n * heads, hd)).sum(-1)  # (t+1, N*H)
                s = s.sub_(s.amax(0)).exp_()
                y = (s.div_(s.sum(0))[..., None] * v).sum(0)  # (N*H, hd)
            else:
                p = torch.bmm(q.reshape(n * heads, 1, hd), k.permute(1, 2, 0)).softmax(-1)
                y = torch.bmm(p, v.transpose(0, 1))  # (N*H, 1, hd)
        x = torch.addmm(x, y.reshape(n, d), w["so_w"]).add_(w["so_b"])
        h = F.layer_norm(x, (d,), w["ln2_w"], w["ln2_b"])
        q = torch.addmm(w["cq_b"], h, w["cq_w"]).view(b, c, heads, hd).transpose(1, 2)
        q = q.reshape(b * heads, c, hd)
        if mem.bias is None:  # no padding in the batch
            att = torch.bmm(q, mem.keys[i])
        else:
            att = torch.baddbmm(mem.bias, q, mem.keys[i])
        y = att.softmax(dim=-1).bmm(mem.values[i]).view(b, heads, c, hd)  # (B, H, C, hd)
        x = torch.addmm(x, y.transpose(1, 2).reshape(n, d), w["co_w"]).add_(w["co_b"])
        h = F.layer_norm(x, (d,), w["ln3_w"], w["ln3_b"])
        if "router" in w:
            x = x + _moe(h, w, dw.top_k, moe_dense)
        else:
            up = F.gelu(torch.addmm(w["up_b"], h, w["up"]))
            x = torch.addmm(x, up, w["down"]).add_(w["down_b"])
    return F.layer_norm(x, (d,), dw.ln_w, dw.ln_b)


def _decode_fast(
    model: OneRec,
    enc: Encoded,
    trie: CompiledTrie,
    beam_width: int,
    exclude: Sequence[Sequence[int]] | None,
    session_len: int | None,
    moe_dense: bool | None = None,
) -> Beams:
    cfg = model.cfg
    L, K, W = cfg.levels, cfg.codebook_size, beam_width
    M = _session_len(model, trie, session_len)
    T = M * L
    if enc.summary.dim() != 2:
        raise ValueError("beam search takes one summary per request (B, D)")
    B, D = enc.summary.shape
    dev = enc.memory.device
    dw = DecodeWeights.of(model)
    mem = CrossMemory.of(enc)
    child, leaf_item = trie.child.to(dev), trie.leaf_item.to(dev)
    n_items = trie.max_item + 1
    prefix_terms = cfg.leaf_logits or cfg.tree_logits

    # Constants of the search: the summary's conditioning plus each position's embedding.
    cond = F.linear(enc.summary, dw.cond_w, dw.cond_b)  # (B, D)
    base = cond[None, :, None, :] + dw.pos[:T, None, None, :]  # (T, B, 1, D)
    step_tok = torch.arange(L, device=dev)[:, None] * K + 1 + torch.arange(K, device=dev)
    excl = torch.zeros(B, n_items, dtype=torch.bool, device=dev)
    if exclude is not None:
        for b, seen in enumerate(exclude):
            ids = [i for i in seen if 0 <= i < n_items]
            if ids:
                excl[b, ids] = True
    excl = excl.view(-1)

    N = B * W
    rows_req = torch.arange(N, device=dev) // W * n_items  # each row's request, × items
    kv = torch.empty(T, 2 * len(dw.layers), N, D, device=dev)
    kv_next = torch.empty_like(kv)
    # Each beam's codes and items (one tensor: one reorder per step), its tokens' log p.
    state = torch.zeros(1 * B, T + M, dtype=torch.long, device=dev)
    tok_lp = torch.zeros(1 * B, T, device=dev)
    scores = torch.zeros(B, 1, device=dev)
    node = torch.zeros(B, dtype=torch.long, device=dev)
    first = torch.arange(B, device=dev)[:, None]  # (B, 1): times c, each request's first row
    token = torch.zeros(B, dtype=torch.long, device=dev)  # the start token
    c = 1  # one beam per request at step 0: the W starting beams are identical
    for t in range(T):
        level, m = t % L, t // L
        n = B * c
        x = (dw.tok[token].view(B, c, D) + base[t]).view(n, D)
        h = decode_step(dw, x, c, t, kv, mem, moe_dense)
        logits = h @ dw.head[level]  # (n, K)
        if prefix_terms:
            # The input tokens before this one: the start token, then codes 0..t-2.
            prev = max(t - 1, 0)
            past = 1 + (torch.arange(prev, device=dev) % L) * K + state[:, :prev]
            past = torch.cat([torch.zeros_like(state[:, :1]), past], dim=1)[:, :t]
            logits = logits + model._prefix_terms(h[:, None], token[:, None], t, past)[:, 0]
        logp = logits.float().log_softmax(dim=-1)
        nxt = child[node]  # (n, K)
        allowed = nxt >= 0
        if level == L - 1:  # completing an item: not one already in the session/excluded
            # (-1 where no child: it indexes from the end, and is masked anyway)
            cand_items = leaf_item[nxt]  # (n, K)
            taken = excl[(rows_req[:n] if c == W else rows_req[::W])[:, None] + cand_items]
            if m:
                taken |= (cand_items[:, :, None] == state[:, None, T : T + m]).any(-1)
            allowed &= taken.logical_not_()
        cand = torch.where(allowed, logp, NEG_INF).add_(scores.view(n, 1)).view(B, c * K)
        width = min(W, c * K)
        top, idx = cand.topk(width, dim=1)  # (B, width)
        if width < W:  # fewer candidates than beams (step 0 with K < W): dead beams
            top = F.pad(top, (0, W - width), value=NEG_INF)
            idx = F.pad(idx, (0, W - width))
        parent = idx // K
        src = (parent + first * c).view(-1)  # (N,) the row each new beam extends
        code = (idx % K).view(-1)
        alive = (top > NEG_INF).view(-1)
        gain = logp.view(B, c * K).gather(1, idx).view(-1)
        # A dead beam's node may be -1: it indexes from the end, its score stays -inf.
        node = nxt.view(B, c * K).gather(1, idx).view(-1)
        state = state.index_select(0, src)
        tok_lp = tok_lp.index_select(0, src)
        state[:, t] = code
        tok_lp[:, t] = gain * alive
        if level == L - 1:
            state[:, T + m] = torch.where(alive, leaf_item[node], -1)
            node = torch.zeros_like(node)
        if t + 1 < T:  # the beams' keys/values follow them
            torch.index_select(kv[: t + 1], 2, src, out=kv_next[: t + 1])
            kv, kv_next = kv_next, kv
        scores = top
        token = step_tok[level][code]
        c = W

    codes, items = state[:, :T], state[:, T:]
    item_lp = tok_lp.view(N, M, L).sum(-1)
    return Beams(items.view(B, W, M), scores, codes.reshape(B, W, T), item_lp.view(B, W, M))


@torch.no_grad()
def _search_fast(
    model: OneRec,
    enc: Encoded,
    trie: CompiledTrie,
    beam_width: int,
    exclude: Sequence[Sequence[int]] | None,
    session_len: int | None,
    moe_dense: bool | None = None,
) -> Beams:
    """``_decode_fast`` under inference mode (cheaper dispatch of its ~3000 small ops);
    the beams come out as plain tensors (copies), so callers may train on them."""
    with torch.inference_mode():
        out = _decode_fast(model, enc, trie, beam_width, exclude, session_len, moe_dense)
    return Beams(*(x.clone() for x in (out.items, out.scores, out.codes, out.item_scores)))


def beam_search(
    model: OneRec,
    enc: Encoded,
    trie: CompiledTrie,
    beam_width: int = 32,
    exclude: Sequence[Sequence[int]] | None = None,
    session_len: int | None = None,
    moe_dense: bool | None = None,
) -> Beams:
    """Top ``beam_width`` sessions per request, batched over requests: the fast decode
    path (beams share their request's encoder output, preallocated KV buffers reordered
    by index, the MoE as batched matmuls). Decodes as in eval mode (no dropout).
    ``moe_dense`` forces the MoE's dense-gate (True) or sort-and-split (False) inference
    path; by default it follows the number of rows (``DENSE_GATE_MAX``)."""
    return _search_fast(model, enc, trie, beam_width, exclude, session_len, moe_dense)


def beam_search_reference(
    model: OneRec,
    enc: Encoded,
    trie: CompiledTrie,
    beam_width: int = 32,
    exclude: Sequence[Sequence[int]] | None = None,
    session_len: int | None = None,
) -> Beams:
    """The same search without a cache: the whole prefix is decoded at every step."""
    return _search_reference(model, enc, trie, beam_width, exclude, session_len)


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


# Rows (requests x SID prefixes of one trie level) decoded at once by score_all_items. A
# large catalogue's widest level has thousands of prefixes (K^(L-1): 4096 at K = 64), and
# each row carries its activations, keys and values: 256 requests at once held ~11 GB at
# 50 k items (make bench-scale). Requests go in groups that keep to this many rows.
SCORE_ALL_ROWS = 32_768


def trie_widths(trie: CompiledTrie) -> list[int]:
    """The number of SID prefixes at each depth 0..levels-1 (the rows per request that
    each level of ``score_all_items`` decodes)."""
    child = trie.child
    nodes = torch.zeros(1, dtype=torch.long, device=child.device)
    widths = []
    for _ in range(trie.levels):
        widths.append(len(nodes))
        nxt = child[nodes]
        nodes = nxt[nxt >= 0]
    return widths


@torch.no_grad()
def score_all_items(
    model: OneRec, enc: Encoded, trie: CompiledTrie, max_rows: int = SCORE_ALL_ROWS
) -> Tensor:
    """log p(SID(item) as the first item | history) for every item of the trie at once.

    Walks the trie level by level with the KV cache: each distinct SID prefix is decoded
    once per request, one token per trie node, its parent's keys and values reused. The
    cost is the number of trie nodes, not items × L. Requests go in groups of at most
    ``max_rows`` decoded rows at the widest level (each request's scores are its own, so
    the grouping changes no score). Returns (B, max_item + 1); ids not in the trie score
    -inf."""
    B = enc.memory.shape[0]
    group = max(1, max_rows // max(trie_widths(trie)))
    if B <= group:
        return _score_all_items(model, enc, trie)
    dev = enc.memory.device
    return torch.cat(
        [
            _score_all_items(
                model, enc.index_select(torch.arange(s, min(B, s + group), device=dev)), trie
            )
            for s in range(0, B, group)
        ]
    )


def _score_all_items(model: OneRec, enc: Encoded, trie: CompiledTrie) -> Tensor:
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
        nodes = nxt[p_idx, code]
        if d == trie.levels - 1:
            break  # the leaves: no level decodes after them, their caches are not needed
        for c in caches:  # children inherit their parent prefix's keys and values
            for kv in ("k", "v"):
                x = c[kv]  # (B*P, H, d+1, hd)
                c[kv] = x.view(B, P, *x.shape[1:])[:, p_idx].reshape(-1, *x.shape[1:])
        path = torch.cat([path[p_idx], (1 + d * K + code)[:, None]], dim=1)
    out = torch.full((B, trie.max_item + 1), NEG_INF, device=dev)
    out[:, leaf[nodes]] = acc
    return out
