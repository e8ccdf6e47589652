"""Real parts for the console tests: an Xvnc on loopback, a WebSocket client, an RFB client over it.

``Xvnc`` is started the way a VM starts it (VncAuth, a password file, listening on one address),
on a display it picks itself (``-displayfd``) and a free port; the RFB client speaks the protocol
a viewer speaks (version, VncAuth with DES, ClientInit, pixel format, update requests) through
the controller's proxy, so a test sees real framebuffer bytes.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

try:  # cryptography >= 43 keeps DES among the "decrepit" algorithms
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover
    from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES  # type: ignore[no-redef]

XVNC = shutil.which("Xvnc")
XDOTOOL = shutil.which("xdotool")

#: The fixed key VNC password files are obfuscated with, bit-reversed for a standard DES.
_PASSWD_KEY = bytes.fromhex("e84ad660c4721ae0")


def _des(key: bytes, data: bytes) -> bytes:
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def _reverse_bits(data: bytes) -> bytes:
    return bytes(int(f"{b:08b}"[::-1], 2) for b in data)


def vnc_password_file(password: str, view_password: str | None = None) -> bytes:
    """The content of a VNC password file (``vncpasswd -f``) for ``password`` (and a view-only one)."""
    content = _des(_PASSWD_KEY, password.encode("ascii")[:8].ljust(8, b"\0"))
    if view_password is not None:
        content += _des(_PASSWD_KEY, view_password.encode("ascii")[:8].ljust(8, b"\0"))
    return content


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """VncAuth: the 16-byte challenge encrypted with the (bit-reversed) password."""
    return _des(_reverse_bits(password.encode("ascii")[:8].ljust(8, b"\0")), challenge)


def wait_until(
    reactor: Any, check: Callable[[], bool], timeout: float, what: str, step: float = 0.02
) -> Deferred[None]:
    """Poll ``check`` until it holds (bounded: fails with ``what`` after ``timeout`` seconds)."""
    d: Deferred[None] = Deferred()
    deadline = reactor.seconds() + timeout

    def poll() -> None:
        try:
            ok = check()
        except Exception:
            d.errback(Failure())
            return
        if ok:
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(AssertionError(f"not within {timeout} s: {what}"))
        else:
            reactor.callLater(step, poll)

    poll()
    return d


class _XvncProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.display: Deferred[int] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.err = b""
        self._out = b""

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2:
            self.err = (self.err + data)[-4000:]
            return
        self._out += data
        if b"\n" in self._out and not self.display.called:
            self.display.callback(int(self._out.split(b"\n")[0]))

    def processEnded(self, reason: Failure) -> None:
        if not self.display.called:
            self.display.errback(RuntimeError(f"Xvnc ended before it was ready: {self.err[-800:]!r}"))
        self.ended.callback(None)


class Xvnc:
    """A TigerVNC ``Xvnc`` on 127.0.0.1 with VncAuth, as a VM runs it (white root window).

    ``view_password``: the file's second line, the operator's view-only password, as the guest
    agent writes it; :meth:`passwords` rewrites the file (Xvnc reads it at every login).
    """

    def __init__(
        self,
        reactor: Any,
        directory: str,
        port: int,
        password: str = "secret12",
        view_password: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.password = password
        self.view_password = view_password
        self.display = -1
        self._directory = directory
        self._process = _XvncProcess()

    def passwords(self, password: str, view_password: str | None) -> None:
        self.password, self.view_password = password, view_password
        passwd = os.path.join(self._directory, "passwd")
        with open(passwd + ".new", "wb") as f:
            f.write(vnc_password_file(password, view_password))
        os.replace(passwd + ".new", passwd)

    async def start(self, geometry: str = "320x200") -> None:
        os.makedirs(self._directory, exist_ok=True)
        passwd = os.path.join(self._directory, "passwd")
        self.passwords(self.password, self.view_password)
        assert XVNC is not None
        argv = [
            XVNC, "-displayfd", "1", "-rfbport", str(self.port), "-SecurityTypes", "VncAuth",
            "-PasswordFile", passwd, "-localhost", "-interface", "127.0.0.1", "-geometry", geometry,
            "-depth", "24", "-AlwaysShared", "-wr", "-nolisten", "tcp",
        ]  # fmt: skip
        self.transport = self.reactor.spawnProcess(
            self._process, XVNC, argv, env={"PATH": "/usr/bin:/bin"}, childFDs={0: "w", 1: "r", 2: "r"}
        )
        self.display = await self._process.display

    def pointer(self) -> tuple[int, int]:
        """Where the X pointer is (asked of the X server with xdotool)."""
        import subprocess

        assert XDOTOOL is not None
        out = subprocess.run(
            [XDOTOOL, "getmouselocation"],
            env={"DISPLAY": f":{self.display}"},
            capture_output=True,
            check=True,
            timeout=10,
        ).stdout.decode()
        fields = dict(part.split(":") for part in out.split())
        return int(fields["x"]), int(fields["y"])

    async def stop(self) -> None:
        if not self._process.ended.called:
            self.transport.signalProcess(signal.SIGTERM)
        await self._process.ended


class WsPipe(WebSocketClientProtocol):
    """A WebSocket client that keeps every byte it receives and can wait for more."""

    def __init__(self) -> None:
        super().__init__()
        self.received = bytearray()
        self.opened: Deferred[None] = Deferred()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self.close_code: int | None = None
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N803 - autobahn's names
        self.received += payload
        for waiter in list(self._waiting):
            if len(self.received) >= waiter[0]:
                self._waiting.remove(waiter)
                waiter[1].callback(None)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N803
        self.close_code = code
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"WebSocket refused: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))
        for _, d in self._waiting:
            d.errback(ConnectionError(f"closed ({code} {reason}) while waiting for bytes"))
        self._waiting = []

    async def read(self, count: int, timeout: float = 10) -> bytes:
        """The next ``count`` received bytes (waits for them, bounded)."""
        if len(self.received) < count:
            d: Deferred[None] = Deferred()
            self._waiting.append((count, d))
            d.addTimeout(timeout, self.factory.reactor)
            await d
        data = bytes(self.received[:count])
        del self.received[:count]
        return data


async def open_ws(
    reactor: Any, port: int, path: str, *, origin: str | None = None, pipe: type[WsPipe] = WsPipe
) -> WsPipe:
    """A WebSocket (subprotocol ``binary``) to ``ws://127.0.0.1:port/path``, once open."""
    factory = WebSocketClientFactory(
        f"ws://127.0.0.1:{port}{path}", protocols=["binary"], origin=origin, reactor=reactor
    )
    factory.protocol = pipe
    factory.setProtocolOptions(openHandshakeTimeout=5, closeHandshakeTimeout=1)
    pipe = pipe()
    pipe.factory = factory
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), pipe)
    await pipe.opened
    return pipe


