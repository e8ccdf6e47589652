"""The pool as a Twisted service: the REST API's operations, the guest channel's listener.

``PoolService`` validates what the API asks (raising the :class:`PoolError` the API turns into
4xx JSON), changes the pool state, and lets the :class:`~vmcloud.pool.reconciler.Reconciler`
carry the consequences out.  It also keeps what only a live process has: long-polls waiting for
events and the timers of expiring handles.

Decisions worth knowing:

* ``set_pool_size`` stores the numbers as asked; the hard cap ``max_pool_size`` clamps ``max``
  (and ``min``) when planning, and ``/all-status`` shows both.  A batch larger than the cap is
  refused (400): it could never be READY.
* A handle whose OCCUPIED VM dies gets a ``{"action": "vm-died", "vmid", "reason"}`` event, is
  no longer assigned (``handle-status`` says ``"assigned": false`` with ``lost``), and stays
  valid until released or expired; it is not given another VM (the worker's session is gone and
  the application decides).  The VM is terminated and the pool replaces it by its rules.
* ``shutdown`` releases every handle, cancels every batch, terminates every VM and keeps the pool
  at 0; batches and locks are refused (409) until ``set_pool_size`` starts the pool again.
* ``terminate_vm`` (the operator's) marks the VM ERROR with the reason "terminated by the
  operator", as a VM that dies: its handle loses it, the plan deletes it and replaces it by its
  rules; it is not a boot failure, so booting does not slow down for it.
* Answers are records (:mod:`vmcloud.pool.views`); the API makes its JSON of them.  The status
  carries a version that moves whenever something it shows changes, checked after every API call,
  every reconcile pass (which follows every change the pool makes on its own) and every event, so
  that ``status_after`` wakes a waiting monitor within a reactor turn, without polling.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from vmcloud.pool.config import PoolConfig
from vmcloud.pool.durations import observe_transition
from vmcloud.pool.interfaces import (
    BatchCancelled,
    BatchOptions,
    GuestCredentials,
    GuestInfo,
    ICheckpointStore,
    ICloudDriver,
    IGuestChannel,
    IGuestCredentialsRestore,
    IGuestListener,
    InvalidRequest,
    IPoolControl,
    ShuttingDown,
    UnknownBatch,
    UnknownHandle,
    UnknownVM,
)
from vmcloud.pool.model import VM, Event, Handle, PoolSpec, VMState
from vmcloud.pool.plan import TERMINATED, effective_size, preparation_queue
from vmcloud.pool.reconciler import Reconciler
from vmcloud.pool.snapshot import SnapshotError, restore
from vmcloud.pool.state import GuestRefused, PoolState
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
from vmcloud.timings import NO_TIMINGS, ITimings

__all__ = ["PoolConfig", "PoolService"]

log = Logger()

#: Longest linger and handle expiry accepted, in milliseconds (a year).
MAX_MS = 365 * 24 * 3600 * 1000
#: Longest home page accepted.
MAX_URL = 4096
MAX_COOKIES = 200
MAX_COOKIE_FIELD = 4096
WINDOW_RANGE = (64, 16384)
#: An event from a guest larger than this (as JSON) is dropped.
MAX_EVENT_BYTES = 16 * 1024
#: A VM leaving these for FREE has a guest that came up.
BOOTED = frozenset({VMState.CREATING, VMState.BOOTING})
#: Long-polls waiting on one handle; beyond, the oldest is answered (empty) to make room.
MAX_WAITERS_PER_HANDLE = 8
#: Long-polls waiting for the status to change (monitors); beyond, the oldest is answered.
MAX_STATUS_WAITERS = 64


class StateLines:
    """The log's lines of VMs changing state: one a VM, but one a kind of change inside a pass.

    A pass may move thousands of VMs at once (a shutdown, a big batch); a line each cost more
    than the pass itself.  Inside :meth:`grouped`, VMs making the same change share a line that
    names them all (``VMs a, b, c: FREE -> WAIT``), so grepping a VM's id still finds its story.
    """

    def __init__(self) -> None:
        self._held: dict[tuple[str, str, str], list[str]] | None = None

    def say(self, vmid: str, before: str, after: str, why: str) -> None:
        if self._held is not None:
            self._held.setdefault((before, after, why), []).append(vmid)
            return
        log.info(
            "VM {vmid}: {before} -> {after}{why}",
            vmid=vmid,
            before=before,
            after=after,
            why=why,
            event="vm-state",
        )

    @contextmanager
    def grouped(self) -> Iterator[None]:
        if self._held is not None:  # nested: the outer block says it all
            yield
            return
        held: dict[tuple[str, str, str], list[str]] = {}
        self._held = held
        try:
            yield
        finally:
            self._held = None
            for (before, after, why), vmids in held.items():
                if len(vmids) == 1:
                    self.say(vmids[0], before, after, why)
                    continue
                log.info(
                    "VMs {list}: {before} -> {after}{why}",
                    list=", ".join(vmids),
                    vmids=vmids,
                    before=before,
                    after=after,
                    why=why,
                    event="vm-state",
                )


def _why(vm: VM | None) -> str:
    """What a state line adds: the reason a VM failed, or the server it got."""
    if vm is None:
        return ""
    if vm.reason:
        return f" ({vm.reason})"
    if vm.state is VMState.BOOTING and vm.server_id is not None:
        return f" (server {vm.server_id})"
    return ""


def _count(value: object, name: str, maximum: int | None = None) -> int:
    """A non-negative integer argument (not a bool), at most ``maximum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"{name} must be an integer, not {value!r}")
    if value < 0:
        raise InvalidRequest(f"{name} must not be negative ({value})")
    if maximum is not None and value > maximum:
        raise InvalidRequest(f"{name} must be at most {maximum} ({value})")
    return value


