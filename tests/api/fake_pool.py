"""A recording IPoolControl for the API tests: remembers every call, answers what a test sets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from zope.interface import implementer

from vmcloud.pool.interfaces import BatchOptions, IPoolControl


@implementer(IPoolControl)
class RecordingPool:
    """Records ``(method, args)``; ``raises[method]`` makes that method raise instead.

    ``events`` is what fetch_events answers at once; set ``hold_events`` to get a Deferred the
    test fires later (``pending_fetch``), as a long poll that waits would.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.raises: dict[str, BaseException] = {}
        self.batch_id = "b1"
        self.handle = "h-0123456789abcdef0123456789abcdef"
        self.status: Mapping[str, Any] = {"assigned": False}
        self.last_id = 7
        self.events: Mapping[str, Any] = {"lastId": 7, "newEvents": []}
        self.hold_events = False
        self.pending_fetch: Deferred[Mapping[str, Any]] | None = None
        self.cancelled_fetches = 0
        self.everything: Mapping[str, Any] = {
            "poolSize": {"min": 0, "max": 0, "linger": 0},
            "vms": [],
            "batches": [],
            "preps": [],
            "handles": [],
            "pendingLocks": [],
        }

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.raises:
            raise self.raises[name]

    def set_pool_size(self, minimum: int, maximum: int, linger_ms: int) -> None:
        self._record("set_pool_size", minimum, maximum, linger_ms)

    def prepare_batch(self, size: int, homepage: str, options: BatchOptions) -> str:
        self._record("prepare_batch", size, homepage, options)
        return self.batch_id

    def lock(self, batch: str) -> str:
        self._record("lock", batch)
        return self.handle

    def release(self, handle: str) -> None:
        self._record("release", handle)

    def handle_status(self, handle: str) -> Mapping[str, Any]:
        self._record("handle_status", handle)
        return self.status

    def renew_expire(self, handle: str, expire_ms: int) -> None:
        self._record("renew_expire", handle, expire_ms)

    def last_event_id(self, handle: str) -> int:
        self._record("last_event_id", handle)
        return self.last_id

    async def fetch_events(self, handle: str, last_id: int, wait: float) -> Mapping[str, Any]:
        self._record("fetch_events", handle, last_id, wait)
        if self.hold_events:
            self.pending_fetch = Deferred()
            try:
                return await self.pending_fetch
            except CancelledError:
                self.cancelled_fetches += 1
                raise
        return self.events

    def cancel_batch(self, batch: str) -> None:
        self._record("cancel_batch", batch)

    def shutdown(self) -> None:
        self._record("shutdown")

    def all_status(self) -> Mapping[str, Any]:
        self._record("all_status")
        return self.everything
