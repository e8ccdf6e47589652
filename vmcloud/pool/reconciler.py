"""Runs the plan against the world: passes, the tick, cloud calls, guest words, back-off.

The reconciler is the adapter around the pure core (:mod:`~vmcloud.pool.state`,
:mod:`~vmcloud.pool.plan`): on every change it schedules one pass per reactor turn (a burst of
changes costs one pass), and a tick on the injected clock catches what time alone changes
(timeouts, linger, expiries) and lists the cloud's servers once per poll interval -- one call for
the whole pool, never one per VM.  Each action of a pass is applied to the state at once (the
marks), then its effect is started: a boot, a delete, a PREPARE or CLEANUP word.  Answers come
back against the VM version they were started with; a stale one is dropped.

Cloud errors never stop anything: rate limits wait as long as the cloud asks, an exhausted quota
stops the pool from growing for a while (and then one boot probes before more follow), other
failures back off exponentially.  All of it shows in ``/all-status``.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from vmcloud.pool.config import PoolConfig
from vmcloud.pool.interfaces import (
    BootRequest,
    CloudError,
    GuestCallFailed,
    GuestCredentials,
    ICheckpointStore,
    ICloudDriver,
    IGuestChannel,
    QuotaExceeded,
    RateLimited,
)
from vmcloud.pool.model import VM, Batch, CloudHealth
from vmcloud.pool.plan import (
    OUTDATED,
    Action,
    Assign,
    Boot,
    Cleanup,
    Delete,
    DeleteServer,
    DropBatch,
    Prepare,
    ReleaseHandle,
    apply,
    plan,
)
from vmcloud.pool.snapshot import SnapshotWriter, cookie_json
from vmcloud.pool.state import PoolState
from vmcloud.timings import NO_TIMINGS, RECONCILE_PASS, ITimings

log = Logger()

#: Guest words (PREPARE, CLEANUP) said per reactor turn.  A pass marks every VM it gives work at
#: once, but a 500-VM batch would otherwise say 500 words in one go and hold the reactor (beacons,
#: the API) for a quarter of a second; the rest follow on the next turns, sockets polled between.
WORDS_PER_TURN = 16

#: Metadata keys every server of the pool carries.
META_CONTROLLER = "vmcloud-controller"
META_VMID = "vmcloud-vmid"


# --------------------------------------------------------------------------- cloud health


def after_cloud_failure(
    health: CloudHealth, error: BaseException, now: float, config: PoolConfig
) -> CloudHealth:
    """The cloud health once a call failed with ``error``: how long to leave the cloud alone."""
    retry_after = error.retry_after if isinstance(error, CloudError) else None
    message = f"{type(error).__name__}: {error}"
    if isinstance(error, QuotaExceeded):
        # refusals of one burst of boots count once: the exponent grows per retry, not per call
        refusals = health.quota_failures + 1 if now >= health.quota_until else max(1, health.quota_failures)
        pause = min(
            config.quota_retry * 2 ** min(refusals - 1, 16), max(config.backoff_max, config.quota_retry)
        )
        pause = max(pause, retry_after or 0.0)
        return attrs.evolve(
            health,
            quota_failures=refusals,
            quota_until=max(health.quota_until, now + pause),
            last_error=message,
            last_error_at=now,
        )
    failures = health.failures + 1 if now >= health.backoff_until else max(1, health.failures)
    pause = min(config.backoff_base * 2 ** min(failures - 1, 16), config.backoff_max)
    if isinstance(error, RateLimited) and retry_after is not None:
        pause = retry_after
    else:
        pause = max(pause, retry_after or 0.0)
    return attrs.evolve(
        health,
        failures=failures,
        backoff_until=max(health.backoff_until, now + pause),
        last_error=message,
        last_error_at=now,
    )


def after_cloud_success(health: CloudHealth, grew: bool, issued_at: float | None = None) -> CloudHealth:
    """The cloud answered; a successful boot also says the quota has room again.

    A call issued (at ``issued_at``) before the last failure says nothing about the cloud since: a
    boot accepted just before its neighbours were refused for quota must not lift the quota pause
    (the pool would boot, and be refused, again at once).
    """
    if issued_at is not None and health.last_error_at is not None and issued_at < health.last_error_at:
        return health
    if health.failures == 0 and health.backoff_until == 0.0 and not (grew and health.quota_failures):
        return health
    if grew:
        return attrs.evolve(health, failures=0, backoff_until=0.0, quota_failures=0, quota_until=0.0)
    return attrs.evolve(health, failures=0, backoff_until=0.0)


def prepare_params(batch: Batch, vnc_password: str) -> dict[str, Any]:
    """The parameters of the PREPARE word for a VM of ``batch``."""
    options = batch.options
    return {
        "homepage": batch.homepage,
        "cookies": [cookie_json(c) for c in options.cookies],
        "window": {"width": options.window_width, "height": options.window_height},
        "audio": options.audio,
        "vncPassword": vnc_password,
    }


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


class Reconciler:
    """Keeps the pool true to its plan."""

    def __init__(
        self,
        clock: IReactorTime,
        driver: ICloudDriver,
        channel: IGuestChannel,
        store: ICheckpointStore,
        config: PoolConfig,
        state: PoolState,
        *,
        grouping: Callable[[], AbstractContextManager[None]] = nullcontext,
        timings: ITimings = NO_TIMINGS,
    ) -> None:
        self.clock = clock
        #: Where the wall time of each pass is told (the ``/metrics`` histogram).
        self._timings = timings
        #: What a pass runs in, so that the lines of its many state changes can be grouped.
        self._grouping = grouping
        self.driver = driver
        self.channel = channel
        self.store = store
        self.config = config
        self.state = state
        self.running = False
        self.passes = 0
        self.last_pass_seconds = 0.0
        self.slowest_pass_seconds = 0.0
        self.listing = False
        self.last_listing_at: float | None = None
        self._next_poll = 0.0
        self._scheduled: IDelayedCall | None = None
        self._checkpoint_call: IDelayedCall | None = None
        self._saved = -1
        self._saved_at = float("-inf")
        self._writer = SnapshotWriter()
        #: Guest words marked by a pass and not said yet, with the VM version they were marked at.
        self._words: deque[tuple[Prepare | Cleanup, int]] = deque()
        self._words_call: IDelayedCall | None = None
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock
        #: The image new VMs boot from (None: the driver has no images).
        self.image: str | None = getattr(driver, "image", None) or None
        #: VMs booted from another image, found at each listing (a VM's image changes only then).
        self.outdated: frozenset[str] = frozenset()

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        """Tick now and every tick interval."""
        self.running = True
        d = self._loop.start(self.config.tick_interval, now=True)
        d.addErrback(lambda f: log.failure("The pool's tick stopped", f))

    def stop(self) -> None:
        self.running = False
        if self._loop.running:
            self._loop.stop()
        for call in (self._scheduled, self._checkpoint_call, self._words_call):
            if call is not None and call.active():
                call.cancel()
        self._scheduled = None
        self._checkpoint_call = None
        self._words_call = None

    def schedule(self) -> None:
        """Run a pass soon: once for all the changes of this reactor turn."""
        if self.running and self._scheduled is None:
            self._scheduled = self.clock.callLater(0, self._scheduled_pass)

    def _scheduled_pass(self) -> None:
        self._scheduled = None
        self.run_pass()

    def tick(self) -> None:
        """Notice what time changed; list the cloud when due; never raises."""
        try:
            now = self.clock.seconds()
            self.state.guests = dict(self.channel.guests())
            self.state.retry_unmatched(now, self.config.timeout_boot)
            if not self.listing and now >= self._next_poll and not self.state.cloud.backing_off(now):
                self.listing = True
                self._spawn(self._list_servers(now), "listing the servers")
            self.run_pass()
        except Exception:
            log.failure("The pool's tick failed; trying again next tick")

    # ------------------------------------------------------------------ passes

    def run_pass(self) -> None:
        """Plan, apply and start every action; then checkpoint if anything changed."""
        started = time.perf_counter()
        try:
            with self._grouping():
                self._plan_and_start()
            self.request_checkpoint()
        except Exception:
            log.failure("A reconcile pass failed; trying again on the next change or tick")
        finally:
            elapsed = time.perf_counter() - started
            self.passes += 1
            self.last_pass_seconds = elapsed
            self.slowest_pass_seconds = max(self.slowest_pass_seconds, elapsed)
            self._timings.observe(RECONCILE_PASS, elapsed)

    def _plan_and_start(self) -> None:
        """Apply every action's marks; start its effect now, or queue it if it is a guest word."""
        now = self.clock.seconds()
        for action in plan(self.config, self.state, now, self.outdated):
            try:
                vm = apply(self.state, action, now, self.config)
                if isinstance(action, Prepare | Cleanup) and vm is not None:
                    self._words.append((action, vm.version))
                else:
                    self._carry_out(action, vm, now)
            except Exception:
                log.failure("Could not carry out {action}", action=repr(action))
                self._undo(action, now)
        if self._words and self._words_call is None:
            self._say_words()

    def _say_words(self) -> None:
        """Say up to ``WORDS_PER_TURN`` of the words passes marked; the rest next reactor turn.

        A VM that moved on since its mark (killed, failed) gets no word: its answer would be
        stale anyway.
        """
        self._words_call = None
        now = self.clock.seconds()
        said = 0
        while self._words and said < WORDS_PER_TURN:
            action, version = self._words.popleft()
            vm = self.state.current(action.vmid, version)
            if vm is None:
                continue
            said += 1
            try:
                self._carry_out(action, vm, now)
            except Exception:
                log.failure("Could not carry out {action}", action=repr(action))
                self._undo(action, now)
        if self._words and self.running:
            self._words_call = self.clock.callLater(0, self._say_words)

    def snapshot(self) -> dict[str, Any]:
        """The state as the checkpoint keeps it."""
        return self._writer.snapshot(self.state)

    def request_checkpoint(self) -> None:
        """Checkpoint soon: at once, or ``checkpoint_interval`` after the previous one."""
        if not self.running or self._checkpoint_call is not None or self.state.changes == self._saved:
            return
        delay = max(0.0, self._saved_at + self.config.checkpoint_interval - self.clock.seconds())
        self._checkpoint_call = self.clock.callLater(delay, self._checkpoint_due)

    def _checkpoint_due(self) -> None:
        self._checkpoint_call = None
        self.checkpoint()

    def checkpoint(self) -> None:
        """Hand a snapshot to the store when the state changed since the last one."""
        if self.state.changes == self._saved:
            return
        self._saved = self.state.changes
        self._saved_at = self.clock.seconds()
        try:
            self.store.save(self._writer.snapshot(self.state))
        except Exception:
            log.failure("Could not save the checkpoint")

    def _carry_out(self, action: Action, vm: VM | None, now: float) -> None:
        if isinstance(action, Boot) and vm is not None:
            credentials = attrs.evolve(
                self.channel.mint_credentials(vm.vmid), beacon_interval=self.config.beacon_interval
            )
            vm = self.state.put(attrs.evolve(vm, login=credentials.login, passcode=credentials.passcode))
            self._spawn(self._boot(vm, credentials), f"booting VM {vm.vmid}")
        elif isinstance(action, Delete):
            self._revoke(action.vmid)
            if action.reason == OUTDATED and vm is not None:
                log.info(
                    "VM {vmid} retired: booted from image {image}, new VMs boot from {current}",
                    vmid=vm.vmid,
                    image=vm.image,
                    current=self.image,
                    event="retire",
                )
            if action.failed_boot:
                log.warn(
                    "VM {vmid} died before its guest said HELLO ({reason}); booting slows down",
                    vmid=action.vmid,
                    reason=action.reason,
                    event="cloud-backoff",
                )
            if vm is not None and vm.server_id is not None:
                if self.state.cloud.backing_off(now):
                    log.info(
                        "VM {vmid}: delete waits for the cloud's back-off",
                        vmid=vm.vmid,
                        event="delete",
                    )
                else:
                    self._spawn(self._delete(vm.vmid, vm.server_id), f"deleting VM {vm.vmid}")
        elif isinstance(action, DeleteServer):
            log.info(
                "Deleting stray server {name} ({server_id}): our prefix, not ours, seen twice",
                name=action.name,
                server_id=action.server_id,
                event="stray",
            )
            self._spawn(self._delete_stray(action.server_id), f"deleting stray {action.server_id}")
        elif isinstance(action, Prepare) and vm is not None:
            self._spawn(self._prepare(vm, action.batch), f"preparing VM {vm.vmid}")
        elif isinstance(action, Cleanup) and vm is not None:
            self._spawn(self._cleanup(vm), f"cleaning VM {vm.vmid}")
        elif isinstance(action, Assign):
            log.info("VM {vmid} lent to a handle", vmid=action.vmid, event="assign")
        elif isinstance(action, ReleaseHandle):
            log.info("Handle released: {reason}", reason=action.reason, event="release")
        elif isinstance(action, DropBatch):
            log.info("Cancelled batch {batch} is empty and gone", batch=action.batch, event="batch")

    def _undo(self, action: Action, now: float) -> None:
        """An action that could not be started leaves no VM waiting for an answer that never comes."""
        vm = self.state.vms.get(getattr(action, "vmid", ""))
        if vm is None:
            return
        if isinstance(action, Boot):
            self.state.boot_failed(vm.vmid, vm.version, "could not start the boot", now)
        elif isinstance(action, Prepare | Cleanup):
            self.state.operation_failed(vm.vmid, vm.version, "could not say the word", now)

    def _spawn(self, work: Coroutine[Any, Any, None], what: str) -> None:
        d = Deferred.fromCoroutine(work)

        def failed(failure: Failure) -> None:
            log.failure("Unexpected failure while {what}", failure, what=what)

        d.addErrback(failed)

    def _revoke(self, vmid: str) -> None:
        try:
            self.channel.revoke_credentials(vmid)
        except Exception:
            log.failure("Could not revoke the credentials of VM {vmid}", vmid=vmid)

    # ------------------------------------------------------------------ cloud

    def _cloud_failed(self, what: str, error: BaseException) -> None:
        now = self.clock.seconds()
        if not isinstance(error, CloudError):
            log.failure("Unexpected error from the cloud driver while {what}", Failure(error), what=what)
        health = after_cloud_failure(self.state.cloud, error, now, self.config)
        self.state.cloud = health
        self.state.changes += 1
        until = max(health.backoff_until, health.quota_until)
        log.warn(
            "Cloud call failed while {what}: {error}; leaving the cloud alone for {pause:.1f} s",
            what=what,
            error=health.last_error,
            pause=max(0.0, until - now),
            quota=isinstance(error, QuotaExceeded),
            event="cloud-backoff",
        )

    def guest_arrived(self) -> None:
        """A booted VM's guest said HELLO: booting works again."""
        if self.state.cloud.boot_failures:
            log.info("A new VM's guest said HELLO: booting at full speed again", event="cloud-backoff")
            self.state.cloud = attrs.evolve(self.state.cloud, boot_failures=0, boot_backoff_until=0.0)
            self.state.changes += 1

    def _cloud_ok(self, issued_at: float, grew: bool = False) -> None:
        health = after_cloud_success(self.state.cloud, grew, issued_at)
        if health is not self.state.cloud:
            log.info("The cloud answers again", event="cloud-backoff")
            self.state.cloud = health
            self.state.changes += 1

    async def _boot(self, vm: VM, credentials: GuestCredentials) -> None:
        vmid, version = vm.vmid, vm.version
        request = BootRequest(
            vmid=vmid,
            name=self.config.prefix + vmid,
            metadata={META_CONTROLLER: self.config.controller_name, META_VMID: vmid},
            credentials=credentials,
        )
        issued_at = self.clock.seconds()
        try:
            server_id = await self.driver.boot(request)
        except Exception as e:
            self._cloud_failed(f"booting VM {vmid}", e)
            self.state.boot_failed(vmid, version, _reason(e), self.clock.seconds())
            if vmid not in self.state.vms:
                self._revoke(vmid)
        else:
            self._cloud_ok(issued_at, grew=True)
            if not self.state.boot_done(vmid, version, server_id, self.clock.seconds()):
                log.info(
                    "VM {vmid} is no longer wanted; deleting the server {server_id} it got",
                    vmid=vmid,
                    server_id=server_id,
                    event="delete",
                )
                self._spawn(self._delete_stray(server_id), f"deleting server {server_id}")
        self.schedule()

    async def _delete(self, vmid: str, server_id: str) -> None:
        # no line of its own: the state line "VM x: ... -> KILLING (reason)" says it
        issued_at = self.clock.seconds()
        try:
            await self.driver.delete(server_id)
        except Exception as e:
            self._cloud_failed(f"deleting VM {vmid}", e)
        else:
            self._cloud_ok(issued_at)
            self.state.delete_done(vmid, server_id)
        self.schedule()

    async def _delete_stray(self, server_id: str) -> None:
        issued_at = self.clock.seconds()
        try:
            await self.driver.delete(server_id)
        except Exception as e:
            self._cloud_failed(f"deleting server {server_id}", e)
        else:
            self._cloud_ok(issued_at)
            self.state.stray_deleted(server_id)
        self.schedule()

    async def _list_servers(self, issued_at: float) -> None:
        try:
            servers = await self.driver.list_servers()
        except Exception as e:
            self._cloud_failed("listing the servers", e)
        else:
            self._cloud_ok(issued_at)
            now = self.clock.seconds()
            self.last_listing_at = now
            self.state.observe_servers(servers, issued_at, now, self.config.prefix)
            self.state.retry_unmatched(now, self.config.timeout_boot)
            self._find_outdated()
            for stray in self.state.strays.values():
                if stray.seen == 1:
                    log.info(
                        "Stray server {name} ({server_id}) has our prefix but is not ours",
                        name=stray.name,
                        server_id=stray.server_id,
                        event="stray",
                    )
        finally:
            self.listing = False
            self._next_poll = issued_at + self.config.poll_interval
        self.schedule()

    def _find_outdated(self) -> None:
        """The VMs booted from another image than ours; a line when some are newly found."""
        image = self.image
        if image is None:
            return
        outdated = frozenset(vmid for vmid, vm in self.state.vms.items() if vm.alive and vm.outdated(image))
        new = outdated - self.outdated
        self.outdated = outdated
        if new:
            log.info(
                "{count} VMs booted from another image than {image} ({images}): retired as replacements "
                "come up, once released when lent",
                count=len(new),
                image=image,
                images=", ".join(sorted({str(self.state.vms[v].image) for v in new})),
                vmids=sorted(new)[:20],
                event="vm-outdated",
            )

    # ------------------------------------------------------------------ guests

    async def _prepare(self, vm: VM, batch_id: str) -> None:
        vmid, version = vm.vmid, vm.version
        batch = self.state.batches.get(batch_id)
        password = secrets.token_urlsafe(6)[:8]  # VNC passwords are at most 8 characters
        try:
            if batch is None or vm.identity is None:
                raise GuestCallFailed(
                    "nothing to prepare for" if batch is None else "the guest never said HELLO"
                )
            answer: Mapping[str, Any] = await self.channel.call(
                vm.identity, "PREPARE", prepare_params(batch, password), self.config.timeout_operation
            )
        except Exception as e:
            self._guest_failed(vmid, version, "PREPARE", e)
        else:
            if not isinstance(answer, Mapping):
                answer = {}
            answer = {"vncPassword": password, **answer}
            if self.state.prepare_done(vmid, version, answer, self.clock.seconds()):
                log.info("VM {vmid} ready for batch {batch}", vmid=vmid, batch=batch_id, event="prepared")
            else:
                log.info("Late PREPARE answer from VM {vmid} dropped", vmid=vmid, event="stale")
        self.schedule()

    async def _cleanup(self, vm: VM) -> None:
        vmid, version = vm.vmid, vm.version
        try:
            if vm.identity is None:
                raise GuestCallFailed("the guest never said HELLO")
            await self.channel.call(vm.identity, "CLEANUP", {}, self.config.timeout_operation)
        except Exception as e:
            self._guest_failed(vmid, version, "CLEANUP", e)
        else:
            if self.state.cleanup_done(vmid, version, self.clock.seconds()):
                log.info("VM {vmid} clean and FREE", vmid=vmid, event="cleaned")
            else:
                log.info("Late CLEANUP answer from VM {vmid} dropped", vmid=vmid, event="stale")
        self.schedule()

    def _guest_failed(self, vmid: str, version: int, word: str, error: BaseException) -> None:
        if not isinstance(error, GuestCallFailed):
            log.failure("Unexpected error saying {word} to VM {vmid}", Failure(error), word=word, vmid=vmid)
        reason = f"{word} failed: {_reason(error)}"
        if self.state.operation_failed(vmid, version, reason, self.clock.seconds()):
            log.warn("VM {vmid}: {reason}", vmid=vmid, reason=reason, event="guest-failed")


__all__ = [
    "META_CONTROLLER",
    "META_VMID",
    "Reconciler",
    "after_cloud_failure",
    "after_cloud_success",
    "prepare_params",
]
