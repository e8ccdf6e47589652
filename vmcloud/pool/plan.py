"""What the pool should do next: a pure function of the state and the time.

``plan(config, state, now)`` reads the pool and returns actions; ``apply(state, action, now, config)`` puts
the marks an action leaves on the state the moment it is started (a booting VM exists in CREATING,
a VM being prepared is in WAIT, ...).  Planning again on the marked state proposes nothing new:
that is what lets the reconciler run a pass on every change without doing anything twice.  The
reconciler then carries out the effects (cloud and guest calls) of the actions it applied.

The rules, as the original controller had them:

* handles past their expiry are released, and their VM cleaned;
* dead VMs (ERROR) and VMs past the timeout of their state are terminated;
* above the maximum, VMs are terminated: CREATING and BOOTING first, then FREE, then released
  ones and cleanups, then READY ones (cancelled batches first) and preparations, never one that
  a handle holds;
* pending locks get READY VMs of their batch, first come, first served;
* a batch wants ``size`` READY-or-preparing VMs plus one per pending lock (a cancelled batch only
  the latter): the preparation queue, pending locks first; FREE VMs are prepared for it;
* more VMs are booted when the queue is longer than what is booting or being cleaned, or the pool
  is below its minimum, as long as it stays at or below its maximum and the cloud lets it grow;
  a pending lock that still finds no VM takes a READY VM from a batch nobody waits on;
* FREE VMs idle for longer than linger are terminated while the pool is above its minimum;
* released VMs are cleaned back to FREE; cancelled batches with no VM and no pending lock go;
* servers with our prefix that we do not track are deleted once seen twice in a row.

And one rule of its own, the rolling replacement of an image (``outdated``: the VMs booted from
another image than the one new VMs boot from):

* an outdated VM is never prepared while an up-to-date FREE one is there; a released one is
  terminated instead of cleaned; one that is READY, preparing or held stays until released;
* outdated FREE VMs do not count towards the minimum, so their replacements boot; one is
  terminated for each VM up (neither CREATING nor BOOTING) beyond the minimum, so the pool never
  has fewer VMs up than its minimum.  At the maximum, where no replacement can boot first, one at
  a time is terminated when nothing is booting and the cloud lets the pool grow (the pool is one
  VM short while its replacement boots); never while boots fail (a broken new image).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from itertools import chain

import attrs

from vmcloud.pool import model
from vmcloud.pool.config import PoolConfig
from vmcloud.pool.model import VM, VMState
from vmcloud.pool.state import PoolState

# --------------------------------------------------------------------------- actions


@attrs.frozen
class Boot:
    """Ask the cloud for a new server for VM ``vmid``."""

    vmid: str


@attrs.frozen
class Delete:
    """Terminate VM ``vmid`` (delete its server).

    ``failed_boot``: the VM dies before its guest ever said HELLO, a failure that slows booting
    down (a broken image must not turn into a boot storm).
    """

    vmid: str
    reason: str
    failed_boot: bool = False


@attrs.frozen
class DeleteServer:
    """Delete a stray server that no VM of ours owns."""

    server_id: str
    name: str


@attrs.frozen
class Prepare:
    """Say PREPARE to a FREE VM's guest for ``batch``."""

    vmid: str
    batch: str


@attrs.frozen
class Cleanup:
    """Say CLEANUP to a VM's guest: fresh browser profile, back to FREE."""

    vmid: str
    reason: str


@attrs.frozen
class Assign:
    """Lend a READY VM to a pending lock."""

    handle: str
    vmid: str


@attrs.frozen
class ReleaseHandle:
    """Forget a handle (expired)."""

    handle: str
    reason: str


@attrs.frozen
class DropBatch:
    """Forget a cancelled batch with no VM and no pending lock."""

    batch: str


#: Reasons for terminating a VM that are no fault of the VM.
ABOVE_MAX = "above the maximum pool size"
LINGER = "idle longer than linger"
SHUTTING_DOWN = "shutting down"
TERMINATED = "terminated by the operator"
OUTDATED = "booted from an outdated image"
NOT_FAILURES = frozenset({ABOVE_MAX, LINGER, SHUTTING_DOWN, TERMINATED, OUTDATED})

