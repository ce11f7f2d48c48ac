"""The Feast repo on the stack's store: pushes read back online, point-in-time joins."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from features import store

pytestmark = pytest.mark.integration


def test_pushed_history_and_stats_are_read_back_online(stack, feature_store):
    now = datetime.now(UTC)
    store.push(
        feature_store,
        "user_history_push",
        pd.DataFrame(
            {
                "user_id": [11, 12],
                "item_ids": [[3, 4, 5], [9]],
                "history_len": [3, 1],
                "event_timestamp": [now, now],
            }
        ),
    )
    store.push(
        feature_store,
        "user_stats_push",
        pd.DataFrame(
            {
                "user_id": [11],
                "impressions": [10],
                "clicks": [4],
                "watch_time_s": [123.5],
                "likes": [1],
                "follows": [0],
                "event_timestamp": [now],
            }
        ),
    )
    got = feature_store.get_online_features(
        features=feature_store.get_feature_service("serving_v1"),
        entity_rows=[{"user_id": 11}, {"user_id": 12}, {"user_id": 10**9}],
    ).to_dict()
    assert got["item_ids"] == [[3, 4, 5], [9], None]
    assert got["clicks"] == [4, None, None]
    assert got["watch_time_s"][0] == pytest.approx(123.5)
    # Profiles were loaded from the (generated) data by `up`.
    assert got["age"][0] is not None and got["gender"][0] in ("M", "F")
    assert got["age"][2] is None  # an unknown user is a row of nulls, not an error


def test_historical_retrieval_is_point_in_time_correct(stack, feature_store):
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    t1 = t0 + timedelta(hours=2)
    user = 21
    store.push(
        feature_store,
        "user_history_push",
        pd.DataFrame(
            {
                "user_id": [user, user],
                "item_ids": [[1, 2], [1, 2, 3]],
                "history_len": [2, 3],
                "event_timestamp": [t0, t1],
            }
        ),
    )
    entity_df = pd.DataFrame(
        {
            "user_id": [user, user, user],
            "event_timestamp": [
                t0 - timedelta(minutes=5),
                t0 + timedelta(hours=1),
                t1 + timedelta(minutes=1),
            ],
        }
    )
    out = (
        feature_store.get_historical_features(
            entity_df=entity_df, features=["user_history:item_ids", "user_history:history_len"]
        )
        .to_df()
        .sort_values("event_timestamp")
    )
    by_time = {row.event_timestamp: row for row in out.itertuples()}
    mid = by_time[pd.Timestamp(t0 + timedelta(hours=1))]
    late = by_time[pd.Timestamp(t1 + timedelta(minutes=1))]
    assert list(mid.item_ids) == [1, 2] and mid.history_len == 2  # not the future value
    assert list(late.item_ids) == [1, 2, 3] and late.history_len == 3
    # Before the first push there is no value: the offline store leaves the row out (it
    # never fills it with a later one).
    assert pd.Timestamp(t0 - timedelta(minutes=5)) not in by_time
    assert len(out) == 2


def test_the_routers_direct_read_gives_what_get_online_features_gives(stack, feature_store):
    """serving.features.FeatureClient reads the online store directly (OnlineReader);
    its twin goes through get_online_features: same history and profile for a user with
    both, one with a profile only, and one the store does not know."""
    from serving.features import FeatureClient

    store.push(
        feature_store,
        "user_history_push",
        pd.DataFrame(
            {
                "user_id": [21],
                "item_ids": [[7, 3, 7, 11]],
                "history_len": [4],
                "event_timestamp": [datetime.now(UTC)],
            }
        ),
    )
    client = FeatureClient(stack)
    client.warm_up()
    for user in (21, 1, 10**9):
        assert client._lookup(user) == client._lookup_reference(user), user
    items, profile = client._lookup(21)
    assert items == [7, 3, 7, 11] and profile  # generated users have profiles
    assert client._lookup(10**9) == (None, {})
