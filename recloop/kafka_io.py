"""Kafka producer and consumer helpers that speak the event contracts.

``EventProducer``: acks=all, idempotent, key = user id, value = validated JSON.
``EventConsumer``: a consumer-group member with at-least-once delivery. Records are
decoded against their topic's contract; a record that fails goes to the dead-letter
topic with the reason, the source topic/partition/offset and the raw bytes, and the
batch goes on. Offsets are committed only after the caller's handler has returned and
the dead letters are acknowledged, so a consumer that dies mid-batch leaves its records
to be delivered again to the group.

Two consumer clients stand behind one interface (``event_consumer(client, ...)``):
``kafka-python`` (pure Python) and ``confluent`` (confluent-kafka, librdkafka: records are
fetched and decoded in C). Both give the same consumer-group semantics: rebalance
callbacks with ``TP`` (topic, partition) tuples, start offsets chosen on assignment,
positions that cover exactly the records handed to the caller, manual commits, and the
partitions' ends as the last fetch saw them.

Clients are created lazily, on first use, never at import.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from kafka import KafkaConsumer, KafkaProducer
from pydantic import BaseModel

from recloop.events import EVENT_TYPES, DeadLetter, EventError, decode, decode_fast, encode
from recloop.topics import DLQ

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


class TP(NamedTuple):
    """A topic partition (equal to, and hashed like, a plain ``(topic, partition)`` tuple
    and kafka-python's ``TopicPartition``)."""

    topic: str
    partition: int


CLIENTS = ("kafka-python", "confluent")


class OnAssigned(Protocol):
    """Called with the partitions assigned; returns where to start reading some of them
    (``{TP: offset}``; the others start from the group's committed offsets)."""

    def __call__(self, partitions: list[TP]) -> Mapping[TP, int] | None: ...


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
        listener: Any = None,  # a kafka ConsumerRebalanceListener (kafka-python only)
        on_assigned: OnAssigned | None = None,
        on_revoked: Callable[[list[TP]], None] | None = None,
        range_assignment: bool = False,  # partition p of every topic to the same member
        fast: bool = False,  # events as recloop.events' msgspec twins where a topic has one
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
        if listener is not None and (on_assigned or on_revoked):
            raise ValueError("pass a kafka listener or on_assigned/on_revoked, not both")
        self._listener = listener
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked
        self.range_assignment = range_assignment
        # Impressions and interactions as read-only structs with the models' fields (the
        # ingestor's hot path); records they refuse still fail with the model's reason.
        self._decode = decode_fast if fast else decode
        self._consumer: Any = None
        self._uncommitted = False
        self.stats = ConsumerStats()

    client = "kafka-python"

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """What ``poll`` raises when the broker is away (the client reconnects)."""
        from kafka.errors import KafkaError

        return (KafkaError,)

    @property
    def consumer(self) -> KafkaConsumer:
        if self._consumer is None:
            settings = dict(self.settings)
            if self.range_assignment:
                from kafka.coordinator.assignors.range import RangePartitionAssignor

                settings["partition_assignment_strategy"] = [RangePartitionAssignor]
            consumer = KafkaConsumer(bootstrap_servers=self.bootstrap_servers, **settings)
            consumer.subscribe(list(self.models), listener=self._listener or self._adapter())
            self._consumer = consumer
        return self._consumer

    def _adapter(self) -> Any:
        """on_assigned / on_revoked as a kafka-python rebalance listener."""
        if self._on_assigned is None and self._on_revoked is None:
            return None
        from kafka import ConsumerRebalanceListener, TopicPartition

        owner = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):  # noqa: N805 (kafka's signature)
                if owner._on_revoked is not None:
                    owner._on_revoked([TP(tp.topic, tp.partition) for tp in revoked])

            def on_partitions_assigned(self, assigned):  # noqa: N805
                if owner._on_assigned is None:
                    return
                starts = owner._on_assigned([TP(tp.topic, tp.partition) for tp in assigned])
                for tp, off in (starts or {}).items():
                    owner._consumer.seek(TopicPartition(tp[0], tp[1]), int(off))

        return Listener()

    # -- the interface the ingestor uses (kafka-python's cached metadata, no requests
    # unless said)
    def assignment(self) -> list[TP]:
        return [TP(tp.topic, tp.partition) for tp in self.consumer.assignment()]

    def position(self, tp: tuple[str, int]) -> int | None:
        """The next offset to hand to the caller (the group's committed offset, or the
        reset one, before the first record; asks the broker then)."""
        from kafka import TopicPartition

        pos = self.consumer.position(TopicPartition(tp[0], tp[1]))
        return None if pos is None else int(pos)

    def highwater(self, tp: tuple[str, int]) -> int | None:
        """The partition's end as the last fetch saw it (no request)."""
        from kafka import TopicPartition

        hw = self.consumer.highwater(TopicPartition(tp[0], tp[1]))
        return None if hw is None else int(hw)

    def end_offsets(self, tps: list[TP]) -> dict[TP, int]:
        """The partitions' ends (asks the broker)."""
        from kafka import TopicPartition

        ends = self.consumer.end_offsets([TopicPartition(t, p) for t, p in tps])
        return {TP(tp.topic, tp.partition): int(off) for tp, off in ends.items()}

    def partitions(self, topic: str) -> set[int]:
        return set(self.consumer.partitions_for_topic(topic) or ())

    def commit_offsets(self, offsets: Mapping[tuple[str, int], int]) -> None:
        """Commit these offsets (the next record to read of each partition)."""
        from kafka import OffsetAndMetadata, TopicPartition

        self.consumer.commit(
            {
                TopicPartition(t, p): OffsetAndMetadata(int(off), "", -1)
                for (t, p), off in offsets.items()
            }
        )

    def poll(self, timeout_ms: int = 1000) -> list[Record]:
        """Fetch one batch; valid events are returned, invalid ones dead-lettered."""
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        records: list[Record] = []
        pending = []
        append = records.append
        decode_ = self._decode
        for tp, raws in polled.items():
            model = self.models[tp.topic]
            topic, partition = tp.topic, tp.partition
            for raw in raws:
                try:
                    event = decode_(model, raw.value)  # parsed once
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
        return self._send_dead_letter(
            raw.topic, raw.partition, raw.offset, raw.key, raw.value, reason
        )

    def _send_dead_letter(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        reason: str,
    ):  # -> future
        letter = DeadLetter(
            event_time_ms=int(time.time() * 1000),
            reason=reason,
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
            key_b64=base64.b64encode(key).decode() if key is not None else None,
            value_b64=base64.b64encode(value or b"").decode(),
        )
        self.stats.dead_lettered += 1
        short = reason.split(":", 1)[0]
        self.stats.reasons[short] = self.stats.reasons.get(short, 0) + 1
        log.warning("dead-lettered %s[%d]@%d: %s", topic, partition, offset, reason)
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


