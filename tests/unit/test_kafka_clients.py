"""The confluent-kafka consumer behind EventConsumer's interface, without a broker: a
fake librdkafka consumer whose ``consume`` may run the rebalance callbacks mid-call, as
the real one does. Positions must cover exactly the records handed to the caller."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from recloop.events import Interaction, encode
from recloop.kafka_io import TP, ConfluentEventConsumer, EventConsumer, event_consumer

TOPIC = Interaction.topic


def _event(i: int) -> bytes:
    return encode(
        Interaction(
            event_time_ms=1_700_000_000_000 + i,
            request_id=f"r{i}",
            user_id=i,
            item_id=i,
            position=0,
            arm="a",
            model_version="v1",
            clicked=False,
            watch_time_s=0.0,
        )
    )


class Msg:
    def __init__(self, partition: int, offset: int, value: bytes | None = None) -> None:
        self._p, self._o = partition, offset
        self._v = _event(offset) if value is None else value

    def error(self):
        return None

    def topic(self):
        return TOPIC

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def value(self):
        return self._v

    def key(self):
        return b"1"

    def timestamp(self):
        return (1, 1_700_000_000_000 + self._o)


class FakeRdkafka:
    """``consume`` plays ``script``: a list per call of messages and ("assign", parts) /
    ("revoke", parts) steps, run in order (callbacks mid-call, as librdkafka does)."""

    def __init__(self, owner: ConfluentEventConsumer, script: list[list]) -> None:
        self.owner, self.script = owner, script
        self.assigned: list = []
        self.commits: list = []
        self.calls: dict[str, int] = {}

    def consume(self, n, timeout):
        if not self.script:
            return []
        out = []
        for step in self.script.pop(0):
            if isinstance(step, tuple):
                kind, parts = step
                tps = [SimpleNamespace(topic=TOPIC, partition=p, offset=-1001) for p in parts]
                cb = self.owner._cb_assign if kind == "assign" else self.owner._cb_revoke
                cb(self, tps)
            else:
                out.append(step)
        return out

    def assign(self, parts):
        self.assigned = [(p.topic, p.partition, p.offset) for p in parts]

    def unassign(self):
        self.assigned = []

    def commit(self, offsets, asynchronous):
        self.commits.append({(o.topic, o.partition): o.offset for o in offsets})

    # Offsets: partition 1 has a committed offset, partition 2 is empty (0, 0), the rest
    # hold 0..99; ``calls`` counts the requests a broker would answer.
    committed_at = {1: 40}
    ends = {2: 0}

    def _tps(self, parts, offset_of):
        return [
            SimpleNamespace(topic=p.topic, partition=p.partition, offset=offset_of(p), error=None)
            for p in parts
        ]

    def _ask(self, what):
        self.calls[what] = self.calls.get(what, 0) + 1

    def position(self, parts):  # nothing taken off the queue: no valid offset, no request
        return self._tps(parts, lambda p: -1001)

    def committed(self, parts, timeout):
        self._ask("committed")
        return self._tps(parts, lambda p: self.committed_at.get(p.partition, -1001))

    def offsets_for_times(self, parts, timeout):
        self._ask("offsets_for_times")
        return self._tps(parts, lambda p: -1 if self.ends.get(p.partition, 100) == 0 else 0)

    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        if not cached:
            self._ask("watermarks")
        return (0, self.ends.get(tp.partition, 100))

    def list_topics(self, topic, timeout):
        self._ask("metadata")
        meta = SimpleNamespace(partitions={0: None, 1: None, 2: None, 3: None}, error=None)
        return SimpleNamespace(topics={topic: meta})

    def close(self):
        pass


class _Sent:
    def get(self, timeout=None):
        return None


class _Dlq:
    def __init__(self):
        self.letters = []

    def send(self, letter, topic=None):
        self.letters.append(letter)
        return _Sent()

    def close(self):
        pass


def _consumer(script, on_assigned=None, on_revoked=None):
    c = ConfluentEventConsumer(
        "unused:9092",
        {TOPIC: Interaction},
        group_id="g",
        dlq_producer=_Dlq(),
        on_assigned=on_assigned,
        on_revoked=on_revoked,
        range_assignment=True,
    )
    c._consumer = FakeRdkafka(c, script)
    return c


def test_positions_follow_the_records_handed_and_assignment_starts_are_applied():
    starts = {TP(TOPIC, 0): 5}
    c = _consumer(
        [[("assign", [0, 1])], [], [Msg(0, 5), Msg(0, 6), Msg(1, 0), Msg(1, 1, b"not json")]],
        on_assigned=lambda tps: starts,
    )
    assert c.poll(10) == []
    assert c.consumer.assigned == [(TOPIC, 0, 5), (TOPIC, 1, -1001)]
    assert c.position(TP(TOPIC, 0)) == 5
    records = c.poll(10)
    assert [(r.partition, r.offset) for r in records] == [(0, 5), (0, 6), (1, 0)]
    assert records[0].timestamp_ms == 1_700_000_000_005
    assert c._dlq.letters[0].source_offset == 1  # dead-lettered, and past it
    assert c.position(TP(TOPIC, 0)) == 7 and c.position(TP(TOPIC, 1)) == 2
    assert c.assignment() == [TP(TOPIC, 0), TP(TOPIC, 1)]
    c.commit()
    assert c.consumer.commits == [{(TOPIC, 0): 7, (TOPIC, 1): 2}]


def test_a_revocation_mid_call_sees_only_what_was_handed_and_drops_the_rest():
    seen = {}

    def revoked(tps):
        seen["positions"] = {tp: c.position(tp) for tp in tps}

    def assigned(tps):  # the partition comes back, from where the revocation left it
        return {TP(TOPIC, 0): seen["positions"][TP(TOPIC, 0)]} if "positions" in seen else {}

    c = _consumer(
        [
            [("assign", [0, 1]), Msg(0, 0), Msg(0, 1)],
            # taken off the queue before the rebalance, then revoked and 0 reassigned
            [Msg(0, 2), Msg(1, 7), ("revoke", [0, 1]), ("assign", [0]), Msg(0, 2), Msg(0, 3)],
            [Msg(0, 3), Msg(0, 4), Msg(1, 8)],
        ],
        on_assigned=assigned,
        on_revoked=revoked,
    )
    assert [r.offset for r in c.poll(10)] == [0, 1]
    got = c.poll(10)
    # The revocation saw offset 2 as the next one: what was handed, not what was taken.
    assert seen["positions"][TP(TOPIC, 0)] == 2
    assert c.consumer.assigned == [(TOPIC, 0, 2)]
    # Partition 1 is gone (its records are its next owner's); 0 goes on once per offset.
    assert [(r.partition, r.offset) for r in got] == [(0, 2), (0, 3)]
    assert [(r.partition, r.offset) for r in c.poll(10)] == [(0, 4)]
    assert c.position(TP(TOPIC, 0)) == 5 and c.position(TP(TOPIC, 1)) is None


def test_position_before_any_record_is_the_reset_offset_and_lag_helpers_answer():
    c = _consumer([[("assign", [0])]])
    c.poll(10)
    assert c.position(TP(TOPIC, 0)) == 0  # nothing committed: earliest (low watermark)
    assert c.highwater(TP(TOPIC, 0)) == 100
    assert c.end_offsets([TP(TOPIC, 0)]) == {TP(TOPIC, 0): 100}


def test_positions_before_any_record_are_resolved_together_once():
    c = _consumer([[("assign", [0, 1, 2, 3])]])
    c.poll(10)
    fake = c.consumer
    fake.calls = {}
    got = {p: c.position(TP(TOPIC, p)) for p in range(4)}
    assert got == {0: 0, 1: 40, 2: 0, 3: 0}  # earliest, committed, empty (its end), earliest
    # One request per kind for all four, the empty partition's end alone asked apart.
    assert fake.calls == {"committed": 1, "offsets_for_times": 1, "watermarks": 1}
    assert [c.position(TP(TOPIC, p)) for p in range(4)] == [0, 40, 0, 0]
    assert fake.calls == {"committed": 1, "offsets_for_times": 1, "watermarks": 1}
    assert c.partitions(TOPIC) == {0, 1, 2, 3}  # fetched at assignment: no request now
    assert "metadata" not in fake.calls


def test_closing_does_not_call_back():
    calls = []
    c = _consumer([[("assign", [0])]], on_revoked=calls.append)
    c.poll(10)
    fake = c.consumer
    fake.close = lambda: c._cb_revoke(fake, [SimpleNamespace(topic=TOPIC, partition=0)])
    c.close()
    assert calls == []


def test_the_factory_and_settings():
    assert type(event_consumer("kafka-python", "x:1", [TOPIC], group_id="g")) is EventConsumer
    c = event_consumer(
        "confluent", "x:1", [TOPIC], group_id="g", session_timeout_ms=6000, max_poll_records=7
    )
    assert c.max_records == 7 and c._conf()["session.timeout.ms"] == 6000
    assert c._conf()["enable.auto.commit"] is False
    with pytest.raises(ValueError, match="no equivalent"):
        event_consumer("confluent", "x:1", [TOPIC], group_id="g", check_crcs=True)
    with pytest.raises(ValueError, match="unknown Kafka client"):
        event_consumer("other", "x:1", [TOPIC], group_id="g")
    assert TP(TOPIC, 1) == (TOPIC, 1) and hash(TP(TOPIC, 1)) == hash((TOPIC, 1))
