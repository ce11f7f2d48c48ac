"""OneRec: an encoder-decoder over semantic item IDs that generates whole sessions.

The encoder reads the user's history (each item = the sum of its SID code embeddings, plus
positions, plus an optional user-feature token). The decoder generates the next M items
as M×L SID tokens after a start token (OneRec eq. 3) with next-token cross-entropy
(eq. 4); its feed-forward layers are a top-k Mixture of Experts (eq. 2) with a
load-balancing loss. Incremental decoding with a KV cache lives here too, so beam search
(``models/beam_search.py``) runs the encoder once per request.

One departure from the paper, for training efficiency: the encoder is causal (item i
attends to the user token and items <= i; positions count from the oldest item). Its
state after item p then depends on items <= p only, so one encoder pass over a window
of a user's sequence serves every prefix of it: training decodes the next session after
each prefix against the memory cut at that prefix (``forward(..., prefix_end=...)``).
That is what SASRec-style training gets from its causal mask: one encoder pass per
window instead of one per example. The encoder's state at
the latest item (like SASRec's user vector) also conditions every decoder token.

Token layout: item codes are (c_1..c_L), c_l in [0, K). Decoder input token ids are
0 = start, 1 + l*K + c for code c at level l. Position t of the decoder predicts the code
at level t % L, so its logits are over K codes of that level.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEAF_TABLE_MAX = 1 << 22  # entries of the (K^(L-1), K) table of leaf items
# MoE at inference: below this many token × expert pairs every expert runs on every token
# under a dense gate (two matmuls); above it, sort-and-split (the top-k FLOPs only). On
# 1 thread (dim 64 / 128, 4 experts) dense wins at 32 tokens, they tie near 256 and
# sort-and-split is 2.7x faster at 1024.
DENSE_GATE_MAX = 1024


@dataclass
class OneRecConfig:
    levels: int = 3  # L: codes per item
    codebook_size: int = 32  # K: codes per level
    session_len: int = 5  # M: items generated per session
    max_history: int = 50
    dim: int = 128
    heads: int = 4
    enc_layers: int = 2
    dec_layers: int = 2
    ffn_hidden: int = 512  # hidden size of a dense FFN
    moe_experts: int = 4  # E; 0 → dense FFN in the decoder
    moe_top_k: int = 2
    expert_hidden: int | None = None  # default ffn_hidden // top_k: equal active params
    moe_aux_weight: float = 0.01
    dropout: float = 0.1  # on embeddings and residual branches
    attn_dropout: float = 0.0  # on attention weights: costly on CPU (a mask per score)
    # Categorical user features (name → cardinality incl. index 0 = unknown).
    user_features: dict[str, int] = field(default_factory=dict)
    # > 0: history items also get a learned id embedding (ids < item_vocab; 0 = padding or
    # an item the model has not seen, which falls back to its SID codes alone). Sums of
    # three shared code embeddings blur items that share a prefix; on small catalogues
    # the id embedding brings back what tells them apart. Cold start still works.
    item_vocab: int = 0
    # > 0 (needs item_vocab): weight of an auxiliary next-item loss on the encoder state
    # at each prefix's latest item (a softmax over the id embeddings, as in SASRec). It
    # trains the encoder with dense item-level gradients; ranking stays generative.
    next_item_weight: float = 0.0
    # True (needs item_vocab): the last SID level's logits also get an item-specific term,
    # h · e(item) with e the id embeddings, for the items under the decoded prefix. The
    # last code is shared by every prefix and tells apart only the few items under one, so
    # a per-code output vector cannot be specific to any of them; the id embedding can.
    # Items without an id embedding (cold start) keep the code term alone.
    leaf_logits: bool = False
    # True (needs item_vocab): the logit of code c under prefix P at every level also gets
    # log sum_i exp(h · e(i)) over the known items i whose SID starts with (P, c): the
    # item-level scores of the subtree, aggregated. At the last level the subtree is one
    # item and this is the leaf term; at level 1 it gives the decoder item-level resolution
    # where a single code vector stands for ~N/K items. Subtrees without a known item keep
    # the code logit alone.
    tree_logits: bool = False
    # OnePiece's joint objective. > 0 (needs item_vocab): an embedding head on the encoder
    # state (the user vector) trained with InfoNCE against item vectors (id embedding + the
    # sum of the item's SID code embeddings, so a cold item has one too): the next item is
    # the positive, the batch's other next items and ``infonce_negatives`` items drawn
    # uniformly are the negatives. Its scores can re-rank beam search's candidates.
    infonce_weight: float = 0.0
    infonce_negatives: int = 127
    infonce_temperature: float = 1.0
    # > 0 (needs the head): a BCE calibration term on the same logits, positive 1 and each
    # negative 0. Softmax is blind to a shift of all logits; BCE pins their scale.
    bce_weight: float = 0.0
    # Latent reasoning (OnePiece): K > 0 appends K steps after the history in the encoder;
    # each step's input is the previous step's last hidden state (no softmax, no token),
    # plus a learned step embedding, and it attends to the history and the earlier steps.
    # The last step's state replaces the encoder state at the latest item as the summary
    # that conditions the decoder and feeds the heads. K = 0: the model as without it.
    latent_steps: int = 0
    # Context engineering (OnePiece). Situational descriptors: categorical fields of the
    # request (name -> cardinality incl. 0 = unknown; e.g. hour, weekday, age, surface),
    # embedded, summed and passed through their own adapter into one token. Preference
    # anchors: ``anchors`` item ids curated for the context (e.g. the most popular items
    # of the user's favourite genre), one token each (item embedding + an anchor type
    # embedding; id 0 = none). These tokens follow the history as the latent steps do:
    # per prefix, attending to the history and each other, so a context never leaks
    # into another prefix. Empty / 0: the model as without them.
    context_fields: dict[str, int] = field(default_factory=dict)
    anchors: int = 0

    @property
    def contrastive_head(self) -> bool:
        return bool(self.infonce_weight or self.bce_weight)

    @property
    def context_width(self) -> int:
        """Columns of a context row: the descriptor fields, then the anchor ids."""
        return len(self.context_fields) + self.anchors

    @property
    def has_tail(self) -> bool:
        """Tokens after the history: context, then latent steps."""
        return bool(self.latent_steps or self.context_width)

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts:
            raise ValueError("moe_top_k must be within 1..moe_experts")
        if min(self.levels, self.codebook_size, self.session_len, self.max_history) < 1:
            raise ValueError("levels, codebook_size, session_len, max_history must be >= 1")
        if (
            self.leaf_logits or self.tree_logits
        ) and self.codebook_size**self.levels > LEAF_TABLE_MAX:
            raise ValueError(
                f"leaf_logits: K^L = {self.codebook_size}^{self.levels} exceeds the "
                f"prefix table's limit of {LEAF_TABLE_MAX} entries"
            )
        if self.latent_steps < 0 or self.anchors < 0:
            raise ValueError("latent_steps and anchors must be >= 0")
        if any(c < 2 for c in self.context_fields.values()):
            raise ValueError("each context field needs a cardinality >= 2 (0 = unknown)")
        if self.infonce_negatives < 0 or self.infonce_temperature <= 0:
            raise ValueError("infonce_negatives must be >= 0 and infonce_temperature > 0")
        if min(self.infonce_weight, self.bce_weight) < 0:
            raise ValueError("infonce_weight and bce_weight must be >= 0")
        if self.expert_hidden is None and self.moe_experts:
            self.expert_hidden = max(1, self.ffn_hidden // self.moe_top_k)

    @property
    def target_len(self) -> int:
        return self.session_len * self.levels

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    """Multi-head attention; self- or cross-, with an optional incremental KV cache."""

    def __init__(self, cfg: OneRecConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = cfg.attn_dropout

    def _split(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, D/H)
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(
        self,
        x: Tensor,  # (B, T, D) queries
        kv: tuple[Tensor, Tensor],  # each (B, H, S, D/H)
        mask: Tensor | None = None,  # bool, broadcastable to (B, H, T, S), True = attend
        causal: bool = False,
    ) -> Tensor:
        q = self._split(self.q(x))
        k, v = kv
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=drop, is_causal=causal and mask is None
        )
        b, h, t, hd = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, h * hd))


class DenseFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


@dataclass
class MoEStats:
    aux_loss: Tensor  # load-balancing loss of this call (scalar)
    counts: Tensor  # (E,) token-to-expert assignments in this call


class MoEFFN(nn.Module):
    """Top-k gated Mixture of Experts (OneRec eq. 2) with the Switch load-balancing loss.

    Each token goes to its k highest-gated experts; gates are the softmax of the router
    logits renormalised over those k. ``forward`` dispatches tokens expert by expert;
    ``forward_reference`` runs every expert on every token and masks — the obvious twin
    the tests compare against."""

    def __init__(self, cfg: OneRecConfig) -> None:
        super().__init__()
        assert cfg.expert_hidden is not None
        self.experts_n, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.router = nn.Linear(cfg.dim, cfg.moe_experts, bias=False)
        h = cfg.expert_hidden
        self.w_up = nn.Parameter(torch.empty(cfg.moe_experts, cfg.dim, h))  # (E, D, H)
        self.b_up = nn.Parameter(torch.zeros(cfg.moe_experts, h))
        self.w_down = nn.Parameter(torch.empty(cfg.moe_experts, h, cfg.dim))  # (E, H, D)
        self.b_down = nn.Parameter(torch.zeros(cfg.moe_experts, cfg.dim))
        nn.init.normal_(self.w_up, std=1 / math.sqrt(cfg.dim))
        nn.init.normal_(self.w_down, std=1 / math.sqrt(h))
        self.drop = nn.Dropout(cfg.dropout)
        self.last: MoEStats | None = None

    def _gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = self.router(x)  # (N, E)
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # (N, k)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)
        counts = torch.bincount(top_i.flatten(), minlength=self.experts_n).to(x.dtype)
        # Switch-style balance: E * sum_e (share of assignments to e) * (mean prob of e).
        frac = counts / counts.sum()
        aux = self.experts_n * (frac * probs.mean(dim=0)).sum()
        self.last = MoEStats(aux_loss=aux, counts=counts.detach())
        return gates, top_i, probs

    def _expert(self, e: int, x: Tensor) -> Tensor:
        return F.gelu(x @ self.w_up[e] + self.b_up[e]) @ self.w_down[e] + self.b_down[e]

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            self.last = None  # no balance loss nor stats off the training path
            return self.infer(x)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        gates, top_i, _ = self._gates(flat)
        out = torch.zeros_like(flat)
        for e in range(self.experts_n):
            token, slot = (top_i == e).nonzero(as_tuple=True)
            if token.numel():
                y = self._expert(e, flat[token]) * gates[token, slot, None]
                out.index_add_(0, token, y)
        return self.drop(out).view(shape)

    def packed(self) -> tuple[Tensor, Tensor, Tensor]:
        """The experts side by side for one matmul each way: up (D, E*H), its bias
        (E*H,), down (E*H, D). Cached until a parameter changes (optimizer step, load)."""
        e, d, h = self.w_up.shape

        def pack() -> tuple[Tensor, Tensor, Tensor]:
            return (
                self.w_up.permute(1, 0, 2).reshape(d, e * h).contiguous(),
                self.b_up.reshape(e * h).contiguous(),
                self.w_down.reshape(e * h, d).contiguous(),
            )

        if torch.is_grad_enabled() and self.w_up.requires_grad:
            return pack()  # differentiable, not cached (eval mode with gradients)
        key = tuple((p.data_ptr(), p._version) for p in (self.w_up, self.b_up, self.w_down))
        if getattr(self, "_packed_key", None) != key:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, cached
                self._packed = pack()
            self._packed_key = key
        return self._packed

    def infer(self, x: Tensor, dense: bool | None = None) -> Tensor:
        """Inference: the top-k gates and batched matmuls, no balance loss nor stats.

        ``dense`` (default: tokens × experts < ``DENSE_GATE_MAX``): every expert on every
        token in one matmul each way, with a gate that is zero outside the top k (fewest
        ops: for the few tokens of a small batch); else sort-and-split, the tokens
        grouped by expert so each expert computes only its own (the top-k FLOPs)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        n = flat.shape[0]
        top_l, top_i = F.linear(flat, self.router.weight).topk(self.top_k, dim=-1)
        gates = top_l.softmax(dim=-1)  # = the softmax's top-k probabilities, renormalised
        if dense is None:
            dense = n * self.experts_n < DENSE_GATE_MAX
        if dense:
            w_up, b_up, w_down = self.packed()
            g = flat.new_zeros(n, self.experts_n).scatter_(1, top_i, gates)  # (N, E)
            hid = F.gelu(torch.addmm(b_up, flat, w_up)).view(n, self.experts_n, -1)
            out = torch.addmm(g @ self.b_down, (hid * g[..., None]).view(n, -1), w_down)
            return out.view(shape)
        slot = top_i.flatten()
        order = slot.argsort(stable=True)
        token = order // self.top_k
        counts = torch.bincount(slot, minlength=self.experts_n).tolist()
        parts = []
        for e, xe in enumerate(flat.index_select(0, token).split(counts)):
            if counts[e]:
                hid = F.gelu(torch.addmm(self.b_up[e], xe, self.w_up[e]))
                parts.append(torch.addmm(self.b_down[e], hid, self.w_down[e]))
        y = torch.cat(parts) * gates.flatten()[order, None]
        return flat.new_zeros(n, shape[-1]).index_add_(0, token, y).view(shape)

    def forward_reference(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        gates, top_i, _ = self._gates(flat)
        dense = torch.zeros(flat.shape[0], self.experts_n, dtype=flat.dtype)
        dense.scatter_(1, top_i, gates)  # (N, E), zero outside the top k
        every = torch.stack([self._expert(e, flat) for e in range(self.experts_n)], dim=1)
        return self.drop((dense[..., None] * every).sum(dim=1)).view(shape)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: OneRecConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.ffn = DenseFFN(cfg.dim, cfg.ffn_hidden, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, self.attn.project_kv(h), mask=mask))
        return x + self.ffn(self.ln2(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: OneRecConfig) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(cfg.dim) for _ in range(3))
        self.self_attn = Attention(cfg)
        self.cross_attn = Attention(cfg)
        self.ffn: nn.Module = (
            MoEFFN(cfg) if cfg.moe_experts else DenseFFN(cfg.dim, cfg.ffn_hidden, cfg.dropout)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,  # (B, T, D), or (B, C, T, D): C candidate sequences per request
        cross_kv: tuple[Tensor, Tensor],
        enc_mask: Tensor,  # (B, 1, 1, S)
        cache: dict | None = None,
    ) -> Tensor:
        shape = x.shape
        seq = x.reshape(-1, shape[-2], shape[-1])  # (B*C, T, D): self-attention per sequence
        h = self.ln1(seq)
        k, v = self.self_attn.project_kv(h)
        causal = True
        if cache is not None:  # incremental: append this step's keys/values
            if "k" in cache:
                # One new token attends to every cached one; a multi-token step after a
                # prefix would need an offset causal mask, which decoding never needs.
                assert seq.shape[1] == 1, "incremental decoding takes one token per step"
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
                causal = False
            cache["k"], cache["v"] = k, v
        seq = seq + self.drop(self.self_attn(h, (k, v), causal=causal))
        # Cross-attention treats a request's C sequences as one long query: tokens do not
        # interact there, so the encoder memory is shared instead of copied C times.
        flat = seq.reshape(shape[0], -1, shape[-1])  # (B, C*T, D)
        flat = flat + self.drop(self.cross_attn(self.ln2(flat), cross_kv, mask=enc_mask))
        flat = flat + self.ffn(self.ln3(flat))
        return flat.view(shape)


