"""The console relay in memory, on a Clock: a real autobahn client, a fake VNC server, iosim pumps."""

from __future__ import annotations

import json
import struct
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.console.support import WsPipe, vnc_auth_response
from vmcloud.api.errors import ApiError
from vmcloud.console.gate import Gate
from vmcloud.console.registry import AccessRegistry
from vmcloud.console.targets import Target, handle_key, vm_key
from vmcloud.console.vnc import (
    CLOSE_ACCESS_ENDED,
    CLOSE_GRACE,
    CLOSE_POLICY,
    CLOSE_VNC_GONE,
    OPENING_TIMEOUT,
    ConsoleFactory,
    ConsoleResource,
)

HELLO = b"RFB 003.008\n"
OPERATOR_PASSWORD = "op-view1"


class FakeVnc(Protocol):
    """A VNC server that records what reaches it."""

    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.lost = True


class Harness:
    """A Site with the console resource, clients and VNC servers joined by iosim pumps."""

    def __init__(
        self, *, token: str | None = "tok", origins: tuple[str, ...] = ("https://app.example",)
    ) -> None:
        self.clock = Clock()
        self.registry = AccessRegistry()
        self.servers: list[FakeVnc] = []
        self.pumps: list[IOPump] = []
        self.targets = {"H1": Target(handle_key("H1"), "10.0.0.5", 5900, "vm1")}
        self.operator_password: str | None = OPERATOR_PASSWORD
        factory = ConsoleFactory(clock=self.clock, dial=self.dial, registry=self.registry, timeouts=False)
        root = Resource()
        root.putChild(
            b"console",
            ConsoleResource(
                factory,
                Gate(token=token, cors_origins=origins),
                resolve_handle=self.resolve,
                resolve_vm=lambda vmid: Target(vm_key(vmid), "10.0.0.5", 5900, vmid, self.operator_password),
                max_per_key=2,
            ),
        )
        self.site = Site(root)
        self.dials: list[Target] = []

    def resolve(self, token: str) -> Target | None:
        if token == "waiting":
            raise ApiError(409, "not-assigned", "the handle waits for a VM")
        return self.targets.get(token)

    def dial(self, target: Target, protocol: Protocol) -> Deferred[Any]:
        self.dials.append(target)
        server = FakeVnc()
        self.servers.append(server)
        self.pumps.append(
            connect(
                server,
                FakeTransport(server, True),
                protocol,
                FakeTransport(protocol, False),
                clock=self.clock,
            )
        )
        return succeed(protocol)

    def open(self, path: str, origin: str | None = None) -> WsPipe:
        factory = WebSocketClientFactory(f"ws://controller{path}", protocols=["binary"], origin=origin)
        factory.setProtocolOptions(
            openHandshakeTimeout=0, closeHandshakeTimeout=0, serverConnectionDropTimeout=0
        )
        client = WsPipe()
        client.factory = factory
        server = self.site.buildProtocol(None)
        self.pumps.append(
            connect(
                server, FakeTransport(server, True), client, FakeTransport(client, False), clock=self.clock
            )
        )
        self.flush()
        return client

    def flush(self) -> None:
        for _ in range(20):
            if not any([pump.flush() for pump in self.pumps]):
                return


