"""Online reads of recloop's Feast features that serving and training share.

The feature references serving's per-request lookup reads (``serving.features``), and the
batch reads a context model needs beside the request path: item clicks for its anchor
popularity (serving's replicas, the trainer's rounds) and user profiles (the trainer's
context rows). ``store`` is an open ``FeatureStore`` (``features.store.open_store``);
this module itself imports no Feast, so importing it costs nothing.
"""

from __future__ import annotations

from typing import Any

HISTORY_FEATURE = "user_history:item_ids"
CLICKS_FEATURE = "item_stats:clicks"
PROFILE_FEATURES = ("user_profile:age", "user_profile:gender", "user_profile:occupation")


def item_clicks(store: Any, item_ids: list[int]) -> dict[int, int]:
    """Clicks per item from Feast's ``item_stats`` (items it has none for are left out):
    the live part of a context model's anchor popularity."""
    out = store.get_online_features(
        features=[CLICKS_FEATURE], entity_rows=[{"item_id": int(i)} for i in item_ids]
    ).to_dict()
    return {
        int(i): int(c) for i, c in zip(out["item_id"], out["clicks"], strict=True) if c is not None
    }


def user_profiles(store: Any, user_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Feast ``user_profile`` rows of ``user_ids`` (users without one are left out)."""
    out = store.get_online_features(
        features=list(PROFILE_FEATURES), entity_rows=[{"user_id": int(u)} for u in user_ids]
    ).to_dict()
    names = [f.split(":")[1] for f in PROFILE_FEATURES]
    rows = {}
    for j, u in enumerate(out["user_id"]):
        row = {n: out[n][j] for n in names if out[n][j] is not None}
        if row:
            rows[int(u)] = row
    return rows
