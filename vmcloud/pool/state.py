"""The whole pool in memory: VMs, batches, handles and pending locks, indexed for the plan.

``PoolState`` is the one mutable object of the pool's core.  It holds frozen records and keeps
indexes over them (VMs by state, by (state, batch), by server, login, MAC, IP and identity) so
that a reconcile pass over thousands of VMs looks up what it needs instead of scanning.  Its
methods apply what happened (a boot answer, a HELLO, a lock) as the pure transitions of
:mod:`vmcloud.pool.model` say; it does no I/O and reads no clock: ``now`` is always passed in.

Observers: ``on_transition(old, new)`` sees every change of a VM's state (None for a VM that
appears or disappears), ``on_handle_event(token, event)`` every event put on a handle.  The
service logs the first and wakes long-polls with the second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from vmcloud.pool import model
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

#: States whose VMs are indexed by batch as well.
_SLOTTED = frozenset({VMState.READY, VMState.WAIT, VMState.OCCUPIED})

TransitionObserver = Callable[[VM | None, VM | None], None]
EventObserver = Callable[[str, Event], None]


class GuestRefused(Exception):
    """A guest claimed a VM that is bound to someone else; the message says which and why."""


def normalize_mac(mac: str) -> str:
    """One spelling for a MAC, whether a cloud or a guest (or an identity) wrote it."""
    return mac.strip().lower().replace("-", ":")


class PoolState:
    """VMs, batches, handles and pending locks, with the indexes the plan needs."""

    __slots__ = (
        "_by_identity",
        "_by_ip",
        "_by_login",
        "_by_mac",
        "_by_server",
        "_by_state",
        "_capabilities",
        "_pending_by_batch",
        "_ready_events",
        "_released",
        "_slots",
        "batches",
        "changes",
        "cloud",
        "epoch",
        "events_limit",
        "guests",
        "handles",
        "next_batch",
        "next_vmid",
        "on_handle_event",
        "on_handle_gone",
        "on_transition",
        "pending",
        "shutting_down",
        "spec",
        "strays",
        "unmatched",
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
        self.strays: dict[str, Stray] = {}
        self.cloud = CloudHealth()
        #: What the guest channel knows of each guest (refreshed every tick and on every HELLO).
        self.guests: dict[str, GuestInfo] = {}
        #: Guests that said HELLO but matched no VM yet, with the time they did.
        self.unmatched: dict[str, tuple[GuestInfo, float]] = {}
        #: One tuple per distinct set of guest capabilities, shared by every VM saying it.
        self._capabilities: dict[tuple[str, ...], tuple[str, ...]] = {}
        self.shutting_down = False
        self.next_vmid = 1
        self.next_batch = 1
        #: Bumped by every change; the reconciler checkpoints when it moved.
        self.changes = 0
        self.on_transition: TransitionObserver | None = None
        self.on_handle_event: EventObserver | None = None
        self.on_handle_gone: Callable[[str], None] | None = None
        self._by_state: dict[VMState, dict[str, None]] = {s: {} for s in VMState}
        self._slots: dict[tuple[VMState, str | None], dict[str, None]] = {}
        self._released: dict[str, None] = {}
        self._pending_by_batch: dict[str, int] = {}
        #: Events a READY VM's guest said before a handle took it (its home page's load), by vmid:
        #: the handle that takes the VM hears them after vm-assigned.  Not checkpointed.
        self._ready_events: dict[str, list[Mapping[str, Any]]] = {}
        self._by_server: dict[str, str] = {}
        self._by_login: dict[str, str] = {}
        self._by_identity: dict[str, str] = {}
        self._by_mac: dict[str, str] = {}
        self._by_ip: dict[str, str] = {}

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

    # ------------------------------------------------------------------ VMs and their indexes

    def vmid_for(self, n: int) -> str:
        """The vmid of the n-th VM of this pool's life."""
        return f"{self.epoch}-{n}"

    def ids(self, state: VMState) -> dict[str, None]:
        """The vmids in ``state``, in the order they entered it (an ordered set: do not mutate)."""
        return self._by_state[state]

    def count(self, state: VMState) -> int:
        return len(self._by_state[state])

    def members(self, state: VMState, batch: str | None) -> dict[str, None]:
        """READY / WAIT / OCCUPIED vmids of a batch (WAIT with None: cleanups), oldest first."""
        return self._slots.get((state, batch), {})

    def released(self) -> dict[str, None]:
        """OCCUPIED VMs whose handle is gone: each wants a CLEANUP."""
        return self._released

    def vm_by_identity(self, identity: str) -> VM | None:
        vmid = self._by_identity.get(identity)
        return None if vmid is None else self.vms.get(vmid)

    def alive_count(self) -> int:
        """VMs counting towards the pool size (neither ERROR nor KILLING)."""
        return len(self.vms) - self.count(VMState.ERROR) - self.count(VMState.KILLING)

    def put(self, vm: VM) -> VM:
        """Store a VM record, keeping every index true; returns the record."""
        old = self.vms.get(vm.vmid)
        self.vms[vm.vmid] = vm
        self.changes += 1
        vmid = vm.vmid
        if old is None or old.state is not vm.state:
            if old is not None:
                self._by_state[old.state].pop(vmid, None)
                if old.state is VMState.READY and vm.state is not VMState.OCCUPIED and self._ready_events:
                    self._ready_events.pop(vmid, None)  # never lent: its early events go with it
            self._by_state[vm.state][vmid] = None
        old_slot = _slot(old)
        new_slot = _slot(vm)
        if old_slot != new_slot:
            if old_slot is not None:
                self._unslot(old_slot, vmid)
            if new_slot is not None:
                self._slots.setdefault(new_slot, {})[vmid] = None
        if vm.released:
            self._released[vmid] = None
        elif old is not None and old.released:
            self._released.pop(vmid, None)
        if (
            old is None
            or old.server_id != vm.server_id
            or old.login != vm.login
            or old.identity != vm.identity
            or old.macs != vm.macs
            or old.ips != vm.ips
        ):  # most changes are of state alone: a 500-VM batch must not rebuild five index entries each
            _reindex(self._by_server, old, vm, lambda v: (v.server_id,))
            _reindex(self._by_login, old, vm, lambda v: (v.login,))
            _reindex(self._by_identity, old, vm, lambda v: (v.identity,))
            _reindex(self._by_mac, old, vm, lambda v: tuple(normalize_mac(m) for m in v.macs))
            _reindex(self._by_ip, old, vm, lambda v: v.ips)
        if self.on_transition is not None and (old is None or old.state is not vm.state):
            self.on_transition(old, vm)
        return vm

    def remove_vm(self, vmid: str) -> VM | None:
        """Forget a VM (its server is gone)."""
        vm = self.vms.pop(vmid, None)
        if vm is None:
            return None
        self.changes += 1
        self._by_state[vm.state].pop(vmid, None)
        self._ready_events.pop(vmid, None)
        slot = _slot(vm)
        if slot is not None:
            self._unslot(slot, vmid)
        self._released.pop(vmid, None)
        _reindex(self._by_server, vm, None, lambda v: (v.server_id,))
        _reindex(self._by_login, vm, None, lambda v: (v.login,))
        _reindex(self._by_identity, vm, None, lambda v: (v.identity,))
        _reindex(self._by_mac, vm, None, lambda v: tuple(normalize_mac(m) for m in v.macs))
        _reindex(self._by_ip, vm, None, lambda v: v.ips)
        if self.on_transition is not None:
            self.on_transition(vm, None)
        return vm

    def _unslot(self, slot: tuple[VMState, str | None], vmid: str) -> None:
        members = self._slots.get(slot)
        if members is not None:
            members.pop(vmid, None)
            if not members:
                del self._slots[slot]

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
        if self.on_handle_gone is not None:
            self.on_handle_gone(token)
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
        if self.on_handle_event is not None:
            self.on_handle_event(token, event)
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

    def match_guest(self, guest: GuestInfo) -> str | None:
        """The VM a guest belongs to, or None while none is known for it yet.

        A guest is who its credentials say and nothing else: a VM bound to a login or identity
        goes to that guest only, and the guest logging in with the credentials minted for a VM
        always gets that VM (even from a guest that claimed it first).  What a guest merely claims
        (a MAC or IP in its HELLO) picks only among VMs nobody is bound to yet; a claim on a bound
        VM raises :class:`GuestRefused`, so that a guest that reaches the broker cannot take over a
        VM (and with it the next worker's cookies and VNC password).  Claims come only from guests
        without minted credentials: anonymous ones, which the broker takes from its own host only,
        and those an external broker passes on; a VM's own guest is matched by its login first.
        """
        if guest.login is not None and guest.login in self._by_login:
            return self._by_login[guest.login]
        if guest.identity in self._by_identity:
            return self._by_identity[guest.identity]
        vmid = None
        if guest.mac and normalize_mac(guest.mac) in self._by_mac:
            vmid, claim = self._by_mac[normalize_mac(guest.mac)], f"mac {guest.mac}"
        elif guest.ip and guest.ip in self._by_ip:
            vmid, claim = self._by_ip[guest.ip], f"ip {guest.ip}"
        if vmid is None:
            return None
        vm = self.vms[vmid]
        if vm.identity is not None:
            raise GuestRefused(f"its {claim} names VM {vmid}, already bound to guest {vm.identity}")
        return vmid

    def guest_hello(self, guest: GuestInfo, now: float) -> VM | None:
        """A guest said HELLO: a booting VM becomes FREE, a recovering one is back.

        Raises :class:`GuestRefused` when the guest claims a VM that is not its own.
        """
        try:
            vmid = self.match_guest(guest)
        except GuestRefused:
            self.unmatched.pop(guest.identity, None)
            raise
        if vmid is None:
            self.unmatched[guest.identity] = (guest, now)
            return None
        self.unmatched.pop(guest.identity, None)
        self.guests[guest.identity] = guest
        vm = self.vms[vmid]
        if not vm.alive:
            return vm
        # 5,000 VMs say the same few things: share one copy of each (a few hundred bytes a VM)
        known = attrs.evolve(
            vm,
            identity=_same(guest.identity, vm.login),
            mac=_same(guest.mac, *vm.macs),
            ip=_same(guest.ip, *vm.ips),
            capabilities=self._shared_capabilities(guest.capabilities),
            recovering=False,
        )
        if vm.state is VMState.BOOTING:
            return self.put(model.transition(known, VMState.FREE, now, last_used=now))
        if known != vm:
            return self.put(known)
        return vm

    def _shared_capabilities(self, capabilities: Iterable[str]) -> tuple[str, ...]:
        key = tuple(capabilities)
        if len(self._capabilities) >= 64 and key not in self._capabilities:
            return key  # a bounded cache: odd guests cannot grow it without end
        return self._capabilities.setdefault(key, key)

    def guest_gone(self, identity: str, reason: str, now: float) -> VM | None:
        self.unmatched.pop(identity, None)
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
        for identity, (guest, seen) in list(self.unmatched.items()):
            if now - seen > patience:
                del self.unmatched[identity]
            else:
                try:
                    vm = self.guest_hello(guest, now) if self.match_guest(guest) is not None else None
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

        Tracked servers update their VM's addresses; a tracked server missing from the listing or
        in ERROR fails its VM (unless the VM got its server after the listing was asked for);
        untracked ones are counted as strays, seen once more.
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
            if macs != vm.macs or ips != vm.ips:
                vm = self.put(attrs.evolve(vm, macs=macs, ips=ips))
            if status.status == SERVER_ERROR and vm.alive:
                self.fail_vm(vmid, f"cloud reports ERROR: {status.fault or 'no reason given'}", now)
        creating = self._by_state[VMState.CREATING]
        strays: dict[str, Stray] = {}
        for server_id, status in listed.items():
            if server_id in self._by_server:
                continue
            vmid = status.metadata.get("vmcloud-vmid") or status.name[len(prefix) :]
            if vmid in creating or (vmid in self.vms and self.vms[vmid].server_id is None):
                continue  # its boot answer is on its way
            before = self.strays.get(server_id)
            if before is None:
                strays[server_id] = Stray(server_id, status.name)
            else:
                strays[server_id] = attrs.evolve(before, seen=before.seen + 1)
        if strays != self.strays:
            self.strays = strays
            self.changes += 1

    def stray_deleting(self, server_id: str, now: float) -> None:
        stray = self.strays.get(server_id)
        if stray is not None:
            self.strays[server_id] = attrs.evolve(stray, deleting_since=now)

    def stray_deleted(self, server_id: str) -> None:
        self.strays.pop(server_id, None)


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


def _slot(vm: VM | None) -> tuple[VMState, str | None] | None:
    if vm is None or vm.state not in _SLOTTED:
        return None
    return (vm.state, vm.batch)


def _reindex(
    index: dict[str, str],
    old: VM | None,
    new: VM | None,
    keys: Callable[[VM], Iterable[str | None]],
) -> None:
    """Move a VM's entries in one index from its old keys to its new ones."""
    old_keys = set(keys(old)) if old is not None else set()
    new_keys = set(keys(new)) if new is not None else set()
    if old_keys == new_keys and new is not None:
        return
    vmid = (old or new).vmid  # type: ignore[union-attr]
    for key in old_keys - new_keys:
        if key is not None and index.get(key) == vmid:
            del index[key]
    for key in new_keys:
        if key is not None:
            index[key] = vmid
