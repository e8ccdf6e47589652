"""A recording IPoolControl for the API tests: remembers every call, answers what a test sets.

It answers with the records the real pool answers with (:mod:`vmcloud.pool.views`), so the JSON
the API makes of them is the API's own and cannot drift from what the real pool's answers give
(``tests/api/test_shapes.py`` compares the two).  The default answers hold one of everything: a
VM lent to the handle, a batch, a preparation in flight and one queued, a pending lock.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from zope.interface import implementer

from vmcloud.pool.interfaces import BatchOptions, IPoolControl
from vmcloud.pool.model import (
    VM,
    Batch,
    CloudHealth,
    Event,
    EventLog,
    Handle,
    LostVM,
    PendingLock,
    PoolSpec,
    VMState,
)
from vmcloud.pool.views import (
    BatchView,
    CloudView,
    EventPage,
    HandleStatus,
    HandleView,
    PoolSize,
    PoolStatus,
    Preparation,
    ReconcilerView,
)

HANDLE = "h-0123456789abcdef0123456789abcdef"
WAITING = "h-waiting-for-a-vm-0123456789abcdef"
NOW = 1_700_000_000.25  # seconds on the pool's clock


def sample_vm(vmid: str = "e1-1", state: VMState = VMState.OCCUPIED, handle: str | None = HANDLE) -> VM:
    """A VM with every field the API shows set."""
    return VM(
        vmid=vmid,
        state=state,
        created_at=NOW - 120,
        version=5,
        since=NOW - 30,
        server_id=f"srv-{vmid}",
        identity=f"guest-{vmid}",
        mac="52:54:00:12:34:56",
        ip="10.0.0.7",
        macs=("52:54:00:12:34:56",),
        ips=("10.0.0.7",),
        batch="b1",
        handle=handle,
        last_used=NOW - 30,
        vnc_password="pw123456",
        capabilities=("cdp", "vnc", "audio"),
    )


def sample_handle(token: str = HANDLE, vmid: str | None = "e1-1", lost: LostVM | None = None) -> Handle:
    events = EventLog(100)
    events.append({"action": "vm-assigned", "vmid": vmid}, NOW - 30)
    return Handle(token, "b1", NOW - 31, events, vmid=vmid, expire_at=NOW + 600, lost=lost)


def sample_status(version: int = 42) -> PoolStatus:
    """/all-status with one of each thing it lists."""
    lent = sample_handle()
    waiting = sample_handle(WAITING, vmid=None)
    batch = Batch("b1", 2, "https://example.com/", BatchOptions(audio=True), NOW - 60)
    return PoolStatus(
        version=version,
        time=NOW,
        size=PoolSize(PoolSpec(1, 4, 60_000), 1, 4, 30),
        vms=(sample_vm(), sample_vm("e1-2", VMState.WAIT, handle=None)),
        batches=(BatchView(batch, ready=0, preparing=1, occupied=1, pending_locks=1),),
        preps=(Preparation("b1", "e1-2", NOW - 1), Preparation("b1")),
        handles=(HandleView(lent, 1, 1, 0), HandleView(waiting, 0, 0, 0)),
        pending_locks=(PendingLock(WAITING, "b1", NOW - 5),),
        cloud=CloudView(
            "fake",
            CloudHealth(failures=1, backoff_until=NOW + 5, last_error="boom", last_error_at=NOW - 1),
            last_listing_at=NOW - 2,
            strays=0,
        ),
        shutting_down=False,
        reconciler=ReconcilerView(12, 0.0015, 0.02),
    )


@implementer(IPoolControl)
class RecordingPool:
    """Records ``(method, args)``; ``raises[method]`` makes that method raise instead.

    ``events`` is what fetch_events answers at once and ``everything`` what all_status and
    status_after do; set ``hold_events`` (``hold_status``) to get a Deferred the test fires later
    (``pending_fetch``, ``pending_status``), as a long poll that waits would.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        self.raises: dict[str, BaseException] = {}
        self.batch_id = "b1"
        self.handle = HANDLE
        self.status = HandleStatus(sample_handle(), sample_vm(), audio=True)
        self.last_id = 7
        self.events = EventPage(7, (), 0)
        self.hold_events = False
        self.pending_fetch: Deferred[EventPage] | None = None
        self.cancelled_fetches = 0
        self.everything = sample_status()
        self.hold_status = False
        self.pending_status: Deferred[PoolStatus] | None = None
        self.cancelled_status_waits = 0

    def _record(self, name: str, *args: object) -> None:
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

    def handle_status(self, handle: str) -> HandleStatus:
        self._record("handle_status", handle)
        return self.status

    def renew_expire(self, handle: str, expire_ms: int) -> None:
        self._record("renew_expire", handle, expire_ms)

    def last_event_id(self, handle: str) -> int:
        self._record("last_event_id", handle)
        return self.last_id

    async def fetch_events(self, handle: str, last_id: int, wait: float) -> EventPage:
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

    def terminate_vm(self, vmid: str) -> None:
        self._record("terminate_vm", vmid)

    def shutdown(self) -> None:
        self._record("shutdown")

    def all_status(self) -> PoolStatus:
        self._record("all_status")
        return self.everything

    async def status_after(self, since: int, wait: float) -> PoolStatus:
        self._record("status_after", since, wait)
        if self.hold_status:
            self.pending_status = Deferred()
            try:
                return await self.pending_status
            except CancelledError:
                self.cancelled_status_waits += 1
                raise
        return self.everything


def page_of(*events: tuple[int, float, dict[str, object]]) -> EventPage:
    """An EventPage of ``(id, time, data)`` events, its last id the last event's."""
    records = tuple(Event(i, t, d) for i, t, d in events)
    return EventPage(records[-1].id if records else 0, records, 0)
