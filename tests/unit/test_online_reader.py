"""features.store.OnlineReader: the ingestor's read of first-seen users, straight from
the online store, gives what get_online_features(...).to_dict() gives."""

from __future__ import annotations

from types import SimpleNamespace

from feast.protos.feast.types.Value_pb2 import Int64List
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

from features.store import OnlineReader, _python


def test_values_convert_as_feast_returns_them():
    assert _python(None) is None
    assert _python(ValueProto()) is None
    assert _python(ValueProto(int64_val=7)) == 7
    assert _python(ValueProto(double_val=1.5)) == 1.5
    assert _python(ValueProto(string_val="x")) == "x"
    assert _python(ValueProto(int64_list_val=Int64List(val=[3, 1]))) == [3, 1]


def test_rows_come_back_in_order_with_absent_ones_none():
    calls = []

    class Provider:
        def online_read(self, config, table, keys, features):
            calls.append((table, [k.entity_values[0].int64_val for k in keys], features))
            return [
                (None, {"item_ids": ValueProto(int64_list_val=Int64List(val=[4]))}),
                (None, None),
            ]

    fv = SimpleNamespace(entity_columns=[SimpleNamespace(name="user_id")])
    store = SimpleNamespace(
        _get_provider=lambda: Provider(),
        get_feature_view=lambda name, allow_registry_cache: fv,
        config="cfg",
    )
    reader = OnlineReader(store)
    rows = reader.read("user_history", [5, 6], ["item_ids", "history_len"])
    assert rows == [{"item_ids": [4], "history_len": None}, {"item_ids": None, "history_len": None}]
    assert calls == [(fv, [5, 6], ["item_ids", "history_len"])]
    assert reader.read("user_history", [], ["item_ids"]) == []
