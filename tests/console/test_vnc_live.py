"""The console proxy end to end: a real Xvnc, real sockets, an RFB client over a real WebSocket.

Time here is the reactor's (real processes); every wait is bounded.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.console.support import (
    XDOTOOL,
    XVNC,
    WsPipe,
    Xvnc,
    open_ws,
    operator_handshake,
    read_frame,
    rfb_handshake,
    wait_until,
)
from tests.integration.conftest import free_port
from vmcloud.console.gate import Gate
from vmcloud.console.registry import AccessRegistry
from vmcloud.console.targets import Target, handle_key, vm_key
from vmcloud.console.vnc import CLOSE_ACCESS_ENDED, ConsoleFactory, ConsoleResource

pytestmark = pytest.mark.skipif(XVNC is None or XDOTOOL is None, reason="needs Xvnc and xdotool")
#: The operator's view-only password, the password file's second line (as the guest agent writes it).
VIEW = "op-view1"


def dial(target: Target, protocol: Protocol) -> Deferred[Any]:
    return connectProtocol(HostnameEndpoint(reactor, target.host, target.port, timeout=5), protocol)


class ConsoleProxyTests(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        return ensureDeferred(self._set_up())

    async def _set_up(self) -> None:
        self.xvnc = Xvnc(reactor, self.mktemp(), free_port(), view_password=VIEW)
        await self.xvnc.start()
        self.addCleanup(lambda: ensureDeferred(self.xvnc.stop()))
        self.registry = AccessRegistry()
        self.handles = {"H1": Target(handle_key("H1"), "127.0.0.1", self.xvnc.port, "vm1")}
        factory = ConsoleFactory(clock=reactor, dial=dial, registry=self.registry)
        root = Resource()
        root.putChild(
            b"console",
            ConsoleResource(
                factory,
                Gate(token="admin-secret", cors_origins=["https://app.example"]),
                resolve_handle=self._resolve,
                resolve_vm=lambda vmid: Target(vm_key(vmid), "127.0.0.1", self.xvnc.port, vmid, VIEW),
            ),
        )
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        self.pipes: list[WsPipe] = []

    def _resolve(self, token: str) -> Target | None:
        return self.handles.get(token)

    async def _open(self, path: str, **kw: Any) -> WsPipe:
        pipe = await open_ws(reactor, self.port, path, **kw)
        self.pipes.append(pipe)
        self.addCleanup(lambda: pipe.transport and pipe.transport.abortConnection())
        return pipe

    def test_screen_through_the_proxy(self) -> Deferred[None]:
        """Two viewers of one handle both authenticate with the session password and see the screen."""

        async def run() -> None:
            one = await self._open("/console/H1", origin="https://app.example")
            two = await self._open("/console/H1?view_only=1")
            for pipe in (one, two):
                width, height = await rfb_handshake(pipe, self.xvnc.password)
                assert (width, height) == (320, 200)
                screen = await read_frame(pipe, width, height)
                assert screen[0:3] == b"\xff\xff\xff"  # the white root window (-wr)
                assert screen[-4:-1] == b"\xff\xff\xff"
            assert self.registry.count(handle_key("H1")) == 2

        return ensureDeferred(run())

    def test_view_only_drops_input_interactive_passes_it(self) -> Deferred[None]:
        async def run() -> None:
            watcher = await self._open("/console/H1?view_only=1")
            await rfb_handshake(watcher, self.xvnc.password)
            before = self.xvnc.pointer()
            watcher.sendMessage(struct.pack("!BBHH", 5, 0, 101, 57), isBinary=True)
            await read_frame(watcher, 320, 200)  # a round trip after the pointer event
            assert self.xvnc.pointer() == before
            worker = await self._open("/console/H1")
            await rfb_handshake(worker, self.xvnc.password)
            worker.sendMessage(struct.pack("!BBHH", 5, 0, 101, 57), isBinary=True)
            await wait_until(reactor, lambda: self.xvnc.pointer() == (101, 57), 5, "pointer moved to 101,57")

        return ensureDeferred(run())

    def test_release_closes_every_viewer_within_a_second(self) -> Deferred[None]:
        async def run() -> None:
            pipes = [await self._open("/console/H1"), await self._open("/console/H1?view_only=1")]
            for pipe in pipes:
                await rfb_handshake(pipe, self.xvnc.password)
            del self.handles["H1"]
            started = time.monotonic()
            self.registry.handle_ended("H1", "handle released")
            for pipe in pipes:
                code, _ = await pipe.closed
                assert code == CLOSE_ACCESS_ENDED
                await wait_until(reactor, lambda p=pipe: not p.transport.connected, 1.0, "socket closed")
            assert time.monotonic() - started < 1.0
            assert self.registry.total == 0

        return ensureDeferred(run())

    def test_operator_route_needs_the_token(self) -> Deferred[None]:
        async def run() -> None:
            with pytest.raises(ConnectionError):
                await self._open("/console/vm/vm1?view_only=1")
            pipe = await self._open("/console/vm/vm1?token=admin-secret")
            size = await operator_handshake(pipe)  # the relay logged in with the view-only password
            assert (await read_frame(pipe, *size))[:3] == b"\xff\xff\xff"
            before = self.xvnc.pointer()
            pipe.sendMessage(struct.pack("!BBHH", 5, 0, 101, 57), isBinary=True)
            await read_frame(pipe, *size)  # a round trip after the pointer event
            assert self.xvnc.pointer() == before
            self.registry.vm_ended("vm1", "VM died")
            code, _ = await pipe.closed
            assert code == CLOSE_ACCESS_ENDED

        return ensureDeferred(run())

    def test_refusals_are_json(self) -> Deferred[None]:
        import treq

        async def run() -> None:
            base = f"http://127.0.0.1:{self.port}/console/"
            ws = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                  "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
            cases = [
                ("nope", ws, 404, "unknown-handle"),
                ("H1", {**ws, "Origin": "https://evil.example"}, 403, "origin-refused"),
                ("H1", {}, 426, "websocket-required"),
                ("vm/vm1", ws, 401, "unauthorized"),
            ]
            for path, headers, status, code in cases:
                response = await treq.get(
                    base + path, headers=headers, pool=HTTPConnectionPool(reactor, False)
                )
                body = await response.json()
                assert (response.code, body["error"]) == (status, code), (path, body)

        return ensureDeferred(run())

    def test_unreachable_vnc_server_closes_the_socket(self) -> Deferred[None]:
        async def run() -> None:
            self.handles["H2"] = Target(handle_key("H2"), "127.0.0.1", free_port(), "vm2")
            pipe = await self._open("/console/H2")
            code, _ = await pipe.closed
            assert code == 4001

        return ensureDeferred(run())


class _Flood(Protocol):
    """A VNC server that writes as fast as its socket takes it, counting what it could write."""

    sent = 0
    paused = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        chunk = b"\0" * 65536
        while not self.paused and self.transport.connected:
            self.transport.write(chunk)
            _Flood.sent += len(chunk)

    def stopProducing(self) -> None:
        self.paused = True


class BackPressureTests(TestCase):
    timeout = 60

    def test_a_viewer_that_does_not_read_stops_the_vnc_server(self) -> Deferred[None]:
        """The relay stops reading the VNC server once the viewer's buffer is full; nothing queues up."""

        async def run() -> None:
            flood = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
                Factory.forProtocol(_Flood)
            )
            self.addCleanup(flood.stopListening)
            registry = AccessRegistry()
            factory = ConsoleFactory(clock=reactor, dial=dial, registry=registry)
            root = Resource()
            target = Target(handle_key("H"), "127.0.0.1", flood.getHost().port, "vm")
            gate = Gate(token=None, cors_origins=["*"])
            resource = ConsoleResource(
                factory, gate, resolve_handle=lambda _: target, resolve_vm=lambda _: None
            )
            root.putChild(b"console", resource)
            port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
            self.addCleanup(port.stopListening)
            pipe = await open_ws(reactor, port.getHost().port, "/console/H")
            self.addCleanup(pipe.transport.abortConnection)
            pipe.transport.pauseProducing()  # the viewer stops reading
            settled: list[int] = []

            def stalled() -> bool:
                settled.append(_Flood.sent)
                return len(settled) > 10 and settled[-1] == settled[-10]

            await wait_until(reactor, stalled, 20, "the VNC server's writes stall", step=0.1)
            # What was written sits in kernel socket buffers (a few MB on loopback) and in at most
            # one bounded transport buffer per hop.  Without back-pressure the relay would read
            # (and queue) without end, and the server's writes would never stall.
            (viewer,) = registry._members[handle_key("H")]
            assert viewer.relayed_out < 32 * 1024 * 1024
            relayed = viewer.relayed_out
            await deferLater(reactor, 0.5)
            assert viewer.relayed_out == relayed  # the relay is not reading either
            pipe.transport.resumeProducing()
            await wait_until(
                reactor, lambda: viewer.relayed_out > relayed, 10, "relay resumes when the viewer reads"
            )

        return ensureDeferred(run())
