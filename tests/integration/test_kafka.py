"""The event helpers against the real broker: round trip, at-least-once, dead letters."""

from __future__ import annotations

import base64
import time

import pytest
from kafka import KafkaConsumer

from recloop.events import DeadLetter, Impression, Interaction, ServedItem, decode
from recloop.kafka_io import EventConsumer, EventProducer

pytestmark = pytest.mark.integration


def _interaction(i: int, request_id: str = "req") -> Interaction:
    return Interaction(
        event_time_ms=1_700_000_000_000 + i,
        request_id=f"{request_id}-{i}",
        user_id=i % 7,
        item_id=100 + i,
        position=i % 5,
        arm="control",
        model_version="v1",
        clicked=i % 2 == 0,
        watch_time_s=float(i) if i % 2 == 0 else 0.0,
    )


def _drain(consumer: EventConsumer, want: int, timeout_s: float = 30.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got.extend(consumer.poll(timeout_ms=500))
    return got


def test_produce_consume_round_trip_preserves_events_and_keys(stack, topic_factory):
    topic = topic_factory("roundtrip", partitions=3)
    sent = [_interaction(i) for i in range(50)]
    with EventProducer(stack.kafka.bootstrap) as producer:
        metas = [producer.send(ev, topic=topic) for ev in sent]
        producer.flush()
        partitions = {m.get(timeout=10).partition for m in metas}
    assert partitions == {0, 1, 2}, "keys by user id spread over all partitions"

    with EventConsumer(stack.kafka.bootstrap, {topic: Interaction}, group_id=topic) as consumer:
        records = _drain(consumer, len(sent))
        consumer.commit()
    assert sorted((r.event for r in records), key=lambda e: e.event_time_ms) == sent
    # One user's events share a partition, so their order is kept.
    by_user: dict[int, set[int]] = {}
    for r in records:
        by_user.setdefault(r.event.user_id, set()).add(r.partition)
    assert all(len(p) == 1 for p in by_user.values())


def test_a_consumer_that_dies_before_committing_leaves_records_to_the_group(stack, topic_factory):
    topic = topic_factory("atleastonce")
    sent = [_interaction(i) for i in range(20)]
    with EventProducer(stack.kafka.bootstrap) as producer:
        for ev in sent:
            producer.send(ev, topic=topic)
        producer.flush()

    group = f"group-{topic}"
    first = EventConsumer(stack.kafka.bootstrap, {topic: Interaction}, group_id=group)

    def crash(records):
        raise RuntimeError("worker died mid-batch")

    with pytest.raises(RuntimeError, match="mid-batch"):
        first.run(crash, max_idle_polls=30)
    assert first.stats.valid > 0 and first.stats.commits == 0
    first.close()  # leaves the group without committing

    second = EventConsumer(stack.kafka.bootstrap, {topic: Interaction}, group_id=group)
    seen: list = []
    second.run(lambda recs: seen.extend(r.event for r in recs), max_idle_polls=3)
    second.close()
    assert sorted(seen, key=lambda e: e.event_time_ms) == sent

    # Now committed: a third member of the group gets nothing more.
    third = EventConsumer(stack.kafka.bootstrap, {topic: Interaction}, group_id=group)
    again: list = []
    third.run(lambda recs: again.extend(recs), max_idle_polls=3)
    third.close()
    assert again == []


def test_malformed_records_go_to_the_dlq_with_reason_and_valid_ones_flow_on(stack, topic_factory):
    topic = topic_factory("dlqsrc")
    dlq = topic_factory("dlq")
    good = [_interaction(i) for i in range(6)]
    bad_values = [
        b"not json at all",
        b'{"event_time_ms": 1}',
        _interaction(99).model_dump_json().replace('"clicked":false', '"clicked":"no"').encode(),
        b"\xff\x00\x01",
    ]
    with EventProducer(stack.kafka.bootstrap) as producer:
        # Interleave: valid, bad, valid, bad, ... so valid records follow bad ones.
        for i, ev in enumerate(good):
            producer.send(ev, topic=topic)
            if i < len(bad_values):
                producer.send_raw(topic, bad_values[i], key=b"k%d" % i)
        producer.flush()

    seen: list = []
    consumer = EventConsumer(
        stack.kafka.bootstrap, {topic: Interaction}, group_id=topic, dlq_topic=dlq
    )
    consumer.run(lambda recs: seen.extend(r.event for r in recs), max_idle_polls=3)
    consumer.close()
    assert sorted(seen, key=lambda e: e.event_time_ms) == good
    assert consumer.stats.dead_lettered == len(bad_values)

    reader = KafkaConsumer(
        dlq,
        bootstrap_servers=stack.kafka.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    letters = [decode(DeadLetter, m.value) for m in reader]
    reader.close()
    assert len(letters) == len(bad_values)
    assert {bytes(letter.raw_value) for letter in letters} == set(bad_values)
    for letter in letters:
        assert letter.source_topic == topic and letter.source_partition == 0
        assert letter.source_offset >= 0 and letter.reason
        assert base64.b64decode(letter.key_b64 or "").startswith(b"k")
    reasons = " | ".join(sorted(letter.reason for letter in letters))
    assert "not JSON" in reasons and "clicked" in reasons and "Field required" in reasons


def test_producer_refuses_an_invalid_event_before_it_reaches_kafka(stack, topic_factory):
    from recloop.events import EventError

    topic = topic_factory("refuse")
    broken = Impression.model_construct(
        event_time_ms=1,
        request_id="r",
        user_id=1,
        arm="a",
        model_version="v",
        items=[ServedItem(item_id=1, position=3, score=0.0)],
        schema_version=1,
        event_id="e",
        context={},
    )
    with EventProducer(stack.kafka.bootstrap) as producer:
        with pytest.raises(EventError, match="positions"):
            producer.send(broken, topic=topic)
