"""Where a worker's console or sound comes from: a handle (or a vmid) resolved to a VM's address.

The proxies never hold a VM's address themselves: each new socket asks a ``resolve`` callable,
so the handle is the only key a worker's browser ever has.  :class:`PoolTargets` is that callable
over the pool's live state; tests give the proxies plain functions instead.

A VM's VNC server listens on its own address, port 5900, and its audio capture server on port
5901 (SPEC "The browser VM and the worker's view"), unless its PREPARE answer named other ports
(a local VM without a network namespace shares the host's loopback).  The address is the one the
cloud reports for the VM (the one the guest said, if the cloud reports several), and what the
guest said only when the cloud reports none: a guest cannot point a worker at another host.  No
route to the VM is ever handed to the worker.

The operator's routes (``/console/vm/{vmid}`` and its ``screen.png``) never hand a password out
either: the controller logs in itself, with the view-only password the VM's own guest said in its
HELLO (see :meth:`PoolTargets._operator_login`).
"""

from __future__ import annotations

from typing import Protocol

import attrs

from vmcloud.api.errors import ApiError
from vmcloud.pool.model import VM, VMState
from vmcloud.pool.state import PoolState

#: The VM's VNC server (``Xvnc -rfbport 5900``).
VNC_PORT = 5900
#: The VM's audio capture server (:mod:`guest_agent.audio`): ``GET /audio.ogg`` and ``/audio.pcm``.
AUDIO_PORT = 5901

#: What gave a socket its access, and what ends it: ``("handle", token)`` or ``("vm", vmid)``.
Key = tuple[str, str]


def handle_key(token: str) -> Key:
    return ("handle", token)


def vm_key(vmid: str) -> Key:
    return ("vm", vmid)


@attrs.frozen
class Target:
    """A VM's server to dial for one key; ``password`` is the session's (for the audio server), or
    the one the controller logs in to the VNC server with itself (the operator's routes)."""

    key: Key
    host: str
    port: int
    vmid: str | None = None
    password: str | None = attrs.field(default=None, repr=False)


class HasPoolState(Protocol):
    """What :class:`PoolTargets` needs of the pool service: its current state."""

    @property
    def state(self) -> PoolState: ...


def _unknown() -> ApiError:
    return ApiError(404, "unknown-handle", "no such handle (released, expired, or never issued)")


class PoolTargets:
    """Resolves handles and vmids to VM addresses from the pool's live state.

    Each method returns a :class:`Target` or raises :class:`ApiError` saying why there is none:
    404 for an unknown handle (as every handle route), 409 while the handle waits for a VM or
    when the VM has no such server, 410 when the handle's VM died.
    """

    def __init__(self, pool: HasPoolState, vnc_port: int = VNC_PORT, audio_port: int = AUDIO_PORT) -> None:
        self._pool = pool
        self._vnc_port = vnc_port
        self._audio_port = audio_port

    def console(self, token: str) -> Target:
        """The VNC server of the VM a handle holds."""
        vm = self._vm_of(token)
        _needs(vm, "vnc", "a VNC server")
        return Target(handle_key(token), _address(vm), vm.vnc_port or self._vnc_port, vm.vmid)

    def console_of_vm(self, vmid: str) -> Target:
        """The VNC server of any live VM, with the password the relay logs in with (the operator's
        route: the relay opens the VM itself and lets the operator's browser watch, view only)."""
        vm = self._live(vmid)
        _needs(vm, "vnc", "a VNC server")
        return self._operator_login(vm)

    def screen_of_vm(self, vmid: str) -> Target:
        """The VNC server of a live VM and the password to log in with (the monitor's thumbnails).

        404 for an unknown VM or one whose guest has no VNC server (or has not said yet), 409 when
        the controller has no password for it (see :meth:`_operator_login`).
        """
        vm = self._live(vmid)
        if "vnc" not in vm.capabilities and not (vm.recovering and vm.vnc_password):
            raise ApiError(
                404,
                "no-vnc",
                f"VM {vmid} has no VNC server (its guest says: {', '.join(vm.capabilities) or 'nothing'})",
            )
        return self._operator_login(vm)

    def _live(self, vmid: str) -> VM:
        vm = self._pool.state.vms.get(vmid)
        if vm is None or not vm.alive:
            raise ApiError(404, "unknown-vm", f"no live VM {vmid!r}")
        return vm

    def _operator_login(self, vm: VM) -> Target:
        """The operator's view-only password its guest said in HELLO (every state), else the
        session's (READY and OCCUPIED, for a guest too old to say one); 409 when there is neither."""
        if vm.view_password:
            port, password = vm.view_port or vm.vnc_port or self._vnc_port, vm.view_password
        elif vm.vnc_password:
            port, password = vm.vnc_port or self._vnc_port, vm.vnc_password
        else:
            raise ApiError(
                409,
                "no-session",
                f"VM {vm.vmid} has no screen the controller may log in to now ({vm.state.value}): its guest "
                "said no view-only password, and only READY and OCCUPIED VMs have a session",
            )
        return Target(vm_key(vm.vmid), _address(vm), port, vm.vmid, password)

    def audio(self, token: str) -> Target:
        """The audio capture server of the VM a handle holds, for batches that asked for audio."""
        state = self._pool.state
        handle = state.handles.get(token)
        if handle is None:
            raise _unknown()
        batch = state.batches.get(handle.batch)
        if batch is not None and not batch.options.audio:
            raise ApiError(404, "no-audio", "this handle's batch did not ask for audio")
        vm = self._vm_of(token)
        _needs(vm, "audio", "audio capture")
        port = vm.audio_port or self._audio_port
        return Target(handle_key(token), _address(vm), port, vm.vmid, vm.vnc_password)

    def _vm_of(self, token: str) -> VM:
        state = self._pool.state
        handle = state.handles.get(token)
        if handle is None:
            raise _unknown()
        if handle.vmid is None:
            if handle.lost is not None:
                raise ApiError(410, "vm-lost", f"the handle's VM died ({handle.lost.reason})")
            raise ApiError(409, "not-assigned", "the handle waits for a VM; try again once it is assigned")
        vm = state.vms.get(handle.vmid)
        if vm is None or vm.state is not VMState.OCCUPIED or vm.handle != token:
            raise ApiError(410, "vm-lost", "the handle's VM is gone")
        return vm


def _needs(vm: VM, capability: str, what: str) -> None:
    """A guest that said what it has and lacks ``capability`` cannot serve it (a VM that said
    nothing yet, e.g. one recovered from a checkpoint, is given the benefit of the doubt)."""
    if vm.capabilities and capability not in vm.capabilities:
        raise ApiError(
            409,
            f"no-{capability}",
            f"VM {vm.vmid} has no {what} (its guest says: {', '.join(vm.capabilities)})",
        )


def _address(vm: VM) -> str:
    if vm.ips:
        address: str | None = vm.ip if vm.ip in vm.ips else vm.ips[0]
    else:
        address = vm.ip
    if not address:
        raise ApiError(503, "no-address", f"VM {vm.vmid} has no known address yet")
    return address