Action = Boot | Delete | DeleteServer | Prepare | Cleanup | Assign | ReleaseHandle | DropBatch


# --------------------------------------------------------------------------- the plan


def effective_size(config: PoolConfig, state: PoolState) -> tuple[int, int]:
    """(min, max) after the hard cap; both 0 while shutting down."""
    if state.shutting_down:
        return 0, 0
    maximum = min(state.spec.maximum, config.max_pool_size)
    return min(state.spec.minimum, maximum), maximum


class _Pass:
    """The working memory of one plan: what this plan already decided about which VM.

    ``taken`` counts, per (state, batch), the VMs this plan moves away (killed, lent, cleaned) so
    that counts read after a decision see the state as it will be once the actions are applied.
    """

    __slots__ = (
        "actions",
        "alive",
        "boot_failed",
        "deletes",
        "dying",
        "let_go",
        "outdated",
        "released",
        "retirable",
        "state",
        "taken",
        "used",
    )

    def __init__(self, state: PoolState, deletes: int = 0, outdated: Collection[str] = ()) -> None:
        self.state = state
        #: VMs booted from another image than the current one.
        self.outdated = outdated
        #: Outdated VMs this plan could terminate but keeps for now (FREE, or released): they do
        #: not count towards the minimum.
        self.retirable = 0
        #: Cloud deletes this plan may still start (``max_deletes_in_flight`` less those in flight).
        self.deletes = deletes
        self.actions: list[Action] = []
        self.dying: set[str] = set()
        self.used: set[str] = set()
        #: Handles this plan releases: their pending locks are no longer waiting.
        self.released: set[str] = set()
        #: VMs whose handle this plan releases: from now on they are like released VMs.
        self.let_go: list[str] = []
        #: A VM dies before its guest said HELLO: no boot in this plan (applying it pauses boots).
        self.boot_failed = False
        self.taken: dict[tuple[VMState, str | None], int] = {}
        self.alive = state.alive_count()

    def kill(self, vm: VM, reason: str) -> bool:
        """Terminate ``vm`` if the delete budget allows; False (and nothing done) when it is spent.

        Every kill counts, even one with no server to delete yet: the budget bounds the work of a
        pass as well as the calls waiting for a cloud thread.
        """
        if not self.spend_delete():
            return False
        failed_boot = vm.identity is None and vm.state is not VMState.KILLING and reason not in NOT_FAILURES
        self.boot_failed |= failed_boot
        self.actions.append(Delete(vm.vmid, reason, failed_boot))
        self.dying.add(vm.vmid)
        if vm.alive:
            self.alive -= 1
            key = (vm.state, vm.batch)
            self.taken[key] = self.taken.get(key, 0) + 1
        return True

    def spend_delete(self) -> bool:
        """One termination more from the budget; False when it is spent."""
        if self.deletes <= 0:
            return False
        self.deletes -= 1
        return True

    def take_ready(self, vmid: str, batch: str) -> None:
        """A READY VM of ``batch`` gets other work from this plan (lent, cleaned)."""
        self.used.add(vmid)
        key = (VMState.READY, batch)
        self.taken[key] = self.taken.get(key, 0) + 1

    def free(self, vmid: str) -> bool:
        """Neither killed nor given work by this plan."""
        return vmid not in self.dying and vmid not in self.used

    def count(self, state: VMState, batch: str | None) -> int:
        """Members of (state, batch) not killed by this plan."""
        return len(self.state.members(state, batch)) - self.taken.get((state, batch), 0)

    def lendable(self, batch: str) -> Iterator[str]:
        """READY VMs of a batch this plan may still lend, clean or kill."""
        vms = self.state.vms
        for vmid in self.state.members(VMState.READY, batch):
            if self.free(vmid) and not vms[vmid].recovering:
                yield vmid


