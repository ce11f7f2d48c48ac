"""One arm's model in a serving process: its version, batching, loading and fallback.

``ArmEngine`` is what answers an arm's requests wherever it runs: in a ``Recommender``
replica of its own (``serve.topology: split``) or, one per arm, inside the ingress
replica (``inline``, one process hop less per request). Either way:

- requests are batched continuously (``serving.batcher``) into one beam search, run in
  a worker thread;
- a new version loads on a thread of its own at background priority, generates once
  (the decode-time weight layouts are built then, and a version that cannot answer is
  never swapped in), and is swapped in with one assignment; requests in flight finish
  on the model they started with;
- a version that does not load leaves the arm on the one it serves; an engine with
  nothing to keep (a replica started after its version went bad) serves the newest of
  the arm's versions that still loads. Each arm has its own engine, so one arm's bad
  version never touches another's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from recloop.config import StackConfig
from recloop.inference import BaselineModel, LoadedModel
from recloop.priority import lower_this_thread
from serving.batcher import ContinuousBatcher

log = logging.getLogger("recloop.serve")

# A request with no history: what an engine generates once for a new version before it
# swaps it in.
WARM_REQUEST = {
    "history": [],
    "profile": {},
    "tags": {},
    "session_size": None,
    "exclude_seen": True,
}


def has_anchors(model: Any) -> bool:
    ctx = getattr(model, "context", None)
    return ctx is not None and ctx.anchors > 0


class ArmEngine:
    """An arm's model: ``await set_version(v)``, ``await generate(request)``, ``info()``."""

    def __init__(
        self, cfg: StackConfig, arm: str, lineage: str, scoring: dict | None = None
    ) -> None:
        from recloop.registry import ModelRegistry

        self.scoring = dict(scoring or {"scoring": "beam"})
        self.cfg = cfg
        torch.set_num_threads(cfg.serve.torch_threads)
        self.arm, self.lineage = arm, lineage
        self.registry = ModelRegistry(cfg.registry_uri)
        self.model: LoadedModel | BaselineModel | None = None
        self.load_error: str | None = None
        self.swaps = 0
        # Anchor popularity of a context-trained model: Feast's clicks, re-read off the
        # request path every serve.anchor_refresh_s.
        self._store: Any = None
        self._anchor_task: asyncio.Task | None = None
        self.anchors: dict[str, Any] = {"items_clicked": 0, "refreshed_at": None, "error": None}
        self.batcher = ContinuousBatcher(self._run_batch, cfg.serve.max_batch_size)
        # New versions load on a thread of their own at background priority: a promotion
        # shares the process's CPU with its requests, and the requests come first.
        self._loader = ThreadPoolExecutor(
            1,
            thread_name_prefix=f"model-load-{arm}",
            initializer=lower_this_thread,
            initargs=(cfg.priority.background_nice,),
        )

    # ------------------------------------------------------------------ versions
    async def set_version(self, version: str | None) -> None:
        """Serve ``version`` (None or the one served: nothing to do)."""
        if not version or (self.model is not None and self.model.version == version):
            return
        loop = asyncio.get_running_loop()
        try:  # load beside the serving model; swap only a complete, valid one
            loaded = await loop.run_in_executor(self._loader, self._load, version)
        except Exception as exc:
            self.load_error = f"{version}: {type(exc).__name__}: {exc}"[:500]
            log.error("arm %s: keeping %s, cannot load %s", self.arm, self.version(), exc)
            if self.model is None:  # nothing to keep: the last good one
                await loop.run_in_executor(self._loader, self._fall_back, version)
                self._keep_anchors_fresh()
            return
        self.model = loaded  # one reference assignment: atomic for requests
        self.load_error = None
        self.swaps += 1
        self._keep_anchors_fresh()

    def version(self) -> str | None:
        return None if self.model is None else self.model.version

    def set_max_batch(self, n: int | None) -> None:
        """The batch limit from now on (None: ``serve.max_batch_size``); the batch that
        runs finishes as it is."""
        self.batcher.set_max_batch(self.cfg.serve.max_batch_size if n is None else int(n))

    def _keep_anchors_fresh(self) -> None:
        if self._anchor_task is None and has_anchors(self.model):
            self._anchor_task = asyncio.get_running_loop().create_task(self._refresh_anchors())

    def _load(self, version: str) -> LoadedModel:
        path = self.registry.fetch(self.lineage, version)
        loaded = LoadedModel.load(str(path), version, self.scoring.get("scoring", "beam"))
        if has_anchors(loaded):  # swapped in with live popularity, not last training's
            self._read_popularity(loaded)
        loaded.generate([dict(WARM_REQUEST, request_time_s=time.time())], 1, self.scoring)
        return loaded

    def _read_popularity(self, model: LoadedModel) -> None:
        """Add Feast's item clicks to ``model``'s anchor popularity; a store that cannot
        be read leaves it as it was (the checkpoint's counts at first) and is reported."""
        from features.reads import item_clicks

        try:
            if self._store is None:
                from features.store import open_store

                self._store = open_store(self.cfg)
            clicked = model.update_popularity(item_clicks(self._store, model.to_data[1:]))
        except Exception as exc:
            self.anchors["error"] = f"{type(exc).__name__}: {exc}"[:300]
            return
        self.anchors.update(
            {"items_clicked": clicked, "refreshed_at": time.time(), "version": model.version}
        )
        self.anchors["error"] = None

    async def _refresh_anchors(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.serve.anchor_refresh_s)
            model = self.model
            if has_anchors(model):
                await asyncio.to_thread(self._read_popularity, model)

    def _fall_back(self, failed: str) -> None:
        """Serve the newest version of the arm's history that still verifies and loads,
        the registry's current one first, as the engines that were running already do."""
        try:
            candidates = [
                self.registry.current(self.arm),
                *reversed(self.registry.served(self.arm)),
            ]
        except Exception as exc:
            log.error("arm %s: no fallback, the registry is unreadable: %s", self.arm, exc)
            return
        for version in dict.fromkeys(v for v in candidates if v and v != failed):
            try:
                self.model = self._load(version)
            except Exception as exc:
                log.error("arm %s: fallback %s does not load either: %s", self.arm, version, exc)
                continue
            self.load_error = f"{self.load_error}; serving {version} instead"[:500]
            self.swaps += 1
            return

    # ------------------------------------------------------------------ requests
    def _run_batch(self, requests: list[dict]) -> list[dict]:
        """One batched generation (in the batcher's worker thread)."""
        model = self.model  # the whole batch runs on one model
        if model is None:
            err = {"error": f"arm {self.arm!r} has no model version yet (promote one)"}
            return [err for _ in requests]
        return model.generate(requests, self.cfg.serve.beam_width, self.scoring)

    async def generate(self, request: dict) -> dict:
        return await self.batcher.submit(request)

    def info(self) -> dict:
        return {
            "model_version": self.version(),
            "scoring": self.scoring.get("scoring", "beam"),
            "load_error": self.load_error,
            "swaps": self.swaps,
            **self.batcher.stats(),  # batches, mean_batch, queued, busy
            "context": self._context_info(),
        }

    def _context_info(self) -> dict | None:
        """What a context-trained model reads per request (None: no context)."""
        ctx = getattr(self.model, "context", None)
        if ctx is None:
            return None
        out: dict[str, Any] = {"fields": list(ctx.fields), "anchors": ctx.anchors}
        if ctx.anchors:
            out["popularity"] = dict(self.anchors)
        return out
