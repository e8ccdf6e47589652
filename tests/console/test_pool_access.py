"""The console's seams with the real pool service (on a Clock): where a handle leads, and the news
that a handle or a VM ended, which closes its sockets."""

from __future__ import annotations

import attrs
import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.pool.fakes import World
from tests.pool.test_service import HOME
from vmcloud.api.errors import ApiError
from vmcloud.console.registry import AccessRegistry
from vmcloud.console.targets import AUDIO_PORT, VNC_PORT, PoolTargets, handle_key, vm_key
from vmcloud.pool.interfaces import BatchOptions


class Closed:
    """A registry member that remembers why it was revoked."""

    def __init__(self) -> None:
        self.why: list[str] = []

    def revoke(self, reason: str) -> None:
        self.why.append(reason)


def locked(audio: bool = False) -> tuple[World, str, str, AccessRegistry]:
    w = World()
    w.pool.set_pool_size(1, 2, 60_000)
    w.settle()
    batch = w.pool.prepare_batch(1, HOME, BatchOptions(audio=audio))
    w.settle()
    token = w.pool.lock(batch)
    w.settle()
    vmid = w.pool.state.handles[token].vmid
    assert vmid is not None
    # the guest said where it is (and what it has) in its HELLO
    vm = w.pool.state.vms[vmid]
    w.pool.state.put(attrs.evolve(vm, ip="10.9.0.7", capabilities=("cdp", "vnc", "audio"), vnc_password="pw"))
    registry = AccessRegistry()
    w.pool.watch_access(registry.handle_ended, registry.vm_ended)
    return w, token, vmid, registry


class TargetTests(SynchronousTestCase):
    def test_a_locked_handle_leads_to_its_vm(self) -> None:
        w, token, vmid, _ = locked(audio=True)
        targets = PoolTargets(w.pool)
        console = targets.console(token)
        assert (console.key, console.host, console.port, console.vmid) == (
            handle_key(token),
            "10.9.0.7",
            VNC_PORT,
            vmid,
        )
        audio = targets.audio(token)
        assert (audio.port, audio.password) == (AUDIO_PORT, "pw")
        assert targets.console_of_vm(vmid).key == vm_key(vmid)

    def test_the_ports_come_from_the_prepare_answer_and_the_address_from_the_cloud(self) -> None:
        """A guest names its servers' ports (a local VM on the host's loopback has its own), never
        the host: the controller dials the address the cloud reports, whatever the guest says."""
        w = World()
        w.pool.set_pool_size(1, 1, 60_000)
        w.settle()
        batch = w.pool.prepare_batch(1, HOME, BatchOptions(audio=True))
        w.turn()
        answer = {
            "vnc": {"host": "127.0.0.1", "port": 15900},
            "audioServer": {"host": "8.8.8.8", "port": 15901},
        }
        w.channel.answer_calls("PREPARE", answer)
        w.settle()
        token = w.pool.lock(batch)
        w.settle()
        vmid = w.pool.state.handles[token].vmid
        assert vmid is not None
        vm = w.pool.state.vms[vmid]
        # the cloud lists the VM at 10.9.0.8; a hostile guest says 127.0.0.1 in its HELLO
        hostile = attrs.evolve(vm, ips=("10.9.0.8",), ip="127.0.0.1", capabilities=("cdp", "vnc", "audio"))
        w.pool.state.put(hostile)
        targets = PoolTargets(w.pool)
        assert (targets.console(token).host, targets.console(token).port) == ("10.9.0.8", 15900)
        assert (targets.audio(token).host, targets.audio(token).port) == ("10.9.0.8", 15901)
        w.pool.release(token)
        w.settle()
        assert (w.pool.state.vms[vmid].vnc_port, w.pool.state.vms[vmid].audio_port) == (None, None)

    def test_ports_that_are_not_ports_are_ignored(self) -> None:
        from vmcloud.pool.state import _server_port

        for server in ({"port": 0}, {"port": 70000}, {"port": "5900"}, {"port": True}, [5900], None):
            assert _server_port(server) is None, server
        assert _server_port({"port": 5999}) == 5999

    def test_refusals(self) -> None:
        w, token, vmid, _ = locked(audio=False)
        targets = PoolTargets(w.pool)
        with pytest.raises(ApiError) as e:
            targets.audio(token)
        assert (e.value.status, e.value.code) == (404, "no-audio")
        with pytest.raises(ApiError) as e:
            targets.console("no-such-handle")
        assert e.value.status == 404
        with pytest.raises(ApiError) as e:
            targets.console_of_vm("nope")
        assert e.value.status == 404
        vm = w.pool.state.vms[vmid]
        w.pool.state.put(attrs.evolve(vm, capabilities=("no-browser",)))
        with pytest.raises(ApiError) as e:
            targets.console(token)
        assert (e.value.status, e.value.code) == (409, "no-vnc")

    def test_a_waiting_handle_is_not_assigned(self) -> None:
        w = World()
        w.pool.set_pool_size(0, 1, 60_000)
        w.settle()
        batch = w.pool.prepare_batch(1, HOME, BatchOptions())
        token = w.pool.lock(batch)  # no VM yet
        with pytest.raises(ApiError) as e:
            PoolTargets(w.pool).console(token)
        assert (e.value.status, e.value.code) == (409, "not-assigned")


class AccessEndsTests(SynchronousTestCase):
    def test_release_closes_the_handles_sockets(self) -> None:
        w, token, vmid, registry = locked()
        handle_socket, operator_socket = Closed(), Closed()
        registry.add(handle_key(token), handle_socket)
        registry.add(vm_key(vmid), operator_socket)
        w.pool.release(token)
        assert handle_socket.why == ["the handle was released or expired"]
        assert operator_socket.why == []  # the VM lives on (it is cleaned for the next worker)
        assert registry.total == 1

    def test_expiry_closes_the_handles_sockets(self) -> None:
        w, token, _, registry = locked()
        member = Closed()
        registry.add(handle_key(token), member)
        w.pool.renew_expire(token, 1000)
        w.advance(1.0)
        assert member.why == ["the handle was released or expired"]

    def test_vm_death_closes_the_handles_and_the_operators_sockets(self) -> None:
        w, token, vmid, registry = locked()
        handle_socket, operator_socket = Closed(), Closed()
        registry.add(handle_key(token), handle_socket)
        registry.add(vm_key(vmid), operator_socket)
        vm = w.pool.state.vms[vmid]
        assert vm.identity is not None
        w.pool.guest_gone(vm.identity, "BYE")
        assert handle_socket.why == [f"VM {vmid} died (guest gone: BYE)"]
        assert operator_socket.why == [f"VM {vmid} died (guest gone: BYE)"]
        assert registry.total == 0