def deletes_in_flight(config: PoolConfig, state: PoolState, now: float) -> int:
    """Terminations started less than ``timeout_cloud`` ago: VMs in KILLING, strays being deleted.

    One older than that is taken as lost and may be started again (it then counts again).
    """
    vms = state.vms
    limit = config.timeout_cloud
    killing = sum(1 for vmid in state.ids(VMState.KILLING) if now - vms[vmid].since < limit)
    strays = sum(
        1 for s in state.strays.values() if s.deleting_since is not None and now - s.deleting_since < limit
    )
    return killing + strays


def plan(config: PoolConfig, state: PoolState, now: float, outdated: Collection[str] = ()) -> list[Action]:
    """Every action the rules call for in ``state`` at ``now``, in the order to apply them.

    ``outdated``: the vmids of VMs booted from another image than the one new VMs boot from
    (:meth:`~vmcloud.pool.model.VM.outdated`; ids of VMs gone since are ignored).

    Terminations are the exception: at most ``max_deletes_in_flight`` are under way at once, so a
    shutdown of thousands of VMs (or a mass death) is spread over many short passes instead of one
    that starts them all; the most urgent come first (dead VMs, strays, shutdown, size, linger).
    """
    p = _Pass(state, config.max_deletes_in_flight - deletes_in_flight(config, state, now), outdated)
    minimum, maximum = effective_size(config, state)
    _expire_handles(p, now)
    _terminate_dead(p, config, now)
    _reap_strays(p, config, now)
    if state.shutting_down:
        for vm in list(state.vms.values()):
            if vm.alive and vm.vmid not in p.dying and not p.kill(vm, SHUTTING_DOWN):
                break
    _shrink_to_max(p, maximum)
    remaining = _assign_locks(p)
    lock_queue, size_queue = _preparation_queue(p, remaining, now)
    queue = lock_queue + size_queue
    served = _prepare_free(p, queue)
    _retire(p, minimum, maximum, now)
    _grow(p, config, minimum, maximum, queue, len(lock_queue), served, now)
    _linger(p, minimum, now)
    _clean_released(p)
    _drop_batches(p, remaining)
    return p.actions


def _expire_handles(p: _Pass, now: float) -> None:
    state = p.state
    for handle in state.handles.values():
        if handle.expire_at is None or handle.expire_at > now:
            continue
        p.actions.append(ReleaseHandle(handle.token, "expired"))
        p.released.add(handle.token)
        vm = state.vms.get(handle.vmid) if handle.vmid is not None else None
        if vm is not None and vm.handle == handle.token:
            p.let_go.append(vm.vmid)


def _terminate_dead(p: _Pass, config: PoolConfig, now: float) -> None:
    """ERROR VMs, and VMs past the timeout of their state."""
    state = p.state
    vms = state.vms
    for vmid in state.ids(VMState.ERROR):
        vm = vms[vmid]
        p.kill(vm, vm.reason or "error")
    if not state.cloud.backing_off(now):
        for vmid in state.ids(VMState.KILLING):
            vm = vms[vmid]
            if now - vm.since >= config.timeout_cloud:
                p.kill(vm, vm.reason or "retry")
    for vmid in state.ids(VMState.CREATING):
        vm = vms[vmid]
        if now - vm.since >= config.timeout_cloud:
            p.kill(vm, "no answer from the cloud to the boot")
    for vmid in state.ids(VMState.BOOTING):
        vm = vms[vmid]
        if now - vm.since >= config.timeout_boot:
            p.kill(vm, "no HELLO from the guest in time")
    # the guest call has its own timeout; this catches an answer that never comes back at all
    wait_limit = config.timeout_operation + config.tick_interval
    for vmid in state.ids(VMState.WAIT):
        vm = vms[vmid]
        if now - vm.since >= wait_limit:
            p.kill(vm, f"{vm.reason or 'operation'} timed out")
    guests = state.guests
    silence = config.timeout_update
    for stable in (VMState.FREE, VMState.READY, VMState.OCCUPIED):
        for vmid in state.ids(stable):
            vm = vms[vmid]
            if vm.recovering:
                if now - vm.since >= silence:
                    p.kill(vm, "no HELLO after the restart")
            elif vm.identity is not None:
                guest = guests.get(vm.identity)
                if guest is not None and now - guest.last_beacon >= silence:
                    p.kill(vm, "beacon silence")


