"""``/console/vm/{vmid}/screen.png``: a still of a VM's screen, for the monitor's thumbnails.

The operator's monitor shows a small live picture of every VM on screen, refreshed every few
seconds.  Each picture is one short RFB conversation the controller holds itself: it dials the
VM's VNC server as the console relay does (the address the cloud reports, never one a guest
names), logs in with the operator's view-only VncAuth password (the one the VM's guest said in its
HELLO; the session's for a guest too old to say one), asks one full framebuffer update in Raw
encoding (32-bit true colour), hangs up, scales the frame down (nearest pixel) and answers it as
a PNG made with :mod:`zlib` and :mod:`struct`.  No image library is needed.

* :class:`ScreenGrab` is the sans-IO RFB client: server bytes in, client bytes out, a
  :class:`Frame` at the end (RFC 6143: versions 3.3, 3.7 and 3.8, security None and VncAuth).
* :func:`thumbnail` and :func:`png` turn a frame into the answer's bytes.
* :class:`Captures` bounds the work: at most :data:`MAX_CAPTURES` conversations at once and
  :data:`MAX_WAITING` requests queued behind them; beyond that the answer is 503 at once, so a
  monitor (or several) cannot make the controller dial every VM at the same moment.  Each capture
  has :data:`CAPTURE_TIMEOUT` seconds, dial included.
* :class:`ScreenResource` is the route, reached through
  :class:`~vmcloud.console.vnc.ConsoleResource`: the admin token as for the operator's console
  (header, ``?token=`` or the cookie), then JSON refusals in the API's shape (404 unknown VM or no
  VNC, 409 no session, 502 the VNC server failed, 503 busy or timed out), never a traceback.

The view-only password lives as long as the guest agent, so a FREE VM's screen shows too, while a
worker's session password still dies at cleanup (SPEC).  A VM whose guest said no view-only
password has a screen only while it has a session (READY, OCCUPIED): otherwise 409.
"""

from __future__ import annotations

import operator
import struct
import zlib
from collections.abc import Callable
from typing import Any, cast

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from vmcloud.api.errors import ApiError
from vmcloud.console.gate import Gate, refuse
from vmcloud.console.rfb import RfbError, VncLogin, take
from vmcloud.console.targets import Target

log = Logger(namespace="vmcloud.console")

#: Captures under way at once, and requests that may wait for one; more are refused (503).
MAX_CAPTURES = 4
MAX_WAITING = 16
#: Seconds for one capture, from the dial to the last pixel.
CAPTURE_TIMEOUT = 5.0
#: Width of the answer when ``?width=`` is not given, and the bounds of what may be asked.
DEFAULT_WIDTH = 320
MIN_WIDTH = 16
MAX_WIDTH = 1920
#: Largest framebuffer accepted (pixels): 64 MiB of 32-bit pixels.
MAX_PIXELS = 4096 * 4096

