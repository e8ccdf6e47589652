"""What the pool answers the API: frozen records in the pool's own terms, never JSON.

The pool says what is, with its model's records (:class:`~vmcloud.pool.model.VM`,
:class:`~vmcloud.pool.model.Handle`, ...) and times in seconds on its clock; the REST API decides
how that looks on the wire (camelCase keys, milliseconds, the console and audio URLs of a worker's
page) in :mod:`vmcloud.api.shapes`.  So the API's test fake returns these same records and cannot
drift from the real pool, and nothing in the pool knows a URL or a JSON key.

The records hold what was true when they were made: counts are taken then, and a handle's event
log (the one mutable part of a handle) is read into numbers rather than handed over.
"""

from __future__ import annotations

import attrs

from vmcloud.pool.model import VM, Batch, CloudHealth, Event, Handle, PendingLock, PoolSpec


@attrs.frozen
class PoolSize:
    """The size set-pool-size asked for, and what the plan works to now (cap and shutdown applied)."""

    spec: PoolSpec
    effective_min: int
    effective_max: int
    max_pool_size: int


@attrs.frozen
class BatchView:
    """A batch with how many of its VMs are READY, preparing or lent, and the locks waiting on it."""

    batch: Batch
    ready: int
    preparing: int
    occupied: int
    pending_locks: int


@attrs.frozen
class Preparation:
    """A VM being prepared for a batch (``vmid``, since ``since``), or one queued (``vmid`` None)."""

    batch: str
    vmid: str | None = None
    since: float | None = None


@attrs.frozen
class HandleView:
    """A handle, with its event log's figures when the view was made."""

    handle: Handle
    last_event_id: int
    events: int
    dropped_events: int


@attrs.frozen
class CloudView:
    """How the cloud has been answering: the driver, its health, the last listing, the strays;
    and the image new VMs boot from (None: the driver has no images), which makes a VM booted
    from another one outdated (:meth:`~vmcloud.pool.model.VM.outdated`)."""

    driver: str
    health: CloudHealth
    last_listing_at: float | None
    strays: int
    image: str | None = None


@attrs.frozen
class ReconcilerView:
    """The reconciler's figures: passes run, the last one's and the slowest one's wall time."""

    passes: int
    last_pass_seconds: float
    slowest_pass_seconds: float


@attrs.frozen
class PoolStatus:
    """Everything the monitor shows, at ``time`` on the pool's clock.

    ``version`` moves whenever anything here changes but the figures that move with time alone
    (``time``, ``reconciler``, ``cloud.last_listing_at``): a client holding a version learns of a
    change by asking for the status after it (:meth:`~vmcloud.pool.interfaces.IPoolControl.status_after`).
    """

    version: int
    time: float
    size: PoolSize
    vms: tuple[VM, ...]
    batches: tuple[BatchView, ...]
    preps: tuple[Preparation, ...]
    handles: tuple[HandleView, ...]
    pending_locks: tuple[PendingLock, ...]
    cloud: CloudView
    shutting_down: bool
    reconciler: ReconcilerView


@attrs.frozen
class HandleStatus:
    """What the holder of a handle may know: the handle, its VM (None while it waits or once it
    lost it), and whether the batch asked for the VM's sound."""

    handle: Handle
    vm: VM | None
    audio: bool


@attrs.frozen
class EventPage:
    """Events of a handle after the id a client gave, and how many of those were dropped before."""

    last_id: int
    events: tuple[Event, ...]
    dropped: int