class ConsoleRelayTests(SynchronousTestCase):
    def test_bytes_flow_both_ways(self) -> None:
        h = Harness()
        pipe = h.open("/console/H1")
        assert self.successResultOf(pipe.opened) is None
        assert h.dials == [h.targets["H1"]]
        (vnc,) = h.servers
        vnc.transport.write(HELLO)
        pipe.sendMessage(HELLO, isBinary=True)
        h.flush()
        assert bytes(pipe.received) == HELLO
        assert vnc.received == HELLO
        assert pipe.websocket_protocol_in_use == "binary"

    def test_view_only_keeps_input_from_the_vnc_server(self) -> None:
        h = Harness()
        pipe = h.open("/console/H1?view_only=1")
        (vnc,) = h.servers
        vnc.transport.write(HELLO + b"\x02\x02\x13")
        h.flush()
        pipe.sendMessage(HELLO, isBinary=True)
        h.flush()
        assert bytes(pipe.received) == HELLO + b"\x01\x02"  # VeNCrypt cannot be followed: not offered
        key = struct.pack("!BBxxI", 4, 1, 0x61)
        update = struct.pack("!BBHHHH", 3, 1, 0, 0, 8, 8)
        pipe.sendMessage(b"\x02" + b"R" * 16 + b"\x01" + key + update + key[:3], isBinary=True)
        pipe.sendMessage(key[3:] + struct.pack("!BBHH", 5, 1, 3, 4) + update, isBinary=True)
        h.flush()
        assert vnc.received == HELLO + b"\x02" + b"R" * 16 + b"\x01" + update + update

    def test_revoke_closes_at_once_and_drops_a_silent_viewer(self) -> None:
        h = Harness()
        one, two = h.open("/console/H1"), h.open("/console/H1?view_only=1")
        assert h.registry.count(handle_key("H1")) == 2
        h.registry.handle_ended("H1", "handle released")
        vnc_sockets = [pump.clientIO for pump in h.pumps if isinstance(pump.server, FakeVnc)]
        assert len(vnc_sockets) == 2
        assert all(s.disconnecting for s in vnc_sockets)  # VNC cut at once
        assert h.registry.total == 0
        # the viewers have not answered the close (nothing pumped yet): dropped after the grace
        viewer_sockets = [pump.serverIO for pump in h.pumps if pump.client in (one, two)]
        assert not any(s.disconnecting for s in viewer_sockets)
        h.clock.advance(CLOSE_GRACE)
        assert all(s.disconnecting for s in viewer_sockets)
        h.flush()
        assert one.close_code == two.close_code == CLOSE_ACCESS_ENDED
        assert all(server.lost for server in h.servers)

    def test_revoke_with_a_prompt_viewer_needs_no_deadline(self) -> None:
        h = Harness()
        pipe = h.open("/console/H1")
        h.registry.handle_ended("H1", "expired")
        h.flush()
        assert pipe.close_code == CLOSE_ACCESS_ENDED
        assert self.successResultOf(pipe.closed)[0] == CLOSE_ACCESS_ENDED
        assert not h.clock.getDelayedCalls()

    def test_vnc_server_gone_closes_the_viewer(self) -> None:
        h = Harness()
        pipe = h.open("/console/H1")
        h.servers[0].transport.loseConnection()
        h.flush()
        assert pipe.close_code == CLOSE_VNC_GONE
        assert h.registry.total == 0

    def test_viewer_gone_cuts_the_vnc_connection(self) -> None:
        h = Harness()
        pipe = h.open("/console/H1")
        pipe.sendClose(1000)
        h.flush()
        assert h.servers[0].lost
        assert h.registry.total == 0

    def test_text_messages_are_refused(self) -> None:
        h = Harness()
        pipe = h.open("/console/H1")
        pipe.sendMessage(b"hello", isBinary=False)
        h.flush()
        assert pipe.close_code == CLOSE_POLICY

    def test_view_only_violation_closes(self) -> None:
        h = Harness()
        pipe = h.open("/console/H1?view_only=1")
        pipe.sendMessage(b"GET / HTTP/1.1\r\n", isBinary=True)
        h.flush()
        assert pipe.close_code == CLOSE_POLICY
        assert h.servers[0].lost

    def test_viewers_per_key_are_bounded(self) -> None:
        h = Harness()
        h.open("/console/H1")
        h.open("/console/H1")
        third = h.open("/console/H1")
        failure = self.failureResultOf(third.opened)
        assert "429" in str(failure.value)
        assert len(h.servers) == 2

    def test_operator_token_in_query_or_cookie(self) -> None:
        h = Harness()
        refused = h.open("/console/vm/vm1")
        assert "401" in str(self.failureResultOf(refused.opened).value)
        ok = h.open("/console/vm/vm1?token=tok&view_only=1")
        assert self.successResultOf(ok.opened) is None
        assert h.dials[-1].key == vm_key("vm1")
        h.registry.vm_ended("vm1", "VM died")
        h.flush()
        assert ok.close_code == CLOSE_ACCESS_ENDED


