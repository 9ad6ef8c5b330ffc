"""Dynamic batching across every open stream: items from all callers are grouped up to a maximum batch size or a
maximum queue delay, run through one blocking function in a worker thread, and each caller gets its own result.

    def forward(items: list[torch.Tensor]) -> list[np.ndarray]: ...   # blocking; one result per item, in order

    async with DynamicBatcher(forward, max_batch_size=32, max_queue_delay_ms=5.0, max_queue_items=256) as batcher:
        features = await batcher.submit(tensor)   # this item's result, or its exception
        future = batcher.submit_nowait(tensor)    # the same without a coroutine: await or cancel the future later

Scheduling: up to max_concurrent_batches batches run at once (1 by default: one runs while the next one fills; 2
lets an accelerator's pipeline decode the next batch while this one runs); a batch starts when full or when its
oldest item has waited max_queue_delay_ms. Past max_queue_items waiting items, submit raises ResourceExhaustedError (the running
batch does not count). A caller cancelled (or a future cancelled) before its batch starts is dropped from it. An exception from run_batch
fails that batch's callers only; an Exception in a result slot, that item's caller only. After close(), submit
raises UnavailableError; close(drain=True) runs what is queued without waiting for the delay, drain=False fails
it. A batcher belongs to the event loop it started on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from services.common.checks import check_int
from services.common.errors import InvalidArgumentError, MistError, ResourceExhaustedError, UnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchRecord:
    """What one batch did, for histograms (batch size, per-item queue wait, run latency)."""

    size: int  # items that went into run_batch
    queue_wait_s: tuple[float, ...]  # per item: seconds from submit to the batch start
    run_s: float  # seconds run_batch took (in its thread)
    ok: bool  # False when run_batch raised or returned the wrong number of results


@dataclass(frozen=True)
class BatcherStats:
    """Cumulative counters since construction, plus the queue length now."""

    batches: int  # batches run (failed ones included)
    items: int  # items that went into a batch
    failed_batches: int  # batches whose run_batch raised or returned the wrong number of results
    rejected: int  # submits refused because the queue was full
    cancelled: int  # items dropped before their batch started because their caller went away
    queued: int  # items waiting now (not counting the running batch)


class _Pending(Generic[T, R]):
    __slots__ = ("item", "future", "submitted_at", "taken")

    def __init__(self, item: T, future: asyncio.Future[R]) -> None:
        self.item = item
        self.future = future
        self.submitted_at = time.monotonic()
        self.taken = False  # moved into a batch (or failed by close): no longer counted as queued

    def on_done(self, batcher: DynamicBatcher[T, R]) -> Callable[[asyncio.Future[R]], None]:
        def done(future: asyncio.Future[R]) -> None:
            if future.cancelled():
                batcher._cancelled(self)

        return done


class DynamicBatcher(Generic[T, R]):
    """Collects items from many concurrent callers into batches for one blocking `run_batch` function."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue_items: int,
        executor: Executor | None = None,
        on_batch: Callable[[BatchRecord], None] | None = None,
        max_concurrent_batches: int = 1,
    ) -> None:
        check_int("max_batch_size", max_batch_size, minimum=1)
        check_int("max_concurrent_batches", max_concurrent_batches, minimum=1)
        check_int("max_queue_items", max_queue_items, minimum=1)
        if max_queue_items < max_batch_size:
            raise InvalidArgumentError(
                f"max_queue_items ({max_queue_items}) must be at least max_batch_size ({max_batch_size}), "
                f"or no batch could ever fill"
            )
        if (
            isinstance(max_queue_delay_ms, bool)
            or not isinstance(max_queue_delay_ms, (int, float))
            or not 0 <= max_queue_delay_ms < float("inf")
        ):
            raise InvalidArgumentError(f"max_queue_delay_ms must be a finite number >= 0; got {max_queue_delay_ms!r}")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay_ms = float(max_queue_delay_ms)
        self.max_queue_items = max_queue_items
        self.max_concurrent_batches = max_concurrent_batches
        self._on_batch = on_batch
        self._executor = executor
        self._owns_executor = executor is None
        self._queue: collections.deque[_Pending[T, R]] = collections.deque()
        self._live = 0  # queued items whose caller is still waiting (cancelled ones leave the deque lazily)
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()  # batches in their thread now
        self._batch_slots: asyncio.Semaphore | None = None
        self._closing = False
        self._broken: UnavailableError | None = None
        self._counts = collections.Counter[str]()

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker on the running event loop (idempotent; `submit` calls it too)."""
        if self._worker is not None:
            return
        if self._closing:
            raise UnavailableError("the batcher is closed")
        loop = asyncio.get_running_loop()  # raises outside a loop, before anything is created
        if self._executor is None:
            # One thread per concurrent batch (one by default: batches never overlap, torch sees one caller).
            self._executor = ThreadPoolExecutor(self.max_concurrent_batches, thread_name_prefix="mist-batcher")
        self._wakeup = asyncio.Event()
        self._batch_slots = asyncio.Semaphore(self.max_concurrent_batches)
        self._worker = loop.create_task(self._work(), name="mist-batcher")

    async def close(self, drain: bool = True) -> None:
        """Refuse new items; run (drain=True) or fail (drain=False) the queued ones; wait for the running batch."""
        self._closing = True
        if not drain:
            self._fail_queued(UnavailableError("the batcher was closed before this item ran"))
        if self._worker is not None:
            assert self._wakeup is not None
            self._wakeup.set()
            await asyncio.shield(self._worker)
        if self._owns_executor and self._executor is not None:
            self._executor.shutdown(wait=False)

    async def __aenter__(self) -> DynamicBatcher[T, R]:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(drain=True)

    # ---- submitting ------------------------------------------------------------------------------------------

    async def submit(self, item: T) -> R:
        """Queue `item` and wait for its result (or its exception)."""
        return await self.submit_nowait(item)

    def submit_nowait(self, item: T) -> asyncio.Future[R]:
        """Queue `item`; its future gets the result or the exception. Cancelling the future before its batch starts
        drops the item (and frees its place in the queue); after, the batch runs it and the result is discarded.
        Raises at once (no future) when the batcher is closed or broken, or the queue is full."""
        if self._broken is not None:
            raise UnavailableError(str(self._broken))
        if self._closing:
            raise UnavailableError("the batcher is closed; no new items are accepted")
        self.start()
        if self._live >= self.max_queue_items:
            self._counts["rejected"] += 1
            raise ResourceExhaustedError(
                f"the extractor queue is full ({self.max_queue_items} items waiting); retry with backoff"
            )
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        pending: _Pending[T, R] = _Pending(item, future)
        future.add_done_callback(pending.on_done(self))
        self._queue.append(pending)
        self._live += 1
        assert self._wakeup is not None
        self._wakeup.set()
        return future

    def _cancelled(self, pending: _Pending[T, R]) -> None:
        # Still queued: give its place back now (the entry leaves the deque lazily). Already taken: nothing to do.
        if not pending.taken:
            pending.taken = True
            self._live -= 1
            self._counts["cancelled"] += 1
            self._compact_if_stale()

    def _compact_if_stale(self) -> None:
        # Cancelled entries leave the deque when the worker reaches them; callers that come and go while one long
        # batch runs must not grow it without bound, so rebuild it once the dead outnumber the allowed queue.
        if len(self._queue) - self._live > self.max_queue_items:
            self._queue = collections.deque(pending for pending in self._queue if not pending.taken)

    @property
    def stats(self) -> BatcherStats:
        """A snapshot of the counters."""
        return BatcherStats(
            batches=self._counts["batches"],
            items=self._counts["items"],
            failed_batches=self._counts["failed_batches"],
            rejected=self._counts["rejected"],
            cancelled=self._counts["cancelled"],
            queued=self._live,
        )

    # ---- the worker ------------------------------------------------------------------------------------------

    async def _work(self) -> None:
        # Whatever stops the worker (a bug, the loop cancelling it), no caller may be left waiting forever.
        assert self._batch_slots is not None
        try:
            while True:
                await self._batch_slots.acquire()  # before filling: a batch forms only when it can start
                batch = await self._next_batch()
                if batch is None:
                    self._batch_slots.release()
                    break
                task = asyncio.ensure_future(self._run(batch))
                self._running.add(task)
                task.add_done_callback(self._batch_done)
            if self._running:
                await asyncio.wait(set(self._running))
        except asyncio.CancelledError:
            for task in self._running:
                task.cancel()
            self._stop(UnavailableError("the batcher was cancelled"))
            raise
        except Exception as error:
            logger.exception("batcher worker failed; no further items are accepted")
            self._stop(UnavailableError(f"the batcher stopped: {error!r}"))

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        assert self._batch_slots is not None
        self._batch_slots.release()
        if not task.cancelled() and task.exception() is not None:  # _run settles its callers; this is a bug
            logger.error("batch failed outside run_batch", exc_info=task.exception())

    def _stop(self, error: UnavailableError) -> None:
        self._broken = error
        self._fail_queued(error)

    async def _next_batch(self) -> list[_Pending[T, R]] | None:
        """Wait until a batch is due (full, oldest item past the delay, or closing); None when closed and empty."""
        assert self._wakeup is not None
        while True:
            self._drop_cancelled_head()
            if self._queue:
                break
            if self._closing:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._queue[0].submitted_at + self.max_queue_delay_ms / 1000
        while self._live < self.max_batch_size and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return self._take(self.max_batch_size)

    def _take(self, limit: int) -> list[_Pending[T, R]]:
        batch: list[_Pending[T, R]] = []
        while self._queue and len(batch) < limit:
            pending = self._queue.popleft()
            if not pending.taken:  # cancelled callers were already uncounted in submit
                pending.taken = True
                batch.append(pending)
                self._live -= 1
        return batch

    def _drop_cancelled_head(self) -> None:
        while self._queue and self._queue[0].taken:
            self._queue.popleft()

    async def _run(self, batch: list[_Pending[T, R]]) -> None:
        if not batch:
            return
        started = time.monotonic()
        waits = tuple(started - pending.submitted_at for pending in batch)
        items = [pending.item for pending in batch]
        loop = asyncio.get_running_loop()
        ok = True
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, items)
            if not isinstance(results, Sequence) or len(results) != len(items):
                count = len(results) if isinstance(results, Sequence) else type(results).__name__
                raise MistError(f"run_batch returned {count} results for {len(items)} items")
        except asyncio.CancelledError:
            for pending in batch:
                _settle(pending.future, error=UnavailableError("the batcher was cancelled while this item ran"))
            raise
        except Exception as error:
            ok = False
            for pending in batch:
                _settle(pending.future, error=error)
        else:
            for pending, result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    _settle(pending.future, error=result)
                else:
                    _settle(pending.future, result=result)
        self._record(BatchRecord(size=len(batch), queue_wait_s=waits, run_s=time.monotonic() - started, ok=ok))

    def _record(self, record: BatchRecord) -> None:
        self._counts["batches"] += 1
        self._counts["items"] += record.size
        self._counts["failed_batches"] += int(not record.ok)
        if self._on_batch is None:
            return
        try:
            self._on_batch(record)
        except Exception:  # metrics must never take the batcher down
            logger.exception("on_batch callback failed")

    def _fail_queued(self, error: BaseException) -> None:
        while self._queue:
            pending = self._queue.popleft()
            pending.taken = True
            _settle(pending.future, error=error)
        self._live = 0


def _settle(future: asyncio.Future[R], *, result: R | None = None, error: BaseException | None = None) -> None:
    """Deliver to a caller who may have gone away meanwhile (a cancelled future accepts nothing)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]
