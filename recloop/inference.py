"""A checkpoint in its served form: what serving's replicas, the training gate and the DPO
sampler load from the registry and generate sessions with.

``LoadedModel.load`` reads any served checkpoint (``recloop.checkpoint``): a OneRec one
becomes a ``models.ranker.OneRecRanker`` plus the data <-> model item-id maps (and, for a
model trained with context engineering, its ``ContextBuilder``); a baseline arm
(popularity, random) a ``BaselineModel`` behind the same ``generate``. Ground floor: on
``models/`` and ``recloop.checkpoint`` / ``recloop.context`` only, so serving never
imports training code and training never imports serving to load a model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from models.beam_search import beam_search
from models.cascade import rerank_beams
from models.ranker import OneRecRanker, code_table
from recloop.checkpoint import (
    BASELINE_FORMAT,
    checkpoint_format,
    context_builder,
    load_baseline,
    load_checkpoint,
)
from recloop.context import ContextBuilder, live_popularity


@dataclass
class LoadedModel:
    """One checkpoint ready to serve: the ranker plus the item-id maps."""

    version: str
    ranker: OneRecRanker
    to_model: dict[int, int]  # data item id -> model item id
    to_data: list[int]  # model item id -> data item id (index 0 unused)
    session_len: int
    loaded_at: float
    # A model trained with context engineering: builds each request's context row (its
    # time, the user's Feast profile, anchors from the history) as in training.
    context: ContextBuilder | None = None
    base_popularity: torch.Tensor | None = None  # the checkpoint's, by model item id

    @classmethod
    def load(cls, path: str, version: str, scoring: str = "beam") -> LoadedModel | BaselineModel:
        if checkpoint_format(path) == BASELINE_FORMAT:
            return BaselineModel.load(path, version)
        ck = load_checkpoint(path)
        n = ck.tokenizer.num_items
        data_ids = ck.meta.get("item_ids") or list(range(1, n + 1))
        if len(data_ids) != n:
            raise ValueError(f"{path}: {len(data_ids)} item ids for {n} items")
        ranker = OneRecRanker(ck.model, code_table(ck.tokenizer, n))
        if scoring == "cascade" and not ck.model.cfg.contrastive_head:
            raise ValueError(
                f"{path}: the arm re-ranks by cascade but this checkpoint has no contrastive "
                "head (train it with infonce_weight > 0)"
            )
        if scoring == "hybrid" and not (ck.model.cfg.next_item_weight and ck.model.cfg.item_vocab):
            raise ValueError(
                f"{path}: the arm re-ranks by the next-item head but this checkpoint has none "
                "trained (next_item_weight > 0)"
            )
        to_data = [0, *[int(i) for i in data_ids]]
        to_model = {d: m for m, d in enumerate(to_data) if m > 0}
        loaded = cls(version, ranker, to_model, to_data, ck.model.cfg.session_len, time.time())
        if ck.model.cfg.context_width:
            loaded.context = context_builder(ck)
            loaded.base_popularity = loaded.context.popularity
        return loaded

    def update_popularity(self, clicks: dict[int, int]) -> int:
        """Anchor popularity = the checkpoint's counts + ``clicks`` (data item id ->
        clicks, from Feast); returns how many catalogue items had clicks."""
        if self.context is None or not self.context.anchors:
            return 0
        pop, clicked = live_popularity(self.base_popularity, self.to_model, clicks)
        self.context.set_popularity(pop)
        return clicked

    def contexts(self, requests: list[dict], histories: list[list[int]]) -> list[list[int]] | None:
        """Each request's context row, for a model that takes one: the request's time
        (``request_time_s``), the user's profile and the history (model ids)."""
        if self.context is None:
            return None
        return [
            self.context.row(h, r.get("request_time_s"), r.get("profile"), r.get("tags"))
            for h, r in zip(histories, requests, strict=True)
        ]

    @torch.no_grad()
    def generate(
        self, requests: list[dict], beam_width: int, scoring: dict | None = None
    ) -> list[dict]:
        histories = [
            [self.to_model[i] for i in r["history"] if i in self.to_model] for r in requests
        ]
        exclude = [h if r["exclude_seen"] else [] for h, r in zip(histories, requests, strict=True)]
        enc = self.ranker.encode(histories, self.contexts(requests, histories))
        beams = beam_search(self.ranker.model, enc, self.ranker.trie, beam_width, exclude=exclude)
        scoring = scoring or {}
        rerank = scoring.get("scoring")
        if rerank in ("cascade", "hybrid"):  # every beam's items, re-ranked by a head
            cas = rerank_beams(
                self.ranker.model,
                enc,
                beams,
                self.ranker.codes,
                weight=float(scoring.get("cascade_weight", 1.0)),
                head="contrastive" if rerank == "cascade" else "item",
            )
            sessions, item_scores = cas.items, cas.sid_scores
        else:
            sessions, item_scores = beams.items[:, 0], beams.item_scores[:, 0]
        out = []
        for b, r in enumerate(requests):
            size = min(r.get("session_size") or self.session_len, self.session_len)
            items, scores = sessions[b].tolist(), item_scores[b].tolist()
            session = [
                {"item_id": self.to_data[i], "score": float(s), "position": p}
                for p, (i, s) in enumerate(zip(items[:size], scores[:size], strict=True))
                if i > 0
            ]
            out.append({"model_version": self.version, "items": session})
        return out


@dataclass
class BaselineModel:
    """A non-learned arm (``popularity`` or ``random``) behind the same interface, so an
    A/B test can check that the model beats it through the whole serving path."""

    version: str
    kind: str
    scores: torch.Tensor  # (N,) per item, aligned with item_ids
    item_ids: torch.Tensor  # (N,) data item ids
    session_len: int
    loaded_at: float
    logp: torch.Tensor  # (N,) the score each served item reports: log p under the arm

    @classmethod
    def load(cls, path: str, version: str) -> BaselineModel:
        ck = load_baseline(path)
        ids = torch.tensor(ck.item_ids, dtype=torch.long)
        if ck.kind == "popularity":
            logp = torch.log_softmax(ck.scores, 0)
        else:  # uniform
            logp = torch.full_like(ck.scores, -math.log(len(ck.item_ids)))
        return cls(version, ck.kind, ck.scores, ids, ck.session_len, time.time(), logp)

    @torch.no_grad()
    def generate(
        self, requests: list[dict], beam_width: int, scoring: dict | None = None
    ) -> list[dict]:
        out = []
        for r in requests:
            size = min(r.get("session_size") or self.session_len, len(self.item_ids))
            if self.kind == "random":
                scores = torch.rand(len(self.item_ids))
            else:
                scores = self.scores.clone()
            if r["exclude_seen"] and r["history"]:
                seen = torch.isin(self.item_ids, torch.tensor(r["history"], dtype=torch.long))
                scores[seen] = float("-inf")
            top = torch.topk(scores, size)
            picked = [
                i
                for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)
                if v > float("-inf")
            ]
            logp = self.logp[picked].tolist()
            session = [
                {"item_id": int(self.item_ids[i]), "score": lp, "position": p}
                for p, (i, lp) in enumerate(zip(picked, logp, strict=True))
            ]
            out.append({"model_version": self.version, "items": session})
        return out
