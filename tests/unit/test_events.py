"""Event contracts: what passes, what is refused, and the reason given."""

from __future__ import annotations

import json

import pytest

from recloop.events import (
    DeadLetter,
    EventError,
    Impression,
    Interaction,
    Preference,
    ServedItem,
    decode,
    encode,
)


def impression(**kw) -> Impression:
    base = dict(
        event_time_ms=1_700_000_000_000,
        request_id="req-1",
        user_id=42,
        arm="control",
        model_version="v3",
        items=[
            ServedItem(item_id=i, position=p, score=1.0 - p / 10) for p, i in enumerate([7, 3, 9])
        ],
    )
    base.update(kw)
    return Impression(**base)


def samples() -> list:
    """One valid event of every contract."""
    return [
        impression(context={"device": "tv"}),
        Interaction(
            event_time_ms=5,
            request_id="r",
            user_id=1,
            item_id=2,
            position=0,
            arm="a",
            model_version="v",
            clicked=True,
            watch_time_s=12.5,
            liked=True,
        ),
        Preference(
            event_time_ms=5,
            request_id="r",
            user_id=1,
            model_version="v",
            history=[1, 2],
            chosen=[3, 4],
            rejected=[5, 6],
            chosen_reward=0.9,
            rejected_reward=0.1,
        ),
        DeadLetter(
            event_time_ms=5,
            reason="bad",
            source_topic="t",
            source_partition=0,
            source_offset=9,
            value_b64="AAE=",
        ),
    ]


def test_every_contract_round_trips_through_json():
    for ev in samples():
        assert decode(type(ev), encode(ev)) == ev


def test_key_is_the_user_id_and_event_ids_are_unique():
    a, b = impression(), impression()
    assert a.key == b"42"
    assert a.event_id != b.event_id


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.pop("request_id"), "request_id: Field required"),
        (lambda d: d.update(user_id="42"), "user_id: Input should be a valid integer"),
        (lambda d: d.update(user_id=-1), "user_id: Input should be greater than or equal to 0"),
        (lambda d: d.update(surprise=1), "surprise: Extra inputs are not permitted"),
        (lambda d: d.update(items=[]), "items: List should have at least 1 item"),
        (lambda d: d["items"][1].update(position=0), "item positions must be 0..2"),
        (lambda d: d["items"][1].update(item_id=7), "an item appears twice"),
        (lambda d: d.update(schema_version=2), "schema_version"),
    ],
)
def test_invalid_impressions_are_refused_with_a_reason(mutate, reason):
    data = json.loads(encode(impression()))
    mutate(data)
    with pytest.raises(EventError) as err:
        decode(Impression, json.dumps(data).encode())
    assert reason in err.value.reason


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty record"),
        (b"", "not JSON"),
        (b"{oops", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'"text"', "expected a JSON object"),
    ],
)
def test_unparseable_records_are_refused_with_a_reason(raw, reason):
    with pytest.raises(EventError) as err:
        decode(Interaction, raw)
    assert reason in err.value.reason


def test_interaction_signals_need_a_click_and_sane_watch_time():
    ok = dict(
        event_time_ms=1,
        request_id="r",
        user_id=1,
        item_id=2,
        position=0,
        arm="a",
        model_version="v",
        clicked=False,
        watch_time_s=0.0,
    )
    Interaction(**ok)
    with pytest.raises(ValueError, match="require clicked"):
        Interaction(**{**ok, "liked": True})
    with pytest.raises(ValueError):
        Interaction(**{**ok, "clicked": True, "watch_time_s": float("nan")})
    with pytest.raises(ValueError):
        Interaction(**{**ok, "clicked": True, "watch_time_s": -1.0})


def test_preference_pairs_must_be_ordered_by_reward():
    with pytest.raises(ValueError, match="chosen_reward"):
        Preference(
            event_time_ms=1,
            request_id="r",
            user_id=1,
            model_version="v",
            history=[],
            chosen=[1],
            rejected=[2],
            chosen_reward=0.1,
            rejected_reward=0.2,
        )


def test_encode_rechecks_events_built_without_validation():
    broken = Interaction.model_construct(
        event_time_ms=1,
        request_id="r",
        user_id=1,
        item_id=2,
        position=0,
        arm="a",
        model_version="v",
        clicked=False,
        watch_time_s=5.0,
        liked=False,
        followed=False,
        schema_version=1,
        event_id="e",
    )
    with pytest.raises(EventError, match="require clicked"):
        encode(broken)


def test_dead_letter_keeps_raw_bytes_and_rejects_non_base64():
    letter = DeadLetter(
        event_time_ms=1,
        reason="r",
        source_topic="t",
        source_partition=2,
        source_offset=3,
        value_b64="/wAB",
    )
    assert letter.raw_value == b"\xff\x00\x01"
    with pytest.raises(ValueError):
        DeadLetter(
            event_time_ms=1,
            reason="r",
            source_topic="t",
            source_partition=0,
            source_offset=0,
            value_b64="not base64!",
        )


def test_event_times_beyond_year_9999_are_refused():
    # Such a time is a valid integer but no timestamp: it would stop the lake's flushes.
    from recloop.events import MAX_EVENT_TIME_MS

    assert impression(event_time_ms=MAX_EVENT_TIME_MS).event_time_ms == MAX_EVENT_TIME_MS
    with pytest.raises(ValueError, match="event_time_ms"):
        impression(event_time_ms=MAX_EVENT_TIME_MS + 1)
    doc = json.loads(encode(impression()))
    doc["event_time_ms"] = 9_069_000_000_000_000  # year 287396
    with pytest.raises(EventError, match="event_time_ms"):
        decode(Impression, json.dumps(doc).encode())
