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
  than survived the last full collection have survived two young ones.  A listing's tens of
  thousands of short-lived dicts live just long enough to get there, so each listing set off a full
  collection of the whole pool (200 ms at 5,000 VMs, GIL held).  Work that makes many objects that
  all die together runs inside :func:`collection_paused`; reference counting still frees them.

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


__all__ = ["collection_paused", "trim", "tune_allocator"]