def _reap_strays(p: _Pass, config: PoolConfig, now: float) -> None:
    if p.state.cloud.backing_off(now):
        return
    for stray in p.state.strays.values():
        if stray.seen < 2:
            continue
        if stray.deleting_since is None or now - stray.deleting_since >= config.timeout_cloud:
            if not p.spend_delete():
                return
            p.actions.append(DeleteServer(stray.server_id, stray.name))


def _shrink_to_max(p: _Pass, maximum: int) -> None:
    """Terminate VMs above the maximum; never one a handle holds."""
    excess = p.alive - maximum
    if excess <= 0:
        return
    for vm in _kill_order(p):
        if excess <= 0:
            return
        if p.free(vm.vmid):
            if not p.kill(vm, ABOVE_MAX):
                return
            excess -= 1


def _kill_order(p: _Pass) -> Iterator[VM]:
    state = p.state
    vms = state.vms
    for vmid in reversed(state.ids(VMState.CREATING)):
        yield vms[vmid]
    for vmid in reversed(state.ids(VMState.BOOTING)):
        yield vms[vmid]
    for vmid in state.ids(VMState.FREE):
        yield vms[vmid]
    for vmid in chain(state.released(), p.let_go):  # OCCUPIED but nobody's any more
        yield vms[vmid]
    for vmid in state.members(VMState.WAIT, None):
        yield vms[vmid]
    for batch in state.batches.values():
        if batch.cancelled:
            for vmid in state.members(VMState.READY, batch.id):
                yield vms[vmid]
    for vmid in reversed(state.ids(VMState.READY)):
        yield vms[vmid]
    for vmid in reversed(state.ids(VMState.WAIT)):
        yield vms[vmid]


def _assign_locks(p: _Pass) -> dict[str, int]:
    """Pending locks get READY VMs of their batch in order; returns what stays pending, by batch."""
    state = p.state
    remaining: dict[str, int] = {}
    lendable: dict[str, Iterator[str]] = {}
    for lock in state.pending.values():
        if lock.handle in p.released:
            continue
        if lock.batch not in remaining:
            it = lendable.get(lock.batch)
            if it is None:
                it = lendable[lock.batch] = p.lendable(lock.batch)
            vmid = next(it, None)
            if vmid is not None:
                p.actions.append(Assign(lock.handle, vmid))
                p.take_ready(vmid, lock.batch)
                continue
        remaining[lock.batch] = remaining.get(lock.batch, 0) + 1
    return remaining


def _preparation_queue(p: _Pass, remaining: dict[str, int], now: float) -> tuple[list[str], list[str]]:
    """Batches wanting one more VM each, pending locks first (oldest first), then sizes.

    Surplus READY VMs of cancelled batches are cleaned on the way.
    """
    state = p.state
    lock_need: dict[str, int] = {}
    size_queue: list[str] = []
    for batch in state.batches.values():
        pend = remaining.get(batch.id, 0)
        ready = p.count(VMState.READY, batch.id)
        have = ready + p.count(VMState.WAIT, batch.id)
        demand = pend if batch.cancelled else batch.size + pend
        if have > demand and ready > 0:
            surplus = min(have - demand, ready)
            for vmid in list(p.lendable(batch.id))[:surplus]:
                p.actions.append(
                    Cleanup(vmid, "batch cancelled" if batch.cancelled else "not needed by its batch")
                )
                p.take_ready(vmid, batch.id)
        deficit = demand - have
        if deficit <= 0:
            continue
        # VMs on their way (READY ones are all lent by now) serve the waiting locks first
        locks = max(0, min(deficit, pend - have))
        if locks:
            lock_need[batch.id] = locks
        size_queue.extend([batch.id] * (deficit - locks))
    lock_queue: list[str] = []
    if lock_need:
        for lock in state.pending.values():
            if lock.handle in p.released:
                continue
            left = lock_need.get(lock.batch, 0)
            if left:
                lock_queue.append(lock.batch)
                lock_need[lock.batch] = left - 1
    return lock_queue, size_queue


