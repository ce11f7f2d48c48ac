"""Impression logging off the request path: a bounded queue drained by one thread.

``offer`` never blocks: the request handler hands the event over and returns. A thread
sends queued events with the idempotent producer, in batches of what arrives within
``linger_s`` of the first; when Kafka is slow or away the queue fills and further
events are dropped and counted (the goal is zero drops, and the counter says when it is
not met). A record the producer gave up on is sent again by a
fresh producer (the ingestor drops a repeated impression by its request id), up to
``SEND_ATTEMPTS`` times; only then is it counted as ``failed``. While the broker does
not answer at all the batch is kept and retried, with a pause growing to 8 s. Send
errors are counted and the last one is kept for ``stats``; ``pending`` (queued or being
sent) tells a client when everything it was served has reached Kafka.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from recloop.events import Impression

SEND_ATTEMPTS = 5  # per record, each by a fresh producer after the last one failed


class ImpressionLogger:
    def __init__(
        self,
        bootstrap_servers: str,
        capacity: int = 10_000,
        client_id: str = "serve",
        linger_s: float = 0.05,
    ):
        self.bootstrap_servers = bootstrap_servers
        self.linger_s = linger_s
        self.capacity = capacity
        self.client_id = client_id
        self._queue: queue.Queue[Impression | None] = queue.Queue(maxsize=capacity)
        self._lock = threading.Lock()
        self._counts = {"offered": 0, "sent": 0, "dropped": 0, "failed": 0, "send_errors": 0}
        self._sending = 0  # taken from the queue, not yet sent or given up
        self._last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="impression-logger", daemon=True)
        self._thread.start()

    def offer(self, event: Impression) -> bool:
        """Queue ``event`` for Kafka; False (and counted) if the buffer is full."""
        with self._lock:
            self._counts["offered"] += 1
        try:
            self._queue.put_nowait(event)
            return True
        except queue.Full:
            with self._lock:
                self._counts["dropped"] += 1
            return False

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                **self._counts,
                "queued": self._queue.qsize(),
                "pending": self._queue.qsize() + self._sending,
                "capacity": self.capacity,
                "last_error": self._last_error,
            }

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _run(self) -> None:
        from recloop.kafka_io import EventProducer

        producer: EventProducer | None = None
        while not self._stop.is_set() or not self._queue.empty():
            try:
                event = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if event is None:
                break
            batch = [event]
            with self._lock:  # taken from the queue: pending until sent or given up
                self._sending = 1
            # What arrives within linger_s goes with it: one send and flush per batch, not
            # per request (each costs this process CPU beside the requests it serves).
            until = time.monotonic() + self.linger_s
            while len(batch) < 500:
                try:
                    nxt = self._queue.get(timeout=max(0.0, until - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._stop.set()
                    break
                batch.append(nxt)
                with self._lock:
                    self._sending = len(batch)
            rejected = 0  # times the producer gave up on records of this batch
            pause = 0.5
            while batch:
                try:
                    if producer is None:
                        producer = EventProducer(self.bootstrap_servers, client_id=self.client_id)
                    futures, kept = [], []
                    for e in batch:
                        try:
                            futures.append(producer.send(e))
                            kept.append(e)
                        except ValueError as bad:  # breaks the contract: never sendable
                            self._count("failed")
                            with self._lock:
                                self._last_error = repr(bad)[:500]
                    batch = kept
                    producer.flush(timeout_s=30)
                except Exception as exc:  # broker away: keep the batch, retry after a pause
                    error = exc
                else:
                    failed = [(e, f) for e, f in zip(batch, futures, strict=True) if f.failed()]
                    self._count("sent", len(batch) - len(failed))
                    batch = [e for e, _ in failed]
                    if not batch:
                        break
                    error = failed[0][1].exception
                    rejected += 1
                self._count("send_errors")
                with self._lock:
                    self._last_error = repr(error)[:500]
                    self._sending = len(batch)
                if producer is not None:  # a fresh producer: new connections, new sequence
                    try:
                        producer.close(timeout_s=1.0)
                    except Exception:
                        pass
                    producer = None
                if rejected >= SEND_ATTEMPTS:
                    self._count("failed", len(batch))
                    break
                if self._stop.wait(pause):
                    self._count("dropped", len(batch))
                    break
                pause = min(8.0, 2 * pause)
            with self._lock:
                self._sending = 0
        if producer is not None:
            producer.close()

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued (up to ``timeout_s``), then stop the thread."""
        deadline = time.monotonic() + timeout_s
        try:
            self._queue.put(None, timeout=max(0.0, timeout_s))
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()
