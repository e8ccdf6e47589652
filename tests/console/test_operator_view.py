"""The operator's view-only VNC password, from a guest's HELLO to the console's own login, in memory.

HELLO carries ``vnc-port`` and ``vnc-view-password``; the guest channel hears it over the broker's
per-VM login; the pool keeps it on the guest's own VM only; the operator's routes log in with it
in every state; and nobody else ever sees it (no /all-status, handle-status, checkpoint, repr, or
refusal text).
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from tests.pool.fakes import World
from tests.pool.test_service import HOME
from tests.words.support import RecordingSession
from vmcloud.api.app import make_api
from vmcloud.api.errors import ApiError
from vmcloud.console.targets import PoolTargets
from vmcloud.pool.interfaces import BatchOptions
from vmcloud.pool.model import VMState
from vmcloud.store.checkpoint import encode_checkpoint
from vmcloud.words.channel import GuestChannel
from vmcloud.words.destinations import CONTROLLER, LOGIN_HEADER
from vmcloud.words.grammar import Said, split_body
from vmcloud.words.presence import Hello, StillAlive

VIEW_A, VIEW_B = "opview-A", "opview-B"


class _NoCredentials:
    def mint(self, vmid: str) -> tuple[str, str]:
        raise AssertionError("the pool's own (fake) channel minted the VMs' logins")

    def revoke(self, vmid: str) -> None:
        pass

    def restore(self, vmid: str, login: str, passcode: str) -> None:
        pass


def said_by(login: str, word: type = Hello, *, identity: str | None = None, **view: Any) -> Said:
    """``word`` as it reaches the controller from the guest logged in as ``login`` (the embedded
    broker stamps the login on every message of a guest)."""
    said: Said = word.how_to_say(
        identity=identity or login,
        ip=None,
        mac=None,
        agent_version="1.0",
        capabilities=("cmd", "cdp", "vnc"),
        **view,
    )
    return Said(said.destination, {**said.headers, LOGIN_HEADER: login}, said.body)


class OperatorViewTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = w = World()
        w.pool.set_pool_size(2, 2, 60_000)
        w.settle()
        self.a, self.b = sorted(w.vms(VMState.FREE), key=lambda vm: vm.vmid)
        for vm in (self.a, self.b):  # the cloud's address for each VM
            vm = w.state.vms[vm.vmid]
            w.state.put(attrs.evolve(vm, ips=("10.0.0." + vm.vmid[-1:],), capabilities=("cdp", "vnc")))
        self.session = RecordingSession()
        self.channel = GuestChannel(
            w.clock, self.session, credentials=_NoCredentials(), guest_broker="tcp:x:1", beacon_timeout=60
        )
        self.channel.add_listener(w.pool)
        self.channel.startService()
        self.targets = PoolTargets(w.pool)

    def hello(self, login: str, **kwargs: Any) -> None:
        self.session.deliver_said(said_by(login, **kwargs))
        self.world.turn()

    def vm(self, vmid: str) -> Any:
        return self.world.state.vms[vmid]

    def test_hello_tells_it_and_a_free_vm_shows_its_screen(self) -> None:
        with self.assertRaises(ApiError) as refused:
            self.targets.screen_of_vm(self.a.vmid)  # an old guest's FREE VM: no login
        assert (refused.exception.status, refused.exception.code) == (409, "no-session")
        self.hello(self.a.login, vnc_view=(5907, VIEW_A))
        vm = self.vm(self.a.vmid)
        assert (vm.state, vm.view_port, vm.view_password) == (VMState.FREE, 5907, VIEW_A)
        for target in (self.targets.screen_of_vm(vm.vmid), self.targets.console_of_vm(vm.vmid)):
            assert (target.host, target.port, target.password) == (vm.ips[0], 5907, VIEW_A)

    def test_beacons_keep_it_and_a_session_does_not_replace_it(self) -> None:
        self.hello(self.a.login, vnc_view=(5907, VIEW_A))
        self.session.deliver_said(said_by(self.a.login, StillAlive))
        assert self.channel.guests()[self.a.login].view_password == VIEW_A
        # a beacon is not read for it, even when it says one (HELLO alone tells it)
        self.session.deliver_said(said_by(self.a.login, StillAlive, vnc_view=(5999, "beacon-1")))
        self.world.turn()
        assert self.channel.guests()[self.a.login].view_password == VIEW_A
        assert (self.vm(self.a.vmid).view_port, self.vm(self.a.vmid).view_password) == (5907, VIEW_A)
        batch = self.world.pool.prepare_batch(1, HOME, BatchOptions())
        self.world.settle()
        ready = next(vm for vm in self.world.vms(VMState.READY))
        assert ready.vnc_password and ready.vnc_password != ready.view_password
        target = self.targets.console_of_vm(ready.vmid)
        if ready.vmid == self.a.vmid:
            assert target.password == VIEW_A  # the operator's, not the worker's session password
        else:
            assert target.password == ready.vnc_password  # an old guest: the session's, while it lasts
        assert batch

    def test_a_guests_claims_cannot_change_another_vms_password(self) -> None:
        self.hello(self.a.login, vnc_view=(5907, VIEW_A))
        self.hello(self.b.login, vnc_view=(5908, VIEW_B))
        # guest A names B as its identity (and B's port): the broker's stamp says who it is
        self.hello(self.a.login, identity=self.b.login, vnc_view=(5908, "stolen-1"))
        assert (self.vm(self.b.vmid).view_port, self.vm(self.b.vmid).view_password) == (5908, VIEW_B)
        assert self.vm(self.a.vmid).view_password == "stolen-1"  # its own VM only
        assert self.targets.screen_of_vm(self.b.vmid).password == VIEW_B

    def test_never_shown(self) -> None:
        logged: list[str] = []

        def observe(event: Any) -> None:
            logged.append(formatEvent(event) + repr(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.hello(self.a.login, vnc_view=(5907, VIEW_A))
        self.hello(self.b.login, vnc_view=(5908, VIEW_B))
        batch = self.world.pool.prepare_batch(2, HOME, BatchOptions())
        self.world.settle()
        handle = self.world.pool.lock(batch)
        self.world.settle()
        static = FilePath(self.mktemp())
        static.makedirs()
        treq = StubTreq(
            make_api(self.world.pool, token=None, cors_origins=["*"], static_dir=static).resource()
        )
        bodies = []
        for path in ("/all-status", f"/handle-status/{handle}", "/metrics", "/openapi.json"):
            d: Deferred[Any] = treq.get("http://vmcloud.test" + path)
            treq.flush()
            response = self.successResultOf(d)
            body = self.successResultOf(treq.content(response)).decode()
            assert response.code == 200, (path, body)
            bodies.append(body)
        status = json.loads(bodies[1])
        assert status["vm"]["vncPassword"]  # the worker's own session password, as ever
        self.world.advance(5)
        assert self.world.store.saves
        bodies += [encode_checkpoint(snapshot, 0).decode() for snapshot in self.world.store.saves]
        bodies += [repr(vm) for vm in self.world.vms()] + [repr(g) for g in self.channel.guests().values()]
        assert logged  # HELLOs, preparations and locks were logged
        bodies += logged
        for body in bodies:
            assert VIEW_A not in body and VIEW_B not in body, body[:300]

    def test_a_bad_view_password_is_refused_without_being_echoed(self) -> None:
        said = said_by(self.a.login, vnc_view=(5907, "has space"))
        self.session.deliver_said(said)
        refusals = [
            (body, headers) for destination, body, headers in self.session.sent if destination != CONTROLLER
        ]
        ((body, headers),) = refusals
        said = body.decode() + json.dumps(headers)
        assert split_body(body)[0] == "AINT_A_WORD" and "vnc-view-password" in said, said
        assert "has space" not in said
        assert self.vm(self.a.vmid).view_password is None
        bad_port = said_by(self.a.login, vnc_view=(70000, VIEW_A))
        self.session.deliver_said(bad_port)
        assert self.vm(self.a.vmid).view_password is None
