"""WatchAlias behind the scenes: every open watch stream of this replica, and one poller that finds new alias moves
in the store, whichever replica made them.

    feed = AliasFeed(store)                        # started with the server, closed when it drains
    async for alias, current in feed.watch("cats", "production", since_revision=0):
        ...                                        # the alias as it stands, then after every move

Cross-replica: the poller reads each watched alias's moves after the last revision it saw, every `poll_interval_s`
(0.25 s), so a move made on another replica of the same database reaches this one's watchers within that bound
plus a query; a move made here wakes the poller at once. Polling was chosen over PostgreSQL's LISTEN/NOTIFY: the
same code serves SQLite, a notification lost while a replica reconnects to the database cannot lose a move (the
revisions are in the table), and the cost is one indexed query per watched alias per interval, not per watcher.

Memory: a watcher holds a bounded queue of references to shared AliasMove records (QUEUE_SIZE); when it falls
further behind it is flagged, drops its queue and reads what it missed from the store again, so a slow reader never
grows the server. Order and dedup use the revisions: a watcher never sends a revision twice or out of order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.common.errors import MistError, UnavailableError
from services.registry.records import Alias, AliasMove
from services.registry.store import RegistryStore

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.25
QUEUE_SIZE = 16  # moves waiting per watcher before it falls back to reading the store
_CLOSED = object()  # put in every queue when the feed closes


@dataclass(eq=False)
class _Watcher:
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    behind: bool = False  # its queue overflowed: read the missed moves from the store


class AliasFeed:
    """Watch streams of this replica by (task, alias), fed by one poller task."""

    def __init__(self, store: RegistryStore, *, poll_interval_s: float = POLL_INTERVAL_S) -> None:
        self._store = store
        self._poll_interval_s = poll_interval_s
        self._watchers: dict[tuple[str, str], set[_Watcher]] = {}
        self._last: dict[tuple[str, str], int] = {}  # the newest revision the poller has seen, per watched alias
        self._wake = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task | None = None

    @property
    def watchers(self) -> int:
        return sum(len(group) for group in self._watchers.values())

    def watchers_of(self, task: str) -> int:
        return sum(len(group) for (t, _), group in self._watchers.items() if t == task)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="alias-feed")

    def poke(self) -> None:
        """A move was just made on this replica: poll now instead of at the next interval."""
        self._wake.set()

    async def close(self) -> None:
        """End every watch stream (UNAVAILABLE: reconnect, to another replica) and stop polling."""
        self._closed = True
        for group in self._watchers.values():
            for watcher in group:
                with contextlib.suppress(asyncio.QueueFull):
                    watcher.queue.put_nowait(_CLOSED)
                watcher.behind = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def watch(self, task: str, alias: str, since_revision: int = 0) -> AsyncIterator[tuple[Alias, bool, int]]:
        """(alias state, current, pending) triples: first the state now (current True) or, with since_revision, each
        move after it (pending: how many more of that replay follow at once); then the state after every later move.
        NotFoundError at once for an unknown task or alias."""
        if self._closed:
            raise UnavailableError("this registry replica is shutting down: reconnect")
        key = (task, alias)
        watcher = _Watcher()
        group = self._watchers.setdefault(key, set())
        group.add(watcher)  # before reading the state: a move committed after that read reaches the queue
        try:
            if key not in self._last:
                revision = await asyncio.to_thread(self._store.latest_revision, task, alias)
                # The lowest of concurrent first readings: a higher one, read after a move committed, would let the
                # poller skip that move while a watcher whose state predates it waits for it. Lower only re-reads
                # moves the watchers already have (they drop revisions they sent).
                self._last[key] = min(self._last.get(key, revision), revision)
            state, missed = await asyncio.to_thread(self._store.watch_start, task, alias, since_revision)
            if missed:
                for index, move in enumerate(missed):
                    yield move.alias, False, len(missed) - index - 1
                sent = missed[-1].revision
            else:
                yield state, True, 0
                sent = state.revision
            while True:
                if watcher.behind:
                    watcher.behind = False
                    while not watcher.queue.empty():
                        if watcher.queue.get_nowait() is _CLOSED:
                            raise UnavailableError("this registry replica is shutting down: reconnect")
                    _, missed = await asyncio.to_thread(self._store.watch_start, task, alias, sent)
                    for index, move in enumerate(missed):
                        yield move.alias, False, len(missed) - index - 1
                        sent = move.revision
                    continue
                item = await watcher.queue.get()
                if item is _CLOSED:
                    raise UnavailableError("this registry replica is shutting down: reconnect")
                if item.revision > sent:
                    yield item.alias, False, 0
                    sent = item.revision
        finally:
            group.discard(watcher)
            if not group and self._watchers.get(key) is group:
                del self._watchers[key]
                self._last.pop(key, None)

    async def _run(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_interval_s)
            self._wake.clear()
            wanted = {key: self._last[key] for key in self._watchers if key in self._last}
            if not wanted:
                continue
            try:
                found = await asyncio.to_thread(self._store.moves_after, wanted)
            except MistError as error:  # the database is away: the streams stay open, moves come when it is back
                log.warning("alias feed could not read the store: %s", error)
                continue
            for key, moves in found.items():
                self._deliver(key, moves)

    def _deliver(self, key: tuple[str, str], moves: list[AliasMove]) -> None:
        # Delivered even when _last moved past them meanwhile (a first watcher's reading): each watcher drops
        # revisions it already sent, so a duplicate costs a queue slot, never a wrong event; a skipped move would.
        self._last[key] = max(self._last.get(key, 0), moves[-1].revision)
        for watcher in self._watchers.get(key, ()):
            if watcher.behind:
                continue
            for move in moves:
                try:
                    watcher.queue.put_nowait(move)
                except asyncio.QueueFull:
                    watcher.behind = True  # it reads the store again; wake it if it waits on an empty queue
                    break
