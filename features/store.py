"""Opening recloop's Feast store and applying its definitions.

The Feast repo is this folder (definitions + ``feature_store.yaml``); its state (registry,
SQLite online store, offline Parquet files) lives under the stack's home. ``apply`` is run
by ``recloop up`` only, so the registry has a single writer.

``features/`` imports nothing of the project: the stack's settings come in as any object
with the fields of :class:`StoreConfig` (``recloop.config.StackConfig`` is one), so the
ground floor may import this folder and never the other way round.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from feast import FeatureStore
from feast.data_source import PushMode
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Int64List
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

from features import definitions

HERE = Path(__file__).resolve().parent


class FeastSettings(Protocol):
    """The ``feast`` section of the stack's config (``recloop.config.FeastConfig``)."""

    online_store: str  # "sqlite" or "redis"
    redis_connection: str
    repo_dir: Path


class StoreConfig(Protocol):
    """What the store needs of the stack's config (``recloop.config.StackConfig``)."""

    @property
    def feast(self) -> FeastSettings: ...

    @property
    def feast_dir(self) -> Path: ...


_TS = pa.timestamp("us", tz="UTC")
_STATS_COLS = [
    ("impressions", pa.int64()),
    ("clicks", pa.int64()),
    ("watch_time_s", pa.float64()),
    ("likes", pa.int64()),
    ("follows", pa.int64()),
]

# Offline (Parquet) layout of every source; pushes are cast to these column orders,
# because the file offline store appends only tables of the exact same schema.
SCHEMAS: dict[str, pa.Schema] = {
    "user_profile": pa.schema(
        [
            ("user_id", pa.int64()),
            ("age", pa.int64()),
            ("gender", pa.string()),
            ("occupation", pa.string()),
            ("event_timestamp", _TS),
        ]
    ),
    "user_history_push": pa.schema(
        [
            ("user_id", pa.int64()),
            ("item_ids", pa.list_(pa.int64())),
            ("history_len", pa.int64()),
            ("history_until_ms", pa.int64()),
            ("event_timestamp", _TS),
        ]
    ),
    "user_stats_push": pa.schema(
        [
            ("user_id", pa.int64()),
            *_STATS_COLS,
            ("stats_until_ms", pa.int64()),
            ("event_timestamp", _TS),
        ]
    ),
    "item_stats_push": pa.schema([("item_id", pa.int64()), *_STATS_COLS, ("event_timestamp", _TS)]),
}
_FILES = {
    "user_profile": "data/user_profile.parquet",
    "user_history_push": "data/user_history.parquet",
    "user_stats_push": "data/user_stats.parquet",
    "item_stats_push": "data/item_stats.parquet",
}


def yaml_path(cfg: StoreConfig) -> Path:
    name = (
        "feature_store.yaml" if cfg.feast.online_store == "sqlite" else "feature_store.redis.yaml"
    )
    return cfg.feast.repo_dir / name


def open_store(cfg: StoreConfig) -> FeatureStore:
    """The Feast store of this stack (definitions must have been applied by ``up``)."""
    cfg.feast_dir.mkdir(parents=True, exist_ok=True)
    if cfg.feast.online_store == "redis":  # feature_store.redis.yaml reads it from the env
        os.environ.setdefault("RECLOOP_REDIS_CONNECTION", cfg.feast.redis_connection)
    return FeatureStore(repo_path=str(cfg.feast_dir), fs_yaml_file=yaml_path(cfg))