def check_homepage(homepage: object) -> str:
    """Only absolute http(s) URLs a browser can open; the API calls this too, before any work."""
    if not isinstance(homepage, str) or not homepage:
        raise InvalidRequest("homepage must be a URL")
    if len(homepage) > MAX_URL:
        raise InvalidRequest(f"homepage is longer than {MAX_URL} characters")
    if any(c.isspace() or ord(c) < 0x21 or ord(c) == 0x7F for c in homepage):
        raise InvalidRequest("homepage must not contain spaces or control characters")
    try:
        parts = urlsplit(homepage)
    except ValueError as e:
        raise InvalidRequest(f"homepage is not a URL: {e}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidRequest(f"homepage must be an http or https URL, not {parts.scheme or 'scheme-less'}")
    if not parts.hostname:
        raise InvalidRequest("homepage has no host")
    return homepage


def check_options(options: object) -> BatchOptions:
    if not isinstance(options, BatchOptions):
        raise InvalidRequest("options must be BatchOptions")
    low, high = WINDOW_RANGE
    for name, size in (("width", options.window_width), ("height", options.window_height)):
        if not isinstance(size, int) or isinstance(size, bool) or not low <= size <= high:
            raise InvalidRequest(f"window {name} must be an integer from {low} to {high}")
    if len(options.cookies) > MAX_COOKIES:
        raise InvalidRequest(f"at most {MAX_COOKIES} cookies")
    for cookie in options.cookies:
        for field in (cookie.name, cookie.value, cookie.path, cookie.domain or ""):
            if not isinstance(field, str) or len(field) > MAX_COOKIE_FIELD:
                raise InvalidRequest(
                    f"cookie fields must be strings of at most {MAX_COOKIE_FIELD} characters"
                )
        if not cookie.name:
            raise InvalidRequest("every cookie needs a name")
    return options


def _event_data(event: object) -> dict[str, Any] | None:
    """A guest's event as we keep it, or None when it is not one we can keep."""
    if not isinstance(event, Mapping) or not isinstance(event.get("action"), str):
        return None
    try:
        data = json.loads(json.dumps(dict(event), allow_nan=False))
    except (TypeError, ValueError):
        return None
    if len(json.dumps(data)) > MAX_EVENT_BYTES:
        return None
    return data  # type: ignore[no-any-return]


@implementer(IPoolControl, IGuestListener)
class PoolService(Service):
    """The pool of VMs: lends them through handles, keeps its size, survives restarts."""

    def __init__(
        self,
        clock: IReactorTime,
        driver: ICloudDriver,
        channel: IGuestChannel,
        store: ICheckpointStore,
        config: PoolConfig,
        *,
        epoch: str | None = None,
        timings: ITimings = NO_TIMINGS,
    ) -> None:
        self.setName("pool")
        self.config = config
        self._clock = clock
        self._channel = channel
        self._store = store
        cap = config.max_pool_size
        maximum = cap if config.initial_max is None else config.initial_max
        spec = PoolSpec(min(config.initial_min, maximum), maximum, config.initial_linger_ms)
        state = PoolState(epoch or secrets.token_hex(3), spec, config.events_per_handle)
        self._lines = StateLines()
        self._timings = timings
        self._reconciler = Reconciler(
            clock, driver, channel, store, config, state, grouping=self._pass, timings=timings
        )
        self._waiters: dict[str, list[Deferred[None]]] = {}
        self._expiry: dict[str, IDelayedCall] = {}
        self._stopping = False
        # The status version: it starts at the clock's milliseconds, so that a version a client kept
        # from an earlier run of the daemon is unlikely to be the current one.
        self._version = round(clock.seconds() * 1000)
        self._seen: tuple[object, ...] | None = None
        self._status_waiters: list[Deferred[None]] = []
        self._status_wake: IDelayedCall | None = None
        self._access_watchers: list[tuple[Callable[[str, str], None], Callable[[str, str], None]]] = []
        self._attach(state)
        channel.add_listener(self)

    @property
    def state(self) -> PoolState:
        """The pool state (read it; change it only through this service)."""
        return self._reconciler.state

    @property
    def reconciler(self) -> Reconciler:
        return self._reconciler

    def _attach(self, state: PoolState) -> None:
        state.observers.on_transition = self._log_transition
        state.observers.on_handle_event = self._event_added
        state.observers.on_handle_gone = self._handle_gone

    @contextmanager
    def _pass(self) -> Iterator[None]:
        """What each reconcile pass runs in: its state lines grouped, then the status version
        brought up to date.  Every change the pool makes on its own (answers from the cloud and
        guests, timeouts, the tick) is followed by a pass, so status waiters hear of it there."""
        try:
            with self._lines.grouped():
                yield
        finally:
            self._notice()

    # ------------------------------------------------------------------ life

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self._stopping = False
        try:
            data = self._store.load()
        except Exception as e:
            # starting clean would terminate every VM the unreadable checkpoint may describe
            log.critical(
                "Cannot read the checkpoint ({reason}); refusing to start. Fix it, or delete it to "
                "start clean (every server named {prefix}* is then terminated)",
                reason=str(e),
                prefix=self.config.prefix,
                event="checkpoint",
            )
            raise
        if data is None:
            log.info(
                "No checkpoint: starting clean; servers named {prefix}* that are not ours will be deleted",
                prefix=self.config.prefix,
                event="checkpoint",
            )
        else:
            self.restore(data)
        self._reconciler.start()

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        self._reconciler.stop()
        for call in self._expiry.values():
            if call.active():
                call.cancel()
        self._expiry.clear()
        for token in list(self._waiters):
            self._wake(token)
        self._wake_status()
        self._reconciler.checkpoint()
        await self._store.flush()
        if self.state.vms:
            log.info(
                "Pool stopped; its {count} VMs keep running and are recovered on the next start",
                count=len(self.state.vms),
                event="stop",
            )
        else:
            log.info("Pool stopped with no VM", event="stop")

    def restore(self, data: Mapping[str, Any]) -> bool:
        """Take the pool from a checkpoint (before start); False when it cannot be read."""
        now = self._clock.seconds()
        try:
            state = restore(data, now, self.config)
        except SnapshotError as e:
            log.error(
                "The checkpoint cannot be restored ({reason}); starting clean",
                reason=str(e),
                event="checkpoint",
            )
            return False
        self._attach(state)
        self._reconciler.state = state
        recovering = [vm for vm in state.vms.values() if vm.recovering]
        if IGuestCredentialsRestore.providedBy(self._channel):
            for vm in recovering:
                if vm.login is not None and vm.passcode is not None:
                    credentials = GuestCredentials(broker="", login=vm.login, passcode=vm.passcode)
                    try:
                        self._channel.restore_credentials(vm.vmid, credentials)
                    except Exception:
                        log.failure("Could not restore the credentials of VM {vmid}", vmid=vm.vmid)
        for handle in state.handles.values():
            if handle.expire_at is not None:
                self._arm_expiry(handle.token, handle.expire_at - now)
        log.info(
            "Checkpoint restored: {recovering} VMs waiting for their guest's HELLO, {doomed} to terminate, "
            "{batches} batches, {handles} handles, {pending} pending locks",
            recovering=len(recovering),
            doomed=state.count(VMState.ERROR),
            batches=len(state.batches),
            handles=len(state.handles),
            pending=len(state.pending),
            event="checkpoint",
        )
        return True

    def snapshot(self) -> dict[str, Any]:
        """The pool as the checkpoint keeps it."""
        return self._reconciler.snapshot()

    def _check_open(self) -> None:
        if self._stopping:
            raise ShuttingDown("the controller is stopping")

    def _changed(self) -> None:
        self._notice()
        self._reconciler.schedule()

    # ------------------------------------------------------------------ the status version

    def _status_mark(self) -> tuple[object, ...]:
        """What moves whenever /all-status would show something else (time alone aside).

        ``changes`` counts every change of the state's records; the strays and the cloud health
        are changed beside it, and a pause of the cloud's ends with time (shown as ended at once).
        """
        state = self.state
        cloud = state.cloud
        now = self._clock.seconds()
        return (
            state,
            state.changes,
            len(state.strays),
            cloud,
            cloud.backing_off(now),
            now < cloud.quota_until,
            now < cloud.boot_backoff_until,
        )

    def _notice(self) -> int:
        """The status version, moved on (and its waiters woken next turn) if the pool changed."""
        mark = self._status_mark()
        if mark != self._seen:
            self._seen = mark
            self._version += 1
            if self._status_waiters and self._status_wake is None:
                self._status_wake = self._clock.callLater(0, self._wake_status)
        return self._version

    def _wake_status(self) -> None:
        call, self._status_wake = self._status_wake, None
        if call is not None and call.active():
            call.cancel()
        waiters, self._status_waiters = self._status_waiters, []
        for waiter in list(waiters):  # each takes itself out of the list as it wakes
            if not waiter.called:
                waiter.callback(None)

    # ------------------------------------------------------------------ IPoolControl

    def set_pool_size(self, minimum: int, maximum: int, linger_ms: int) -> None:
        self._check_open()
        _count(minimum, "min")
        _count(maximum, "max")
        _count(linger_ms, "linger", MAX_MS)
        if minimum > maximum:
            raise InvalidRequest(f"min ({minimum}) must not be above max ({maximum})")
        cap = self.config.max_pool_size
        if maximum > cap:
            log.info(
                "Pool max {maximum} clamped to the hard cap {cap}",
                maximum=maximum,
                cap=cap,
                event="pool-size",
            )
        state = self.state
        state.spec = PoolSpec(minimum, maximum, linger_ms)
        if state.shutting_down:
            log.info("The pool starts again after its shutdown", event="shutdown")
        state.shutting_down = False
        state.changes += 1
        log.info(
            "Pool size set: min {minimum}, max {maximum}, linger {linger} ms",
            minimum=minimum,
            maximum=maximum,
            linger=linger_ms,
            event="pool-size",
        )
        self._changed()

    def prepare_batch(self, size: int, homepage: str, options: BatchOptions) -> str:
        self._check_open()
        _count(size, "size")
        if size > self.config.max_pool_size:
            raise InvalidRequest(
                f"size {size} is above the pool's hard cap of {self.config.max_pool_size} VMs"
            )
        check_homepage(homepage)
        check_options(options)
        if self.state.shutting_down:
            raise ShuttingDown("the pool is shut down; set the pool size to start it again")
        batch = self.state.add_batch(size, homepage, options, self._clock.seconds())
        log.info(
            "Batch {batch}: {size} VMs for {homepage}",
            batch=batch.id,
            size=size,
            homepage=homepage,
            event="batch",
        )
        self._changed()
        return batch.id

    def lock(self, batch: str) -> str:
        self._check_open()
        state = self.state
        found = state.batches.get(batch) if isinstance(batch, str) else None
        if found is None:
            raise UnknownBatch(f"no batch {batch!r}")
        if found.cancelled:
            raise BatchCancelled(f"batch {batch} is cancelled")
        if state.shutting_down:
            raise ShuttingDown("the pool is shut down")
        if len(state.pending) >= self.config.max_pending_locks:
            raise InvalidRequest(f"{len(state.pending)} locks are already waiting for a VM; try again later")
        now = self._clock.seconds()
        token = secrets.token_urlsafe(24)
        state.add_handle(batch, token, now)
        if state.pending_count(batch) == 1:
            vmid = state.first_ready(batch)
            if vmid is not None:
                state.assign(token, vmid, now)
        self._changed()
        return token

    def release(self, handle: str) -> None:
        self._handle(handle)
        self.state.release_handle(handle)
        self._changed()

    def handle_status(self, handle: str) -> HandleStatus:
        found = self._handle(handle)
        vm = self.state.vms.get(found.vmid) if found.vmid is not None else None
        batch = self.state.batches.get(found.batch)
        return HandleStatus(found, vm, audio=batch is None or batch.options.audio)

    def renew_expire(self, handle: str, expire_ms: int) -> None:
        self._handle(handle)
        _count(expire_ms, "expireTime", MAX_MS)
        delay = expire_ms / 1000.0
        self.state.set_expiry(handle, self._clock.seconds() + delay)
        self._arm_expiry(handle, delay)
        self._changed()

    def _arm_expiry(self, token: str, delay: float) -> None:
        old = self._expiry.pop(token, None)
        if old is not None and old.active():
            old.cancel()

        def due() -> None:
            self._expiry.pop(token, None)
            self._reconciler.run_pass()

        self._expiry[token] = self._clock.callLater(max(0.0, delay), due)

    def last_event_id(self, handle: str) -> int:
        return self._handle(handle).events.last_id

    async def fetch_events(self, handle: str, last_id: int, wait: float | None = None) -> EventPage:
        found = self._handle(handle)
        _count(last_id, "lastId")
        if last_id > found.events.last_id:
            raise InvalidRequest(
                f"lastId {last_id} is beyond the handle's last event id {found.events.last_id}"
            )
        wait = self._wait(wait)
        answer = self._events_after(handle, last_id)
        if answer.events or wait <= 0 or self._stopping:
            return answer
        try:
            await self._woken_in(self._waiters.setdefault(handle, []), MAX_WAITERS_PER_HANDLE, wait)
        finally:
            if handle in self._waiters and not self._waiters[handle]:
                del self._waiters[handle]
        return self._events_after(handle, last_id)

    async def _woken_in(self, waiters: list[Deferred[None]], most: int, wait: float) -> None:
        """Wait among ``waiters`` until one wakes them all (fires each) or ``wait`` seconds passed.

        Beyond ``most`` waiters the oldest is woken to make room.  A wait that is cancelled (its
        client went away) leaves neither its timer nor itself behind.
        """
        if len(waiters) >= most:
            oldest = waiters.pop(0)
            if not oldest.called:
                oldest.callback(None)
        woken: Deferred[None] = Deferred()
        waiters.append(woken)
        timer = self._clock.callLater(wait, lambda: None if woken.called else woken.callback(None))
        try:
            await woken
        finally:
            if timer.active():
                timer.cancel()
            if woken in waiters:
                waiters.remove(woken)

    def _wait(self, wait: object) -> float:
        """A long poll's ``wait`` in seconds: the default when None, capped at ``long_poll_max``."""
        if wait is None:
            wait = self.config.long_poll_default
        if not isinstance(wait, int | float) or isinstance(wait, bool) or math.isnan(wait) or wait < 0:
            raise InvalidRequest(f"wait must be a non-negative number of seconds, not {wait!r}")
        return min(float(wait), self.config.long_poll_max)

    def _events_after(self, token: str, last_id: int) -> EventPage:
        found = self._handle(token)
        events, dropped = found.events.after(last_id)
        return EventPage(events[-1].id if events else last_id, tuple(events), dropped)

    def cancel_batch(self, batch: str) -> None:
        if not isinstance(batch, str) or batch not in self.state.batches:
            raise UnknownBatch(f"no batch {batch!r}")
        self.state.cancel_batch(batch)
        log.info("Batch {batch} cancelled", batch=batch, event="batch")
        self._changed()

    def terminate_vm(self, vmid: str) -> None:
        self._check_open()
        state = self.state
        vm = state.vms.get(vmid) if isinstance(vmid, str) else None
        if vm is None:
            raise UnknownVM(f"no VM {vmid!r} (never known, or already terminated)")
        if state.shutting_down:
            raise ShuttingDown("the pool is shut down: every VM is being terminated")
        if not vm.alive:
            log.info(
                "VM {vmid}: the operator asked to terminate it; it is already {state}",
                vmid=vm.vmid,
                state=vm.state.value,
                event="vm-terminate",
            )
            return
        log.info(
            "VM {vmid} ({state}) terminated by the operator{lent}",
            vmid=vm.vmid,
            state=vm.state.value,
            lent="; its handle loses it" if vm.state is VMState.OCCUPIED and vm.handle else "",
            event="vm-terminate",
        )
        # as when a VM dies: ERROR, its handle told; the plan deletes it and replaces it by its rules
        state.fail_vm(vm.vmid, TERMINATED, self._clock.seconds())
        self._changed()

    def shutdown(self) -> None:
        state = self.state
        state.shutting_down = True
        state.changes += 1
        for token in list(state.handles):
            state.release_handle(token)
        for batch in list(state.batches):
            state.cancel_batch(batch)
        log.info(
            "Shutdown: every handle released, every batch cancelled, every VM terminated", event="shutdown"
        )
        self._reconciler.run_pass()

    def all_status(self) -> PoolStatus:
        version = self._notice()
        now = self._clock.seconds()
        state = self.state
        minimum, maximum = effective_size(self.config, state)
        batches = tuple(
            BatchView(
                batch,
                ready=len(state.members(VMState.READY, batch.id)),
                preparing=len(state.members(VMState.WAIT, batch.id)),
                occupied=len(state.members(VMState.OCCUPIED, batch.id)),
                pending_locks=state.pending_count(batch.id),
            )
            for batch in state.batches.values()
        )
        preps = [
            Preparation(vm.batch, vmid, vm.since)
            for vmid in state.ids(VMState.WAIT)
            if (vm := state.vms[vmid]).batch is not None
        ]
        preps.extend(Preparation(batch) for batch in preparation_queue(state, now))
        reconciler = self._reconciler
        return PoolStatus(
            version=version,
            time=now,
            size=PoolSize(state.spec, minimum, maximum, self.config.max_pool_size),
            vms=tuple(state.vms.values()),
            batches=batches,
            preps=tuple(preps),
            handles=tuple(
                HandleView(h, h.events.last_id, len(h.events), h.events.dropped)
                for h in state.handles.values()
            ),
            pending_locks=tuple(state.pending.values()),
            cloud=CloudView(
                driver=str(getattr(reconciler.driver, "name", "?")),
                health=state.cloud,
                last_listing_at=reconciler.last_listing_at,
                strays=len(state.strays),
                image=reconciler.image,
            ),
            shutting_down=state.shutting_down,
            reconciler=ReconcilerView(
                reconciler.passes, reconciler.last_pass_seconds, reconciler.slowest_pass_seconds
            ),
        )

    async def status_after(self, since: int, wait: float) -> PoolStatus:
        _count(since, "since")
        wait = self._wait(wait)
        if self._notice() != since or wait <= 0 or self._stopping:
            return self.all_status()
        await self._woken_in(self._status_waiters, MAX_STATUS_WAITERS, wait)
        return self.all_status()

    def _handle(self, token: object) -> Handle:
        found = self.state.handles.get(token) if isinstance(token, str) else None
        if found is None:
            raise UnknownHandle("no such handle (released, expired, or never issued)")
        return found

    # ------------------------------------------------------------------ IGuestListener

    def guest_hello(self, guest: GuestInfo) -> None:
        try:
            try:
                vm = self.state.guest_hello(guest, self._clock.seconds())
            except GuestRefused as refused:
                log.warn(
                    "Refused the HELLO of guest {identity} (login {login}): {reason}",
                    identity=guest.identity,
                    login=guest.login,
                    reason=str(refused),
                    event="guest-refused",
                )
                return
            if vm is None:
                log.info(
                    "Guest {identity} (ip {ip}, mac {mac}) said HELLO but is none of our VMs (yet)",
                    identity=guest.identity,
                    ip=guest.ip,
                    mac=guest.mac,
                    event="guest-unknown",
                )
            self._changed()
        except Exception:
            log.failure("Could not take in the HELLO of {identity}", identity=guest.identity)

    def guest_gone(self, identity: str, reason: str) -> None:
        try:
            self.state.guests.pop(identity, None)
            vm = self.state.guest_gone(identity, reason, self._clock.seconds())
            if vm is not None:
                log.warn(
                    "VM {vmid}: its guest is gone ({reason})", vmid=vm.vmid, reason=reason, event="guest-gone"
                )
            self._changed()
        except Exception:
            log.failure("Could not take in that guest {identity} is gone", identity=identity)

    def guest_event(self, identity: str, event: Mapping[str, Any]) -> None:
        try:
            data = _event_data(event)
            if data is None:
                log.warn(
                    "Dropped an event from guest {identity}: not a JSON object with an action, or too large",
                    identity=identity,
                    event="guest-event",
                )
                return
            if self.state.guest_event(identity, data, self._clock.seconds()) is not None:
                self._reconciler.request_checkpoint()  # nothing to plan: only to keep
        except Exception:
            log.failure("Could not take in an event from {identity}", identity=identity)

    # ------------------------------------------------------------------ observers

    def watch_access(
        self, handle_ended: Callable[[str, str], None], vm_ended: Callable[[str, str], None]
    ) -> None:
        """Be told at once when a handle stops lending its VM (``handle_ended(token, why)``: released,
        expired, or its VM died) and when a VM dies or is terminated (``vm_ended(vmid, why)``), so
        the console and audio proxies close their sockets then (SPEC: within a second)."""
        self._access_watchers.append((handle_ended, vm_ended))

    def _access_ended(self, token: str | None, vmid: str | None, why: str) -> None:
        for handle_ended, vm_ended in self._access_watchers:
            try:
                if token is not None:
                    handle_ended(token, why)
                if vmid is not None:
                    vm_ended(vmid, why)
            except Exception:
                log.failure("A watcher of handles and VMs failed ({why})", why=why)

    def _log_transition(self, old: VM | None, new: VM | None) -> None:
        vm = new or old
        assert vm is not None
        if self._access_watchers and old is not None:
            why = f"VM {old.vmid} died" + (f" ({new.reason})" if new is not None and new.reason else "")
            lent = old.handle if old.state is VMState.OCCUPIED else None
            if lent is not None and (new is None or new.handle != lent):
                self._access_ended(lent, None, why)
            if new is None or not new.alive:
                self._access_ended(None, old.vmid, why)
        if old is not None and new is not None and new.state is VMState.FREE and old.state in BOOTED:
            self._reconciler.guest_arrived()
        observe_transition(self._timings, old, new, self.state.handles)
        before = old.state.value if old is not None else "new"
        self._lines.say(vm.vmid, before, new.state.value if new is not None else "gone", _why(new))

    def _event_added(self, token: str, event: Event) -> None:
        self._wake(token)
        self._notice()  # a guest's event runs no pass: /all-status counts the handle's events

    def _handle_gone(self, token: str) -> None:
        self._access_ended(token, None, "the handle was released or expired")
        call = self._expiry.pop(token, None)
        if call is not None and call.active():
            call.cancel()
        self._wake(token)

    def _wake(self, token: str) -> None:
        for waiter in list(self._waiters.pop(token, [])):  # each takes itself out as it wakes
            if not waiter.called:
                waiter.callback(None)
