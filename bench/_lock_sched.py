"""How long a thread ran, and how long it waited for a CPU, from ``/proc/.../schedstat``.

On a host shared with other work a slow request is often a request whose server (or client) sat on
the run queue while other processes had both cores.  The kernel counts that, per thread, in
nanoseconds: ``schedstat`` holds the time on a CPU and the time runnable but waiting.  Reading it
around each measured request splits a latency into what the daemon did and what the host's other
load cost it.  A ``pread`` of the open file costs about a microsecond, outside the timed window.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Sched:
    """Cumulative nanoseconds a thread ran and waited on a run queue."""

    run: int
    wait: int

    def __sub__(self, other: Sched) -> Sched:
        return Sched(self.run - other.run, self.wait - other.wait)


class SchedStat:
    """One thread's counters; ``tid`` None is the thread group leader (a twistd's reactor thread)."""

    def __init__(self, pid: int, tid: int | None = None) -> None:
        path = f"/proc/{pid}/task/{tid}/schedstat" if tid is not None else f"/proc/{pid}/schedstat"
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY)
        except OSError:
            self._fd = None  # kernel without schedstats: figures say 0

    @classmethod
    def this_thread(cls) -> SchedStat:
        return cls(os.getpid(), threading.get_native_id())

    def read(self) -> Sched:
        if self._fd is None:
            return Sched(0, 0)
        try:
            run, wait, _slices = os.pread(self._fd, 128, 0).split()
        except (OSError, ValueError):
            return Sched(0, 0)
        return Sched(int(run), int(wait))

    @property
    def available(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