def _prepare_free(p: _Pass, queue: list[str]) -> int:
    """FREE VMs, longest idle first, are prepared for the queue; returns how many entries served."""
    if not queue:
        return 0
    state = p.state
    vms = state.vms
    served = 0
    ids = state.ids(VMState.FREE)
    free: Iterator[str] = iter(ids)
    if p.outdated:  # up-to-date VMs first; outdated ones only when none is left
        old = p.outdated
        free = chain((v for v in ids if v not in old), (v for v in ids if v in old))
    for vmid in free:
        if served == len(queue):
            break
        if p.free(vmid) and not vms[vmid].recovering:
            p.actions.append(Prepare(vmid, queue[served]))
            p.used.add(vmid)
            served += 1
    return served


def _retire(p: _Pass, minimum: int, maximum: int, now: float) -> None:
    """Terminate outdated VMs: released ones at once, FREE ones as replacements come up."""
    if not p.outdated:
        return
    state = p.state
    vms = state.vms
    let_go = set(p.let_go)
    idle: list[VM] = []
    for vmid in p.outdated:
        vm = vms.get(vmid)
        if vm is None or not p.free(vmid):
            continue
        if vm.state is VMState.OCCUPIED and (vm.handle is None or vmid in let_go):
            if not p.kill(vm, OUTDATED):
                p.retirable += 1
        elif vm.state is VMState.FREE and not vm.recovering:
            idle.append(vm)
    if not idle:
        return
    idle.sort(key=lambda vm: vm.last_used)  # longest idle first, as linger would
    coming = sum(
        1 for kind in (VMState.CREATING, VMState.BOOTING) for vmid in state.ids(kind) if vmid not in p.dying
    )
    retire = min(len(idle), max(0, p.alive - coming - minimum))
    cloud = state.cloud
    if not retire and p.alive >= maximum and not coming and cloud.can_grow(now) and not cloud.probing:
        retire = 1  # no room to boot a replacement first: one at a time
    killed = 0
    for vm in idle[:retire]:
        if not p.kill(vm, OUTDATED):
            break
        killed += 1
    p.retirable += len(idle) - killed


def _grow(
    p: _Pass,
    config: PoolConfig,
    minimum: int,
    maximum: int,
    queue: list[str],
    locks_queued: int,
    served: int,
    now: float,
) -> None:
    """Boot for the queue and the minimum; a lock still unserved takes an idle READY VM."""
    state = p.state
    unserved = len(queue) - served
    creating = sum(1 for vmid in state.ids(VMState.CREATING) if vmid not in p.dying)
    booting = sum(1 for vmid in state.ids(VMState.BOOTING) if vmid not in p.dying)
    cleaning = sum(
        1 for vmid in chain(state.released(), p.let_go) if vmid not in p.dying and vmid not in p.outdated
    )
    coming = p.count(VMState.WAIT, None) + cleaning + creating + booting
    want = max(unserved - coming, minimum - (p.alive - p.retirable), 0)
    boots = min(want, maximum - p.alive)
    if boots > 0 and (p.boot_failed or not state.cloud.can_grow(now)):
        boots = 0
    if boots > 0 and state.cloud.probing:
        # the cloud failed lately: one boot at a time until one succeeds
        # a probe proves itself when the cloud accepts it, or, after VMs died before HELLO, at HELLO
        unproven = creating + (booting if state.cloud.boot_failures else 0)
        boots = min(boots, max(0, 1 - unproven))
    boots = max(boots, 0)
    # Boots wait for a cloud thread, and the cloud-call timeout runs from the moment they are
    # asked for: at most so many at once, or a big fill times out its own queue (and re-boots it).
    started = min(boots, max(0, config.max_boots_in_flight - creating))
    for i in range(started):
        p.actions.append(Boot(state.vmid_for(state.next_vmid + i)))
    p.alive += started
    short = (locks_queued - served) - coming - boots
    if short <= 0:
        return
    # take from the batches with the most READY VMs; none of them has a pending lock left
    donors = sorted(
        (b for b in state.batches.values()),
        key=lambda b: -p.count(VMState.READY, b.id),
    )
    for batch in donors:
        for vmid in list(p.lendable(batch.id)):
            if short <= 0:
                return
            p.actions.append(Cleanup(vmid, "taken for a pending lock"))
            p.take_ready(vmid, batch.id)
            short -= 1


