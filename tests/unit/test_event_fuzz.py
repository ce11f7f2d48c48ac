"""Property-based fuzzing of the event contracts (hypothesis): whatever bytes arrive on a
topic, decoding either yields a valid event or raises ``EventError`` with a reason, never
anything else; and the consumer dead-letters every bad record with that reason while the
good ones of the same batch go on, so no record is lost."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.structs import TopicPartition

from recloop.events import DeadLetter, EventError, Interaction, decode, encode
from recloop.kafka_io import EventConsumer
from tests.unit.test_events import samples

VALID = {type(ev): ev for ev in samples() if not isinstance(ev, DeadLetter)}
MODELS = list(VALID)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRIED = {"records": 0, "refused": 0, "dead_lettered": 0, "batches": 0}  # for the fault table

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module", autouse=True)
def _record_what_was_tried(_fault_records):
    yield
    if TRIED["records"]:
        _fault_records.append(
            {
                "test": __name__,
                "fault": "malformed events (hypothesis: bytes, JSON, one field broken)",
                "load": f"{TRIED['records']} records, {TRIED['batches']} consumer batches",
                "survived": True,
                "bad_inputs": TRIED["refused"] + TRIED["dead_lettered"],
                "detail": f"{TRIED['refused']} refused with a reason by the contracts, "
                f"{TRIED['dead_lettered']} dead-lettered by the consumer, none lost",
            }
        )


def _decodes_or_explains(model, value: bytes | None) -> bool:
    """True if valid; an invalid record must raise EventError with a reason."""
    TRIED["records"] += 1
    try:
        event = decode(model, value)
    except EventError as exc:
        assert exc.reason and isinstance(exc.reason, str)
        TRIED["refused"] += 1
        return False
    assert isinstance(event, model)
    assert decode(model, encode(event)) == event  # what passes also round-trips
    return True


@FUZZ
@given(model=st.sampled_from(MODELS), value=st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_an_event_error(model, value):
    _decodes_or_explains(model, value)


@FUZZ
@given(model=st.sampled_from(MODELS), value=JSON)
def test_arbitrary_json_decodes_or_raises_an_event_error(model, value):
    _decodes_or_explains(model, json.dumps(value).encode())


@FUZZ
@given(model=st.sampled_from(MODELS), data=st.data())
def test_a_valid_event_with_one_field_broken_is_refused_with_the_field_named(model, data):
    doc = json.loads(encode(VALID[model]))
    field = data.draw(st.sampled_from(sorted(doc)))
    action = data.draw(st.sampled_from(["drop", "replace", "extra"]))
    if action == "drop":
        del doc[field]
    elif action == "replace":
        new = data.draw(JSON)
        if new == doc[field]:
            return
        doc[field] = new
    else:
        field = "x_" + data.draw(st.text(min_size=1, max_size=6))
        doc[field] = data.draw(JSON)
    if _decodes_or_explains(model, json.dumps(doc).encode()):
        # Some replacements are valid (another id, an optional field set to null), and a
        # field with a default may be left out.
        optional = action == "drop" and not model.model_fields[field].is_required()
        assert action == "replace" or optional, (action, field)
        return
    with pytest.raises(EventError) as info:
        decode(model, json.dumps(doc).encode())
    assert field in info.value.reason or action == "replace"


class _Sent:
    def get(self, timeout=None):
        return None


class _FakeDlq:
    def __init__(self):
        self.letters: list[DeadLetter] = []

    def send(self, letter, topic=None):
        self.letters.append(letter)
        return _Sent()


@pytest.mark.parametrize("fast", [False, True], ids=["models", "twins"])
@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.just(encode(VALID[Interaction])),
            st.binary(max_size=80),
            JSON.map(lambda v: json.dumps(v).encode()),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_the_consumer_dead_letters_each_bad_record_with_its_reason_and_keeps_the_rest(values, fast):
    topic = Interaction.topic
    raws = [
        SimpleNamespace(topic=topic, partition=0, offset=i, key=b"1", value=v, timestamp=i)
        for i, v in enumerate(values)
    ]
    dlq = _FakeDlq()
    consumer = EventConsumer("unused:9092", [topic], group_id="fuzz", dlq_producer=dlq, fast=fast)
    consumer._consumer = SimpleNamespace(poll=lambda timeout_ms: {TopicPartition(topic, 0): raws})
    records = consumer.poll()
    good = {r.offset for r in records}
    bad = {d.source_offset for d in dlq.letters}
    assert good | bad == set(range(len(values))) and not good & bad  # none lost, none twice
    for letter in dlq.letters:
        raw = raws[letter.source_offset]
        assert base64.b64decode(letter.value_b64) == (raw.value or b"")  # the record itself
        with pytest.raises(EventError) as info:
            decode(Interaction, raw.value)
        assert letter.reason == info.value.reason
    assert consumer.stats.valid == len(good) and consumer.stats.dead_lettered == len(bad)
    TRIED["batches"] += 1
    TRIED["records"] += len(values)
    TRIED["dead_lettered"] += len(bad)
