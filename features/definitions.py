"""Feast definitions of recloop: entities, sources, feature views, feature services.

Declarations only (``feast apply`` imports every module of this folder). File paths are
relative to the repo path, which recloop sets to its state folder.

- ``user_profile``: demographics, a batch source written by ``recloop up`` from the data.
- ``user_history``: the user's most recent item ids, pushed by the ingestor.
- ``user_stats`` / ``item_stats``: running counts and watch time, pushed by the ingestor.
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource
from feast.types import Array, Float64, Int64, String
from feast.value_type import ValueType

HISTORY_LEN = 50  # items kept in user_history.item_ids (most recent last)

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="a user")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="an item")

user_profile_source = FileSource(
    name="user_profile_source",
    path="data/user_profile.parquet",
    timestamp_field="event_timestamp",
)


def _push_source(name: str) -> PushSource:
    """A push source whose offline copy is ``data/<name>.parquet``."""
    return PushSource(
        name=f"{name}_push",
        batch_source=FileSource(
            name=f"{name}_batch", path=f"data/{name}.parquet", timestamp_field="event_timestamp"
        ),
    )


user_history_push = _push_source("user_history")
user_stats_push = _push_source("user_stats")
item_stats_push = _push_source("item_stats")

user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(0),  # demographics do not expire
    schema=[
        Field(name="user_id", dtype=Int64),
        Field(name="age", dtype=Int64),
        Field(name="gender", dtype=String),
        Field(name="occupation", dtype=String),
    ],
    source=user_profile_source,
    online=True,
)

user_history = FeatureView(
    name="user_history",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="user_id", dtype=Int64),
        Field(name="item_ids", dtype=Array(Int64)),
        Field(name="history_len", dtype=Int64),
        # event time (ms) of the newest session in the history: lets the ingestor that
        # starts from a pushed history tell what it already holds
        Field(name="history_until_ms", dtype=Int64),
    ],
    source=user_history_push,
    online=True,
)

_STATS = [
    Field(name="impressions", dtype=Int64),
    Field(name="clicks", dtype=Int64),
    Field(name="watch_time_s", dtype=Float64),
    Field(name="likes", dtype=Int64),
    Field(name="follows", dtype=Int64),
]

user_stats = FeatureView(
    name="user_stats",
    entities=[user],
    ttl=timedelta(days=30),
    schema=[
        Field(name="user_id", dtype=Int64),
        *_STATS,
        # the same for the counters (names differ: a feature service joins both views)
        Field(name="stats_until_ms", dtype=Int64),
    ],
    source=user_stats_push,
    online=True,
)

item_stats = FeatureView(
    name="item_stats",
    entities=[item],
    ttl=timedelta(days=30),
    schema=[Field(name="item_id", dtype=Int64), *_STATS],
    source=item_stats_push,
    online=True,
)

serving_v1 = FeatureService(
    name="serving_v1",
    features=[user_profile, user_history, user_stats],
    description="what a recommender replica reads per request",
)
item_stats_v1 = FeatureService(
    name="item_stats_v1",
    features=[item_stats],
    description="item popularity and engagement (preference anchors, cold start)",
)
training_v1 = FeatureService(
    name="training_v1",
    features=[user_profile, user_history, user_stats],
    description="point-in-time user features joined onto training examples",
)
