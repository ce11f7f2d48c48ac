"""The consumers' fast decoders (``recloop.events.decode_fast``: msgspec twins of the
impression and interaction contracts) against the reference (``decode``: the pydantic
models). Whatever the twins accept, the models accept with the same values; whatever the
models refuse is refused with the models' reason; so a record is never treated
differently on the ingestor's fast path."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recloop.events import (
    FAST_TWINS,
    EventError,
    Impression,
    Interaction,
    decode,
    decode_fast,
    encode,
)
from tests.unit.test_events import samples

SEEN = {"twin": 0, "model": 0, "refused": 0}


def _outcome(fn, model, value) -> tuple[str, Any]:
    try:
        return "ok", fn(model, value)
    except EventError as exc:
        return "refused", exc.reason


def _values(event: Any) -> dict[str, Any]:
    data = event.model_dump() if hasattr(event, "model_dump") else msgspec.to_builtins(event)
    # Same values, same JSON types (3 and 3.0 differ here)
    return json.loads(json.dumps(data, sort_keys=True))


def agree(model: type, value: bytes | None) -> None:
    """The fast path's outcome for ``value`` is the reference's."""
    ref, ref_out = _outcome(decode, model, value)
    fast, fast_out = _outcome(decode_fast, model, value)
    assert fast == ref, (value, ref_out, fast_out)
    if ref == "refused":
        SEEN["refused"] += 1
        assert fast_out == ref_out
        return
    SEEN["twin" if isinstance(fast_out, FAST_TWINS[model]) else "model"] += 1
    a, b = _values(ref_out), _values(fast_out)
    if value is None or b'"event_id"' not in value:  # a fresh id each decode
        a.pop("event_id"), b.pop("event_id")
    assert a == b, value


def test_valid_events_decode_to_twins_with_the_same_values():
    for ev in samples():
        if type(ev) in FAST_TWINS:
            out = decode_fast(type(ev), encode(ev))
            assert isinstance(out, FAST_TWINS[type(ev)])
            assert _values(out) == _values(ev)
            agree(type(ev), encode(ev))


def test_models_without_a_twin_decode_as_before():
    for ev in samples():
        if type(ev) not in FAST_TWINS:
            assert decode_fast(type(ev), encode(ev)) == ev


def _interaction(**kw: Any) -> dict[str, Any]:
    base = json.loads(encode(samples()[1]))
    base.update(kw)
    return base


def _impression(**kw: Any) -> dict[str, Any]:
    base = json.loads(encode(samples()[0]))
    base.update(kw)
    return base


EDGES: list[tuple[type, bytes | None]] = [
    (Interaction, None),
    (Interaction, b""),
    (Interaction, b"\xff\xfe"),
    (Interaction, b"[]"),
    (Interaction, b"null"),
    (Interaction, json.dumps(_interaction()).encode() + b"  \n"),  # trailing space
    (Interaction, b"\xef\xbb\xbf" + json.dumps(_interaction()).encode()),  # a BOM
    (Interaction, json.dumps(_interaction()).encode() + b"x"),  # trailing bytes
    (Interaction, json.dumps(_interaction()).encode()[:-1]),  # cut short
    (Interaction, json.dumps(_interaction(watch_time_s=float("nan"))).encode()),
    (Interaction, json.dumps(_interaction(watch_time_s=float("inf"))).encode()),
    (Interaction, json.dumps(_interaction(watch_time_s=-0.0)).encode()),
    (Interaction, json.dumps(_interaction(watch_time_s=86400)).encode()),
    (Interaction, json.dumps(_interaction(watch_time_s=86400.0001)).encode()),
    (Interaction, json.dumps(_interaction(watch_time_s="1.5")).encode()),
    (Interaction, b'{"watch_time_s": 1e400, ' + json.dumps(_interaction())[1:].encode()),
    (Interaction, json.dumps(_interaction(user_id=2**63)).encode()),
    (Interaction, json.dumps(_interaction(user_id=2**64 + 1)).encode()),  # beyond 64 bits
    (Interaction, json.dumps(_interaction(user_id=-1)).encode()),
    (Interaction, json.dumps(_interaction(user_id=3.0)).encode()),
    (Interaction, json.dumps(_interaction(user_id=True)).encode()),
    (Interaction, json.dumps(_interaction(user_id="3")).encode()),
    (Interaction, json.dumps(_interaction(clicked=1)).encode()),
    (Interaction, json.dumps(_interaction(clicked=False)).encode()),  # watch without click
    (Interaction, json.dumps(_interaction(clicked=False, watch_time_s=0, liked=False)).encode()),
    (Interaction, json.dumps(_interaction(schema_version=2)).encode()),
    (Interaction, json.dumps(_interaction(schema_version=1.0)).encode()),
    (Interaction, json.dumps(_interaction(schema_version=True)).encode()),
    (Interaction, json.dumps(_interaction(event_time_ms=253_402_300_800_000)).encode()),
    (Interaction, json.dumps(_interaction(request_id="")).encode()),
    (Interaction, json.dumps(_interaction(request_id="é" * 128)).encode()),
    (Interaction, json.dumps(_interaction(request_id="é" * 129)).encode()),
    (Interaction, json.dumps(_interaction(request_id="😀" * 128), ensure_ascii=False).encode()),
    (Interaction, json.dumps(_interaction(request_id="😀" * 128)).encode()),  # \\ud83d pairs
    (Interaction, json.dumps(_interaction(request_id="\ud800")).encode()),  # a lone surrogate
    (Interaction, json.dumps(_interaction(request_id="a\u0000b")).encode()),
    (Interaction, json.dumps(_interaction(context={"a": 1})).encode()),
    (Interaction, json.dumps(_interaction(context=None)).encode()),
    (Interaction, json.dumps(_interaction(extra=1)).encode()),
    (Interaction, b'{"user_id": 1, ' + json.dumps(_interaction())[1:].encode()),  # twice
    (Interaction, json.dumps(_interaction())[:-1].encode() + b', "user_id": 7}'),
    (Impression, json.dumps(_impression(items=[])).encode()),
    (Impression, json.dumps(_impression(items=_impression()["items"][:1] * 2)).encode()),
    (
        Impression,
        json.dumps(_impression(items=[{"item_id": 1, "position": 1, "score": 0}])).encode(),
    ),
    (
        Impression,
        json.dumps(_impression(items=[{"item_id": 1, "position": 0, "score": 0}])).encode(),
    ),
    (
        Impression,
        json.dumps(
            _impression(items=[{"item_id": 1, "position": 0, "score": 1e308 * 10}])
        ).encode(),
    ),
    (
        Impression,
        b'{"items": [{"item_id": 1, "position": 0, "score": 1e999}], '
        + json.dumps(_impression())[1:].encode(),
    ),
    (Impression, json.dumps(_impression(items=[{"item_id": 1, "position": 0}])).encode()),
    (
        Impression,
        json.dumps(
            _impression(items=[{"item_id": i, "position": i, "score": 0} for i in range(257)])
        ).encode(),
    ),
    (
        Impression,
        json.dumps(_impression(items=[{"item_id": 1, "position": 0, "score": 0, "x": 1}])).encode(),
    ),
]


@pytest.mark.parametrize("case", range(len(EDGES)))
def test_edge_cases_agree(case):
    agree(*EDGES[case])


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


def mostly(valid: st.SearchStrategy, other: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` 19 times in 20 (per field: about half the records pass, so both sides
    of the contract are checked)."""
    return st.integers(0, 19).flatmap(lambda k: other if k == 0 else valid)


