"""DynamicBatcher: batching across concurrent callers, the queue delay, back-pressure, failures, cancellation, close.

Timing bounds are generous on purpose: the test machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from services.common.errors import InvalidArgumentError, MistError, ResourceExhaustedError, UnavailableError
from services.extractor.batcher import BatchRecord, DynamicBatcher


class Recorder:
    """A run_batch that doubles numbers, remembers every batch and the thread it ran on, and can be held."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.started = threading.Event()  # set when a batch begins
        self.release = threading.Event()  # a held batch waits for this
        self.release.set()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        self.started.set()
        self.release.wait(timeout=10)
        time.sleep(self.delay_s)
        return [2 * item for item in items]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


async def wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    """Poll `predicate` on the event loop (other tasks run in between) until it holds; AssertionError after timeout."""
    deadline = time.monotonic() + timeout_s
    polls = 0
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        polls += 1
        await asyncio.sleep(0 if polls < 10 else 0.005)  # the tasks it waits for are usually one loop turn away


def test_concurrent_submitters_are_batched_and_each_gets_its_own_result() -> None:
    # Prepare
    recorder = Recorder(delay_s=0.02)
    records: list[BatchRecord] = []

    async def scenario() -> list[int]:
        batcher = DynamicBatcher(
            recorder, max_batch_size=8, max_queue_delay_ms=50, max_queue_items=64, on_batch=records.append
        )
        async with batcher:
            return await asyncio.gather(*(batcher.submit(i) for i in range(20)))

    # Execute
    results = run(scenario())

    # Assert
    assert results == [2 * i for i in range(20)]
    sizes = [len(batch) for batch in recorder.batches]
    assert sum(sizes) == 20
    assert max(sizes) > 1
    assert max(sizes) <= 8
    assert sorted(item for batch in recorder.batches for item in batch) == list(range(20))
    assert [record.size for record in records] == sizes
    assert all(len(record.queue_wait_s) == record.size and record.ok for record in records)
    assert all(record.run_s >= 0.02 for record in records)


def test_run_batch_runs_off_the_event_loop_thread() -> None:
    # Prepare
    recorder = Recorder()

    async def scenario() -> str:
        async with DynamicBatcher(recorder, max_batch_size=4, max_queue_delay_ms=1, max_queue_items=4) as batcher:
            await batcher.submit(1)
        return threading.current_thread().name

    # Execute
    loop_thread = run(scenario())

    # Assert
    assert len(recorder.threads) == 1
    assert loop_thread not in recorder.threads


def test_full_batch_starts_without_waiting_for_the_delay() -> None:
    # Prepare: a 10 s delay that a full batch must not wait for.
    recorder = Recorder()

    async def scenario() -> float:
        async with DynamicBatcher(recorder, max_batch_size=4, max_queue_delay_ms=10_000, max_queue_items=8) as batcher:
            started = time.monotonic()
            await asyncio.gather(*(batcher.submit(i) for i in range(4)))
            return time.monotonic() - started

    # Execute
    elapsed = run(scenario())

    # Assert
    assert recorder.batches == [[0, 1, 2, 3]]
    assert elapsed < 5.0


def test_lone_item_runs_after_about_the_queue_delay() -> None:
    # Prepare
    recorder = Recorder()
    records: list[BatchRecord] = []

    async def scenario() -> tuple[int, float]:
        batcher = DynamicBatcher(
            recorder, max_batch_size=8, max_queue_delay_ms=150, max_queue_items=8, on_batch=records.append
        )
        async with batcher:
            started = time.monotonic()
            result = await batcher.submit(21)
            return result, time.monotonic() - started

    # Execute
    result, elapsed = run(scenario())

    # Assert: not before the delay, and nowhere near forever.
    assert result == 42
    assert 0.14 <= elapsed < 3.0
    assert recorder.batches == [[21]]
    assert 0.14 <= records[0].queue_wait_s[0] < 3.0


def test_queue_over_max_queue_items_is_refused_at_once() -> None:
    # Prepare: hold the first batch (2 items) in run_batch, then fill the 4-item queue.
    recorder = Recorder()
    recorder.release.clear()

    async def scenario() -> tuple[list[int], float, Any]:
        batcher = DynamicBatcher(recorder, max_batch_size=2, max_queue_delay_ms=0, max_queue_items=4)
        async with batcher:
            running = [asyncio.ensure_future(batcher.submit(i)) for i in range(2)]
            await wait_until(recorder.started.is_set)
            queued = [asyncio.ensure_future(batcher.submit(i)) for i in range(2, 6)]
            await wait_until(lambda: batcher.stats.queued == 4)
            started = time.monotonic()
            with pytest.raises(ResourceExhaustedError, match="queue is full"):
                await batcher.submit(99)
            refused_after = time.monotonic() - started
            stats_while_full = batcher.stats
            recorder.release.set()
            results = await asyncio.gather(*running, *queued)
        return results, refused_after, stats_while_full

    # Execute
    results, refused_after, stats = run(scenario())

    # Assert
    assert results == [0, 2, 4, 6, 8, 10]
    assert refused_after < 1.0
    assert stats.queued == 4
    assert stats.rejected == 1


