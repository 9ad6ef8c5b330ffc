"""One Extract stream on the event loop: read requests while its window has room, answer them in request order.

    stream = OrderedStream(requests, admit, window=32, idle_timeout_s=30.0, idle_error=make_error)
    async for answer in stream.answers():   # admit(request, index) returns an answer or a future of one
        ...

Per stream there is one reader task; per image only what `admit` returns (an answer ready now, e.g. a cache hit, or
an asyncio future the batcher settles), never a task, an `asyncio.wait` or a timer. The window counts answers not
yet taken by the consumer, the one it holds included: while it is full nothing more is read, so gRPC flow control
pushes back on the sender, and a consumer that stops taking answers stops the reading too.

Ends: the requests end -> every answer, then the end; `admit` (or reading) raises -> the answers before it, then
that error; nothing in progress and no request for `idle_timeout_s` -> `idle_error()` is raised (one timer per stream,
re-armed only when it fires); a future that fails -> its exception ends the stream. Whatever ends it (the consumer
closing the generator included), the reader is cancelled and unanswered futures are cancelled.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Generic, TypeVar

Request = TypeVar("Request")
Answer = TypeVar("Answer")


class OrderedStream(Generic[Request, Answer]):
    """The reader, the window and the idle clock of one stream (see the module docstring)."""

    def __init__(
        self,
        requests: AsyncIterable[Request],
        admit: Callable[[Request, int], Answer | asyncio.Future[Answer]],
        *,
        window: int,
        idle_timeout_s: float | None,
        idle_error: Callable[[], BaseException],
        on_taken: Callable[[], None] = lambda: None,
        on_abandoned: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._requests = requests
        self._admit = admit
        self._window = window
        self._idle_timeout_s = idle_timeout_s
        self._idle_error = idle_error
        self._on_taken = on_taken  # an answer left the window (gauges)
        self._on_abandoned = on_abandoned  # this many admitted answers will never be taken
        self._loop = asyncio.get_running_loop()
        self._slots: collections.deque[Answer | asyncio.Future[Answer]] = collections.deque()
        self._holding = False  # the consumer holds an answer: it still counts in the window
        self._reading = True
        self._awaiting_request = False
        self._failure: BaseException | None = None
        self._consumer_waiter: asyncio.Future[None] | None = None  # the consumer waits for a slot or the end
        self._reader_waiter: asyncio.Future[None] | None = None  # the reader waits for room in the window
        self._reader: asyncio.Task[None] | None = None
        self._idle_since: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_fired = False

    async def answers(self) -> AsyncIterator[Answer]:
        """Every answer in request order; raises what ended the stream early."""
        self._reader = self._loop.create_task(self._read())
        slots = self._slots
        try:
            while True:
                if slots:
                    head = slots[0]
                    if isinstance(head, asyncio.Future):
                        if not head.done():
                            await head  # cancelled with us: _close would cancel it anyway
                        answer = head.result()  # an exception (batcher closed, a bug) ends the stream
                    else:
                        answer = head
                    slots.popleft()
                    self._on_taken()
                    self._holding = True
                    yield answer
                    self._holding = False
                    self._room_freed()
                    continue
                if not self._reading:
                    break
                self._consumer_waiter = self._loop.create_future()
                await self._consumer_waiter
            if self._failure is not None:
                raise self._failure
        finally:
            self._close()

    # ---- the reader ------------------------------------------------------------------------------------------

    async def _read(self) -> None:
        requests = aiter(self._requests)
        index = 0
        try:
            while True:
                if len(self._slots) + self._holding >= self._window:
                    self._reader_waiter = self._loop.create_future()
                    await self._reader_waiter
                    continue
                self._awaiting_request = True
                if not self._slots and not self._holding:
                    self._mark_idle()
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    return
                finally:
                    self._awaiting_request = False
                    self._idle_since = None
                self._slots.append(self._admit(request, index))
                index += 1
                self._wake_consumer()
        except asyncio.CancelledError:
            if not self._idle_fired:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            self._failure = self._idle_error()
        except Exception as error:  # a request failed validation, or reading failed: the answers before it go out
            self._failure = error
        finally:
            self._reading = False
            self._wake_consumer()

    def _wake_consumer(self) -> None:
        waiter, self._consumer_waiter = self._consumer_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _room_freed(self) -> None:
        waiter, self._reader_waiter = self._reader_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        elif self._awaiting_request and not self._slots:
            self._mark_idle()  # everything answered and taken while the client sends nothing

    # ---- the idle clock --------------------------------------------------------------------------------------

    def _mark_idle(self) -> None:
        if self._idle_timeout_s is None:
            return
        self._idle_since = self._loop.time()
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_later(self._idle_timeout_s, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self._idle_since is None or self._idle_timeout_s is None:
            return  # busy since: the next idle moment arms a new timer
        left = self._idle_since + self._idle_timeout_s - self._loop.time()
        if left > 0:
            self._idle_timer = self._loop.call_later(left, self._check_idle)
            return
        if self._reader is not None and not self._reader.done():
            self._idle_fired = True
            self._reader.cancel()

    # ---- the end ---------------------------------------------------------------------------------------------

    def _close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._reader is not None:
            self._reader.cancel()
        abandoned = 0
        while self._slots:
            slot = self._slots.popleft()
            if isinstance(slot, asyncio.Future):
                slot.cancel()
            abandoned += 1
        if abandoned:
            self._on_abandoned(abandoned)