INTS = mostly(
    st.integers(0, 10**6),
    st.integers(min_value=-5, max_value=2**65) | st.sampled_from([2**63 - 1, 2**64]),
)
TEXT = mostly(
    st.text(min_size=1, max_size=128),
    st.text(max_size=130) | st.sampled_from(["", "x" * 128, "x" * 129]),
)
FLOATS = mostly(
    st.floats(0, 86400) | st.integers(0, 86400),
    st.floats() | st.sampled_from([-0.0, 86400.0, 86400.5, 1e-300, -1.0]),
)
ITEMS = mostly(
    st.lists(st.integers(0, 10**6), min_size=1, max_size=5, unique=True).flatmap(
        lambda ids: st.permutations(range(len(ids))).map(
            lambda pos: [
                {"item_id": i, "position": p, "score": 1.0 / (1 + p)}
                for i, p in zip(ids, pos, strict=True)
            ]
        )
    ),
    st.lists(
        st.fixed_dictionaries({"item_id": INTS, "position": st.integers(-1, 4), "score": FLOATS}),
        max_size=5,
    ),
)
FIELDS = {
    Interaction: {
        "event_time_ms": INTS,
        "request_id": TEXT,
        "user_id": INTS,
        "item_id": INTS,
        "position": INTS,
        "arm": TEXT,
        "model_version": TEXT,
        "clicked": mostly(st.just(True), st.booleans()),
        "watch_time_s": FLOATS,
        "liked": st.booleans(),
        "followed": st.booleans(),
        "context": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
        "event_id": TEXT,
        "schema_version": mostly(st.just(1), st.sampled_from([0, 2, 1.0, True])),
    },
    Impression: {
        "event_time_ms": INTS,
        "request_id": TEXT,
        "user_id": INTS,
        "arm": TEXT,
        "model_version": TEXT,
        "items": ITEMS,
        "context": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
        "event_id": TEXT,
        "schema_version": mostly(st.just(1), st.sampled_from([0, 2, 1.0, True])),
    },
}
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def records(draw, model: type) -> bytes:
    """An event of ``model``: every field drawn (mostly valid), some left out, one
    perhaps replaced by any JSON or an unknown one added."""
    fields = FIELDS[model]
    data = {k: draw(v) for k, v in fields.items() if draw(st.integers(0, 30))}
    if not draw(st.integers(0, 3)):
        data[draw(st.sampled_from([*fields, "extra"]))] = draw(JSON)
    return json.dumps(data, ensure_ascii=draw(st.booleans())).encode()


@FUZZ
@given(value=records(Interaction))
def test_interactions_agree(value):
    agree(Interaction, value)


@FUZZ
@given(value=records(Impression))
def test_impressions_agree(value):
    agree(Impression, value)


def test_the_fuzz_reached_both_outcomes():
    """The generated records are not all refused (or all accepted): the agreement above
    was checked on both sides of the contract. (Runs after the fuzz in this module.)"""
    if not SEEN["refused"] and not SEEN["twin"]:
        pytest.skip("run with the fuzz tests of this module")
    assert SEEN["twin"] > 20 and SEEN["refused"] > 20, SEEN
