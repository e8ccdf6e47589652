"""Indexes over the pool's VM records, so that a pass over thousands of VMs looks up instead of scanning.

:class:`StateIndex` answers what the plan asks most: the VMs in a state (in the order they
entered it), the READY / WAIT / OCCUPIED VMs of a batch, and the OCCUPIED VMs whose handle is
gone.  :func:`reindex` keeps a one-key-one-VM index (server id, login, MAC...) true when a record
changes.  Both are told every change by :class:`~vmcloud.pool.state.PoolState`, which owns the
records; they hold vmids only, never records, and do no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vmcloud.pool.model import VM, VMState

#: States whose VMs are indexed by batch as well.
_SLOTTED = frozenset({VMState.READY, VMState.WAIT, VMState.OCCUPIED})

#: A (state, batch) pair of :data:`_SLOTTED`; WAIT with batch None are the VMs being cleaned.
Slot = tuple[VMState, str | None]


class StateIndex:
    """The vmids by state, by (state, batch), and the released ones; ordered sets (dicts of None)."""

    __slots__ = ("_by_state", "_released", "_slots")

    def __init__(self) -> None:
        self._by_state: dict[VMState, dict[str, None]] = {s: {} for s in VMState}
        self._slots: dict[Slot, dict[str, None]] = {}
        self._released: dict[str, None] = {}

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

    def move(self, old: VM | None, new: VM) -> None:
        """A VM's record changed from ``old`` (None: it is new) to ``new``."""
        vmid = new.vmid
        if old is None or old.state is not new.state:
            if old is not None:
                self._by_state[old.state].pop(vmid, None)
            self._by_state[new.state][vmid] = None
        old_slot = _slot(old)
        new_slot = _slot(new)
        if old_slot != new_slot:
            if old_slot is not None:
                self._unslot(old_slot, vmid)
            if new_slot is not None:
                self._slots.setdefault(new_slot, {})[vmid] = None
        if new.released:
            self._released[vmid] = None
        elif old is not None and old.released:
            self._released.pop(vmid, None)

    def drop(self, vm: VM) -> None:
        """The VM is forgotten."""
        self._by_state[vm.state].pop(vm.vmid, None)
        slot = _slot(vm)
        if slot is not None:
            self._unslot(slot, vm.vmid)
        self._released.pop(vm.vmid, None)

    def _unslot(self, slot: Slot, vmid: str) -> None:
        members = self._slots.get(slot)
        if members is not None:
            members.pop(vmid, None)
            if not members:
                del self._slots[slot]


def _slot(vm: VM | None) -> Slot | None:
    if vm is None or vm.state not in _SLOTTED:
        return None
    return (vm.state, vm.batch)


def reindex(
    index: dict[str, str],
    old: VM | None,
    new: VM | None,
    keys: Callable[[VM], Iterable[str | None]],
) -> None:
    """Move a VM's entries in one index (key to vmid) from its old keys to its new ones.

    ``old`` None: the VM is new; ``new`` None: it is forgotten.  A key now held by another VM is
    left to that VM.
    """
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