# --------------------------------------------------------------------------- model
@dataclass
class Encoded:
    """The encoder's output for a batch, reusable across decoding steps."""

    memory: Tensor  # (B, S, D)
    mask: Tensor  # (B, 1, 1, S) bool, True = a token the decoder may attend to
    cross_kv: list[tuple[Tensor, Tensor]]  # per decoder layer
    summary: Tensor  # (B, [C,] D) decoder conditioning: encoder state at the latest item
    # With a tail (context, latent steps) only: per encoder layer, the history's keys and
    # values (B, H, S, hd) that the tail tokens attend to.
    layer_kv: list[tuple[Tensor, Tensor]] | None = None

    def index_select(self, index: Tensor) -> Encoded:
        """Rows ``index`` (e.g. repeat each request for its beams)."""
        return Encoded(
            self.memory.index_select(0, index),
            self.mask.index_select(0, index),
            [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv],
            self.summary.index_select(0, index),
            None
            if self.layer_kv is None
            else [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.layer_kv],
        )

    def prefixes(self, prefix_end: Tensor, tokens: int) -> Encoded:
        """C prefixes per row, decoded together as (B, C, T) sequences of ``tokens``
        tokens: sequence c of row b sees memory up to and including position
        ``prefix_end[b, c]`` (B, C). With a causal encoder that is exactly what encoding
        the prefix alone would give."""
        b, c = prefix_end.shape
        pos = torch.arange(self.memory.shape[1], device=prefix_end.device)
        visible = pos[None, None, :] <= prefix_end[:, :, None]  # (B, C, S)
        visible = visible & self.mask[:, 0]  # padding stays hidden
        mask = visible.repeat_interleave(tokens, dim=1)[:, None]  # (B, 1, C*T, S)
        index = prefix_end[:, :, None].expand(-1, -1, self.memory.shape[-1])
        summary = self.memory.gather(1, index)  # (B, C, D)
        return Encoded(self.memory, mask, self.cross_kv, summary, self.layer_kv)