_RAW = 0
#: 32 bits per pixel, depth 24, little-endian, true colour, red at bit 0: pixels arrive as R, G, B, X.
_PIXEL_FORMAT = struct.pack("!BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 0, 8, 16)

#: Resolves a vmid to the VM's VNC server and the password the controller logs in with, or raises ApiError.
ResolveScreen = Callable[[str], Target]
#: Dials a VM's server: connects ``protocol`` to ``target``, firing when connected.
Dial = Callable[[Target, Protocol], "Deferred[Any]"]


@attrs.frozen
class Frame:
    """A whole screen: ``pixels`` are ``width * height`` R, G, B, X quadruplets, row after row."""

    width: int
    height: int
    pixels: bytes = attrs.field(repr=False)


class ScreenGrab:
    """One RFB conversation that ends with one full frame.

    Call :meth:`feed` with what the server sent and send what it returns; when :attr:`frame` is
    set the conversation is over.  :class:`RfbError` says why it cannot go on.  The opening is a
    :class:`~vmcloud.console.rfb.VncLogin`; the client asks only Raw encoding, so every rectangle
    of the update is plain pixels.
    """

    def __init__(self, password: str | None) -> None:
        self._login = VncLogin(password)
        self._buffer = bytearray()
        self._step = "init"
        self._rects = 0
        self._pixels = bytearray()
        self.width = 0
        self.height = 0
        self.frame: Frame | None = None

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        if not self._login.done:
            out += self._login.feed(data)
            if not self._login.done:
                return bytes(out)
            data = self._login.rest()
            out += b"\x01"  # ClientInit: shared, so the worker's own viewer stays connected
        self._buffer += data
        while self.frame is None and self._advance(out):
            pass
        return bytes(out)

    def _need(self, count: int) -> bytes | None:
        return take(self._buffer, count)

    def _advance(self, out: bytearray) -> bool:
        """Take one step of the conversation; False when it waits for more bytes."""
        step = self._step
        if step == "init":
            return self._server_init(out)
        if step == "message":
            return self._message()
        if step == "rect":
            return self._rect(out)
        raise AssertionError(step)  # pragma: no cover

    def _server_init(self, out: bytearray) -> bool:
        if len(self._buffer) < 24:
            return False
        width, height = struct.unpack_from("!HH", self._buffer)
        (name_length,) = struct.unpack_from("!I", self._buffer, 20)
        if len(self._buffer) < 24 + name_length:
            return False
        del self._buffer[: 24 + name_length]
        if width * height > MAX_PIXELS or not width or not height:
            raise RfbError(f"a screen of {width}x{height} is not one to show")
        self.width, self.height = width, height
        self._pixels = bytearray(width * height * 4)
        out += b"\x00\x00\x00\x00" + _PIXEL_FORMAT  # SetPixelFormat
        out += struct.pack("!BxHi", 2, 1, _RAW)  # SetEncodings: Raw only
        out += struct.pack("!BBHHHH", 3, 0, 0, 0, width, height)  # the whole screen, not incremental
        self._step = "message"
        return True

    def _message(self) -> bool:
        if not self._buffer:
            return False
        kind = self._buffer[0]
        if kind == 0:  # FramebufferUpdate
            got = self._need(4)
            if got is None:
                return False
            (self._rects,) = struct.unpack_from("!H", got, 2)
            self._step = "rect"
            return True
        if kind == 1:  # SetColourMapEntries (not used in true colour; skipped whole)
            if len(self._buffer) < 6:
                return False
            (count,) = struct.unpack_from("!H", self._buffer, 4)
            return self._need(6 + 6 * count) is not None
        if kind == 2:  # Bell
            return self._need(1) is not None
        if kind == 3:  # ServerCutText
            if len(self._buffer) < 8:
                return False
            (length,) = struct.unpack_from("!I", self._buffer, 4)
            if length > 1 << 20:
                raise RfbError("a clipboard text over 1 MiB")
            return self._need(8 + length) is not None
        raise RfbError(f"server message type {kind} was not asked for")

    def _rect(self, out: bytearray) -> bool:
        if self._rects == 0:
            self.frame = Frame(self.width, self.height, bytes(self._pixels))
            self._pixels = bytearray()
            return False
        if len(self._buffer) < 12:
            return False
        x, y, w, h, encoding = struct.unpack_from("!HHHHi", self._buffer)
        if encoding != _RAW:
            raise RfbError(f"a rectangle in encoding {encoding}, which was not asked for")
        if x + w > self.width or y + h > self.height:
            raise RfbError(f"a rectangle {w}x{h}+{x}+{y} outside the {self.width}x{self.height} screen")
        size = w * h * 4
        if len(self._buffer) < 12 + size:
            return False
        data = memoryview(self._buffer)[12 : 12 + size]
        row = w * 4
        if x == 0 and w == self.width:
            self._pixels[y * row : (y + h) * row] = data
        else:
            stride = self.width * 4
            for line in range(h):
                start = (y + line) * stride + x * 4
                self._pixels[start : start + row] = data[line * row : (line + 1) * row]
        data.release()
        del self._buffer[: 12 + size]
        self._rects -= 1
        return True


def thumbnail(frame: Frame, width: int) -> tuple[int, int, list[bytes]]:
    """The frame scaled to ``width`` (never up), nearest pixel: ``(width, height, RGB rows)``."""
    width = max(1, min(width, frame.width))
    height = max(1, round(frame.height * width / frame.width))
    stride = frame.width * 4
    pixels = frame.pixels
    rows = []
    if width == frame.width:
        for y in range(height):
            line = pixels[y * stride : (y + 1) * stride]
            rgb = bytearray(width * 3)
            for k in (0, 1, 2):  # R, G, B of every pixel, X dropped
                rgb[k::3] = line[k::4]
            rows.append(bytes(rgb))
        return width, height, rows
    columns = [((2 * x + 1) * frame.width) // (2 * width) for x in range(width)]
    take = operator.itemgetter(*[4 * c + k for c in columns for k in (0, 1, 2)])
    for y in range(height):
        source = ((2 * y + 1) * frame.height) // (2 * height)
        rows.append(bytes(take(pixels[source * stride : (source + 1) * stride])))
    return width, height, rows


def png(width: int, height: int, rows: list[bytes]) -> bytes:
    """An 8-bit RGB PNG of ``rows`` (each ``3 * width`` bytes), filter None on every row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + row for row in rows)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", struct.pack("!IIBBBBB", width, height, 8, 2, 0, 0, 0)),
            chunk(b"IDAT", zlib.compress(raw, 6)),
            chunk(b"IEND", b""),
        )
    )


class _Capture(Protocol):
    """A :class:`ScreenGrab` on a TCP connection; ``done`` fires with the frame or an RfbError."""

    def __init__(self, password: str | None) -> None:
        self.grab = ScreenGrab(password)
        self.done: Deferred[Frame] = Deferred(lambda _: self.stop())

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if self.done.called:
            return
        try:
            reply = self.grab.feed(data)
        except RfbError as e:
            self._end(Failure(e))
            return
        if reply and self.transport is not None:
            self.transport.write(reply)
        if self.grab.frame is not None:
            self._end(self.grab.frame)

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802 - Twisted's name
        if not self.done.called:
            self.done.errback(RfbError("the VNC server closed the connection before a whole screen"))

    def _end(self, result: Frame | Failure) -> None:
        self.stop()
        if not self.done.called:
            self.done.callback(result) if isinstance(result, Frame) else self.done.errback(result)

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class Captures:
    """Screen captures, at most ``limit`` at once and ``waiting`` queued behind them."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        dial: Dial,
        limit: int = MAX_CAPTURES,
        waiting: int = MAX_WAITING,
        timeout: float = CAPTURE_TIMEOUT,
    ) -> None:
        self._clock = clock
        self._dial = dial
        self._slots = DeferredSemaphore(limit)
        self._limit = limit
        self._waiting_limit = waiting
        self._timeout = timeout
        self.running = 0
        self.waiting = 0

    async def capture(self, target: Target) -> Frame:
        """One frame of ``target``'s screen; :class:`ApiError` (502, 503) says why there is none."""
        if self.running >= self._limit and self.waiting >= self._waiting_limit:
            raise ApiError(
                503,
                "too-many-captures",
                f"{self._limit} screens are being captured and {self._waiting_limit} wait; try again",
                headers=((b"Retry-After", b"1"),),
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            return await self._grab(target)
        finally:
            self.running -= 1
            self._slots.release()

    async def _grab(self, target: Target) -> Frame:
        capture = _Capture(target.password)
        dialing = self._dial(target, capture)

        def too_late() -> None:
            (capture.done if dialing.called else dialing).cancel()

        timer = self._clock.callLater(self._timeout, too_late)
        try:
            await dialing
            return await capture.done
        except (CancelledError, TimeoutError):
            if timer.active():
                raise  # cancelled from outside (the request went away)
            raise ApiError(
                503,
                "vnc-timeout",
                f"the VNC server at {target.host}:{target.port} gave no screen within {self._timeout:g} s",
                headers=((b"Retry-After", b"5"),),
            ) from None
        except RfbError as e:
            raise ApiError(502, "vnc-error", f"the VM's VNC server: {e}") from None
        except Exception as e:
            raise ApiError(
                502,
                "vnc-unreachable",
                f"cannot reach the VM's VNC server at {target.host}:{target.port}: {e}",
            ) from None
        finally:
            if timer.active():
                timer.cancel()
            capture.stop()


class ScreenResource(Resource):
    """``GET /console/vm/{vmid}/screen.png[?width=N]``: a PNG of the VM's screen (admin)."""

    isLeaf = True

    def __init__(self, captures: Captures, gate: Gate, *, resolve: ResolveScreen) -> None:
        super().__init__()
        self._captures = captures
        self._gate = gate
        self._resolve = resolve

    def render(self, request: IRequest) -> Any:
        path = [segment.decode("utf-8", "replace") for segment in request.postpath]
        vmid = path[1] if len(path) == 3 else ""
        where = f"/console/vm/{vmid[:40]}/screen.png"
        try:
            if request.method not in (b"GET", b"HEAD"):
                raise ApiError(
                    405, "method-not-allowed", "use GET on this path", headers=((b"Allow", b"GET, HEAD"),)
                )
            self._gate.check_admin(request)
            self._gate.check_origin(request)
            width = _width(request)
            target = self._resolve(vmid)
        except ApiError as e:
            return refuse(request, e, where)
        gone = cast(Request, request).notifyFinish()  # asked first: the answer may come at once
        answer = Deferred.fromCoroutine(self._answer(request, target, width, where))
        gone.addErrback(lambda _: answer.cancel())
        answer.addErrback(_unexpected, vmid)
        return NOT_DONE_YET

    async def _answer(self, request: IRequest, target: Target, width: int, where: str) -> None:
        try:
            frame = await self._captures.capture(target)
        except ApiError as e:
            body = refuse(request, e, where)
        else:
            small = thumbnail(frame, width)
            body = png(*small)
            request.setHeader(b"Content-Type", b"image/png")
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"X-Content-Type-Options", b"nosniff")
            request.setHeader(b"X-Screen-Size", f"{frame.width}x{frame.height}".encode())
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if request.method != b"HEAD":
            request.write(body)
        request.finish()


def _unexpected(failure: Failure, vmid: str) -> None:
    if not failure.check(CancelledError):  # CancelledError: the client went away
        log.failure("Could not answer the screen of VM {vmid}", failure, vmid=vmid)


def _width(request: IRequest) -> int:
    values = (request.args or {}).get(b"width")
    if not values:
        return DEFAULT_WIDTH
    text = values[-1].decode("ascii", "replace")
    if not text.isdigit() or not MIN_WIDTH <= int(text) <= MAX_WIDTH:
        raise ApiError(400, "bad-width", f"width must be a whole number from {MIN_WIDTH} to {MAX_WIDTH}")
    return int(text)
