"""The durations a VM's change of state completes, said to the :class:`~vmcloud.timings.ITimings` seam.

Nothing is kept beside the records for it: a VM carries ``since`` (when it entered its state) and
``created_at`` (when the cloud was asked for its server), a handle its ``created_at`` (its /lock), all
on the pool's clock.  So the change that ends a phase tells how long the phase took:

* WAIT with a batch (a PREPARE) to READY: ``prepare``, outcome ``ok``;
* WAIT without one (a CLEANUP) to FREE: ``cleanup``, outcome ``ok``;
* CREATING or BOOTING to FREE (the guest's HELLO): ``boot`` since ``created_at``, outcome ``ok``;
* any of these phases to ERROR or KILLING (a failure, a timeout, or the VM terminated on the way,
  a shutdown for one): the same, outcome ``failed``;
* READY to OCCUPIED: ``lock_assigned``, the handle's wait since its /lock.

A VM forgotten without a state of its own (the cloud made no server) ends nothing timed: the Nova
call's own histogram says how that call went.
"""

from __future__ import annotations

from collections.abc import Mapping

from vmcloud.pool.model import VM, Handle, VMState
from vmcloud.timings import BOOT, CLEANUP, FAILED, LOCK_ASSIGNED, OK, PREPARE, ITimings

_BOOTING = frozenset({VMState.CREATING, VMState.BOOTING})
_PREPARE_ENDS = {VMState.READY: OK, VMState.ERROR: FAILED, VMState.KILLING: FAILED}
_CLEANUP_ENDS = {VMState.FREE: OK, VMState.ERROR: FAILED, VMState.KILLING: FAILED}
_BOOT_ENDS = _CLEANUP_ENDS


def observe_transition(
    timings: ITimings, old: VM | None, new: VM | None, handles: Mapping[str, Handle]
) -> None:
    """Tell ``timings`` the duration that the change ``old`` -> ``new`` ends, if it ends one."""
    if old is None or new is None:
        return
    before, after = old.state, new.state
    if before is VMState.WAIT:
        ends, name = (_CLEANUP_ENDS, CLEANUP) if old.batch is None else (_PREPARE_ENDS, PREPARE)
        outcome = ends.get(after)
        if outcome is not None:
            timings.observe(name, new.since - old.since, outcome=outcome)
    elif before in _BOOTING:
        outcome = _BOOT_ENDS.get(after)
        if outcome is not None:
            timings.observe(BOOT, new.since - new.created_at, outcome=outcome)
    elif before is VMState.READY and after is VMState.OCCUPIED and new.handle is not None:
        handle = handles.get(new.handle)
        if handle is not None:
            timings.observe(LOCK_ASSIGNED, new.since - handle.created_at)