class RefusalTests(SynchronousTestCase):
    """What a plain HTTP client sees: the API's JSON errors."""

    def _get(self, h: Harness, path: bytes, headers: dict[bytes, bytes]) -> tuple[int, dict[str, Any]]:
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest(path.split(b"/")[2:])
        request.path = path
        for name, value in headers.items():
            request.requestHeaders.setRawHeaders(name, [value])
        resource = h.site.resource.children[b"console"]
        body = resource.render(request)
        return request.responseCode, json.loads(body)

    def test_errors(self) -> None:
        h = Harness(token="tok")
        ws = {b"upgrade": b"websocket", b"connection": b"Upgrade"}
        cases = [
            (b"/console/nope", ws, 404, "unknown-handle"),
            (b"/console/waiting", ws, 409, "not-assigned"),
            (b"/console/H1", {**ws, b"origin": b"https://evil.example"}, 403, "origin-refused"),
            (b"/console/H1", {b"host": b"vmcloud.example", b"origin": b"https://vmcloud.example"}, 426,
             "websocket-required"),  # the controller's own pages pass the origin check
            (b"/console/vm/vm1", {**ws, b"cookie": b"vmcloud_token=wrong"}, 401, "unauthorized"),
            (b"/console/a/b/c", ws, 404, "not-found"),
        ]  # fmt: skip
        for path, headers, status, code in cases:
            got_status, body = self._get(h, path, headers)
            assert (got_status, body["error"]) == (status, code), (path, body)
            assert body["message"]

    def test_a_broken_handshake_is_a_json_refusal(self) -> None:
        """What the WebSocket library would refuse with an HTML page of its own is refused first, as
        every other refusal (the same checks apply to /audio/{handle})."""
        h = Harness()
        ws = {
            b"host": b"vmcloud.example",
            b"upgrade": b"websocket",
            b"connection": b"keep-alive, Upgrade",
            b"sec-websocket-version": b"13",
            b"sec-websocket-key": b"dGhlIHNhbXBsZSBub25jZQ==",
        }
        cases = [
            {**ws, b"sec-websocket-version": b"8"},
            {**ws, b"sec-websocket-key": b"not base64 at all!!!!!!!"},
            {**ws, b"sec-websocket-key": b"c2hvcnQ="},  # base64, but not 16 bytes
            {k: v for k, v in ws.items() if k != b"sec-websocket-key"},
            {**ws, b"connection": b"keep-alive"},
            {k: v for k, v in ws.items() if k != b"host"},
            {**ws, b"sec-websocket-protocol": b"binary, binary"},
        ]
        for headers in cases:
            status, body = self._get(h, b"/console/H1", headers)
            assert (status, body["error"]) == (400, "bad-handshake"), (headers, body)