def test_a_failing_batch_fails_only_its_callers() -> None:
    # Prepare: batches containing a negative number raise.
    def run_batch(items: list[int]) -> list[int]:
        if any(item < 0 for item in items):
            raise ValueError("negative input")
        return [item + 1 for item in items]

    async def scenario() -> tuple[list[Any], list[int], Any]:
        async with DynamicBatcher(run_batch, max_batch_size=3, max_queue_delay_ms=20, max_queue_items=8) as batcher:
            first = await asyncio.gather(*(batcher.submit(i) for i in (1, -1, 2)), return_exceptions=True)
            later = await asyncio.gather(*(batcher.submit(i) for i in (10, 20, 30)))
            return first, later, batcher.stats

    # Execute
    first, later, stats = run(scenario())

    # Assert
    assert [type(outcome) for outcome in first] == [ValueError] * 3
    assert later == [11, 21, 31]
    assert stats.batches == 2
    assert stats.failed_batches == 1


def test_exception_in_a_result_slot_goes_to_that_caller_only() -> None:
    # Prepare
    def run_batch(items: list[int]) -> list[object]:
        return [KeyError(item) if item == 2 else item for item in items]

    async def scenario() -> list[Any]:
        async with DynamicBatcher(run_batch, max_batch_size=3, max_queue_delay_ms=50, max_queue_items=3) as batcher:
            return await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3)), return_exceptions=True)

    # Execute
    outcomes = run(scenario())

    # Assert
    assert outcomes[0] == 1 and outcomes[2] == 3
    assert isinstance(outcomes[1], KeyError)


def test_wrong_number_of_results_fails_the_batch_with_a_clear_error() -> None:
    async def scenario() -> list[Any]:
        async with DynamicBatcher(
            lambda items: items[:1], max_batch_size=2, max_queue_delay_ms=50, max_queue_items=2
        ) as batcher:
            return await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)

    outcomes = run(scenario())

    assert all(isinstance(outcome, MistError) and "1 results for 2 items" in str(outcome) for outcome in outcomes)


def test_a_caller_cancelled_before_its_batch_is_dropped_from_it() -> None:
    # Prepare
    recorder = Recorder()

    async def scenario() -> tuple[int, Any]:
        async with DynamicBatcher(recorder, max_batch_size=4, max_queue_delay_ms=300, max_queue_items=4) as batcher:
            gone = asyncio.ensure_future(batcher.submit(7))
            stays = asyncio.ensure_future(batcher.submit(8))
            await wait_until(lambda: batcher.stats.queued == 2)
            gone.cancel()
            result = await stays
            return result, batcher.stats

    # Execute
    result, stats = run(scenario())

    # Assert
    assert result == 16
    assert recorder.batches == [[8]]
    assert stats.cancelled == 1
    assert stats.queued == 0


def test_cancelled_callers_free_their_queue_places() -> None:
    # Prepare: a held batch, a full queue, then every queued caller goes away.
    recorder = Recorder()
    recorder.release.clear()

    async def scenario() -> int:
        async with DynamicBatcher(recorder, max_batch_size=1, max_queue_delay_ms=0, max_queue_items=2) as batcher:
            running = asyncio.ensure_future(batcher.submit(0))
            await wait_until(recorder.started.is_set)
            queued = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
            await wait_until(lambda: batcher.stats.queued == 2)
            for task in queued:
                task.cancel()
            await asyncio.gather(*queued, return_exceptions=True)
            replacement = asyncio.ensure_future(batcher.submit(3))  # must not be refused
            recorder.release.set()
            await running
            return await replacement

    # Execute
    result = run(scenario())

    # Assert
    assert result == 6
    assert recorder.batches == [[0], [3]]


def test_a_cancelled_future_from_submit_nowait_frees_its_place_and_is_dropped() -> None:
    # Prepare: a held batch and a queue of one, filled by a future that is then cancelled.
    recorder = Recorder()
    recorder.release.clear()

    async def scenario() -> tuple[int, int]:
        async with DynamicBatcher(recorder, max_batch_size=1, max_queue_delay_ms=0, max_queue_items=1) as batcher:
            running = batcher.submit_nowait(0)
            await wait_until(recorder.started.is_set)
            queued = batcher.submit_nowait(1)
            with pytest.raises(ResourceExhaustedError):
                batcher.submit_nowait(2)  # refused at once: no future is created
            queued.cancel()
            await asyncio.sleep(0)  # the done callback runs on the next loop turn
            replacement = batcher.submit_nowait(3)
            recorder.release.set()
            return await running, await replacement

    # Execute
    results = run(scenario())

    # Assert
    assert results == (0, 6)
    assert recorder.batches == [[0], [3]]


