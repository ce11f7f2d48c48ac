"""OneRec at inference: the ranker behind the evaluation harness's ``Ranker`` protocol, and
the tables and padding it (and serving, training, the DPO sampler) build inputs with.

Pure torch on ``models.*``: serving loads checkpoints into an ``OneRecRanker`` without
importing any training code (``recloop.inference``), and ``pipelines.offline.train_onerec``
validates with the same class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.beam_search import CompiledTrie, beam_search, score_all_items, score_items
from models.cascade import rerank_scores
from models.onerec import OneRec
from models.tokenizer import SemanticIdTokenizer


def code_table(tokenizer: SemanticIdTokenizer, num_items: int) -> torch.Tensor:
    """(num_items + 1, L) codes by item id; row 0 (padding) is zeros."""
    table = torch.zeros(num_items + 1, tokenizer.levels, dtype=torch.long)
    table[1:] = tokenizer.codes(list(range(1, num_items + 1)))
    return table


def pad_histories(histories: Sequence[Sequence[int]], max_history: int) -> torch.Tensor:
    out = torch.zeros(len(histories), max_history, dtype=torch.long)
    for i, h in enumerate(histories):
        h = list(h)[-max_history:]
        if h:
            out[i, max_history - len(h) :] = torch.tensor(h)
    return out


SCORINGS = ("sid", "infonce", "cascade", "item", "hybrid")
HEAD_SCORINGS = ("infonce", "cascade")  # need the contrastive head
ITEM_SCORINGS = ("item", "hybrid")  # need the encoder's next-item head


class OneRecRanker:
    """OneRec behind the evaluation harness's ``Ranker`` protocol.

    ``scoring`` says what an item's score is: ``sid`` (default), log p(its SID as the
    first item of the next session | history); ``infonce``, the contrastive head's logit
    u · v(item); ``cascade``, the ``cascade_candidates`` best items by SID score (those a
    beam of that width keeps), re-ordered by the blend of both scores (``models/cascade``)
    and placed above the rest; ``item``, the log-softmax over the catalogue of the
    encoder's next-item head (the auxiliary loss ``next_item_weight`` trains); ``hybrid``,
    log p(SID) + ``hybrid_weight`` · that, over every item (one model, two heads)."""

    def __init__(
        self,
        model: OneRec,
        codes: torch.Tensor,
        batch_size: int = 64,
        scoring: str = "sid",
        cascade_weight: float = 1.0,
        cascade_candidates: int = 32,
        trie: CompiledTrie | None = None,
        hybrid_weight: float = 1.0,
    ) -> None:
        if scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {scoring!r}; known: {', '.join(SCORINGS)}")
        if scoring in HEAD_SCORINGS and not model.cfg.contrastive_head:
            raise ValueError(
                f"scoring {scoring!r} needs the contrastive head: train with "
                "infonce_weight > 0 (or bce_weight > 0)"
            )
        if scoring in ITEM_SCORINGS and not (model.cfg.next_item_weight and model.cfg.item_vocab):
            raise ValueError(
                f"scoring {scoring!r} needs the next-item head: train with next_item_weight > 0"
            )
        if cascade_candidates < 1:
            raise ValueError("cascade_candidates must be >= 1")
        self.model = model.eval()
        self.codes = codes  # (N + 1, L)
        self.batch_size = batch_size
        self.scoring = scoring
        self.cascade_weight = float(cascade_weight)
        self.cascade_candidates = int(cascade_candidates)
        self.hybrid_weight = float(hybrid_weight)
        n = codes.shape[0] - 1
        self.trie = trie or CompiledTrie(codes[1:], torch.arange(1, n + 1), model.cfg.codebook_size)

    def with_scoring(self, scoring: str, **kw) -> OneRecRanker:
        """The same model and trie under another scoring."""
        args = {
            "cascade_weight": self.cascade_weight,
            "cascade_candidates": self.cascade_candidates,
            "hybrid_weight": self.hybrid_weight,
            **kw,
        }
        out = OneRecRanker(self.model, self.codes, self.batch_size, scoring, trie=self.trie, **args)
        for kept in ("train_info", "test_contexts", "val_contexts"):
            if hasattr(self, kept):
                setattr(out, kept, getattr(self, kept))
        return out

    def encode(self, histories: Sequence[Sequence[int]], contexts=None):
        items = pad_histories(histories, self.model.cfg.max_history)
        ctx = None if contexts is None else torch.as_tensor(contexts, dtype=torch.long)
        return self.model.encode(self.codes[items], items > 0, history_items=items, context=ctx)

    def _contrastive(self, enc, cand: torch.Tensor | None) -> torch.Tensor:
        if cand is None:  # every item: (B, N + 1), column 0 padding
            out = self.model.contrastive_scores(enc, torch.arange(len(self.codes)), self.codes)
            out[:, 0] = float("-inf")
            return out
        return self.model.contrastive_scores(enc, cand, self.codes[cand])

    def _next_item(self, enc, cand: torch.Tensor | None) -> torch.Tensor:
        """log softmax over the catalogue of the next-item head, (B, N + 1) or (B, C)."""
        n_items = self.codes.shape[0] - 1
        logits = self.model.next_item_logits(enc)[:, : n_items + 1].clone()
        logits[:, 0] = float("-inf")
        logp = torch.log_softmax(logits, dim=-1)
        return logp if cand is None else logp.gather(1, cand)

    @torch.no_grad()
    def score(
        self,
        histories: list[list[int]],
        candidates: torch.Tensor | None,
        contexts: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """Scores (B, N + 1) or (B, C) for ``candidates``; ``contexts``, one row per
        history, for a model that takes a context."""
        n_items = self.codes.shape[0] - 1
        outs = []
        for s in range(0, len(histories), self.batch_size):
            part = histories[s : s + self.batch_size]
            enc = self.encode(part, None if contexts is None else contexts[s : s + self.batch_size])
            cand = None if candidates is None else candidates[s : s + self.batch_size]
            if self.scoring == "infonce":
                outs.append(self._contrastive(enc, cand))
                continue
            if self.scoring == "item":
                outs.append(self._next_item(enc, cand))
                continue
            if cand is None:  # every item: walk the trie once per SID prefix
                sid = score_all_items(self.model, enc, self.trie)[:, : n_items + 1]
            else:
                sid = score_items(self.model, enc, self.codes[cand])
            if self.scoring == "sid":
                outs.append(sid)
                continue
            if self.scoring == "hybrid":  # items outside the trie stay at -inf
                item = self._next_item(enc, cand)
                never = torch.isneginf(item)  # the padding id (0 · -inf would be NaN)
                hyb = sid + self.hybrid_weight * item.masked_fill(never, 0.0)
                outs.append(hyb.masked_fill(never, float("-inf")))
                continue
            eligible = torch.isfinite(sid)
            for b, h in enumerate(part):  # the history never takes a proposal's place
                seen = torch.tensor(list(h), dtype=torch.long)
                if cand is None:
                    eligible[b, seen[(seen >= 0) & (seen <= n_items)]] = False
                else:
                    eligible[b] &= ~torch.isin(cand[b], seen)
            outs.append(
                rerank_scores(
                    sid,
                    self._contrastive(enc, cand),
                    eligible,
                    self.cascade_candidates,
                    self.cascade_weight,
                )
            )
        return torch.cat(outs)

    @torch.no_grad()
    def recommend(
        self, histories: list[list[int]], beam_width: int = 32, exclude_seen: bool = True
    ):
        """Top ``beam_width`` sessions per history (trie-constrained beam search)."""
        enc = self.encode(histories)
        exclude = histories if exclude_seen else None
        return beam_search(self.model, enc, self.trie, beam_width, exclude=exclude)