class OperatorConsoleTests(SynchronousTestCase):
    """``/console/vm/{vmid}``: the relay logs in to the VM itself and lets the browser in with None."""

    CHALLENGE = bytes(range(16))

    def _logged_in(self, h: Harness, path: str = "/console/vm/vm1?token=tok") -> tuple[WsPipe, FakeVnc]:
        """A viewer whose relay went through the VM's VncAuth, the server's bytes one at a time."""
        pipe = h.open(path)
        assert self.successResultOf(pipe.opened) is None
        (vnc,) = h.servers
        server_said = HELLO + b"\x01\x02" + self.CHALLENGE + struct.pack("!I", 0)
        for i, byte in enumerate(server_said):
            vnc.transport.write(bytes([byte]))
            h.flush()
            if i < len(server_said) - 1:
                assert bytes(pipe.received) == b"", f"the browser heard something at byte {i} of the login"
            if i == 11:
                assert vnc.received == HELLO
            if i == 13:
                assert vnc.received == HELLO + b"\x02"  # VncAuth chosen
        assert vnc.received == HELLO + b"\x02" + vnc_auth_response(OPERATOR_PASSWORD, self.CHALLENGE)
        return pipe, vnc

    def test_login_then_security_none_byte_by_byte(self) -> None:
        h = Harness()
        pipe, vnc = self._logged_in(h)
        login = bytes(vnc.received)
        h.flush()
        assert bytes(pipe.received) == HELLO  # the login is over: the browser is greeted
        for byte in HELLO:
            pipe.sendMessage(bytes([byte]), isBinary=True)
            h.flush()
        assert bytes(pipe.received) == HELLO + b"\x01\x01"  # one security type: None
        pipe.sendMessage(b"\x01", isBinary=True)
        h.flush()
        assert bytes(pipe.received) == HELLO + b"\x01\x01" + b"\0\0\0\0"  # SecurityResult OK (3.8)
        assert vnc.received == login  # nothing of the browser's opening reached the VM
        pipe.sendMessage(b"\x00", isBinary=True)  # ClientInit, exclusive
        h.flush()
        assert vnc.received == login + b"\x01"  # made shared: an operator never pushes a worker out
        server_init = struct.pack("!HH16sI", 8, 6, b"\0" * 16, 3) + b"vm1"
        vnc.transport.write(server_init)
        h.flush()
        assert bytes(pipe.received).endswith(server_init)
        key = struct.pack("!BBxxI", 4, 1, 0x61)
        pointer = struct.pack("!BBHH", 5, 1, 3, 4)
        update = struct.pack("!BBHHHH", 3, 1, 0, 0, 8, 6)
        for byte in key + update + pointer + update:
            pipe.sendMessage(bytes([byte]), isBinary=True)
        h.flush()
        assert vnc.received == login + b"\x01" + update + update  # the operator's input never arrives
        assert OPERATOR_PASSWORD.encode() not in bytes(pipe.received)

    def test_always_view_only(self) -> None:
        h = Harness()
        pipe, vnc = self._logged_in(h, "/console/vm/vm1?token=tok&view_only=0")
        login = bytes(vnc.received)
        pipe.sendMessage(HELLO + b"\x01\x01" + struct.pack("!BBHH", 5, 1, 3, 4), isBinary=True)
        h.flush()
        assert vnc.received == login + b"\x01"

    def test_a_refused_login_closes_before_the_browser_hears_rfb(self) -> None:
        h = Harness()
        pipe = h.open("/console/vm/vm1?token=tok")
        (vnc,) = h.servers
        reason = b"Authentication failure"
        refusal = struct.pack("!II", 1, len(reason)) + reason
        vnc.transport.write(HELLO + b"\x01\x02" + self.CHALLENGE + refusal)
        h.flush()
        assert bytes(pipe.received) == b""
        assert pipe.close_code == CLOSE_VNC_GONE
        _, text = self.successResultOf(pipe.closed)
        assert "refused the controller's login" in (text or ""), text
        assert vnc.lost and h.registry.total == 0

    def test_the_browser_may_choose_none_only(self) -> None:
        h = Harness()
        pipe, _ = self._logged_in(h)
        pipe.sendMessage(HELLO + b"\x02", isBinary=True)
        h.flush()
        assert pipe.close_code == CLOSE_POLICY

    def test_no_login_for_the_vm_is_a_refusal(self) -> None:
        h = Harness()
        h.operator_password = None
        pipe = h.open("/console/vm/vm1?token=tok")
        assert "409" in str(self.failureResultOf(pipe.opened).value)
        assert h.dials == []

    def test_an_opening_that_never_ends_is_closed(self) -> None:
        h = Harness()
        pipe = h.open("/console/vm/vm1?token=tok")
        (vnc,) = h.servers
        vnc.transport.write(HELLO)  # and then nothing: a hung VNC server
        h.flush()
        h.clock.advance(OPENING_TIMEOUT)
        h.flush()
        assert pipe.close_code == CLOSE_VNC_GONE
        assert vnc.lost and h.registry.total == 0

    def test_a_finished_opening_leaves_no_timer(self) -> None:
        h = Harness()
        pipe, _ = self._logged_in(h)
        pipe.sendMessage(HELLO + b"\x01\x01", isBinary=True)
        h.flush()
        h.clock.advance(OPENING_TIMEOUT)
        h.flush()
        assert pipe.close_code is None and h.registry.total == 1