def _linger(p: _Pass, minimum: int, now: float) -> None:
    """FREE VMs idle longer than linger go while the pool is above its minimum.

    Outdated VMs are the retiring's: neither taken nor counted (their replacements are).
    """
    if p.alive - p.retirable <= minimum:
        return
    state = p.state
    vms = state.vms
    linger = state.spec.linger
    outdated = p.outdated
    for vmid in state.ids(VMState.FREE):
        if p.alive - p.retirable <= minimum:
            return
        vm = vms[vmid]
        if not p.free(vmid) or vm.recovering or vmid in outdated:
            continue
        if now - vm.last_used < linger:
            return  # FREE VMs are in the order they became idle: the rest idled for less
        if not p.kill(vm, LINGER):
            return


def _clean_released(p: _Pass) -> None:
    vms = p.state.vms
    outdated = p.outdated
    for vmid in chain(p.state.released(), p.let_go):
        if p.free(vmid) and not vms[vmid].recovering and vmid not in outdated:
            p.actions.append(Cleanup(vmid, "released"))
            p.used.add(vmid)


def _drop_batches(p: _Pass, remaining: dict[str, int]) -> None:
    for batch in p.state.batches.values():
        if (
            batch.cancelled
            and not remaining.get(batch.id)
            and p.count(VMState.READY, batch.id) <= 0
            and p.count(VMState.WAIT, batch.id) <= 0
            and not _held(p, batch.id)
        ):
            p.actions.append(DropBatch(batch.id))


def _held(p: _Pass, batch: str) -> bool:
    """Whether a handle still holds a VM of the batch (a cancelled batch stays until none does)."""
    released = p.state.released()
    for vmid in p.state.members(VMState.OCCUPIED, batch):
        if vmid not in released and vmid not in p.dying and vmid not in p.let_go:
            return True
    return False


# --------------------------------------------------------------------------- the marks


def apply(state: PoolState, action: Action, now: float, config: PoolConfig) -> VM | None:
    """Mark the state with an action being started; returns the VM the action now works on.

    None means there is nothing left to carry out (the action was state only, or moot).
    """
    if isinstance(action, Boot):
        return state.add_vm(action.vmid, now)
    if isinstance(action, Delete):
        if action.failed_boot:
            state.cloud = model.after_boot_failure(state.cloud, action.reason, now, config)
        return state.kill_vm(action.vmid, action.reason, now)
    if isinstance(action, Prepare):
        vm = state.vms[action.vmid]
        return state.put(model.prepare_started(vm, action.batch, now))
    if isinstance(action, Cleanup):
        vm = state.vms[action.vmid]
        if vm.handle is not None:
            state.release_handle(vm.handle)
            vm = state.vms[action.vmid]
        return state.put(model.cleanup_started(vm, now))
    if isinstance(action, Assign):
        state.assign(action.handle, action.vmid, now)
        return None
    if isinstance(action, ReleaseHandle):
        state.release_handle(action.handle)
        return None
    if isinstance(action, DropBatch):
        state.drop_batch(action.batch)
        return None
    if isinstance(action, DeleteServer):
        state.stray_deleting(action.server_id, now)
        return None
    raise TypeError(f"not an action: {action!r}")


def preparation_queue(state: PoolState, now: float) -> list[str]:
    """The batches waiting for a VM to be prepared for them, one entry per VM, locks first.

    What ``/all-status`` shows as queued preparations: the plan's queue before FREE VMs serve it.
    """
    p = _Pass(state)
    lock_queue, size_queue = _preparation_queue(p, _assign_locks(p), now)
    return lock_queue + size_queue
