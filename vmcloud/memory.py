"""The daemon's process-wide memory policy, behind one switch: :func:`apply_policy`.

A controller of 5,000 VMs holds 5,000 guest connections and their records for weeks, and every
few seconds its cloud threads parse a listing of 5,000 servers.  Two settings of the process,
not of any one room, keep that within README's figures; ``tap.py`` applies both with one call,
and nothing else in the tree touches the allocator or the collector:

* **glibc's allocator** (:func:`tune_allocator`).  Every thread that allocates gets an arena of
  its own (up to eight per core), and the threshold above which a block is mapped on its own
  grows with every large block freed, so megabyte-sized response bodies end up in the heaps and
  pin them.  The policy caps the arenas at two and fixes the thresholds (what ``MALLOC_ARENA_MAX=2
  MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072`` would do, without asking operators
  to set them).  Measured with ``bench/scale.py`` at 5,000 VMs: 7.3-7.6 KiB of RSS per VM with it,
  12.5-12.7 KiB without (the target is 10 KB).
* **Python's cyclic collector** (:class:`FreezeSurvivors`).  A full collection walks every object
  the pool holds, with the GIL held and the reactor stopped.  The policy moves what survived a
  full collection out of the collector's reach (``gc.freeze``), so the next one walks only what
  is new; every ``thaw_interval`` it gives them back, and one full walk finds whatever garbage
  cycle formed among them since.  Measured at 5,000 VMs: full collections of 1.4-2.6 ms (mean)
  with it, 83-106 ms (up to 300 ms of wall time) without.

Tried and dropped, for measuring the same with and without (at 5,000 VMs): returning free heap
pages every 30 s (``malloc_trim``; 7.3-7.4 KiB per VM without, 7.6 with), and switching the
collector off while a cloud thread parses a listing (full collections of 1.4-2.4 ms and 7.6 KiB
per VM without it, as with it).

Nothing here changes what the daemon does, only what it costs; on a system without glibc the
allocator settings are skipped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Any

from twisted.application.service import IService, IServiceCollection, Service
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
    if not hasattr(libc, "mallopt"):
        return None  # not glibc (musl, macOS)
    return libc


def tune_allocator() -> bool:
    """Set glibc's allocator up for a long-lived threaded daemon; False when it is not glibc.

    Call it early, before the thread pools start: arenas already made stay.
    """
    libc = _libc()
    if libc is None:
        return False
    ok = all(
        libc.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)) == 1
        for parameter, value in (
            (_M_ARENA_MAX, ARENA_MAX),
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        )
    )
    if not ok:
        log.warn("glibc refused a malloc setting; the daemon keeps its defaults", event="memory")
    return ok


class FreezeSurvivors(Service):
    """What exists at the start, and after each full collection its survivors, frozen; all of
    it thawed once a ``thaw_interval``.

    A full collection's cost is the number of objects it walks.  Objects that survived one are
    the pool's long-lived records and connections; frozen, they are still freed by reference
    counting when let go, but a garbage *cycle* among them waits for the next thaw.  So the
    daemon pays one full walk per ``thaw_interval`` instead of one every few seconds while the
    pool grows or churns.
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
        gc.freeze()  # what was built before the start lives as long as the daemon
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


def apply_policy(reactor: Any, daemon: IService) -> None:
    """The switch: the allocator tuned now, and the collector's freezing as a service of
    ``daemon`` (added last, so it starts once everything else is built).

    Call it before the daemon starts: the allocator's settings must come before its threads.
    """
    tune_allocator()
    FreezeSurvivors(reactor).setServiceParent(IServiceCollection(daemon))


__all__ = ["FreezeSurvivors", "apply_policy", "tune_allocator"]