def test_two_concurrent_batches_overlap_and_keep_each_callers_result() -> None:
    # Prepare: the first batch is held until a second one has started beside it.
    both_running = threading.Barrier(2, timeout=10)
    seen: list[list[int]] = []

    def run_batch(items: list[int]) -> list[int]:
        seen.append(list(items))
        both_running.wait()  # raises BrokenBarrierError (failing the test) if the batches never overlap
        return [item * 10 for item in items]

    async def scenario() -> list[int]:
        batcher = DynamicBatcher(
            run_batch, max_batch_size=2, max_queue_delay_ms=0, max_queue_items=8, max_concurrent_batches=2
        )
        async with batcher:
            first = [batcher.submit_nowait(i) for i in (1, 2)]
            await wait_until(lambda: len(seen) == 1)
            second = [batcher.submit_nowait(i) for i in (3, 4)]
            return list(await asyncio.gather(*first, *second))

    # Execute
    results = run(scenario())

    # Assert
    assert results == [10, 20, 30, 40]
    assert sorted(seen) == [[1, 2], [3, 4]]


def test_callers_coming_and_going_during_a_long_batch_do_not_grow_the_queue() -> None:
    # Prepare: one held batch; 200 callers each submit and go away while it runs.
    recorder = Recorder()
    recorder.release.clear()

    async def scenario() -> tuple[int, int]:
        async with DynamicBatcher(recorder, max_batch_size=1, max_queue_delay_ms=0, max_queue_items=4) as batcher:
            running = asyncio.ensure_future(batcher.submit(0))
            await wait_until(recorder.started.is_set)
            longest = 0
            for i in range(200):
                task = asyncio.ensure_future(batcher.submit(i))
                await wait_until(lambda: batcher.stats.queued == 1)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                longest = max(longest, len(batcher._queue))  # internal: the entries still held in memory
            recorder.release.set()
            await running
            return longest, batcher.stats.cancelled

    # Execute
    longest, cancelled = run(scenario())

    # Assert
    assert cancelled == 200
    assert longest <= 2 * 4 + 1
    assert recorder.batches == [[0]]


def test_close_with_drain_runs_queued_items_without_waiting_for_the_delay() -> None:
    # Prepare: a 10 s delay that close() must cut short.
    recorder = Recorder()

    async def scenario() -> tuple[list[int], float]:
        batcher = DynamicBatcher(recorder, max_batch_size=4, max_queue_delay_ms=10_000, max_queue_items=16)
        tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(10)]
        # all 10 submitted: waiting, or taken into the two full batches that run at once
        await wait_until(lambda: batcher.stats.queued + sum(len(batch) for batch in recorder.batches) == 10)
        started = time.monotonic()
        await batcher.close(drain=True)
        elapsed = time.monotonic() - started
        with pytest.raises(UnavailableError):
            await batcher.submit(11)
        return await asyncio.gather(*tasks), elapsed

    # Execute
    results, elapsed = run(scenario())

    # Assert
    assert results == [2 * i for i in range(10)]
    assert [len(batch) for batch in recorder.batches] == [4, 4, 2]
    assert elapsed < 5.0


def test_close_without_drain_fails_queued_items_but_finishes_the_running_batch() -> None:
    # Prepare
    recorder = Recorder()
    recorder.release.clear()

    async def scenario() -> list[Any]:
        batcher = DynamicBatcher(recorder, max_batch_size=2, max_queue_delay_ms=0, max_queue_items=4)
        running = [asyncio.ensure_future(batcher.submit(i)) for i in range(2)]
        await wait_until(recorder.started.is_set)
        queued = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
        await wait_until(lambda: batcher.stats.queued == 2)
        closing = asyncio.ensure_future(batcher.close(drain=False))
        await wait_until(lambda: all(task.done() for task in queued))  # failed while the running batch still runs
        recorder.release.set()
        await closing
        return await asyncio.gather(*running, *queued, return_exceptions=True)

    # Execute
    outcomes = run(scenario())

    # Assert
    assert outcomes[:2] == [0, 2]
    assert all(isinstance(outcome, UnavailableError) for outcome in outcomes[2:])
    assert recorder.batches == [[0, 1]]


def test_a_failing_metrics_callback_does_not_break_the_batcher() -> None:
    def broken_callback(record: BatchRecord) -> None:
        raise RuntimeError("metrics backend down")

    async def scenario() -> list[int]:
        batcher = DynamicBatcher(
            lambda items: items, max_batch_size=2, max_queue_delay_ms=1, max_queue_items=2, on_batch=broken_callback
        )
        async with batcher:
            return [await batcher.submit(1), await batcher.submit(2)]

    assert run(scenario()) == [1, 2]


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_batch_size=0, max_queue_delay_ms=5, max_queue_items=8),
        dict(max_batch_size=8, max_queue_delay_ms=-1, max_queue_items=8),
        dict(max_batch_size=8, max_queue_delay_ms=float("nan"), max_queue_items=8),
        dict(max_batch_size=8, max_queue_delay_ms=5, max_queue_items=4),
        dict(max_batch_size=2.0, max_queue_delay_ms=5, max_queue_items=8),
        dict(max_batch_size=8, max_queue_delay_ms=5, max_queue_items=8, max_concurrent_batches=0),
    ],
)
def test_bad_settings_are_refused(settings: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        DynamicBatcher(lambda items: items, **settings)
