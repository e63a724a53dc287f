"""Group commit: requests that arrive together run through one function, in one storage transaction.

``Batcher(run)`` starts ``threads`` worker threads. ``submit(item)`` (any thread) queues the item and blocks
until a worker has run a batch holding it (``submit_nowait(item, callback)``: the callback hears of it instead):
each worker takes whatever is queued (at most ``max_batch``) and calls ``run(slots)``, which must finish every
slot with ``slot.set(value)`` or ``slot.fail(exc)``. While one worker is in its transaction, the next batch
gathers. Under load a worker first waits up to ``window`` seconds for its batch to fill: the storage's cost of
a batch is mostly per batch (its round trips and COMMIT), so a few milliseconds buy larger batches and less
work per request. Nothing waits when the process is idle: a request that finds the queue empty while the
previous batch held one request (no load) goes at once, as a batch of one (``idle_wait=True``: it waits too,
so that requests sent a moment apart from idle share a batch; for tests that need that).

``key(item)`` (optional) names what an item locks in storage (for confirms: the member): a worker leaves in
the queue the items whose key is in a batch another worker is running, so that two batches never wait for each
other's locks (they would only queue in the database, one batch's whole transaction behind the other's), and
the items of one key go into batches in the order they came (inside a batch, ``run`` decides the order). None:
the item locks nothing of its own.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

__all__ = ["Batcher", "Slot"]

log = logging.getLogger(__name__)


class Slot:
    """One request in a batch: ``item`` in, ``value`` or ``error`` out."""

    __slots__ = ("item", "key", "deadline", "value", "error", "done", "origin", "_event", "_callback")

    def __init__(self, item, callback=None, deadline: float | None = None):
        self.item = item
        self.key = None
        self.deadline = deadline                        # time.monotonic() by which its caller wants an answer
        self.value = None
        self.error: BaseException | None = None
        self.done = False
        self.origin = None                              # what ``Batcher.capture`` took in the submitting thread
        self._callback = callback                       # called with the slot once answered (no waiting)
        self._event = threading.Event() if callback is None else None

    def set(self, value) -> None:
        self.value = value
        self._finish()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self._finish()

    def _finish(self) -> None:
        self.done = True
        if self._event is not None:
            self._event.set()
        else:
            try:
                self._callback(self)
            except Exception:  # noqa: BLE001 - one waiter's callback must not stop the batch
                log.exception("batch callback failed")


class Batcher:
    def __init__(self, run, *, max_batch: int = 32, window: float = 0.0, threads: int = 2,
                 name: str = "batcher", key=None, idle_wait: bool = False):
        self._run = run
        self._key = key
        self._busy: dict = {}       # key -> how many running batches hold items of it
        self.max_batch = max(1, max_batch)
        self.window = max(0.0, window)
        self.idle_wait = idle_wait
        self._queue: collections.deque[Slot] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self.batches = 0            # statistics: batches run and items in them
        self.items = 0
        self._last = 0              # the size of the batch taken last: 1 (or 0) means no load, take at once
        self.on_batch = None        # on_batch(n) for every batch of n taken (the metrics), under the lock
        # traces: ``capture()`` in the submitting thread (its span's context, kept in ``slot.origin``), and
        # ``around(batch)``, a context manager entered around running a batch (a span linked to those)
        self.capture = None
        self.around = None
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for t in self._threads:
            t.start()

    def submit(self, item, deadline: float | None = None):
        """Run ``item`` in the next batch; returns its value or raises its error."""
        slot = Slot(item, deadline=deadline)
        self._put(slot)
        slot._event.wait()
        if slot.error is not None:
            raise slot.error
        return slot.value

    def submit_nowait(self, item, callback, deadline: float | None = None) -> None:
        """Queue ``item``; ``callback(slot)`` is called from a worker once it is answered (``slot.value`` or
        ``slot.error``). Keep the callback short: the next batch waits for it. ``deadline``: for ``run``
        (``slot.deadline``)."""
        self._put(Slot(item, callback, deadline))

    def _put(self, slot: Slot) -> None:
        if self.capture is not None:
            slot.origin = self.capture()
        if self._key is not None:
            slot.key = self._key(slot.item)
        with self._cond:
            if self._closed:
                raise RuntimeError("batcher is closed")
            self._queue.append(slot)
            self._cond.notify()

    def _take(self) -> list[Slot] | None:
        with self._cond:
            while True:
                while not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                if (self.window and len(self._queue) < self.max_batch
                        and (self._last > 1 or len(self._queue) > 1 or self.idle_wait)):
                    deadline = time.monotonic() + self.window
                    while len(self._queue) < self.max_batch and not self._closed:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                # (another worker may have emptied the queue while this one waited for the window)
                if self._key is None:
                    n = min(len(self._queue), self.max_batch)
                    if n:
                        self._taken(n)
                        return [self._queue.popleft() for _ in range(n)]
                    continue
                batch = self._take_free()
                if batch:
                    self._taken(len(batch))
                    return batch
                if self._queue:
                    self._cond.wait()    # everything queued waits for a running batch: until one ends

    def _taken(self, n: int) -> None:
        """A batch of ``n`` is taken (under the lock, so that the counters, which the metrics export, lose no
        increment between worker threads and a scrape never sees a batch without its items)."""
        self._last = n
        self.batches += 1
        self.items += n
        if self.on_batch is not None:
            self.on_batch(n)

    def _take_free(self) -> list[Slot]:
        """Up to ``max_batch`` items, in queue order, whose keys no running batch holds (under the lock)."""
        busy = self._busy
        batch: list[Slot] = []
        kept: list[Slot] = []
        queue = self._queue
        while queue and len(batch) < self.max_batch:
            slot = queue.popleft()
            k = slot.key
            if k is not None and k in busy:
                kept.append(slot)
            else:
                batch.append(slot)
        queue.extendleft(reversed(kept))
        for slot in batch:
            if slot.key is not None:
                busy[slot.key] = busy.get(slot.key, 0) + 1
        return batch

    def _release(self, batch: list[Slot]) -> None:
        with self._cond:
            busy = self._busy
            for slot in batch:
                k = slot.key
                if k is not None:
                    left = busy[k] - 1
                    if left:
                        busy[k] = left
                    else:
                        del busy[k]
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                if self.around is None:
                    self._run(batch)
                else:
                    with self.around(batch):
                        self._run(batch)
            except BaseException as exc:  # noqa: BLE001 - every waiter must be woken, whatever happened
                log.exception("batch of %d failed", len(batch))
                for slot in batch:
                    if not slot.done:
                        slot.fail(exc)
            else:
                for slot in batch:
                    if not slot.done:
                        slot.fail(RuntimeError("batch left a request unanswered"))
            finally:
                if self._key is not None:
                    self._release(batch)

    def close(self) -> None:
        """Finish what is queued, then stop the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(30)