class ConfluentEventConsumer(EventConsumer):
    """``EventConsumer`` on confluent-kafka (librdkafka): the same interface and the same
    guarantees, with records fetched, decompressed and checked in C.

    Positions are kept here, from the records handed to the caller, not librdkafka's
    (which moves on for every record taken off its queue): a rebalance callback runs
    inside ``consume``, possibly after some records of that call were taken, and the
    caller (the ingestor flushes its state on revocation) must see positions that
    cover exactly what it has handled. Records of a partition no longer assigned, or
    before its position (fetched again after a new assignment started it earlier), are
    left out; they are read again by whoever owns the partition.

    kafka-python's setting names are taken where they have an equivalent (below);
    others are refused rather than silently ignored.
    """

    client = "confluent"
    _SETTINGS = {
        "client_id": "client.id",
        "group_id": "group.id",
        "enable_auto_commit": None,  # always off: commits are explicit
        "auto_offset_reset": "auto.offset.reset",
        "session_timeout_ms": "session.timeout.ms",
        "heartbeat_interval_ms": "heartbeat.interval.ms",
        "max_poll_interval_ms": "max.poll.interval.ms",
        "fetch_max_bytes": "fetch.max.bytes",
        "max_partition_fetch_bytes": "max.partition.fetch.bytes",
        "fetch_max_wait_ms": "fetch.wait.max.ms",
        "max_poll_records": None,  # the batch size of consume()
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("listener") is not None:
            raise ValueError("confluent: pass on_assigned/on_revoked, not a kafka listener")
        super().__init__(*args, **kwargs)
        unknown = sorted(set(self.settings) - set(self._SETTINGS))
        if unknown:
            raise ValueError(f"confluent: no equivalent for consumer setting(s) {unknown}")
        self.max_records = int(self.settings.get("max_poll_records", 500))
        self._assigned: set[tuple[str, int]] = set()
        self._pos: dict[tuple[str, int], int] = {}
        self._closing = False
        self._partitions: dict[str, tuple[float, set[int]]] = {}

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        from confluent_kafka import KafkaException

        return (KafkaException,)

    def _conf(self) -> dict[str, Any]:
        strategy = "range" if self.range_assignment else "range,roundrobin"
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "partition.assignment.strategy": strategy,
        }
        for key, value in self.settings.items():
            name = self._SETTINGS[key]
            if name is not None:
                conf[name] = value
        return conf

    @property
    def consumer(self) -> Any:
        if self._consumer is None:
            from confluent_kafka import Consumer

            consumer = Consumer(self._conf(), logger=log)
            consumer.subscribe(
                list(self.models), on_assign=self._cb_assign, on_revoke=self._cb_revoke
            )
            self._consumer = consumer
        return self._consumer

    # -- rebalance (run by librdkafka inside consume)
    def _cb_assign(self, consumer: Any, parts: list[Any]) -> None:
        tps = [TP(p.topic, p.partition) for p in parts]
        starts: Mapping[TP, int] = {}
        try:
            if self._on_assigned is not None and not self._closing:
                starts = self._on_assigned(tps) or {}
        finally:
            for p in parts:
                off = starts.get(TP(p.topic, p.partition))
                if off is not None:
                    p.offset = int(off)
            consumer.assign(parts)
            self._assigned = {(t, p) for t, p in tps}
            self._pos = {(t, p): int(off) for (t, p), off in starts.items()}
        for topic in {t for t, _ in tps}:  # metadata now, not while records wait
            try:
                self._partitions.pop(topic, None)
                self.partitions(topic)
            except Exception as exc:  # asked again when needed
                log.warning("consumer: metadata of %s: %r", topic, exc)

    def _cb_revoke(self, consumer: Any, parts: list[Any]) -> None:
        tps = [TP(p.topic, p.partition) for p in parts]
        try:
            if self._on_revoked is not None and not self._closing:
                self._on_revoked(tps)
        finally:
            consumer.unassign()
            self._assigned -= {(t, p) for t, p in tps}
            for tp in tps:
                self._pos.pop((tp[0], tp[1]), None)

    # -- records
    def _fetch(self, timeout_ms: int) -> list[Any]:
        """What is already fetched, up to ``max_records``; else wait up to ``timeout_ms``
        for a first record and take what came with it (kafka-python's poll: returns as
        soon as there is something, does not wait to fill the batch)."""
        c = self.consumer
        msgs = c.consume(self.max_records, 0)
        if not msgs:
            msgs = c.consume(1, timeout_ms / 1000)
            if msgs and self.max_records > 1:
                msgs += c.consume(self.max_records - 1, 0)
        return msgs

    def poll(self, timeout_ms: int = 1000) -> list[Record]:
        """Fetch one batch; valid events are returned, invalid ones dead-lettered."""
        from confluent_kafka import KafkaError, KafkaException

        msgs = self._fetch(timeout_ms)
        records: list[Record] = []
        pending = []
        append = records.append
        assigned, pos, models = self._assigned, self._pos, self.models
        handed = False
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.fatal():
                    raise KafkaException(err)
                log.warning("consumer: %s", err)
                continue
            topic, partition, offset = m.topic(), m.partition(), m.offset()
            key = (topic, partition)
            if key not in assigned:
                continue  # revoked in this call: its next owner reads it
            at = pos.get(key)
            if at is not None and offset < at:
                continue  # fetched again after a new assignment: handed already
            pos[key] = offset + 1
            handed = True
            value = m.value()
            try:
                event = self._decode(models[topic], value)  # parsed once
            except EventError as exc:
                pending.append(
                    self._send_dead_letter(topic, partition, offset, m.key(), value, exc.reason)
                )
                continue
            append(Record(topic, partition, offset, event, m.timestamp()[1]))
        for fut in pending:
            fut.get(timeout=30)
        if handed:
            self.stats.batches += 1
            self._uncommitted = True
        self.stats.valid += len(records)
        return records

    def commit(self) -> None:
        """Commit the positions of everything polled so far."""
        pos = {tp: off for tp, off in self._pos.items() if tp in self._assigned}
        if pos:
            self.commit_offsets(pos)
        self._uncommitted = False
        self.stats.commits += 1

    # -- the interface the ingestor uses
    def assignment(self) -> list[TP]:
        self.consumer  # noqa: B018 (joins on first use)
        return [TP(t, p) for t, p in sorted(self._assigned)]

    def position(self, tp: tuple[str, int]) -> int | None:
        """The next offset to hand to the caller: after the last record handed, or where
        the assignment started it; before either, the group's committed offset, or the
        reset one. The partitions without one are resolved together (a few requests for
        all of them, once per assignment, not a round trip per partition and call)."""
        key = (tp[0], tp[1])
        at = self._pos.get(key)
        if at is not None or key not in self._assigned:
            return at
        self._resolve_positions()
        return self._pos.get(key)

    def _resolve_positions(self) -> None:
        from confluent_kafka import TopicPartition

        c = self.consumer
        todo = [TopicPartition(t, p) for t, p in sorted(self._assigned - set(self._pos))]
        if todo:  # what librdkafka knows without asking (records taken, none handed)
            todo = self._take_positions(c.position(todo), todo)
        if todo:
            todo = self._take_positions(c.committed(todo, timeout=10), todo)
        latest = str(self.settings.get("auto_offset_reset", "earliest")) in ("latest", "end")
        if todo and not latest:  # no commit either: the first offsets, in one request
            firsts = [TopicPartition(tp.topic, tp.partition, 0) for tp in todo]
            todo = self._take_positions(c.offsets_for_times(firsts, timeout=10), todo)
        for tp in todo:  # the end (an empty partition, or reset to the latest)
            lo, hi = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
            self._pos[(tp.topic, tp.partition)] = int(hi if latest else lo)

    def _take_positions(self, got: list[Any], todo: list[Any]) -> list[Any]:
        """Keep the valid offsets of ``got``; returns the partitions of ``todo`` left."""
        for tp in got:
            if tp.error is None and tp.offset >= 0:
                self._pos[(tp.topic, tp.partition)] = int(tp.offset)
        return [tp for tp in todo if (tp.topic, tp.partition) not in self._pos]

    def highwater(self, tp: tuple[str, int]) -> int | None:
        from confluent_kafka import TopicPartition

        wm = self.consumer.get_watermark_offsets(TopicPartition(tp[0], tp[1]), cached=True)
        return None if wm is None or wm[1] < 0 else int(wm[1])

    def end_offsets(self, tps: list[TP]) -> dict[TP, int]:
        from confluent_kafka import KafkaException, TopicPartition

        out: dict[TP, int] = {}
        for t, p in tps:
            wm = self.consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)
            if wm is None:
                raise KafkaException(f"no watermarks for {t}[{p}]")
            out[TP(t, p)] = int(wm[1])
        return out

    def partitions(self, topic: str) -> set[int]:
        """The topic's partitions (metadata kept for 30 s)."""
        cached = self._partitions.get(topic)
        if cached is not None and time.monotonic() - cached[0] < 30:
            return cached[1]
        meta = self.consumer.list_topics(topic, timeout=10).topics.get(topic)
        parts = set(meta.partitions) if meta is not None and meta.error is None else set()
        self._partitions[topic] = (time.monotonic(), parts)
        return parts

    def commit_offsets(self, offsets: Mapping[tuple[str, int], int]) -> None:
        from confluent_kafka import TopicPartition

        self.consumer.commit(
            offsets=[TopicPartition(t, p, int(off)) for (t, p), off in offsets.items()],
            asynchronous=False,
        )

    def close(self) -> None:
        if self._consumer is not None:
            self._closing = True  # leaving the group revokes: the caller has flushed
            try:
                self._consumer.close()
            finally:
                self._consumer = None
                self._closing = False
        if self._owns_dlq:
            self._dlq.close()


def event_consumer(client: str, *args: Any, **kwargs: Any) -> EventConsumer:
    """An ``EventConsumer`` on ``client`` (one of ``CLIENTS``)."""
    if client == "kafka-python":
        return EventConsumer(*args, **kwargs)
    if client == "confluent":
        return ConfluentEventConsumer(*args, **kwargs)
    raise ValueError(f"unknown Kafka client {client!r}; one of {CLIENTS}")


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
