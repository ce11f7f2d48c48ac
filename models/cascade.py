"""Cascade inference (OnePiece): beam search proposes, the contrastive head re-scores.
(``head="item"``: the encoder's next-item head re-scores instead, the ``hybrid`` scoring;
a log-softmax over the candidates orders them as one over the catalogue would.)

The generative score of a candidate is log p(its SID | history, ...) from the decoder; the
contrastive score is u · v(item) from the InfoNCE head (``OneRec.contrastive_scores``).
The two live on different scales, so the contrastive logits are first turned into a
log-softmax over the request's candidates; the blend is

    score = log p_SID(item) + weight * log softmax_candidates(u · v(item))

``weight = 0`` orders by the beam's score alone; a large weight orders by the head alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.beam_search import NEG_INF, Beams
from models.onerec import Encoded, OneRec


def blend(sid: Tensor, contrastive: Tensor, valid: Tensor, weight: float) -> Tensor:
    """(B, C) blended scores of C candidates; -inf where ``valid`` is False."""
    logits = contrastive.masked_fill(~valid, NEG_INF)
    log_p = logits.log_softmax(dim=-1)
    out = sid + weight * log_p
    return out.masked_fill(~valid, NEG_INF)


@dataclass
class CascadeSessions:
    items: Tensor  # (B, M) item ids, best first; -1 where fewer candidates than M
    scores: Tensor  # (B, M) blended scores
    sid_scores: Tensor  # (B, M) the beam's log p of each item
    contrastive: Tensor  # (B, M) the re-scoring head's logit of each item
    candidates: Tensor  # (B,) distinct items the beams proposed


@torch.no_grad()
def rerank_beams(
    model: OneRec,
    enc: Encoded,
    beams: Beams,
    codes: Tensor,  # (max_item + 1, L) the SIDs by item id (cold items included)
    weight: float = 1.0,
    session_len: int | None = None,
    head: str = "contrastive",
) -> CascadeSessions:
    """The session of the best ``session_len`` distinct items among every beam's items.

    An item that several beams hold keeps its best generative score (its log p given the
    history and the items before it in that beam). Only items the beams emitted can come
    back, so every item is in the trie and the beams' exclusions hold."""
    B, W, M = beams.items.shape
    m = session_len or M
    flat = beams.items.reshape(B, W * M)
    lp = beams.item_scores.reshape(B, W * M).masked_fill(flat <= 0, NEG_INF)
    width = int(codes.shape[0])
    best = torch.full((B, width), NEG_INF, device=lp.device)
    best = best.scatter_reduce(1, flat.clamp(min=0), lp, "amax")
    best[:, 0] = NEG_INF
    c = min(W * M, width - 1)
    sid, cand = best.topk(c, dim=1)  # distinct candidates, by generative score
    valid = sid > NEG_INF
    cand = torch.where(valid, cand, torch.zeros_like(cand))
    if head == "contrastive":
        logits = model.contrastive_scores(enc, cand, codes[cand])  # (B, C)
    elif head == "item":
        logits = model.next_item_logits(enc).gather(1, cand.clamp(max=model.cfg.item_vocab - 1))
    else:
        raise ValueError(f"unknown head {head!r}: contrastive or item")
    scores = blend(sid, logits, valid, weight)
    k = min(m, c)
    top, idx = scores.topk(k, dim=1)
    alive = top > NEG_INF
    pad = m - k
    items = torch.where(alive, cand.gather(1, idx), torch.full_like(idx, -1))

    def padded(x: Tensor, fill: float) -> Tensor:
        return torch.nn.functional.pad(x, (0, pad), value=fill) if pad else x

    return CascadeSessions(
        items=padded(items, -1),
        scores=padded(top, NEG_INF),
        sid_scores=padded(sid.gather(1, idx), NEG_INF),
        contrastive=padded(logits.gather(1, idx), NEG_INF),
        candidates=valid.sum(dim=1),
    )


@torch.no_grad()
def rerank_scores(
    sid: Tensor,  # (B, C) generative scores of C candidates
    contrastive: Tensor,  # (B, C) the head's logits of the same candidates
    eligible: Tensor,  # (B, C) bool: may be proposed (not padding, not excluded)
    proposals: int,
    weight: float = 1.0,
) -> Tensor:
    """Scores of a whole ranking under the cascade (offline evaluation): the ``proposals``
    best eligible candidates by generative score (what a beam of that width keeps for the
    first item, exactly) are ordered by the blend and placed above the rest, which keep
    their generative order. Ineligible candidates keep their generative score (the caller
    masks them), below every proposal."""
    masked = sid.masked_fill(~eligible, NEG_INF)
    k = min(proposals, sid.shape[1])
    top, idx = masked.topk(k, dim=1)
    chosen = torch.zeros_like(eligible).scatter(1, idx, top > NEG_INF)
    mixed = blend(sid, contrastive, chosen, weight)
    # The rest: below every proposal, in generative order (log p is finite, > -1e4).
    rest = sid - 1e4
    return torch.where(chosen, mixed, rest)
