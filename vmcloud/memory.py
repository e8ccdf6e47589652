"""The daemon's memory habits: a frugal allocator and a garbage collector that stays out of the way.

A controller of 5,000 VMs holds 5,000 guest connections and their records for weeks, and every
few seconds it parses a listing of 5,000 servers on a cloud thread.  Two things made that cost
three times the memory it needs and stalled the reactor for a fifth of a second at a time:

* **glibc's allocator.**  Every thread that allocates gets an arena of its own (up to eight per
  core), and the threshold above which a block is mapped on its own grows with every large block
  freed, so megabyte-sized response bodies end up in the heaps and pin them.  :func:`tune_allocator`
  caps the arenas at two and fixes the thresholds (what ``MALLOC_ARENA_MAX=2
  MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072`` would do, without asking operators
  to set them); :func:`trim` gives free pages inside the heaps back to the system.
* **Python's cyclic collector.**  Its oldest generation is collected when a quarter more objects
  than survived the last full collection have survived two young ones, and a full collection
  walks every object of the pool: 200 ms at 5,000 VMs, GIL held, reactor stopped.  A listing's tens
  of thousands of short-lived dicts lived just long enough to set one off every few listings; work
  that makes many objects that all die together now runs inside :func:`collection_paused`
  (reference counting still frees them).  And :class:`FreezeSurvivors` moves what survived a full
  collection out of the collector's reach (``gc.freeze``), so the next one walks only what is new;
  every ``thaw_interval`` it gives them back, and one full walk finds whatever garbage cycle formed
  among them since.

Nothing here changes what the daemon does, only what it costs; on a system without glibc the
allocator calls do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: Arenas for all threads together: the reactor, the cloud threads and the store thread share two.
ARENA_MAX = 2
#: Blocks from this size up are mapped on their own and unmapped when freed (glibc's default,
#: but fixed: glibc raises it up to 32 MB as large blocks are freed, and then they stay).
MMAP_THRESHOLD = 128 * 1024
#: Free memory at the top of a heap beyond this is given back at once.
TRIM_THRESHOLD = 128 * 1024


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None  # not glibc (musl, macOS)
    return libc


_LIBC = _libc()


def tune_allocator() -> bool:
    """Set glibc's allocator up for a long-lived threaded daemon; False when it is not glibc.

    Call it early, before the thread pools start: arenas already made stay.
    """
    if _LIBC is None:
        return False
    ok = all(
        _LIBC.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)) == 1
        for parameter, value in (
            (_M_ARENA_MAX, ARENA_MAX),
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        )
    )
    if not ok:
        log.warn("glibc refused a malloc setting; the daemon keeps its defaults", event="memory")
    return ok


def trim() -> bool:
    """Give the system back whole free pages inside the allocator's heaps; True when any went.

    Runs without the GIL (a ctypes call); a few milliseconds for a heap of a hundred megabytes.
    """
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(ctypes.c_size_t(0)))


_pause_lock = threading.Lock()
_pauses = 0
_resume = False


@contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic garbage collection, in any thread, while the block runs.

    For work that makes many objects which all die together when it ends (parsing a server
    listing): collected young they would only be promoted, and their mass would set off a full
    collection of everything.  Nests, and works across threads: the collector runs again when the
    last block ends, if it was running when the first began.  Keep the blocks short.
    """
    global _pauses, _resume
    with _pause_lock:
        if _pauses == 0:
            _resume = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0 and _resume:
                gc.enable()


class FreezeSurvivors(Service):
    """After each full collection, freeze its survivors; thaw them all once a ``thaw_interval``.

    A full collection's cost is the number of objects it walks.  Objects that survived one are
    the pool's long-lived records and connections; frozen, they are still freed by reference
    counting when let go, but a garbage *cycle* among them waits for the next thaw.  So the
    daemon pays one full walk (a fifth of a second at 5,000 VMs) per ``thaw_interval`` instead of
    one every few seconds while the pool grows or churns.
    """

    def __init__(self, reactor: Any, thaw_interval: float = 900.0, full_every: int = 2) -> None:
        self.setName("gc-freeze")
        #: Young (generation 1) collections between two full ones: CPython waits for 10, but with
        #: the survivors frozen a full collection walks only what came since, so it is cheaper
        #: (and its pause shorter) to walk that more often, in smaller bites.
        self._full_every = full_every
        self._thresholds = gc.get_threshold()
        self._reactor: IReactorFromThreads = reactor
        self._thaw = LoopingCall(self.thaw)
        clock: IReactorTime = reactor
        self._thaw.clock = clock
        self._interval = thaw_interval
        self.freezes = 0
        self.thaws = 0

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self._thresholds = gc.get_threshold()
        gc.set_threshold(self._thresholds[0], self._thresholds[1], self._full_every)
        gc.callbacks.append(self._collected)
        self._thaw.start(self._interval, now=False)

    def stopService(self) -> None:  # noqa: N802 - Twisted's name
        super().stopService()
        gc.set_threshold(*self._thresholds)
        if self._collected in gc.callbacks:
            gc.callbacks.remove(self._collected)
        if self._thaw.running:
            self._thaw.stop()

    def _collected(self, phase: str, info: dict[str, Any]) -> None:
        # Any thread may collect; the freeze happens on the reactor's next turn, not inside the
        # collector's callback.
        if phase == "stop" and info.get("generation") == 2:
            self._reactor.callFromThread(self.freeze)

    def freeze(self) -> None:
        gc.freeze()
        self.freezes += 1

    def thaw(self) -> None:
        """Give every frozen object back to the collector; the next full collection walks them."""
        gc.unfreeze()
        self.thaws += 1


__all__ = ["FreezeSurvivors", "collection_paused", "trim", "tune_allocator"]