async def rfb_handshake(pipe: WsPipe, password: str) -> tuple[int, int]:
    """Version, VncAuth and ClientInit (shared) through ``pipe``; returns the framebuffer size."""
    version = await pipe.read(12)
    assert version.startswith(b"RFB 003."), version
    pipe.sendMessage(b"RFB 003.008\n", isBinary=True)
    count = (await pipe.read(1))[0]
    types = await pipe.read(count)
    assert 2 in types, types
    pipe.sendMessage(b"\x02", isBinary=True)
    challenge = await pipe.read(16)
    pipe.sendMessage(vnc_auth_response(password, challenge), isBinary=True)
    (result,) = struct.unpack("!I", await pipe.read(4))
    assert result == 0, "VncAuth refused"
    pipe.sendMessage(b"\x01", isBinary=True)
    width, height = struct.unpack("!HH", await pipe.read(4))
    await pipe.read(16)  # pixel format
    (name_length,) = struct.unpack("!I", await pipe.read(4))
    await pipe.read(name_length)
    # 32-bit true colour, little-endian, red at bit 16: pixels read as B, G, R, X
    pixel_format = struct.pack("!BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
    pipe.sendMessage(b"\x00\x00\x00\x00" + pixel_format, isBinary=True)
    pipe.sendMessage(struct.pack("!BxHi", 2, 1, 0), isBinary=True)  # Raw encoding only
    return width, height


async def operator_handshake(pipe: WsPipe) -> tuple[int, int]:
    """The operator's opening through the relay: RFB 3.8, security None (the relay logged in to the
    VM itself), ClientInit; then the same pixel format and encodings as :func:`rfb_handshake`."""
    assert await pipe.read(12) == b"RFB 003.008\n"
    pipe.sendMessage(b"RFB 003.008\n", isBinary=True)
    assert await pipe.read(2) == b"\x01\x01"  # one security type: None
    pipe.sendMessage(b"\x01", isBinary=True)
    assert struct.unpack("!I", await pipe.read(4)) == (0,)
    pipe.sendMessage(b"\x00", isBinary=True)  # asks for exclusive access: the relay makes it shared
    width, height = struct.unpack("!HH", await pipe.read(4))
    await pipe.read(16)
    (name_length,) = struct.unpack("!I", await pipe.read(4))
    await pipe.read(name_length)
    pixel_format = struct.pack("!BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
    pipe.sendMessage(b"\x00\x00\x00\x00" + pixel_format, isBinary=True)
    pipe.sendMessage(struct.pack("!BxHi", 2, 1, 0), isBinary=True)
    return width, height


async def read_frame(pipe: WsPipe, width: int, height: int) -> bytes:
    """Ask for the whole screen (non-incremental) and return its BGRX pixels."""
    pipe.sendMessage(struct.pack("!BBHHHH", 3, 0, 0, 0, width, height), isBinary=True)
    screen = bytearray(width * height * 4)
    covered = 0
    while True:
        kind = (await pipe.read(1))[0]
        if kind != 0:  # bell, colour map, cut text: not asked for
            raise AssertionError(f"unexpected server message {kind}")
        (rects,) = struct.unpack("!xH", await pipe.read(3))
        for _ in range(rects):
            x, y, w, h, encoding = struct.unpack("!HHHHi", await pipe.read(12))
            if encoding != 0:
                continue  # pseudo-encodings carry no pixels here
            data = await pipe.read(w * h * 4)
            for row in range(h):
                start = ((y + row) * width + x) * 4
                screen[start : start + w * 4] = data[row * w * 4 : (row + 1) * w * 4]
            covered += w * h
        if covered >= width * height:
            return bytes(screen)