def feast_objects() -> list:
    """Every Feast object declared in ``features/definitions.py``."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    kinds = (Entity, FeatureView, FeatureService, DataSource)
    return [v for v in vars(definitions).values() if isinstance(v, kinds)]


# Columns a push may leave out (they are null then).
OPTIONAL = {"history_until_ms", "stats_until_ms"}


def to_table(source: str, df: pd.DataFrame) -> pa.Table:
    """Cast a DataFrame to the declared layout of ``source`` (column order included)."""
    schema = SCHEMAS[source]
    absent = [n for n in schema.names if n not in df.columns and n in OPTIONAL]
    if absent:
        df = df.assign(**{n: pd.array([None] * len(df), dtype="Int64") for n in absent})
    missing = [n for n in schema.names if n not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}")
    return pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)


def profile_frame(users: pd.DataFrame, as_of: datetime) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": users["user_id"].astype("int64"),
            "age": users["age"].astype("int64"),
            "gender": users["gender"].astype(str),
            "occupation": users["occupation"].astype(str),
            "event_timestamp": pd.Timestamp(as_of),
        }
    )


def apply(
    cfg: StoreConfig, users: pd.DataFrame, progress: Callable[[str], None] = lambda _: None
) -> FeatureStore:
    """Create the offline files, register the definitions and load the user profiles
    into the online store. Idempotent; pushed data already there is kept."""
    data_dir = cfg.feast_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for source, rel in _FILES.items():
        path = cfg.feast_dir / rel
        if source == "user_profile":
            continue
        if not path.exists():
            pq.write_table(SCHEMAS[source].empty_table(), path)
        elif pq.read_schema(path) != SCHEMAS[source]:  # a column was added: migrate in place
            old = pq.read_table(path)
            cols = [
                old.column(f.name).cast(f.type)
                if f.name in old.column_names
                else pa.nulls(old.num_rows, f.type)
                for f in SCHEMAS[source]
            ]
            pq.write_table(pa.Table.from_arrays(cols, schema=SCHEMAS[source]), path)
    # Profiles are a snapshot of the data set, valid since the epoch of its ratings.
    as_of = datetime(1970, 1, 2, tzinfo=UTC)
    profiles = profile_frame(users, as_of)
    pq.write_table(to_table("user_profile", profiles), cfg.feast_dir / _FILES["user_profile"])

    store = open_store(cfg)
    store.apply(feast_objects())
    store.write_to_online_store("user_profile", profiles)
    progress(
        f"Feast: {len(feast_objects())} objects applied, {len(profiles)} user profiles online "
        f"({cfg.feast.online_store} online store under {cfg.feast_dir})"
    )
    return store


class OnlineWriter:
    """Rows of a push source straight into the online store: what ``push`` with
    ``offline=False`` does, for the sources' plain types (Int64, Float64, String,
    Array(Int64)), without Feast's per-call registry lookups, DataFrame → Arrow → proto
    round trip and runtime type checks (most of a push's time for the ingestor, which
    pushes several times a second). The feature views behind each source are looked
    up once; rows are dicts with the entity key, the features and ``event_timestamp``
    (a missing or None feature is written as null, as ``push`` writes an absent
    optional column)."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self._provider = store._get_provider()  # Feast has no public handle on it
        self._views: dict[str, list[tuple[object, str, list[tuple[str, object]]]]] = {}

    def _views_of(self, source: str) -> list[tuple[object, str, list[tuple[str, object]]]]:
        if source not in self._views:
            fvs = [
                fv
                for fv in self.store.list_feature_views(allow_cache=True)
                if fv.stream_source is not None and fv.stream_source.name == source
            ]
            if not fvs:
                raise ValueError(f"no feature view reads the push source {source!r}")
            views = []
            for fv in sorted(fvs, key=lambda v: v.name):
                (key,) = [e.name for e in fv.entity_columns]
                feats = [(f.name, f.dtype.to_value_type()) for f in fv.features]
                views.append((fv, key, feats))
            self._views[source] = views
        return self._views[source]

    def write(self, source: str, rows: list[dict]) -> None:
        if not rows:
            return
        for fv, key, feats in self._views_of(source):
            convert = [(name, _CONVERT[vt.name]) for name, vt in feats]
            data = []
            for r in rows:
                ek = EntityKeyProto(join_keys=[key], entity_values=[_int64(r[key])])
                values = {name: conv(r.get(name)) for name, conv in convert}
                data.append((ek, values, r["event_timestamp"], None))
            self._provider.online_write_batch(self.store.config, fv, data, progress=None)


class OnlineReader:
    """Features of plain feature views straight from the online store: what
    ``get_online_features`` returns for them (one read per view, absent values None),
    without its per-call registry lookups, request building and response conversion
    (most of the time of the ingestor's read of first-seen users). Feast enforces no
    TTL on online reads, so neither does this."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self._provider = store._get_provider()  # Feast has no public handle on it
        self._views: dict[str, tuple[object, str]] = {}

    def _view(self, name: str) -> tuple[object, str]:
        if name not in self._views:
            fv = self.store.get_feature_view(name, allow_registry_cache=True)
            (key,) = [e.name for e in fv.entity_columns]
            self._views[name] = (fv, key)
        return self._views[name]

    def read(self, view: str, ids: list[int], features: list[str]) -> list[dict[str, object]]:
        """``features`` of ``view`` for each entity id of ``ids``, in order."""
        if not ids:
            return []
        fv, key = self._view(view)
        keys = [EntityKeyProto(join_keys=[key], entity_values=[_int64(i)]) for i in ids]
        got = self._provider.online_read(self.store.config, fv, keys, features)
        return [
            {f: _python(values.get(f)) if values else None for f in features} for _, values in got
        ]


def _python(v: ValueProto | None) -> object:
    """A value proto as the Python value ``get_online_features(...).to_dict()`` gives."""
    if v is None:
        return None
    which = v.WhichOneof("val")
    if which is None or which == "null_val":
        return None
    value = getattr(v, which)
    if which.endswith("_list_val"):
        return list(value.val)
    return value


def _int64(v):
    return ValueProto() if v is None else ValueProto(int64_val=int(v))


def _int64_list(v):
    if v is None:
        return ValueProto()
    return ValueProto(int64_list_val=Int64List(val=[int(x) for x in v]))


_CONVERT = {
    "INT64": _int64,
    "INT32": lambda v: ValueProto() if v is None else ValueProto(int32_val=int(v)),
    "DOUBLE": lambda v: ValueProto() if v is None else ValueProto(double_val=float(v)),
    "FLOAT": lambda v: ValueProto() if v is None else ValueProto(float_val=float(v)),
    "STRING": lambda v: ValueProto() if v is None else ValueProto(string_val=str(v)),
    "BOOL": lambda v: ValueProto() if v is None else ValueProto(bool_val=bool(v)),
    "INT64_LIST": _int64_list,
}


def push(store: FeatureStore, source: str, df: pd.DataFrame, offline: bool = True) -> None:
    """Push rows to a push source: online store, plus the offline store unless
    ``offline`` is false. ``df`` must carry an ``event_timestamp`` column."""
    table = to_table(source, df)
    store.push(
        source,
        table.to_pandas(),
        to=PushMode.ONLINE_AND_OFFLINE if offline else PushMode.ONLINE,
    )
