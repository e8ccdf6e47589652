"""The whole pool in memory: VMs, batches, handles and pending locks, and what happens to them.

``PoolState`` is the one mutable object of the pool's core.  It holds frozen records and applies
what happened (a boot answer, a HELLO, a lock) as the pure transitions of :mod:`vmcloud.pool.model`
say; it does no I/O and reads no clock: ``now`` is always passed in.  It composes parts that do
one job each (the first two are told every change of a VM record it stores):

- :class:`~vmcloud.pool.indexes.StateIndex`: VMs by state and by (state, batch), for the plan;
- :class:`~vmcloud.pool.guests.GuestDirectory`: which VM a guest's HELLO is (:class:`GuestRefused`);
- :class:`~vmcloud.pool.strays.Strays`: servers in the cloud that no VM tracks, from each listing;
- :class:`~vmcloud.pool.observers.PoolObservers` (``observers``, the one part others set):
  ``on_transition(old, new)`` sees every change of a VM's state (None for a VM that appears or
  disappears), ``on_handle_event(token, event)`` every event put on a handle,
  ``on_handle_gone(token)`` every handle that goes.  The service logs the first and wakes
  long-polls with the second.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from vmcloud.pool import model
from vmcloud.pool.guests import GuestDirectory, GuestRefused
from vmcloud.pool.indexes import StateIndex, reindex
from vmcloud.pool.interfaces import ERROR as SERVER_ERROR
from vmcloud.pool.interfaces import BatchOptions, GuestInfo, ServerStatus
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
    Stray,
    VMState,
)
from vmcloud.pool.observers import PoolObservers
from vmcloud.pool.strays import Strays

__all__ = ["GuestRefused", "PoolState"]


class PoolState:
    """VMs, batches, handles and pending locks; the transitions that happen to them."""

    __slots__ = (
        "_by_server",
        "_directory",
        "_index",
        "_pending_by_batch",
        "_ready_events",
        "_strays",
        "batches",
        "changes",
        "cloud",
        "epoch",
        "events_limit",
        "guests",
        "handles",
        "next_batch",
        "next_vmid",
        "observers",
        "pending",
        "shutting_down",
        "spec",
        "vms",
    )

    def __init__(self, epoch: str, spec: PoolSpec, events_limit: int = 1000) -> None:
        #: Distinguishes this pool's vmids from those of an earlier life (a deleted checkpoint).
        self.epoch = epoch
        self.spec = spec
        self.events_limit = events_limit
        self.vms: dict[str, VM] = {}
        self.batches: dict[str, Batch] = {}
        self.handles: dict[str, Handle] = {}
        #: Locks waiting for a VM, by handle token, oldest first.
        self.pending: dict[str, PendingLock] = {}
        self.cloud = CloudHealth()
        #: What the guest channel knows of each guest (refreshed every tick and on every HELLO).
        self.guests: dict[str, GuestInfo] = {}
        self.shutting_down = False
        self.next_vmid = 1
        self.next_batch = 1
        #: Bumped by every change; the reconciler checkpoints when it moved.
        self.changes = 0
        self._index = StateIndex()
        self._directory = GuestDirectory()
        self._strays = Strays()
        self.observers = PoolObservers()
        self._by_server: dict[str, str] = {}
        self._pending_by_batch: dict[str, int] = {}
        #: Events a READY VM's guest said before a handle took it (its home page's load), by vmid:
        #: the handle that takes the VM hears them after vm-assigned.  Not checkpointed.
        self._ready_events: dict[str, list[Mapping[str, Any]]] = {}

    def __repr__(self) -> str:
        vms = ", ".join(
            f"{vm.vmid}:{vm.state.value}"
            + (f"/{vm.batch}" if vm.batch else "")
            + (f"@{vm.handle}" if vm.handle else "")
            + ("~" if vm.recovering else "")
            for vm in self.vms.values()
        )
        batches = ", ".join(f"{b.id}:{b.size}{'x' if b.cancelled else ''}" for b in self.batches.values())
        handles = ", ".join(f"{h.token}->{h.vmid}" for h in self.handles.values())
        return (
            f"<PoolState {self.spec} vms=[{vms}] batches=[{batches}] handles=[{handles}] "
            f"pending={[(p.handle, p.batch) for p in self.pending.values()]} cloud={self.cloud} "
            f"shutting_down={self.shutting_down}>"
        )

    # ------------------------------------------------------------------ the parts, as the rooms see them

    @property
    def strays(self) -> dict[str, Stray]:
        """Servers that no VM tracks, by server id (see :class:`~vmcloud.pool.strays.Strays`)."""
        return self._strays.seen

    @strays.setter
    def strays(self, strays: dict[str, Stray]) -> None:
        self._strays.seen = strays

    @property
    def unmatched(self) -> dict[str, tuple[GuestInfo, float]]:
        """Guests that said HELLO but matched no VM yet, with the time they did."""
        return self._directory.unmatched

    # ------------------------------------------------------------------ VMs and their indexes

    def vmid_for(self, n: int) -> str:
        """The vmid of the n-th VM of this pool's life."""
        return f"{self.epoch}-{n}"

    def ids(self, state: VMState) -> dict[str, None]:
        """The vmids in ``state``, in the order they entered it (an ordered set: do not mutate)."""
        return self._index.ids(state)

    def count(self, state: VMState) -> int:
        return self._index.count(state)

    def members(self, state: VMState, batch: str | None) -> dict[str, None]:
        """READY / WAIT / OCCUPIED vmids of a batch (WAIT with None: cleanups), oldest first."""
        return self._index.members(state, batch)

    def released(self) -> dict[str, None]:
        """OCCUPIED VMs whose handle is gone: each wants a CLEANUP."""
        return self._index.released()

    def vm_by_identity(self, identity: str) -> VM | None:
        vmid = self._directory.vmid_of(identity)
        return None if vmid is None else self.vms.get(vmid)

    def alive_count(self) -> int:
        """VMs counting towards the pool size (neither ERROR nor KILLING)."""
        return len(self.vms) - self._index.count(VMState.ERROR) - self._index.count(VMState.KILLING)

    def put(self, vm: VM) -> VM:
        """Store a VM record, keeping every index true; returns the record."""
        old = self.vms.get(vm.vmid)
        self.vms[vm.vmid] = vm
        self.changes += 1
        self._index.move(old, vm)
        if (
            old is None
            or old.server_id != vm.server_id
            or old.login != vm.login
            or old.identity != vm.identity
            or old.macs != vm.macs
            or old.ips != vm.ips
        ):  # most changes are of state alone: a 500-VM batch must not rebuild five index entries each
            reindex(self._by_server, old, vm, _server_id)
            self._directory.move(old, vm)
        if old is None or old.state is not vm.state:
            if old is not None and old.state is VMState.READY and vm.state is not VMState.OCCUPIED:
                self._ready_events.pop(vm.vmid, None)  # never lent: its early events go with it
            self.observers.transition(old, vm)
        return vm

    def remove_vm(self, vmid: str) -> VM | None:
        """Forget a VM (its server is gone)."""
        vm = self.vms.pop(vmid, None)
        if vm is None:
            return None
        self.changes += 1
        self._index.drop(vm)
        self._ready_events.pop(vmid, None)
        reindex(self._by_server, vm, None, _server_id)
        self._directory.move(vm, None)
        self.observers.transition(vm, None)
        return vm

    def current(self, vmid: str, version: int) -> VM | None:
        """The VM if it is still at ``version``: else an answer about it is stale."""
        vm = self.vms.get(vmid)
        if vm is None or vm.version != version:
            return None
        return vm

    def add_vm(self, vmid: str, now: float) -> VM:
        """A new VM in CREATING; the counter moves past it so the next plan names the next one."""
        self.next_vmid += 1
        return self.put(model.new_vm(vmid, now))

    # ------------------------------------------------------------------ batches, handles, locks

    def add_batch(self, size: int, homepage: str, options: BatchOptions, now: float) -> Batch:
        batch = Batch(str(self.next_batch), size, homepage, options, now)
        self.next_batch += 1
        self.batches[batch.id] = batch
        self.changes += 1
        return batch

    def cancel_batch(self, batch_id: str) -> None:
        batch = self.batches[batch_id]
        if not batch.cancelled:
            self.batches[batch_id] = attrs.evolve(batch, cancelled=True)
            self.changes += 1

    def drop_batch(self, batch_id: str) -> None:
        if self.batches.pop(batch_id, None) is not None:
            self.changes += 1

    def pending_count(self, batch_id: str) -> int:
        return self._pending_by_batch.get(batch_id, 0)

    def add_handle(self, batch_id: str, token: str, now: float) -> Handle:
        """A new handle on the batch, waiting for a VM as a pending lock."""
        handle = Handle(token, batch_id, now, EventLog(self.events_limit))
        self.handles[token] = handle
        self.add_pending(PendingLock(token, batch_id, now))
        return handle

    def add_pending(self, lock: PendingLock) -> None:
        """Queue a lock (last in line) for a READY VM of its batch."""
        self.pending[lock.handle] = lock
        self._pending_by_batch[lock.batch] = self._pending_by_batch.get(lock.batch, 0) + 1
        self.changes += 1

    def _unpend(self, token: str) -> None:
        lock = self.pending.pop(token, None)
        if lock is not None:
            left = self._pending_by_batch[lock.batch] - 1
            if left:
                self._pending_by_batch[lock.batch] = left
            else:
                del self._pending_by_batch[lock.batch]

    def first_ready(self, batch_id: str) -> str | None:
        """The oldest READY VM of the batch that may be lent now."""
        for vmid in self.members(VMState.READY, batch_id):
            if not self.vms[vmid].recovering:
                return vmid
        return None

    def assign(self, token: str, vmid: str, now: float) -> None:
        """Lend a READY VM to a pending lock."""
        handle = self.handles[token]
        vm = self.vms[vmid]
        self._unpend(token)
        self.handles[token] = attrs.evolve(handle, vmid=vmid)
        self.put(model.occupied(vm, token, now))
        self.add_event(token, {"action": "vm-assigned", "vmid": vmid}, now)
        for data in self._ready_events.pop(vmid, ()):
            self.add_event(token, data, now)

    def release_handle(self, token: str) -> Handle | None:
        """Forget a handle; its VM, if any, waits OCCUPIED for its cleanup."""
        handle = self.handles.pop(token, None)
        if handle is None:
            return None
        self.changes += 1
        self._unpend(token)
        self.observers.handle_gone(token)
        if handle.vmid is not None:
            vm = self.vms.get(handle.vmid)
            if vm is not None and vm.handle == token:
                self.put(attrs.evolve(vm, handle=None))
        return handle

    def set_expiry(self, token: str, expire_at: float | None) -> None:
        self.handles[token] = attrs.evolve(self.handles[token], expire_at=expire_at)
        self.changes += 1

    def add_event(self, token: str, data: Mapping[str, Any], now: float) -> Event | None:
        handle = self.handles.get(token)
        if handle is None:
            return None
        event = handle.events.append(data, now)
        self.changes += 1
        self.observers.handle_event(token, event)
        return event

    def _detach(self, vm: VM, reason: str, now: float) -> None:
        """The VM dies under its handle: the handle loses it and says so in an event."""
        if vm.state is not VMState.OCCUPIED or vm.handle is None:
            return
        token = vm.handle
        handle = self.handles.get(token)
        if handle is None or handle.vmid != vm.vmid:
            return
        self.handles[token] = attrs.evolve(handle, vmid=None, lost=LostVM(vm.vmid, reason, now))
        self.add_event(token, {"action": "vm-died", "vmid": vm.vmid, "reason": reason}, now)

    # ------------------------------------------------------------------ what happens to VMs

    def fail_vm(self, vmid: str, reason: str, now: float) -> VM | None:
        """Mark a live VM ERROR (the plan terminates it); a dying one is left alone."""
        vm = self.vms.get(vmid)
        if vm is None or not vm.alive:
            return None
        self._detach(vm, reason, now)
        return self.put(model.failed(vm, reason, now))

    def kill_vm(self, vmid: str, reason: str, now: float) -> VM | None:
        """Start terminating a VM; returns it in KILLING, or None when there is nothing to delete.

        A VM whose boot was never answered has no server to delete: it waits in KILLING for the
        answer (which then gets the server deleted) until asked to be killed again, when it is
        forgotten (the stray reaper gets whatever the cloud made of it).
        """
        vm = self.vms.get(vmid)
        if vm is None:
            return None
        if vm.state is VMState.KILLING and vm.server_id is None:
            self.remove_vm(vmid)
            return None
        self._detach(vm, reason, now)
        return self.put(model.killing(vm, reason, now))

    def boot_done(self, vmid: str, version: int, server_id: str, now: float) -> bool:
        """The cloud accepted a server; False when nobody wants it any more (delete it)."""
        vm = self.current(vmid, version)
        if vm is not None and vm.state is VMState.CREATING:
            self.put(model.boot_accepted(vm, server_id, now))
            return True
        vm = self.vms.get(vmid)
        if vm is not None and vm.server_id is None and not vm.alive:
            # killed while its boot was in flight: now there is a server to delete
            self.put(model.failed(attrs.evolve(vm, server_id=server_id), vm.reason or "killed", now))
            return True
        return False

    def boot_failed(self, vmid: str, version: int, reason: str, now: float) -> None:
        """The cloud made no server: the VM never existed."""
        vm = self.vms.get(vmid)
        if vm is not None and vm.server_id is None and vm.state in (VMState.CREATING, VMState.KILLING):
            self.remove_vm(vmid)

    def prepare_done(self, vmid: str, version: int, answer: Mapping[str, Any], now: float) -> bool:
        vm = self.current(vmid, version)
        if vm is None or not vm.preparing:
            return False
        password = answer.get("vncPassword", answer.get("vnc_password"))
        self.put(
            model.prepared(
                vm,
                password if isinstance(password, str) else None,
                now,
                vnc_port=_server_port(answer.get("vnc")),
                audio_port=_server_port(answer.get("audioServer")),
            )
        )
        return True

    def cleanup_done(self, vmid: str, version: int, now: float) -> bool:
        vm = self.current(vmid, version)
        if vm is None or vm.state is not VMState.WAIT or vm.batch is not None:
            return False
        self.put(model.cleaned(vm, now))
        return True

    def operation_failed(self, vmid: str, version: int, reason: str, now: float) -> bool:
        """A PREPARE or CLEANUP failed: the guest cannot be trusted any more."""
        vm = self.current(vmid, version)
        if vm is None or vm.state is not VMState.WAIT:
            return False
        self.fail_vm(vmid, reason, now)
        return True

    def delete_done(self, vmid: str, server_id: str | None) -> bool:
        vm = self.vms.get(vmid)
        if vm is None or vm.state is not VMState.KILLING or vm.server_id != server_id:
            return False
        self.remove_vm(vmid)
        return True

    # ------------------------------------------------------------------ what guests say

    def guest_hello(self, guest: GuestInfo, now: float) -> VM | None:
        """A guest said HELLO: a booting VM becomes FREE, a recovering one is back.

        Which VM is the guest's is :meth:`~vmcloud.pool.guests.GuestDirectory.match`'s answer;
        raises :class:`GuestRefused` when the guest claims a VM that is not its own.
        """
        unmatched = self._directory.unmatched
        try:
            vmid = self._directory.match(guest, self.vms)
        except GuestRefused:
            unmatched.pop(guest.identity, None)
            raise
        if vmid is None:
            unmatched[guest.identity] = (guest, now)
            return None
        unmatched.pop(guest.identity, None)
        self.guests[guest.identity] = guest
        vm = self.vms[vmid]
        if not vm.alive:
            return vm
        view: dict[str, Any] = {}
        if guest.view_password is not None:  # the VM's own guest (matched above) said its operator view
            view = {"view_port": guest.vnc_port, "view_password": guest.view_password}
        # 5,000 VMs say the same few things: share one copy of each (a few hundred bytes a VM)
        known = attrs.evolve(
            vm,
            identity=_same(guest.identity, vm.login),
            mac=_same(guest.mac, *vm.macs),
            ip=_same(guest.ip, *vm.ips),
            capabilities=self._directory.shared_capabilities(guest.capabilities),
            recovering=False,
            **view,
        )
        if vm.state is VMState.BOOTING:
            return self.put(model.transition(known, VMState.FREE, now, last_used=now))
        if known != vm:
            return self.put(known)
        return vm

    def guest_gone(self, identity: str, reason: str, now: float) -> VM | None:
        self._directory.unmatched.pop(identity, None)
        vm = self.vm_by_identity(identity)
        if vm is None or vm.recovering or vm.state in (VMState.CREATING, VMState.BOOTING):
            return None
        return self.fail_vm(vm.vmid, f"guest gone: {reason}", now)

    def guest_event(self, identity: str, data: Mapping[str, Any], now: float) -> Event | None:
        """An event from a guest goes to the handle holding its VM; otherwise nobody wants it."""
        vm = self.vm_by_identity(identity)
        if vm is not None and vm.state is VMState.READY:
            kept = self._ready_events.setdefault(vm.vmid, [])
            if len(kept) < 16:
                kept.append(data)
            return None
        if vm is None or vm.state is not VMState.OCCUPIED or vm.handle is None:
            return None
        return self.add_event(vm.handle, data, now)

    def retry_unmatched(self, now: float, patience: float) -> list[VM]:
        """Match again guests that said HELLO before the cloud told us their addresses."""
        matched = []
        unmatched = self._directory.unmatched
        for identity, (guest, seen) in list(unmatched.items()):
            if now - seen > patience:
                del unmatched[identity]
            else:
                try:
                    vm = (
                        self.guest_hello(guest, now)
                        if self._directory.match(guest, self.vms) is not None
                        else None
                    )
                except GuestRefused:
                    continue  # told when it said HELLO; it stays refused
                if vm is not None:
                    matched.append(vm)
        return matched

    # ------------------------------------------------------------------ what the cloud says

    def observe_servers(
        self, servers: Iterable[ServerStatus], issued_at: float, now: float, prefix: str
    ) -> None:
        """Take in one listing of the pool's servers (asked for at ``issued_at``).

        Tracked servers update their VM's addresses and image; a tracked server missing from the
        listing or in ERROR fails its VM (unless the VM got its server after the listing was asked
        for); untracked ones are counted as strays, seen once more.
        """
        listed = {s.server_id: s for s in servers}
        for server_id, vmid in list(self._by_server.items()):
            vm = self.vms[vmid]
            status = listed.get(server_id)
            if status is None:
                if vm.booted_at is not None and vm.booted_at > issued_at:
                    continue
                if vm.state is VMState.KILLING:
                    self.remove_vm(vmid)
                else:
                    self.fail_vm(vmid, "server gone from the cloud", now)
                continue
            macs, ips = tuple(status.macs), tuple(status.ips)
            if macs != vm.macs or ips != vm.ips or status.image != vm.image:
                vm = self.put(attrs.evolve(vm, macs=macs, ips=ips, image=status.image))
            if status.status == SERVER_ERROR and vm.alive:
                self.fail_vm(vmid, f"cloud reports ERROR: {status.fault or 'no reason given'}", now)
        if self._strays.count(self._untracked(listed, prefix)):
            self.changes += 1

    def _untracked(self, listed: Mapping[str, ServerStatus], prefix: str) -> list[ServerStatus]:
        """The listed servers no VM tracks, but for those whose boot answer is on its way."""
        creating = self._index.ids(VMState.CREATING)
        untracked = []
        for server_id, status in listed.items():
            if server_id in self._by_server:
                continue
            vmid = status.metadata.get("vmcloud-vmid") or status.name[len(prefix) :]
            if vmid in creating or (vmid in self.vms and self.vms[vmid].server_id is None):
                continue  # its boot answer is on its way
            untracked.append(status)
        return untracked

    def stray_deleting(self, server_id: str, now: float) -> None:
        self._strays.deleting(server_id, now)

    def stray_deleted(self, server_id: str) -> None:
        self._strays.deleted(server_id)


def _server_port(server: object) -> int | None:
    """The port of a ``{"host", "port"}`` a guest's PREPARE answer gives for one of its servers.

    Only the port is taken: the controller dials the address it knows for the VM, so a guest
    cannot point a worker's console at another host (or at the controller's own loopback).
    """
    port = server.get("port") if isinstance(server, Mapping) else None
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
        return port
    return None


def _same(value: str | None, *known: str | None) -> str | None:
    """``value``, as the very object of an equal string already held (else itself)."""
    for candidate in known:
        if candidate is not None and candidate == value:
            return candidate
    return value


def _server_id(vm: VM) -> tuple[str | None]:
    return (vm.server_id,)
