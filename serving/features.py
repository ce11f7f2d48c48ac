"""Per-request user features from the Feast online store, degraded rather than failed.

A lookup that errors or takes longer than ``timeout_s`` returns what is known (an empty
history: the user gets a cold-start session) and is counted. After a failure the store
is left alone for ``backoff_s`` so an unreachable store costs each request nothing
instead of a timeout each (no storm of slow requests or 5xx).

Lookups run one at a time on a thread of their own. Feast's SQLite store shares one
connection, so concurrent lookups would queue there anyway; against a locked database
they queued for its busy timeout (5 s) each, and the router stopped answering anything,
``/healthz`` included, for 15 s (found by the fault test). Now requests wait on the
event loop instead, and one whose lookup did not start in time is cancelled unrun.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from features.reads import (
    CLICKS_FEATURE,
    HISTORY_FEATURE,
    PROFILE_FEATURES,
    item_clicks,
    user_profiles,
)
from recloop.config import StackConfig

# The feature references and the batch reads (item_clicks, user_profiles) are
# features.reads', shared with training; re-exported here for existing imports.
__all__ = [
    "CLICKS_FEATURE",
    "HISTORY_FEATURE",
    "PROFILE_FEATURES",
    "FeatureClient",
    "UserFeatures",
    "item_clicks",
    "user_profiles",
]


@dataclass
class UserFeatures:
    history: list[int] = field(default_factory=list)  # raw item ids, oldest first
    profile: dict[str, Any] = field(default_factory=dict)  # age, gender, occupation if known
    source: str = "feast"  # feast | missing (unknown user) | degraded (store failed)


def _view(ref: str) -> tuple[str, str]:
    view, name = ref.split(":")
    return view, name


_HISTORY = _view(HISTORY_FEATURE)  # (view, feature)
_PROFILE = (_view(PROFILE_FEATURES[0])[0], [_view(f)[1] for f in PROFILE_FEATURES])
assert all(_view(f)[0] == _PROFILE[0] for f in PROFILE_FEATURES), "one profile view"


class FeatureClient:
    def __init__(self, cfg: StackConfig, timeout_s: float = 0.5, backoff_s: float = 5.0):
        self.cfg = cfg
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self._store: Any = None
        self._reader: Any = None
        self._open_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feast-lookup")
        self._skip_until = 0.0
        self.counts = {"lookups": 0, "found": 0, "missing": 0, "errors": 0, "skipped": 0}
        self.last_error: str | None = None

    def _open(self) -> Any:
        with self._open_lock:
            if self._store is None:
                from features.store import open_store

                self._store = open_store(self.cfg)
            return self._store

    def _lookup(self, user_id: int) -> tuple[list[int] | None, dict[str, Any]]:
        """The user's history (None: unknown user) and profile, read straight from the
        online store (``features.store.OnlineReader``: one read per feature view, without
        ``get_online_features``' per-call registry and response work, which was most of
        the router's CPU per request). ``_lookup_reference`` is its twin."""
        if self._reader is None:
            from features.store import OnlineReader

            self._reader = OnlineReader(self._open())
        (hist,) = self._reader.read(_HISTORY[0], [int(user_id)], [_HISTORY[1]])
        (prof,) = self._reader.read(_PROFILE[0], [int(user_id)], _PROFILE[1])
        items = hist[_HISTORY[1]]
        profile = {n: v for n, v in prof.items() if v is not None}
        return (None if items is None else [int(i) for i in items]), profile

    def _lookup_reference(self, user_id: int) -> tuple[list[int] | None, dict[str, Any]]:
        """``_lookup`` through Feast's ``get_online_features``."""
        store = self._open()
        out = store.get_online_features(
            features=[HISTORY_FEATURE, *PROFILE_FEATURES], entity_rows=[{"user_id": int(user_id)}]
        ).to_dict()
        items = out.get("item_ids", [None])[0]
        names = (f.split(":")[1] for f in PROFILE_FEATURES)
        profile = {n: out[n][0] for n in names if out.get(n, [None])[0] is not None}
        return (None if items is None else [int(i) for i in items]), profile

    async def user(self, user_id: int) -> UserFeatures:
        self.counts["lookups"] += 1
        if time.monotonic() < self._skip_until:
            self.counts["skipped"] += 1
            return UserFeatures(source="degraded")
        try:
            loop = asyncio.get_running_loop()
            items, profile = await asyncio.wait_for(
                loop.run_in_executor(self._pool, self._lookup, user_id), timeout=self.timeout_s
            )
        except Exception as exc:  # store unreachable, slow or broken: serve what is known
            self.counts["errors"] += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            self._skip_until = time.monotonic() + self.backoff_s
            return UserFeatures(source="degraded")
        if items is None:
            self.counts["missing"] += 1
            return UserFeatures(profile=profile, source="missing")
        self.counts["found"] += 1
        return UserFeatures(history=items, profile=profile)

    def warm_up(self) -> None:
        """Open the store and make one lookup now: the first open imports Feast and the
        first read loads its registry (seconds), beyond a request's lookup timeout."""
        try:
            self._open()
            self._lookup(0)  # no such user: the answer is empty, the store is warm
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "last_error": self.last_error}