def _weighted_ce(logits: Tensor, labels: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy over the labels that are not -100, the same with each term
    times ``weight`` (same shape as ``labels``), divided by the same count); without a
    weight both are the plain mean."""
    if weight is None:
        plain = F.cross_entropy(logits, labels, ignore_index=-100)
        return plain, plain
    per = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    kept = (labels != -100).to(per.dtype)
    n = kept.sum().clamp(min=1.0)
    return (per * kept).sum() / n, (per * weight.reshape(-1).to(per.dtype) * kept).sum() / n


class OneRec(nn.Module):
    def __init__(self, cfg: OneRecConfig) -> None:
        super().__init__()
        if cfg.next_item_weight and not cfg.item_vocab:
            raise ValueError("next_item_weight needs item_vocab > 0 (the id embeddings)")
        if (cfg.leaf_logits or cfg.tree_logits) and not cfg.item_vocab:
            raise ValueError("leaf_logits / tree_logits need item_vocab > 0 (the id embeddings)")
        if cfg.anchors and not cfg.item_vocab:
            raise ValueError("anchors need item_vocab > 0 (the id embeddings)")
        if cfg.contrastive_head and cfg.item_vocab < 2:
            raise ValueError("infonce_weight / bce_weight need item_vocab > 1 (the catalogue)")
        self.cfg = cfg
        d, L, K = cfg.dim, cfg.levels, cfg.codebook_size
        # Encoder: an item is the sum of its level-wise code embeddings.
        self.code_emb = nn.Embedding(L * K, d)
        self.hist_pos = nn.Embedding(cfg.max_history, d)
        self.item_emb = nn.Embedding(cfg.item_vocab, d, padding_idx=0) if cfg.item_vocab else None
        self.user_emb = nn.ModuleDict({n: nn.Embedding(c, d) for n, c in cfg.user_features.items()})
        self.user_token = nn.Parameter(torch.zeros(d))
        self.enc_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.enc_ln = nn.LayerNorm(d)
        # Decoder.
        self.dec_tok = nn.Embedding(1 + L * K, d)
        self.dec_pos = nn.Embedding(cfg.target_len + 1, d)
        self.dec_cond = nn.Linear(d, d)  # the encoder summary, added to every decoder token
        self.dec_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.dec_ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, L * K, bias=False)  # level l's logits: slice l*K:(l+1)*K
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.leaf_logits or cfg.tree_logits:
            # leaf_table[prefix, c]: the item whose SID is (prefix, c), 0 if none or unknown;
            # prefix = the first L-1 codes read as a base-K number. Set by set_leaf_items.
            self.register_buffer("leaf_table", torch.zeros(K ** (L - 1), K, dtype=torch.long))
        if cfg.tree_logits:
            # item_nodes[l, i]: item i's trie node at level l+1 (its first l+1 codes read as a
            # base-K number), for the inner levels; K^(l+1) (a spare slot) if i is unknown.
            spare = (K ** torch.arange(1, L)).reshape(-1, 1).expand(-1, cfg.item_vocab)
            self.register_buffer("item_nodes", spare.clone())
        if cfg.latent_steps:
            self.latent_pos = nn.Embedding(cfg.latent_steps, d)
        if cfg.context_fields:
            self.ctx_emb = nn.ModuleDict(
                {n: nn.Embedding(c, d) for n, c in cfg.context_fields.items()}
            )
            self.ctx_adapter = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        if cfg.anchors:
            self.anchor_type = nn.Parameter(torch.zeros(d))
        if cfg.contrastive_head:
            self.user_head = nn.Linear(d, d)  # encoder state -> user vector
        if cfg.contrastive_head or cfg.anchors:
            # item_codes[i]: item i's SID, for the vectors of sampled negatives and anchors.
            self.register_buffer("item_codes", torch.zeros(cfg.item_vocab, L, dtype=torch.long))
        self.apply(self._init)

    # ------------------------------------------------------------------ leaf items
    def set_leaf_items(self, codes: Tensor) -> None:
        """Fill the leaf table and the contrastive head's item codes from ``codes``
        (N + 1, L), the SIDs by item id (row 0 is padding). Ids at or above ``item_vocab``
        have no embedding and are left out."""
        cfg = self.cfg
        if not (cfg.leaf_logits or cfg.tree_logits or cfg.contrastive_head or cfg.anchors):
            return
        ids = torch.arange(1, min(codes.shape[0], cfg.item_vocab), device=codes.device)
        if cfg.contrastive_head or cfg.anchors:
            table = torch.zeros_like(self.item_codes)
            table[ids] = codes[ids].to(table.device)
            self.item_codes.copy_(table)
        if not (cfg.leaf_logits or cfg.tree_logits):
            return
        table = torch.zeros_like(self.leaf_table)
        table[self._prefix_index(codes[ids, :-1]), codes[ids, -1]] = ids.to(table.device)
        self.leaf_table.copy_(table)
        if cfg.tree_logits:
            nodes = (cfg.codebook_size ** torch.arange(1, cfg.levels)).reshape(-1, 1)
            nodes = nodes.expand(-1, cfg.item_vocab).clone()
            for lv in range(cfg.levels - 1):
                nodes[lv, ids] = self._prefix_index(codes[ids, : lv + 1]).to(nodes.device)
            self.item_nodes.copy_(nodes)

    def _subtree_logits(self, h: Tensor, prefix: Tensor, level: int) -> Tensor:
        """(..., J, K): log sum exp of h · e(i) over the known items under each child of
        ``prefix`` (..., J, level) at ``level`` (0-based, an inner level); 0 for a child
        with no known item."""
        K = self.cfg.codebook_size
        assert self.item_emb is not None
        scores = h @ self.item_emb.weight[1:].T  # (..., J, V-1): items 1..V-1
        idx = self.item_nodes[level, 1:].expand_as(scores)
        slots = K ** (level + 1) + 1
        with torch.no_grad():  # a stabiliser only: the log-sum-exp's gradient ignores it
            top = scores.new_full((*scores.shape[:-1], slots), float("-inf"))
            top = top.scatter_reduce(-1, idx, scores, "amax")
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        mass = scores.new_zeros(*scores.shape[:-1], slots)
        mass = mass.scatter_add(-1, idx, (scores - top.gather(-1, idx)).exp())
        rows = self._prefix_index(prefix)[..., None] * K + torch.arange(K, device=h.device)
        picked = mass.gather(-1, rows)
        lse = top.gather(-1, rows) + picked.clamp_min(1e-30).log()
        return torch.where(picked > 0, lse, torch.zeros_like(lse))

    def _prefix_index(self, prefix: Tensor) -> Tensor:  # (..., l) codes -> (...,) base K
        weights = self.cfg.codebook_size ** torch.arange(
            prefix.shape[-1] - 1, -1, -1, device=prefix.device
        )
        return (prefix * weights).sum(dim=-1)

    def leaf_items(self, prefix: Tensor) -> Tensor:
        """(..., L-1) codes of the first L-1 levels -> (..., K) items under that prefix."""
        return self.leaf_table[self._prefix_index(prefix)]

    def _prefix_codes(self, ctx: Tensor, cols: list[int], level: int) -> Tensor:
        """(..., J, level) codes of the item's first ``level`` levels for the positions
        whose input token sits at ``cols`` of ``ctx`` (the token before position j is the
        code of level ``level - 1``; the ``level`` tokens up to it are the prefix)."""
        K = self.cfg.codebook_size
        idx = torch.tensor(
            [[c - level + 1 + i for i in range(level)] for c in cols], dtype=torch.long
        ).reshape(len(cols), level)
        tok = ctx[..., idx.to(ctx.device)]  # (..., J, level) 1-based token ids
        return (tok - 1 - torch.arange(level, device=tok.device) * K).clamp(0, K - 1)

    def _prefix_terms(
        self, h: Tensor, tokens: Tensor, start_pos: int, past: Tensor | None
    ) -> Tensor:
        """Prefix-specific logits (..., T, K): at the last level h · e(item) for the items
        under the decoded prefix (``leaf_logits``); at the inner levels the log-sum-exp of
        the subtrees' item scores (``tree_logits``). The prefix at position j is read from
        the tokens before it: in ``tokens`` itself, or in ``past`` for an incremental step."""
        cfg = self.cfg
        L, K, t = cfg.levels, cfg.codebook_size, tokens.shape[-1]
        levels = [(start_pos + j) % L for j in range(t)]
        out = h.new_zeros(*h.shape[:-1], K)
        ctx = tokens if past is None else torch.cat([past, tokens], dim=-1)
        shift = ctx.shape[-1] - t  # index of tokens[..., 0] in ctx
        for lv in range(L):
            last = lv == L - 1
            leaf = last and (cfg.leaf_logits or cfg.tree_logits)
            if not (leaf or cfg.tree_logits):
                continue
            where = [j for j in range(t) if levels[j] == lv]
            if not where:
                continue
            if where[0] + shift - lv + 1 < 0:  # the prefix reaches before the context
                raise ValueError(
                    "leaf/tree logits: decoding a position of level > 1 needs the tokens of the "
                    "item's earlier levels (pass past= for an incremental step)"
                )
            prefix = self._prefix_codes(ctx, [j + shift for j in where], lv)  # (..., J, lv)
            sel = torch.tensor(where, device=h.device)
            hs = h.index_select(-2, sel)  # (..., J, D)
            term = hs.new_zeros(*hs.shape[:-1], K)
            if leaf:
                assert self.item_emb is not None
                vectors = self.item_emb(self.leaf_items(prefix))  # (..., J, K, D)
                term = term + torch.einsum("...jd,...jkd->...jk", hs, vectors)
            else:
                term = term + self._subtree_logits(hs, prefix, lv)
            out = out.index_copy(-2, sel, term)
        return out

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    # ------------------------------------------------------------------ encoder
    def encode(
        self,
        history: Tensor,  # (B, S, L) codes, left-padded
        history_mask: Tensor,  # (B, S) bool, True = real item
        user_feats: dict[str, Tensor] | None = None,  # name -> (B,) ints, 0 = unknown
        history_items: Tensor | None = None,  # (B, S) item ids, used when item_vocab > 0
        context: Tensor | None = None,  # (B, context_width) descriptor ids, then anchors
        with_tail: bool = True,  # False: the caller runs the tail per prefix itself
    ) -> Encoded:
        cfg = self.cfg
        b, s, L = history.shape
        offsets = torch.arange(L, device=history.device) * cfg.codebook_size
        x = self.code_emb(history.clamp(min=0) + offsets).sum(dim=2)  # (B, S, D)
        if self.item_emb is not None and history_items is not None:
            known = (history_items > 0) & (history_items < cfg.item_vocab)
            x = x + self.item_emb(history_items * known)  # row 0 (padding, unseen) is zero
        # Position = ordinal from the oldest item in view, so a prefix of a window and the
        # same items encoded on their own get the same positions.
        pos = (history_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        x = x + self.hist_pos(pos)
        user = self.user_token.expand(b, -1)
        for name, emb in self.user_emb.items():
            if user_feats is not None and name in user_feats:
                user = user + emb(user_feats[name])
        x = torch.cat([user[:, None], x], dim=1)  # (B, 1+S, D)
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), history_mask], 1)
        mask = keep[:, None, None, :]  # (B, 1, 1, 1+S)
        causal = torch.ones(s + 1, s + 1, dtype=torch.bool, device=x.device).tril()
        self_mask = mask & causal  # padding keys masked; the user token is always visible
        x = self.drop(x)
        layer_kv = [] if cfg.has_tail else None
        for layer in self.enc_layers:
            if layer_kv is not None:
                layer_kv.append(layer.attn.project_kv(layer.ln1(x)))
            x = layer(x, self_mask)
        memory = self.enc_ln(x)
        cross = [layer.cross_attn.project_kv(memory) for layer in self.dec_layers]
        # Histories are left-padded, so the latest item sits last; with no history at all
        # that slot is padding and the user token stands in.
        has_items = history_mask.any(dim=1)
        summary = torch.where(has_items[:, None], memory[:, -1], memory[:, 0])
        enc = Encoded(memory, mask, cross, summary, layer_kv)
        if cfg.has_tail and with_tail:
            ctx = None if context is None else context[:, None]
            enc.summary = self.reason(enc, keep[:, None, :], ctx)[:, 0]
        return enc

    def next_item_logits(self, enc: Encoded) -> Tensor:
        """(B, item_vocab) logits of the next item from the encoder state: the head the
        auxiliary loss (``next_item_weight``) trains."""
        assert self.item_emb is not None, "next-item logits need item_vocab > 0"
        return enc.summary @ self.item_emb.weight.T

    def context_tokens(self, context: Tensor | None, shape: tuple[int, int]) -> list[Tensor]:
        """(B, C, context_width) ids -> the context's tail tokens, each (B, C, D): the
        descriptors' adapter token, then one per anchor. No context given: every field
        unknown and no anchors (the tokens still come, so the shapes stay put)."""
        cfg = self.cfg
        b, c = shape
        if context is None:
            device = self.user_token.device
            context = torch.zeros(b, c, cfg.context_width, dtype=torch.long, device=device)
        if context.shape[-1] != cfg.context_width:
            raise ValueError(
                f"context has {context.shape[-1]} columns; the model takes "
                f"{len(cfg.context_fields)} descriptor fields + {cfg.anchors} anchors"
            )
        out = []
        if cfg.context_fields:
            x = sum(
                emb(context[..., i].clamp(0, emb.num_embeddings - 1))
                for i, emb in enumerate(self.ctx_emb.values())
            )
            out.append(self.ctx_adapter(x))
        f = len(cfg.context_fields)
        for a in range(cfg.anchors):
            item = context[..., f + a]
            known = (item > 0) & (item < cfg.item_vocab)  # 0 (no anchor) gives a zero token
            out.append((self.item_vectors(item) + self.anchor_type) * known[..., None])
        return out

    def reason(self, enc: Encoded, visible: Tensor, context: Tensor | None = None) -> Tensor:
        """The tail after the history: (B, C, D) the state after the context's tokens
        (``context`` (B, C, context_width)) and then ``latent_steps`` steps, from each of C
        starting states ``enc.summary`` (B, [C,] D). The tail of (b, c) sees the encoder
        positions ``visible[b, c]`` (B, C, S) and its own earlier tail tokens; a latent
        step's input is the previous token's last hidden state."""
        assert enc.layer_kv is not None
        state = enc.summary if enc.summary.dim() == 3 else enc.summary[:, None]
        b, c, d = state.shape
        heads = self.cfg.heads
        hd = d // heads
        mem_mask = visible[:, None]  # (B, 1, C, S)
        past: list[list[tuple[Tensor, Tensor]]] = [[] for _ in self.enc_layers]
        given = self.context_tokens(context, (b, c)) if self.cfg.context_width else []
        for step in range(len(given) + self.cfg.latent_steps):
            if step < len(given):
                x = self.drop(given[step])
            else:  # the last hidden state, fed back
                x = state + self.latent_pos.weight[step - len(given)]
            for i, layer in enumerate(self.enc_layers):
                attn = layer.attn
                h = layer.ln1(x)
                q = attn._split(attn.q(h))  # (B, H, C, hd)
                k_new, v_new = attn.project_kv(h)  # (B, H, C, hd): this step, per query
                past[i].append((k_new, v_new))
                k_mem, v_mem = enc.layer_kv[i]  # (B, H, S, hd)
                mem = (q @ k_mem.transpose(-1, -2)) / math.sqrt(hd)  # (B, H, C, S)
                mem = mem.masked_fill(~mem_mask, float("-inf"))
                k_lat = torch.stack([k for k, _ in past[i]], dim=3)  # (B, H, C, j, hd)
                v_lat = torch.stack([v for _, v in past[i]], dim=3)
                lat = (q[..., None, :] * k_lat).sum(-1) / math.sqrt(hd)  # (B, H, C, j)
                p = torch.cat([mem, lat], dim=-1).softmax(dim=-1)
                s = mem.shape[-1]
                y = p[..., :s] @ v_mem + (p[..., s:, None] * v_lat).sum(dim=-2)
                y = attn.out(y.transpose(1, 2).reshape(b, c, d))
                x = x + layer.drop(y)
                x = x + layer.ffn(layer.ln2(x))
            state = self.enc_ln(x)
        return state

    # ------------------------------------------------------------------ decoder
    def target_tokens(self, codes: Tensor) -> Tensor:
        """(B, M, L) codes → (B, M*L) decoder token ids (without the start token)."""
        b, m, L = codes.shape
        offsets = torch.arange(L, device=codes.device) * self.cfg.codebook_size
        return (codes + offsets + 1).reshape(b, m * L)

    def decode(
        self,
        enc: Encoded,
        tokens: Tensor,  # (B, T) or (B, C, T) decoder input ids, from the start token on
        start_pos: int = 0,
        caches: list[dict] | None = None,
        past: Tensor | None = None,  # (B, [C,] P) tokens before ``tokens``: for leaf_logits
    ) -> Tensor:
        """Level-wise logits (B, [C,] T, K). Target position ``start_pos + t`` predicts
        the code of level (start_pos + t) % L. With (B, C, T) tokens, C sequences share
        request b's encoder output (teacher-forced scoring of candidates). With
        ``leaf_logits`` an incremental step that completes an item needs ``past``, the
        tokens decoded before (at least the item's first L-1)."""
        cfg = self.cfg
        t = tokens.shape[-1]
        pos = torch.arange(start_pos, start_pos + t, device=tokens.device)
        cond = self.dec_cond(enc.summary)  # (B, D), or (B, C, D) with per-sequence prefixes
        cond = cond.view(*cond.shape[:-1], *([1] * (tokens.dim() - cond.dim() + 1)), cfg.dim)
        x = self.drop(self.dec_tok(tokens) + self.dec_pos(pos) + cond)
        for i, layer in enumerate(self.dec_layers):
            x = layer(x, enc.cross_kv[i], enc.mask, None if caches is None else caches[i])
        h = self.dec_ln(x)
        levels = pos % cfg.levels  # (T,)
        weight = self.head.weight.view(cfg.levels, cfg.codebook_size, cfg.dim)[levels]
        logits = torch.einsum("...td,tkd->...tk", h, weight)  # (B, [C,] T, K)
        if cfg.leaf_logits or cfg.tree_logits:
            logits = logits + self._prefix_terms(h, tokens, start_pos, past)
        return logits

    def forward(
        self,
        history: Tensor,
        history_mask: Tensor,
        target: Tensor,  # (B, M, L) codes of the next session, or (B, C, M, L): see below
        target_mask: Tensor | None = None,  # (B, [C,] M) bool: which target items count
        user_feats: dict[str, Tensor] | None = None,
        history_items: Tensor | None = None,
        prefix_end: Tensor | None = None,  # (B, C) last visible encoder position
        target_items: Tensor | None = None,  # (B, [C,] M) ids, for next_item_weight
        context: Tensor | None = None,  # (B, [C,] context_width): each session's context
        target_weight: Tensor | None = None,  # (B, [C,] M) float: each target item's weight
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Next-token loss (OneRec eq. 4) plus the MoE balance loss; returns (loss, parts).

        ``target_weight`` weighs each target item's tokens (and the next-item loss by the
        first item's): the loss is the sum of weight x token loss over the kept tokens,
        divided by their count, so weights that average one keep the unweighted scale
        (reward-weighted likelihood: items users rewarded more count more). ``parts["ntp"]``
        stays the unweighted loss, comparable across rounds.

        Without ``prefix_end`` session b follows history b. With it the histories are
        windows of a user's sequence and session (b, c) follows the prefix of window b
        that ends at encoder position ``prefix_end[b, c]`` (the user token is position 0,
        window item j is 1 + j): one encoder pass trains on C sessions per window."""
        cfg = self.cfg
        lead = target.shape[:-2]  # (B,) or (B, C)
        direct = prefix_end is None
        enc = self.encode(
            history, history_mask, user_feats, history_items, context if direct else None, direct
        )
        tgt = self.target_tokens(target.reshape(-1, cfg.session_len, cfg.levels))
        tgt = tgt.view(*lead, cfg.target_len)
        if prefix_end is not None:
            assert len(lead) == 2, "prefix_end goes with (B, C, M, L) targets"
            keep = enc.mask[:, 0]  # (B, 1, S) not padding
            enc = enc.prefixes(prefix_end, cfg.target_len)
            if cfg.has_tail:  # each prefix's tail starts from its own latest item
                pos = torch.arange(enc.memory.shape[1], device=prefix_end.device)
                visible = (pos[None, None, :] <= prefix_end[:, :, None]) & keep  # (B, C, S)
                enc.summary = self.reason(enc, visible, context)
        start = torch.zeros(*lead, 1, dtype=tgt.dtype, device=tgt.device)
        logits = self.decode(enc, torch.cat([start, tgt[..., :-1]], dim=-1))  # (..., M*L, K)
        labels = target.reshape(*lead, cfg.target_len)
        if target_mask is not None:
            keep = target_mask.repeat_interleave(cfg.levels, dim=-1)
            labels = labels.masked_fill(~keep, -100)
        w = None if target_weight is None else target_weight.repeat_interleave(cfg.levels, -1)
        ntp, fit = _weighted_ce(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), w)
        aux = self.moe_aux_loss()
        loss = fit + cfg.moe_aux_weight * aux
        parts = {"ntp": ntp.detach(), "moe_aux": aux.detach()}
        if cfg.next_item_weight and target_items is not None:
            assert self.item_emb is not None
            nxt = target_items[..., 0]  # (B, [C]) the next item
            nxt = nxt.masked_fill((nxt <= 0) | (nxt >= cfg.item_vocab), -100)
            logits_item = self.next_item_logits(enc)  # (B, [C,] V)
            w0 = None if target_weight is None else target_weight[..., 0]
            item_loss, item_fit = _weighted_ce(
                logits_item.reshape(-1, cfg.item_vocab), nxt.reshape(-1), w0
            )
            loss = loss + cfg.next_item_weight * item_fit
            parts["next_item"] = item_loss.detach()
        if cfg.contrastive_head and target_items is not None:
            nxt = target_items[..., 0].reshape(-1)
            valid = (nxt > 0) & (nxt < cfg.item_vocab)
            if valid.any():
                user = self.user_vectors(enc).reshape(-1, cfg.dim)[valid]
                nce, bce = self.contrastive_losses(user, nxt[valid])
                loss = loss + cfg.infonce_weight * nce + cfg.bce_weight * bce
                parts["infonce"], parts["bce"] = nce.detach(), bce.detach()
        return loss, parts

    # ------------------------------------------------------------------ contrastive head
    def item_vectors(self, items: Tensor, codes: Tensor | None = None) -> Tensor:
        """(...,) item ids -> (..., D): the id embedding (ids the model knows) plus the sum
        of the SID code embeddings; ``codes`` (..., L) for items the model's table lacks
        (cold start), else they are read from it."""
        cfg = self.cfg
        assert self.item_emb is not None
        known = (items > 0) & (items < cfg.item_vocab)
        if codes is None:
            codes = self.item_codes[items * known]
        offsets = torch.arange(cfg.levels, device=codes.device) * cfg.codebook_size
        vec = self.code_emb(codes.clamp(min=0) + offsets).sum(dim=-2)
        return vec + self.item_emb(items * known)

    def user_vectors(self, enc: Encoded) -> Tensor:
        """(B, [C,] D) the user vectors of the contrastive head."""
        if not self.cfg.contrastive_head:
            raise ValueError(
                "this model has no contrastive head (trained with infonce_weight = "
                "bce_weight = 0): InfoNCE scores and cascade re-ranking need one"
            )
        return self.user_head(enc.summary)

    def contrastive_scores(
        self, enc: Encoded, items: Tensor, codes: Tensor | None = None
    ) -> Tensor:
        """(B, C) logits u · v(item) / temperature for C candidates per request
        (``items`` (B, C)), or for the same C candidates for every request (``items``
        (C,), e.g. the whole catalogue)."""
        user = self.user_vectors(enc)  # (B, D)
        vec = self.item_vectors(items, codes)  # (B, C, D) or (C, D)
        if vec.dim() == 2:
            return user @ vec.T / self.cfg.infonce_temperature
        return torch.einsum("bd,bcd->bc", user, vec) / self.cfg.infonce_temperature

    def contrastive_losses(self, user: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
        """InfoNCE and BCE of user vectors (N, D) against their positives (N,): the logits
        of each row are over every row's positive (in-batch) and ``infonce_negatives``
        uniformly drawn items; a candidate equal to the row's positive (other than its own
        slot) is masked, so an item is never its own negative."""
        cfg = self.cfg
        n = positive.shape[0]
        drawn = torch.randint(1, cfg.item_vocab, (cfg.infonce_negatives,), device=user.device)
        cand = torch.cat([positive, drawn])  # (N + S,)
        logits = user @ self.item_vectors(cand).T / cfg.infonce_temperature  # (N, N + S)
        rows = torch.arange(n, device=user.device)
        own = torch.zeros_like(logits, dtype=torch.bool)
        own[rows, rows] = True
        clash = (cand[None, :] == positive[:, None]) & ~own
        nce = F.cross_entropy(logits.masked_fill(clash, float("-inf")), rows)
        negative = ~own & ~clash
        bce_pos = F.softplus(-logits[rows, rows]).mean()  # -log sigmoid(s+)
        bce_neg = (F.softplus(logits) * negative).sum() / negative.sum().clamp(min=1)
        return nce, bce_pos + bce_neg

    # ------------------------------------------------------------------ MoE reporting
    def moe_layers(self) -> list[MoEFFN]:
        return [layer.ffn for layer in self.dec_layers if isinstance(layer.ffn, MoEFFN)]

    def moe_aux_loss(self) -> Tensor:
        losses = [m.last.aux_loss for m in self.moe_layers() if m.last is not None]
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def expert_utilisation(self) -> list[list[float]]:
        """Share of token assignments per expert, per MoE layer, in the last call."""
        out = []
        for m in self.moe_layers():
            if m.last is not None:
                c = m.last.counts
                out.append((c / c.sum().clamp(min=1)).tolist())
        return out

    def num_params(self) -> dict[str, int]:
        """Total parameters and those active per decoder token (top-k of E experts)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for m in self.moe_layers():
            per_expert = sum(p[0].numel() for p in (m.w_up, m.b_up, m.w_down, m.b_down))
            inactive += per_expert * (m.experts_n - m.top_k)
        return {"total": total, "active": total - inactive}
