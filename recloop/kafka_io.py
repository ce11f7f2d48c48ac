"""Kafka producer and consumer helpers that speak the event contracts.

``EventProducer``: acks=all, idempotent, key = user id, value = validated JSON.
``EventConsumer``: a consumer-group member with at-least-once delivery. Records are
decoded against their topic's contract; a record that fails goes to the dead-letter
topic with the reason, the source topic/partition/offset and the raw bytes, and the
batch goes on. Offsets are committed only after the caller's handler has returned and
the dead letters are acknowledged, so a consumer that dies mid-batch leaves its records
to be delivered again to the group.

Clients are created lazily, on first use, never at import.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kafka import KafkaConsumer, KafkaProducer
from pydantic import BaseModel

from infra.kafka.topics import DLQ
from recloop.events import EVENT_TYPES, DeadLetter, EventError, decode, encode

log = logging.getLogger(__name__)


class EventProducer:
    """Sends contract-checked events; acks=all and idempotence make retries safe."""

    def __init__(self, bootstrap_servers: str, client_id: str = "recloop", **overrides: Any):
        self.bootstrap_servers = bootstrap_servers
        self.settings: dict[str, Any] = {
            "client_id": client_id,
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": 5,
            "batch_size": 128 * 1024,
            "retries": 2**31 - 1,
            "delivery_timeout_ms": 120_000,
            **overrides,
        }
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()

    @property
    def producer(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:
                self._producer = KafkaProducer(
                    bootstrap_servers=self.bootstrap_servers, **self.settings
                )
            return self._producer

    def send(self, event: BaseModel, topic: str | None = None):  # -> kafka FutureRecordMetadata
        """Validate and send ``event`` to ``topic`` (default: its contract's topic)."""
        value = encode(event)
        return self.producer.send(
            topic or type(event).topic,
            key=event.key,
            value=value,  # type: ignore[attr-defined]
        )

    def send_raw(self, topic: str, value: bytes | None, key: bytes | None = None):
        """Send bytes as they are (tests and tools; the contract is not checked)."""
        return self.producer.send(topic, key=key, value=value)

    def flush(self, timeout_s: float | None = 30.0) -> None:
        if self._producer is not None:
            self._producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        if self._producer is not None:
            self._producer.close(timeout=timeout_s)
            self._producer = None

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Record(NamedTuple):
    """A valid event with where it came from (a tuple: cheap to make, one per record)."""

    topic: str
    partition: int
    offset: int
    event: Any
    timestamp_ms: int = -1  # the record's Kafka timestamp (producer's wall clock)


@dataclass
class ConsumerStats:
    batches: int = 0
    valid: int = 0
    dead_lettered: int = 0
    commits: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class EventConsumer:
    """At-least-once consumer of contract-checked events.

    ``topics`` maps each topic to subscribe to onto its event model; by default a topic
    named like a contract's topic gets that contract.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topics: Mapping[str, type[BaseModel]] | list[str],
        group_id: str,
        dlq_topic: str = DLQ.name,
        client_id: str = "recloop-consumer",
        dlq_producer: EventProducer | None = None,
        listener: Any = None,  # a kafka ConsumerRebalanceListener
        **overrides: Any,
    ) -> None:
        if isinstance(topics, list):
            unknown = [t for t in topics if t not in EVENT_TYPES]
            if unknown:
                raise ValueError(f"no contract for topic(s) {unknown}; pass a mapping")
            topics = {t: EVENT_TYPES[t] for t in topics}
        self.models = dict(topics)
        self.bootstrap_servers = bootstrap_servers
        self.group_id = group_id
        self.dlq_topic = dlq_topic
        self.settings: dict[str, Any] = {
            "client_id": client_id,
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_poll_records": 500,
            **overrides,
        }
        self._dlq = dlq_producer or EventProducer(bootstrap_servers, client_id=f"{client_id}-dlq")
        self._owns_dlq = dlq_producer is None
        self._listener = listener
        self._consumer: KafkaConsumer | None = None
        self._uncommitted = False
        self.stats = ConsumerStats()

    @property
    def consumer(self) -> KafkaConsumer:
        if self._consumer is None:
            consumer = KafkaConsumer(bootstrap_servers=self.bootstrap_servers, **self.settings)
            consumer.subscribe(list(self.models), listener=self._listener)
            self._consumer = consumer
        return self._consumer

    def poll(self, timeout_ms: int = 1000) -> list[Record]:
        """Fetch one batch; valid events are returned, invalid ones dead-lettered."""
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        records: list[Record] = []
        pending = []
        append = records.append
        for tp, raws in polled.items():
            model = self.models[tp.topic]
            topic, partition = tp.topic, tp.partition
            for raw in raws:
                try:
                    event = decode(model, raw.value)  # parsed once
                except EventError as exc:
                    pending.append(self._dead_letter(raw, exc.reason))
                    continue
                append(Record(topic, partition, raw.offset, event, raw.timestamp))
        # A dead letter must be durable before the offset that dropped it is committed.
        for fut in pending:
            fut.get(timeout=30)
        if polled:
            self.stats.batches += 1
            self._uncommitted = True
        self.stats.valid += len(records)
        return records

    def _dead_letter(self, raw: Any, reason: str):  # -> future
        letter = DeadLetter(
            event_time_ms=int(time.time() * 1000),
            reason=reason,
            source_topic=raw.topic,
            source_partition=raw.partition,
            source_offset=raw.offset,
            key_b64=base64.b64encode(raw.key).decode() if raw.key is not None else None,
            value_b64=base64.b64encode(raw.value or b"").decode(),
        )
        self.stats.dead_lettered += 1
        short = reason.split(":", 1)[0]
        self.stats.reasons[short] = self.stats.reasons.get(short, 0) + 1
        log.warning("dead-lettered %s[%d]@%d: %s", raw.topic, raw.partition, raw.offset, reason)
        return self._dlq.send(letter, topic=self.dlq_topic)

    def commit(self) -> None:
        """Commit the positions of everything polled so far."""
        self.consumer.commit()
        self._uncommitted = False
        self.stats.commits += 1

    def run(
        self,
        handler: Callable[[list[Record]], None],
        stop: threading.Event | None = None,
        max_idle_polls: int | None = None,
        timeout_ms: int = 1000,
    ) -> ConsumerStats:
        """poll → handler → commit, until ``stop`` is set (or ``max_idle_polls`` empty
        polls in a row). If the handler raises, nothing of that batch is committed."""
        idle = 0
        while stop is None or not stop.is_set():
            records = self.poll(timeout_ms=timeout_ms)
            if records:
                handler(records)
            if self._uncommitted:
                # Also after a batch of dead letters only, so they are not re-read.
                self.commit()
            idle = 0 if records else idle + 1
            if max_idle_polls is not None and idle >= max_idle_polls:
                break
        return self.stats

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None
        if self._owns_dlq:
            self._dlq.close()

    def __enter__(self) -> EventConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- offset ranges
def end_offsets(bootstrap_servers: str, topic: str) -> dict[int, int]:
    """The next offset of every partition of ``topic`` (where a reader starting now
    begins); with ``read_range`` it bounds exactly what one run produced."""
    from kafka import TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise ValueError(f"topic {topic!r} does not exist on {bootstrap_servers}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        return {tp.partition: int(off) for tp, off in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def read_range(
    bootstrap_servers: str,
    topic: str,
    start: Mapping[int, int],
    end: Mapping[int, int],
    timeout_s: float = 120.0,
) -> tuple[list[Any], list[tuple[int, int, str]]]:
    """Every record of ``topic`` with start[p] <= offset < end[p], decoded against the
    topic's contract: (events, invalid) where invalid lists (partition, offset, reason).
    Reads without a consumer group (nothing committed); TimeoutError if the range cannot
    be read in ``timeout_s``."""
    from kafka import TopicPartition

    cls = EVENT_TYPES[topic]
    todo = {p: (int(start.get(p, 0)), int(e)) for p, e in end.items() if e > start.get(p, 0)}
    events: list[Any] = []
    invalid: list[tuple[int, int, str]] = []
    if not todo:
        return events, invalid
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        enable_auto_commit=False,
        max_poll_records=5000,
        fetch_max_bytes=32 * 1024 * 1024,
    )
    try:
        tps = {p: TopicPartition(topic, p) for p in todo}
        consumer.assign(list(tps.values()))
        for p, (s, _) in todo.items():
            consumer.seek(tps[p], s)
        deadline = time.monotonic() + timeout_s
        while todo:
            if time.monotonic() > deadline:
                left = {p: (consumer.position(tps[p]), e) for p, (_, e) in todo.items()}
                raise TimeoutError(f"{topic}: offsets not read after {timeout_s:.0f} s: {left}")
            for tp, records in consumer.poll(timeout_ms=500).items():
                stop = todo.get(tp.partition, (0, -1))[1]
                for r in records:
                    if r.offset >= stop:
                        break
                    try:
                        events.append(decode(cls, r.value))
                    except EventError as exc:
                        invalid.append((tp.partition, r.offset, exc.reason))
            for p in list(todo):
                if consumer.position(tps[p]) >= todo[p][1]:
                    consumer.pause(tps[p])
                    del todo[p]
    finally:
        consumer.close()
    return events, invalid
