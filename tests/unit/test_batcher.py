"""serving.batcher.ContinuousBatcher: no wait when idle, the next batch is what came
during the last one, errors reach every caller of their batch."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serving.batcher import ContinuousBatcher


class SlowModel:
    """Doubles its inputs; each batch takes ``delay_s``; records the batches."""

    def __init__(self, delay_s: float = 0.05, fail_on: int | None = None) -> None:
        self.delay_s, self.fail_on = delay_s, fail_on
        self.batches: list[list[int]] = []
        self.started_at: list[float] = []
        self.threads: set[str] = set()

    def __call__(self, items: list[int]) -> list[int]:
        self.started_at.append(time.monotonic())
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [2 * i for i in items]


def test_an_idle_model_starts_at_once_and_arrivals_go_together_next():
    async def main():
        model = SlowModel(delay_s=0.2)
        b = ContinuousBatcher(model, max_batch=8)
        t0 = time.monotonic()
        first = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.02)  # the first batch is running now
        rest = [asyncio.create_task(b.submit(i)) for i in range(1, 6)]
        got = await asyncio.gather(first, *rest)
        return model, b, t0, got

    model, b, t0, got = asyncio.run(main())
    assert got == [0, 2, 4, 6, 8, 10]
    assert model.batches == [[0], [1, 2, 3, 4, 5]]
    assert model.started_at[0] - t0 < 0.1  # no fill wait
    assert model.threads and "MainThread" not in model.threads  # off the event loop
    s = b.stats()
    assert s["batches"] == 2 and s["mean_batch"] == 3.0 and s["queued"] == 0
    assert 0.0 < s["busy"] <= 1.0


def test_batches_never_exceed_max_and_keep_arrival_order():
    async def main():
        model = SlowModel(delay_s=0.05)
        b = ContinuousBatcher(model, max_batch=3)
        got = await asyncio.gather(*(b.submit(i) for i in range(10)))
        return model, got

    model, got = asyncio.run(main())
    assert got == [2 * i for i in range(10)]
    assert all(len(x) <= 3 for x in model.batches)
    assert [i for x in model.batches for i in x] == list(range(10))


def test_an_error_reaches_every_request_of_its_batch_only():
    async def main():
        model = SlowModel(delay_s=0.1, fail_on=3)
        b = ContinuousBatcher(model, max_batch=8)
        first = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0.02)
        bad = [asyncio.create_task(b.submit(i)) for i in (2, 3)]
        ok1 = await first
        res = await asyncio.gather(*bad, return_exceptions=True)
        after = await b.submit(4)  # the batcher goes on
        return ok1, res, after

    ok1, res, after = asyncio.run(main())
    assert ok1 == 2 and after == 8
    assert all(isinstance(r, ValueError) and "bad item 3" in str(r) for r in res)


def test_a_cancelled_caller_is_left_out_of_the_next_batch():
    async def main():
        model = SlowModel(delay_s=0.1)
        b = ContinuousBatcher(model, max_batch=8)
        first = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0.02)
        gone = asyncio.create_task(b.submit(2))
        kept = asyncio.create_task(b.submit(3))
        await asyncio.sleep(0.01)
        gone.cancel()
        return model, await first, await kept

    model, a, c = asyncio.run(main())
    assert (a, c) == (2, 6) and model.batches == [[1], [3]]


def test_a_wrong_result_count_is_an_error_not_a_hang():
    async def main():
        b = ContinuousBatcher(lambda items: items[:-1], max_batch=4)
        return await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)

    res = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in res)
    with pytest.raises(ValueError):
        ContinuousBatcher(lambda x: x, max_batch=0)
