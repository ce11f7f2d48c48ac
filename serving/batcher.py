"""Continuous request batching for a replica's model (no fixed wait).

``serve.batch`` waits up to ``batch_wait_timeout_s`` for a batch to fill on every call,
even when the model is idle and the request could start at once. ``ContinuousBatcher``
runs at most one batch at a time: a request that finds the model idle starts
immediately, alone; requests that arrive while a batch runs wait for it and then go
together as the next batch (up to ``max_batch``). Under load the batch grows by itself
to what arrived during one batch's run; at low load nothing waits.

The batch function runs in a worker thread (``asyncio.to_thread``), so the replica's
event loop keeps accepting requests while the model computes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


class ContinuousBatcher:
    """``await submit(item)`` → ``run_batch([items])[i]``; one batch in flight."""

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._runner: asyncio.Task | None = None
        self.batches = 0
        self.requests = 0
        self.busy_s = 0.0  # wall time with a batch running
        self.started = time.monotonic()

    def set_max_batch(self, n: int) -> None:
        if n < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = n

    async def submit(self, item: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())
        return await fut

    async def _run(self) -> None:
        while self._queue:
            take, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            take = [(item, fut) for item, fut in take if not fut.done()]  # caller gone
            if not take:
                continue
            started = time.monotonic()
            try:
                results = await asyncio.to_thread(self.run_batch, [item for item, _ in take])
                if len(results) != len(take):
                    raise RuntimeError(
                        f"batch function returned {len(results)} results for {len(take)}"
                    )
            except Exception as exc:  # every request of the batch gets the error
                for _, fut in take:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                for (_, fut), res in zip(take, results, strict=True):
                    if not fut.done():
                        fut.set_result(res)
            finally:
                self.busy_s += time.monotonic() - started
                self.batches += 1
                self.requests += len(take)

    def stats(self) -> dict[str, float]:
        """Batches run, mean batch size, queue length now, and the share of wall time
        since start with a batch running (the model's duty cycle)."""
        wall = max(1e-9, time.monotonic() - self.started)
        return {
            "batches": self.batches,
            "requests": self.requests,
            "mean_batch": self.requests / self.batches if self.batches else 0.0,
            "queued": len(self._queue),
            "busy": self.busy_s / wall,
        }
