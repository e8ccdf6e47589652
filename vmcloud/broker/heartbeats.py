"""One timed call for the heart-beats of every connection, instead of two per connection.

A Twisted ``DelayedCall`` with the bound method, keyword dict and times it carries costs about half
a kilobyte, and the broker kept two per heart-beating connection (one to send beats, one to watch
for silence), re-armed every few seconds: a kilobyte per guest, and ten thousand entries in the
reactor's own heap at 5,000 guests, which every other timed call then paid for.

Here every heart-beating connection sits once in a heap ordered by when it next needs attention,
and a single timed call wakes for the earliest.  A woken connection does what is due (send a beat,
drop a silent peer) and says when it wants waking next.  A connection that goes away stays in the
heap, marked, until it comes up or until the marked ones are half the heap, when they are swept
out (taking one out of the middle of a heap costs a pass over the heap); when the last one goes,
so does the timed call.
"""

from __future__ import annotations

import heapq
import typing

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

#: How early a sleeper may be woken, so that a wake-up computed with floats a hair later than the
#: clock's reading is not put off to another turn.
SLACK = 1e-6

#: Below this many marked entries the heap is never swept; sweeping is a pass over all of it.
_SWEEP_MIN = 64


class Sleeper(typing.Protocol):
    """What :class:`Heartbeats` keeps: a connection that wants waking at ``wake_at``.

    ``wake_at`` is the heap key: it must not change while the sleeper is in the heap, and the
    sleeper orders by it (``__lt__``).  ``scheduled`` belongs to :class:`Heartbeats`.
    """

    wake_at: float
    scheduled: bool

    def __lt__(self, other: typing.Any) -> bool: ...

    def wake(self, now: float) -> float | None:
        """Do what is due at ``now``; return when to wake next, or None to leave the schedule."""
        ...


class Heartbeats:
    """The heart-beat schedule of one listener (its factory): a heap of sleepers, one timed call."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._heap: list[Sleeper] = []
        self._call: IDelayedCall | None = None
        self._due = 0.0
        self._marked = 0  # sleepers removed but still in the heap

    def __len__(self) -> int:
        """Sleepers in the schedule (removed ones not counted)."""
        return len(self._heap) - self._marked

    def add(self, sleeper: Sleeper, at: float) -> None:
        """Wake ``sleeper`` at ``at`` (clock seconds), and from then on when it asks."""
        sleeper.wake_at = at
        sleeper.scheduled = True
        heapq.heappush(self._heap, sleeper)
        if self._call is None or at < self._due:
            self._arm(at)

    def remove(self, sleeper: Sleeper) -> None:
        """Never wake ``sleeper`` again (it leaves the heap when it comes up, or in a sweep)."""
        if not sleeper.scheduled:
            return
        sleeper.scheduled = False
        self._marked += 1
        heap = self._heap
        if self._marked == len(heap):  # nobody left: no timed call either (a clean reactor)
            heap.clear()
            self._marked = 0
            if self._call is not None:
                self._call.cancel()
                self._call = None
        elif self._marked >= _SWEEP_MIN and 2 * self._marked >= len(heap):
            heap[:] = [s for s in heap if s.scheduled]  # in place: a wake-up may be iterating it
            heapq.heapify(heap)
            self._marked = 0
            if not heap and self._call is not None:
                self._call.cancel()
                self._call = None

    def _arm(self, at: float) -> None:
        if self._call is not None:
            self._call.cancel()
        self._due = at
        self._call = self._clock.callLater(max(0.0, at - self._clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._call = None
        now = self._clock.seconds()
        heap = self._heap
        woken: list[Sleeper] = []
        while heap and heap[0].wake_at <= now + SLACK:
            sleeper = heapq.heappop(heap)
            if not sleeper.scheduled:
                self._marked -= 1
                continue
            sleeper.scheduled = False  # while it runs: removing itself must not count it as marked
            try:
                again = sleeper.wake(now)
            except Exception:
                log.failure("A heart-beat wake-up failed", event="broker-internal-error")
                continue
            if again is not None and not sleeper.scheduled:
                sleeper.wake_at = max(again, now + SLACK)
                woken.append(sleeper)
        for sleeper in woken:
            sleeper.scheduled = True
            heapq.heappush(heap, sleeper)
        if heap:
            self._arm(heap[0].wake_at)
