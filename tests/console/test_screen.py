"""The monitor's thumbnails in memory: the RFB client, the scaling and the PNG, and every answer of
``/console/vm/{vmid}/screen.png`` but the real Xvnc's (tests/console/test_screen_live.py).

The VNC server here is a scripted one on an in-memory connection; the VncAuth response it expects is
computed by the test's own DES (tests/console/support.py), not by the code under test.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test.iosim import FakeTransport, connect
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from tests.console.support import vnc_auth_response
from tests.pool.fakes import World
from tests.pool.test_service import HOME
from vmcloud.console.gate import Gate
from vmcloud.console.registry import AccessRegistry
from vmcloud.console.screen import Captures, Frame, RfbError, ScreenGrab, ScreenResource, png, thumbnail
from vmcloud.console.targets import PoolTargets, Target, vm_key
from vmcloud.console.vnc import ConsoleFactory, ConsoleResource
from vmcloud.pool.interfaces import BatchOptions
from vmcloud.pool.model import VMState

PASSWORD = "pw123456"
CHALLENGE = bytes(range(16))
TOKEN = "admin-token"


def pixels(width: int, height: int) -> bytes:
    """A screen whose every pixel says where it is: R = x, G = y, B = 200, X = 0."""
    return b"".join(bytes((x, y, 200, 0)) for y in range(height) for x in range(width))


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB rows of an 8-bit RGB PNG without filters (what :func:`png` writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, {}
    while at < len(data):
        (length,) = struct.unpack_from("!I", data, at)
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack_from("!I", data, at + 8 + length)
        assert crc == zlib.crc32(kind + body), kind
        chunks[kind] = body
        at += 12 + length
    width, height, depth, colour = struct.unpack_from("!IIBB", chunks[b"IHDR"])
    assert (depth, colour) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    line = 1 + 3 * width
    rows = [raw[y * line : (y + 1) * line] for y in range(height)]
    assert all(row[0] == 0 for row in rows)
    return width, height, [row[1:] for row in rows]


def conversation(
    width: int = 4, height: int = 3, *, rects: list[tuple[int, int, int, int]] | None = None
) -> bytes:
    """What a 3.8 server with VncAuth says, whole, for a frame of :func:`pixels` in ``rects``."""
    screen = pixels(width, height)
    rects = rects or [(0, 0, width, height)]
    update = struct.pack("!BxH", 0, len(rects))
    for x, y, w, h in rects:
        update += struct.pack("!HHHHi", x, y, w, h, 0)
        for row in range(y, y + h):
            update += screen[(row * width + x) * 4 : (row * width + x + w) * 4]
    name = b"vm1"
    init = struct.pack("!HH16sI", width, height, b"\0" * 16, len(name)) + name
    return b"RFB 003.008\n" + b"\x02\x01\x02" + CHALLENGE + b"\0\0\0\0" + init + update


def swap(said: bytes, old: bytes, new: bytes) -> bytes:
    """``said`` with the last ``old`` (the update's rectangle header, not the init's bytes) as ``new``."""
    head, found, tail = said.rpartition(old)
    assert found
    return head + new + tail


class ScreenGrabTests(SynchronousTestCase):
    def test_vnc_auth_then_one_frame(self) -> None:
        grab = ScreenGrab(PASSWORD)
        sent = grab.feed(conversation())
        assert sent[:12] == b"RFB 003.008\n"
        assert sent[12:13] == b"\x02"  # VncAuth chosen
        assert sent[13:29] == vnc_auth_response(PASSWORD, CHALLENGE)
        assert sent[29:30] == b"\x01"  # shared
        set_format, encodings, request = sent[30:50], sent[50:58], sent[58:]
        assert set_format[0] == 0 and set_format[4:8] == bytes((32, 24, 0, 1))  # 32 bpp, little-endian
        assert struct.unpack("!BxHi", encodings) == (2, 1, 0)  # Raw only
        assert struct.unpack("!BBHHHH", request) == (3, 0, 0, 0, 4, 3)  # whole screen, not incremental
        assert grab.frame == Frame(4, 3, pixels(4, 3))

    def test_byte_by_byte_is_the_same(self) -> None:
        whole = ScreenGrab(PASSWORD)
        whole_sent = whole.feed(conversation(5, 4, rects=[(0, 0, 5, 2), (0, 2, 2, 2), (2, 2, 3, 2)]))
        trickled = ScreenGrab(PASSWORD)
        sent = b"".join(
            trickled.feed(bytes([b]))
            for b in conversation(5, 4, rects=[(0, 0, 5, 2), (0, 2, 2, 2), (2, 2, 3, 2)])
        )
        assert sent == whole_sent
        assert trickled.frame == whole.frame == Frame(5, 4, pixels(5, 4))

    def test_messages_before_the_update_are_skipped(self) -> None:
        said = conversation()
        at = said.index(b"vm1") + 3
        extra = b"\x02" + struct.pack("!BxxxI", 3, 5) + b"hello" + struct.pack("!BxHH", 1, 0, 1) + b"\0" * 6
        grab = ScreenGrab(PASSWORD)
        grab.feed(said[:at] + extra + said[at:])
        assert grab.frame == Frame(4, 3, pixels(4, 3))

    def test_older_versions_and_no_password(self) -> None:
        init = struct.pack("!HH16sI", 1, 1, b"\0" * 16, 0)
        update = struct.pack("!BxH", 0, 1) + struct.pack("!HHHHi", 0, 0, 1, 1, 0) + b"\x01\x02\x03\x00"
        for server, chosen, expected in (
            (b"RFB 003.003\n" + struct.pack("!I", 1), b"", b"RFB 003.003\n"),
            (b"RFB 003.007\n\x01\x01", b"\x01", b"RFB 003.007\n"),
            (b"RFB 003.008\n\x01\x01\0\0\0\0", b"\x01", b"RFB 003.008\n"),
            (b"RFB 004.001\n\x01\x01\0\0\0\0", b"\x01", b"RFB 003.008\n"),
        ):
            grab = ScreenGrab(None)
            sent = grab.feed(server + init + update)
            assert sent.startswith(expected + chosen + b"\x01"), (server, sent)
            assert grab.frame == Frame(1, 1, b"\x01\x02\x03\x00")

    def test_refusals_say_why(self) -> None:
        v38, v33, whole = b"RFB 003.008\n", b"RFB 003.003\n", conversation()
        rect = struct.pack("!HHHHi", 0, 0, 4, 3, 0)
        cases = [
            (None, b"SSH-2.0-OpenSSH\r\n", "not a VNC server"),
            (
                PASSWORD,
                v38 + b"\x00" + struct.pack("!I", 9) + b"too many!",
                "refused the connection: too many!",
            ),
            (PASSWORD, v33 + struct.pack("!II", 0, 2) + b"no", "refused the connection: no"),
            (PASSWORD, v38 + b"\x01\x10", "only security types [16]"),
            (None, v38 + b"\x01\x02", "wants a password"),
            (
                PASSWORD,
                v38 + b"\x01\x02" + CHALLENGE + struct.pack("!II", 1, 6) + b"denied",
                "password: denied",
            ),
            (PASSWORD, swap(whole, rect, struct.pack("!HHHHi", 0, 0, 4, 3, 7)), "encoding 7"),
            (PASSWORD, swap(whole, rect, struct.pack("!HHHHi", 1, 0, 4, 3, 0)), "outside"),
            (PASSWORD, whole[: whole.index(b"vm1") + 3] + b"\x09", "type 9"),
        ]
        for password, said, why in cases:
            with self.assertRaises(RfbError) as caught:
                ScreenGrab(password).feed(said)
            assert why in str(caught.exception), (why, caught.exception)


class PictureTests(SynchronousTestCase):
    def test_png_of_a_full_size_frame_keeps_every_pixel(self) -> None:
        width, height, rows = decode_png(png(*thumbnail(Frame(7, 3, pixels(7, 3)), 320)))
        assert (width, height) == (7, 3)  # never scaled up
        assert rows[2] == b"".join(bytes((x, 2, 200)) for x in range(7))

    def test_scaled_down_by_the_nearest_pixel(self) -> None:
        width, height, rows = decode_png(png(*thumbnail(Frame(200, 100, pixels(200, 100)), 50)))
        assert (width, height) == (50, 25)
        # output pixel (x, y) shows source pixel (4x + 2, 4y + 2): the centre of its 4x4 block
        assert rows[3][:9] == bytes((2, 14, 200, 6, 14, 200, 10, 14, 200))
        assert rows[24][-3:] == bytes((198, 98, 200))

    def test_one_pixel_wide(self) -> None:
        assert thumbnail(Frame(10, 10, pixels(10, 10)), 1) == (1, 1, [bytes((5, 5, 200))])


class FakeVnc(Protocol):
    """A VNC server speaking :func:`conversation` as the client asks for it; records what it got."""

    def __init__(self, said: bytes) -> None:
        self.said = said
        self.got = b""
        self.lost = False

    def connectionMade(self) -> None:
        self.transport.write(self.said)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.got += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class ScreenRouteTests(SynchronousTestCase):
    """The route through the console resource, over a real pool state (World) and a scripted VNC."""

    def setUp(self) -> None:
        self.clock = Clock()
        w = World()
        w.pool.set_pool_size(2, 2, 60_000)
        w.settle()
        batch = w.pool.prepare_batch(1, HOME, BatchOptions())
        w.settle()
        ready = [vm for vm in w.vms() if vm.state is VMState.READY]
        assert ready, [vm.state for vm in w.vms()]
        self.vmid = ready[0].vmid
        w.pool.state.put(
            attrs.evolve(ready[0], ip="127.0.0.1", vnc_password=PASSWORD, capabilities=("cdp", "vnc"))
        )
        self.free = next(vm.vmid for vm in w.vms() if vm.vmid != self.vmid)
        w.pool.state.put(attrs.evolve(w.pool.state.vms[self.free], capabilities=("cdp", "vnc")))
        self.world = w
        self.batch = batch
        self.pumps: list[Any] = []
        self.dials: list[Target] = []
        self.servers: list[FakeVnc] = []
        self.said = conversation(8, 6)
        self.hang = False
        self.captures = Captures(clock=self.clock, dial=self._dial, limit=1, waiting=1)
        gate = Gate(token=TOKEN, cors_origins=[])
        screen = ScreenResource(self.captures, gate, resolve=PoolTargets(w.pool, vnc_port=5999).screen_of_vm)
        self.console = ConsoleResource(
            ConsoleFactory(clock=self.clock, dial=self._dial, registry=AccessRegistry(), timeouts=False),
            gate,
            resolve_handle=lambda _: None,
            resolve_vm=lambda vmid: Target(vm_key(vmid), "127.0.0.1", 1, vmid, PASSWORD),
            screen=screen,
        )

    def _dial(self, target: Target, protocol: Protocol) -> Deferred[Any]:
        self.dials.append(target)
        if self.hang:
            return Deferred()
        server = FakeVnc(self.said)
        self.servers.append(server)
        self.pumps.append(
            connect(
                server, FakeTransport(server, True), protocol, FakeTransport(protocol, False), greet=False
            )
        )
        connected: Deferred[Any] = Deferred()
        self.clock.callLater(0, lambda: (self.pumps[-1].flush(), connected.callback(protocol)))
        return connected

    def get(
        self, path: str, *, token: str | None = TOKEN, headers: dict[bytes, bytes] | None = None
    ) -> DummyRequest:
        raw, _, query = path.partition("?")
        request = DummyRequest([part.encode() for part in raw.strip("/").split("/")[1:]])
        request.args = {}
        for pair in filter(None, query.split("&")):
            name, _, value = pair.partition("=")
            request.args.setdefault(name.encode(), []).append(value.encode())
        if token is not None:
            request.requestHeaders.addRawHeader(b"authorization", f"Bearer {token}".encode())
        for name, value in (headers or {}).items():
            request.requestHeaders.addRawHeader(name, value)
        result = self.console.render(request)
        if result is not NOT_DONE_YET:
            request.write(result)
            request.finish()
        return request

    def talk(self) -> None:
        """Let the in-memory connections talk until nothing moves."""
        for _ in range(20):
            self.clock.advance(0)
            for pump in self.pumps:
                pump.flush()

    def refusal(self, request: DummyRequest) -> tuple[int, str]:
        assert request.finished, "no answer"
        assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
        return request.responseCode, json.loads(b"".join(request.written))["error"]

    def test_a_png_of_the_vm_screen(self) -> None:
        self.said = conversation(64, 48)
        request = self.get(f"/console/vm/{self.vmid}/screen.png?width=32")
        self.talk()
        assert request.finished and request.responseCode in (None, 200)
        assert request.responseHeaders.getRawHeaders(b"content-type") == [b"image/png"]
        assert request.responseHeaders.getRawHeaders(b"x-screen-size") == [b"64x48"]
        width, height, rows = decode_png(b"".join(request.written))
        assert (width, height) == (32, 24)
        assert rows[0][:3] == bytes((1, 1, 200))  # the centre of the 2x2 block
        target = self.dials[0]
        assert (target.host, target.port, target.password) == ("127.0.0.1", 5999, PASSWORD)
        assert self.servers[0].got[13:29] == vnc_auth_response(PASSWORD, CHALLENGE)
        assert self.servers[0].lost, "the capture hangs up once it has the screen"

    def test_refusals_are_json(self) -> None:
        self.world.pool.state.put(attrs.evolve(self.world.pool.state.vms[self.free], capabilities=("cdp",)))
        cases = [
            (f"/console/vm/{self.vmid}/screen.png", None, {}, 401, "unauthorized"),
            (f"/console/vm/{self.vmid}/screen.png", "wrong", {}, 401, "unauthorized"),
            ("/console/vm/nope/screen.png", TOKEN, {}, 404, "unknown-vm"),
            (f"/console/vm/{self.free}/screen.png", TOKEN, {}, 404, "no-vnc"),
            (f"/console/vm/{self.vmid}/screen.png?width=0", TOKEN, {}, 400, "bad-width"),
            (f"/console/vm/{self.vmid}/screen.png?width=x", TOKEN, {}, 400, "bad-width"),
            (
                f"/console/vm/{self.vmid}/screen.png",
                TOKEN,
                {b"origin": b"https://evil.ex"},
                403,
                "origin-refused",
            ),
        ]
        for path, token, headers, status, code in cases:
            assert self.refusal(self.get(path, token=token, headers=headers)) == (status, code), path
        assert not self.dials

    def test_token_as_query_or_cookie(self) -> None:
        for path, headers in (
            (f"/console/vm/{self.vmid}/screen.png?token={TOKEN}", {}),
            (f"/console/vm/{self.vmid}/screen.png", {b"cookie": f"vmcloud_token={TOKEN}".encode()}),
        ):
            request = self.get(path, token=None, headers=headers)
            self.talk()
            assert request.responseHeaders.getRawHeaders(b"content-type") == [b"image/png"], path

    def test_a_free_vm_has_no_session(self) -> None:
        assert self.refusal(self.get(f"/console/vm/{self.free}/screen.png")) == (409, "no-session")

    def test_unreachable_vnc_is_502(self) -> None:
        self.console = self._with_dial(lambda target, protocol: fail(ConnectionRefusedError("refused")))
        request = self.get(f"/console/vm/{self.vmid}/screen.png")
        self.talk()
        assert self.refusal(request) == (502, "vnc-unreachable")

    def test_a_vnc_that_says_no_is_502(self) -> None:
        self.said = b"RFB 003.008\n\x01\x02" + CHALLENGE + struct.pack("!II", 1, 6) + b"denied"
        request = self.get(f"/console/vm/{self.vmid}/screen.png")
        self.talk()
        assert self.refusal(request) == (502, "vnc-error")
        self.said = b"RFB 003.008\n\x01\x02"  # then nothing more: the server hangs up
        request = self.get(f"/console/vm/{self.vmid}/screen.png")
        self.talk()
        self.pumps[-1].serverIO.loseConnection()
        self.talk()
        assert self.refusal(request) == (502, "vnc-error")

    def test_silent_vnc_is_503_after_the_timeout_and_the_connection_is_cut(self) -> None:
        self.said = b"RFB 003.008\n"  # and then silence
        request = self.get(f"/console/vm/{self.vmid}/screen.png")
        self.talk()
        assert not request.finished
        self.clock.advance(4.9)
        assert not request.finished
        self.clock.advance(0.2)
        self.talk()
        assert self.refusal(request) == (503, "vnc-timeout")
        assert self.servers[0].lost
        assert self.captures.running == 0

    def test_a_dial_that_hangs_is_503(self) -> None:
        self.hang = True
        request = self.get(f"/console/vm/{self.vmid}/screen.png")
        self.clock.advance(5.1)
        assert self.refusal(request) == (503, "vnc-timeout")

    def test_captures_are_capped(self) -> None:
        """limit 1, 1 waiting: a third request at once is refused; the waiting one is served after."""
        self.said = b"RFB 003.008\n"
        first = self.get(f"/console/vm/{self.vmid}/screen.png")
        self.talk()
        self.said = conversation(8, 6)
        second = self.get(f"/console/vm/{self.vmid}/screen.png")
        third = self.get(f"/console/vm/{self.vmid}/screen.png")
        assert self.refusal(third) == (503, "too-many-captures")
        assert third.responseHeaders.getRawHeaders(b"retry-after") == [b"1"]
        assert len(self.dials) == 1 and not second.finished
        self.clock.advance(5.1)
        self.talk()
        assert self.refusal(first) == (503, "vnc-timeout")
        assert second.responseHeaders.getRawHeaders(b"content-type") == [b"image/png"]

    def test_a_client_that_goes_away_cancels_its_capture(self) -> None:
        self.said = b"RFB 003.008\n"
        request = self.get(f"/console/vm/{self.vmid}/screen.png")
        self.talk()
        for finished in request._finishedDeferreds:  # the connection was lost
            finished.errback(ConnectionDone("gone"))
        self.talk()
        assert self.servers[0].lost and self.captures.running == 0

    def test_other_methods_and_paths(self) -> None:
        request = DummyRequest([b"vm", self.vmid.encode(), b"screen.png"])
        request.method = b"POST"
        request.requestHeaders.addRawHeader(b"authorization", f"Bearer {TOKEN}".encode())
        request.write(self.console.render(request))
        assert request.responseCode == 405
        # a console path that is not the screen is still the WebSocket's (426 without an upgrade)
        assert self.refusal(self.get(f"/console/vm/{self.vmid}")) == (426, "websocket-required")

    def _with_dial(self, dial: Any) -> ConsoleResource:
        gate = Gate(token=TOKEN, cors_origins=[])
        self.captures = Captures(clock=self.clock, dial=dial)
        screen = ScreenResource(self.captures, gate, resolve=PoolTargets(self.world.pool).screen_of_vm)
        return ConsoleResource(
            ConsoleFactory(clock=self.clock, dial=dial, registry=AccessRegistry(), timeouts=False),
            gate,
            resolve_handle=lambda _: None,
            resolve_vm=lambda vmid: None,
            screen=screen,
        )
