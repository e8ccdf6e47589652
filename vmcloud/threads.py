"""The one seam to blocking code: a ``Dispatch`` runs a callable off the reactor thread.

Blocking libraries (python-novaclient, the checkpoint's fsyncs, the guest's file writes) are
reached through an injected dispatcher, never through the reactor's own thread pool, which DNS
resolution shares.  Production hands out :meth:`ThreadPoolService.dispatch` (a dedicated, bounded
pool that lives as long as the daemon); tests and tools hand out :func:`synchronous_dispatch`, or
build a service tree with :class:`SynchronousThreads` in place of the pools.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class Dispatch(Protocol):
    """Runs ``work`` somewhere other than the reactor thread; the Deferred fires on the reactor."""

    def __call__(self, work: Callable[[], T], /) -> Deferred[T]: ...


def thread_dispatcher(reactor: IReactorFromThreads, pool: ThreadPool) -> Dispatch:
    """A dispatcher whose ``work`` runs in ``pool`` (a dedicated thread pool, started by the caller)."""

    def dispatch(work: Callable[[], T], /) -> Deferred[T]:
        return deferToThreadPool(reactor, pool, work)

    return dispatch


def synchronous_dispatch(work: Callable[[], T], /) -> Deferred[T]:
    """Run ``work`` right now on the calling thread; for tests and tools that have no threads."""
    try:
        return succeed(work())
    except Exception:
        return fail(Failure())


class Threads(Service):
    """A service that owns the threads behind :meth:`dispatch` (a :class:`Dispatch`)."""

    def dispatch(self, work: Callable[[], T], /) -> Deferred[T]:
        raise NotImplementedError


#: Builds the threads of one room from ``(name, size)``: :class:`ThreadPoolService` in the daemon.
ThreadsFactory = Callable[[str, int], Threads]


class ThreadPoolService(Threads):
    """A dedicated, bounded thread pool that lives exactly as long as the service tree it is in."""

    def __init__(self, reactor: Any, name: str, size: int) -> None:
        self.setName(name)
        self._reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=size, name=name)

    def dispatch(self, work: Callable[[], T], /) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self.pool, work)

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self.pool.start()

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        super().stopService()
        # joining the workers blocks: done from the reactor's own pool, not the reactor thread
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self.pool.stop)


class SynchronousThreads(Threads):
    """Stands in for a :class:`ThreadPoolService` where there are no threads: work runs on the spot."""

    def __init__(self, name: str, size: int = 1) -> None:
        self.setName(name)

    def dispatch(self, work: Callable[[], T], /) -> Deferred[T]:
        return synchronous_dispatch(work)


__all__ = [
    "Dispatch",
    "SynchronousThreads",
    "ThreadPoolService",
    "Threads",
    "ThreadsFactory",
    "synchronous_dispatch",
    "thread_dispatcher",
]
