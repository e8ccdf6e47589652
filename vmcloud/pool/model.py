"""The pool's records and the pure transitions between VM states.

Everything here is plain data: frozen, slotted ``attrs`` records and functions that take a record
and the time and return a new record.  No I/O, no clock, no reactor: the reconciler owns time and
effects, this module only says what a VM *is* after something happened to it.

A VM carries a ``version`` bumped on every change of state.  Whatever the reconciler starts on a
VM's behalf (a boot, a PREPARE) remembers the version it was started against; when the answer
comes back against another version, the VM has moved on and the answer is stale (the original
controller's ``verSet``).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from vmcloud.pool.config import PoolConfig
from vmcloud.pool.options import BatchOptions


class VMState(enum.Enum):
    """The life of a VM; the value is the name, since states travel as names."""

    CREATING = "CREATING"  # the cloud was asked for a server
    BOOTING = "BOOTING"  # the cloud accepted it; waiting for the guest's HELLO
    FREE = "FREE"  # idle, clean, ready to be prepared for a batch
    WAIT = "WAIT"  # a PREPARE (batch set) or CLEANUP (no batch) is in flight
    READY = "READY"  # prepared for its batch, waiting for a lock
    OCCUPIED = "OCCUPIED"  # lent to a handle (or released and waiting for its cleanup)
    ERROR = "ERROR"  # something went wrong; to be terminated
    KILLING = "KILLING"  # termination asked of the cloud


#: States a VM can be recovered in after a restart: nothing was in flight.
STABLE = frozenset({VMState.FREE, VMState.READY, VMState.OCCUPIED})
#: States that do not count towards the pool size: the VM is on its way out.
DEAD = frozenset({VMState.ERROR, VMState.KILLING})


@attrs.frozen
class PoolSpec:
    """The pool size an operator asked for with set-pool-size (before the hard cap clamps it)."""

    minimum: int = 0
    maximum: int = 0
    linger_ms: int = 60_000

    @property
    def linger(self) -> float:
        """Linger in seconds, the unit of the clock."""
        return self.linger_ms / 1000.0


@attrs.frozen
class VM:
    """One VM of the pool, as the controller knows it.

    ``macs``/``ips`` are what the cloud reports for the server; ``mac``/``ip`` what the guest said
    in its HELLO.  ``batch`` is the batch the VM is being prepared for, is READY for, or was locked
    from; ``handle`` the handle holding an OCCUPIED VM (None once released: it then waits for its
    cleanup).  ``recovering`` marks a VM kept from a checkpoint whose guest has not said HELLO
    again yet: it gets no new work until it does.  ``image`` is the image the cloud says the
    server was booted from (None until a listing said it, and for drivers without images); it is
    not checkpointed: every listing refreshes it.
    """

    vmid: str
    state: VMState
    created_at: float
    version: int = 0
    since: float = 0.0
    server_id: str | None = None
    booted_at: float | None = None
    login: str | None = None
    passcode: str | None = attrs.field(default=None, repr=False)
    identity: str | None = None
    mac: str | None = None
    ip: str | None = None
    macs: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    batch: str | None = None
    handle: str | None = None
    last_used: float = 0.0
    vnc_password: str | None = None
    # the ports the guest's VNC and audio servers listen on this session (None: the defaults, 5900
    # and 5901); the address is the one the controller knows for the VM, never one the guest names
    vnc_port: int | None = None
    audio_port: int | None = None
    # the operator's view-only VNC login as the guest's HELLO said it, for the agent's life and in
    # every state (the monitor's screens): its VNC server's port and the password, a secret never
    # shown in /all-status or a log and not kept in the checkpoint (the next HELLO says it again)
    view_port: int | None = None
    view_password: str | None = attrs.field(default=None, repr=False)
    capabilities: tuple[str, ...] = ()
    recovering: bool = False
    reason: str | None = None
    image: str | None = None

    @property
    def alive(self) -> bool:
        """Whether the VM counts towards the pool size."""
        return self.state not in DEAD

    @property
    def preparing(self) -> bool:
        """A PREPARE is in flight: the VM already belongs to its batch."""
        return self.state is VMState.WAIT and self.batch is not None

    def outdated(self, image: str | None) -> bool:
        """Booted from another image than ``image``, the one new VMs boot from (None: no images)."""
        return self.image is not None and image is not None and self.image != image

    @property
    def released(self) -> bool:
        """OCCUPIED but its handle is gone: a CLEANUP is due."""
        return self.state is VMState.OCCUPIED and self.handle is None


@attrs.frozen
class Batch:
    """VMs prepared alike (home page and options) for an application to lock.

    The VMs serving a batch are not listed here: the pool state indexes VMs by (state, batch), so
    membership has one source of truth, the VM records.
    """

    id: str
    size: int
    homepage: str
    options: BatchOptions
    created_at: float
    cancelled: bool = False


@attrs.frozen
class Event:
    """Something that happened on a handle's VM; ``time`` is seconds on the controller's clock."""

    id: int
    time: float
    data: Mapping[str, Any]


class EventLog:
    """The events of one handle: bounded, oldest dropped first, drops counted.

    Mutable on purpose: it lives as long as its handle while the frozen ``Handle`` record around it
    is replaced on every change, and appending must not copy the log.
    """

    __slots__ = ("_events", "dropped", "next_id")

    def __init__(self, limit: int, next_id: int = 1, dropped: int = 0, events: Iterable[Event] = ()) -> None:
        self._events: deque[Event] = deque(events, maxlen=limit)
        self.next_id = next_id
        self.dropped = dropped

    @property
    def last_id(self) -> int:
        """The id of the newest event, 0 before the first one."""
        return self.next_id - 1

    def append(self, data: Mapping[str, Any], now: float) -> Event:
        """Record an event; when full, the oldest one is dropped and counted."""
        event = Event(self.next_id, now, data)
        if len(self._events) == self._events.maxlen:
            self.dropped += 1
        self._events.append(event)
        self.next_id += 1
        return event

    def after(self, last_id: int) -> tuple[list[Event], int]:
        """Events with an id above ``last_id``, and how many of those were already dropped."""
        events = self._events
        if not events or last_id >= events[-1].id:
            return [], 0
        first = events[0].id
        missed = max(0, first - (last_id + 1))
        if last_id < first:
            return list(events), missed
        return [e for e in events if e.id > last_id], 0

    def __iter__(self) -> Any:
        return iter(self._events)

    def __len__(self) -> int:
        return len(self._events)


@attrs.frozen
class LostVM:
    """Why a handle lost its VM: the application must be able to notice."""

    vmid: str
    reason: str
    at: float


@attrs.frozen
class Handle:
    """A capability token lending one VM of a batch to whoever holds it.

    ``vmid`` is None while the lock waits for a READY VM, and again after the VM died (``lost``
    then says which and why); a handle that lost its VM is not given another one: the worker's
    session is gone, the application decides what to do and releases the handle.
    """

    token: str
    batch: str
    created_at: float
    events: EventLog = attrs.field(eq=False, repr=False)
    vmid: str | None = None
    expire_at: float | None = None
    lost: LostVM | None = None


@attrs.frozen
class PendingLock:
    """A lock waiting for a READY VM of its batch; served first come, first served."""

    handle: str
    batch: str
    since: float


@attrs.frozen
class Stray:
    """A server with our prefix that the pool does not track; deleted once seen twice in a row."""

    server_id: str
    name: str
    seen: int = 1
    deleting_since: float | None = None


@attrs.frozen
class CloudHealth:
    """How the cloud has been answering; shown in /all-status and gating the plan.

    ``backoff_until`` stops every cloud call until then; ``quota_until`` stops only boots (the pool
    cannot grow, it can still shrink).
    """

    failures: int = 0
    backoff_until: float = 0.0
    quota_failures: int = 0
    quota_until: float = 0.0
    #: VMs that died before their guest ever said HELLO (a broken image or agent): booting more
    #: at once would only make more of them.
    boot_failures: int = 0
    boot_backoff_until: float = 0.0
    last_error: str | None = None
    last_error_at: float | None = None

    def backing_off(self, now: float) -> bool:
        return now < self.backoff_until

    def can_grow(self, now: float) -> bool:
        return now >= self.backoff_until and now >= self.quota_until and now >= self.boot_backoff_until

    @property
    def probing(self) -> bool:
        """Boots failed lately: one boot at a time until one succeeds."""
        return bool(self.failures or self.quota_failures or self.boot_failures)


# --------------------------------------------------------------------------- transitions


def transition(vm: VM, state: VMState, now: float, **changes: Any) -> VM:
    """The VM in a new state since ``now``, its version bumped so older answers become stale."""
    return attrs.evolve(vm, state=state, version=vm.version + 1, since=now, **changes)


def new_vm(vmid: str, now: float) -> VM:
    """A VM whose server the cloud is about to be asked for."""
    return VM(vmid=vmid, state=VMState.CREATING, created_at=now, since=now, version=1)


def boot_accepted(vm: VM, server_id: str, now: float) -> VM:
    """The cloud accepted the server; a guest that already said HELLO makes the VM FREE at once."""
    if vm.identity is not None:
        return transition(vm, VMState.FREE, now, server_id=server_id, booted_at=now, last_used=now)
    return transition(vm, VMState.BOOTING, now, server_id=server_id, booted_at=now)


def prepare_started(vm: VM, batch: str, now: float) -> VM:
    return transition(vm, VMState.WAIT, now, batch=batch, handle=None, reason="prepare")


def prepared(
    vm: VM, vnc_password: str | None, now: float, vnc_port: int | None = None, audio_port: int | None = None
) -> VM:
    return transition(
        vm,
        VMState.READY,
        now,
        vnc_password=vnc_password,
        vnc_port=vnc_port,
        audio_port=audio_port,
        reason=None,
    )


def cleanup_started(vm: VM, now: float) -> VM:
    """The VM leaves its batch and its handle; CLEANUP gives it a fresh browser profile."""
    return transition(vm, VMState.WAIT, now, batch=None, handle=None, reason="cleanup")


def cleaned(vm: VM, now: float) -> VM:
    return transition(
        vm, VMState.FREE, now, last_used=now, vnc_password=None, vnc_port=None, audio_port=None, reason=None
    )


def occupied(vm: VM, handle: str, now: float) -> VM:
    return transition(vm, VMState.OCCUPIED, now, handle=handle, last_used=now)


def failed(vm: VM, reason: str, now: float) -> VM:
    """Something is wrong with the VM: it will be terminated (and replaced if it served a batch)."""
    return transition(vm, VMState.ERROR, now, reason=reason, handle=None, recovering=False)


def killing(vm: VM, reason: str, now: float) -> VM:
    return transition(vm, VMState.KILLING, now, reason=reason, handle=None, recovering=False)


def after_boot_failure(health: CloudHealth, reason: str, now: float, config: PoolConfig) -> CloudHealth:
    """A VM died before its guest said HELLO: pause booting, longer for each failure in a row.

    Failures during the pause (VMs of the same burst) count once: the pause grows per retry.
    """
    failures = health.boot_failures + 1 if now >= health.boot_backoff_until else max(1, health.boot_failures)
    pause = min(config.backoff_base * 2 ** min(failures - 1, 16), config.backoff_max)
    return attrs.evolve(
        health,
        boot_failures=failures,
        boot_backoff_until=max(health.boot_backoff_until, now + pause),
        last_error=f"VM died before its guest said HELLO: {reason}",
        last_error_at=now,
    )
