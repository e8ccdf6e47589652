"""What a view-only console viewer may say to a VNC server: RFB client messages, input removed.

``?view_only=1`` must hold whatever the viewer's page does (a worker's own noVNC can be told to
send keys anyway), so the controller itself drops the input.  RFB has no message framing: each
client message's length follows from its type (and, for some, a count inside it), so the relay
must follow the stream from the first byte to know where one message ends and the next begins.
This module does that, bytes in, bytes out, with no I/O (RFC 6143; the extensions noVNC 1.x sends
are named where they are handled).

What passes: the handshake, ``SetPixelFormat`` (0), ``SetEncodings`` (2),
``FramebufferUpdateRequest`` (3), ``EnableContinuousUpdates`` (150) and ``ClientFence`` (248).
What is dropped: ``KeyEvent`` (4), ``PointerEvent`` (5), ``ClientCutText`` (6, extended clipboard
included), xvp (250, which can reboot a machine), ``SetDesktopSize`` (251) and QEMU's extended key
event (255/0).  Anything else cannot be followed and ends the connection (:class:`RfbViolation`):
a stream whose boundaries are lost could smuggle input through.

Two things the filter changes so that lengths stay known: the server's list of security types is
cut to those whose client side it can follow (None and VncAuth), and ``SetEncodings`` loses the
ExtendedMouseButtons pseudo-encoding (-316), which would make a pointer event 6 *or* 7 bytes
depending on what the server answered.
"""

from __future__ import annotations

import struct

#: Security types whose client half has a known length: None (no bytes), VncAuth (16 bytes).
SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2
FOLLOWED_SECURITY = (SECURITY_NONE, SECURITY_VNC_AUTH)
#: ExtendedMouseButtons: with it a PointerEvent may be 7 bytes, decided by the server's answer.
EXTENDED_MOUSE_BUTTONS = -316
#: The largest message the filter buffers whole (SetEncodings with 65535 encodings is 262,144 bytes).
MAX_BUFFERED = 4 + 4 * 0xFFFF

_VERSIONS = {b"RFB 003.003\n": 3.3, b"RFB 003.007\n": 3.7, b"RFB 003.008\n": 3.8}

# client message types
_SET_PIXEL_FORMAT = 0
_SET_ENCODINGS = 2
_UPDATE_REQUEST = 3
_KEY_EVENT = 4
_POINTER_EVENT = 5
_CLIENT_CUT_TEXT = 6
_CONTINUOUS_UPDATES = 150
_CLIENT_FENCE = 248
_XVP = 250
_SET_DESKTOP_SIZE = 251
_QEMU = 255

#: Messages of a fixed length: type -> (length, passes)
_FIXED = {
    _SET_PIXEL_FORMAT: (20, True),
    _UPDATE_REQUEST: (10, True),
    _KEY_EVENT: (8, False),
    _POINTER_EVENT: (6, False),
    _CONTINUOUS_UPDATES: (10, True),
    _XVP: (4, False),
}


class RfbViolation(Exception):
    """The viewer's stream cannot be followed (or is not RFB): the relay must close it."""


class ViewOnlyFilter:
    """Follows one RFB connection and removes the viewer's input from it.

    Call :meth:`from_client` with what the viewer sent and forward what it returns to the server;
    call :meth:`from_server` with what the server sent and forward what it returns to the viewer,
    until :attr:`server_done` (after the security types, the server's bytes pass untouched and
    need not be shown to the filter any more).  Both raise :class:`RfbViolation`.
    """

    __slots__ = (
        "_client",
        "_client_step",
        "_discard",
        "_server",
        "_server_step",
        "dropped",
        "security",
        "server_done",
        "version",
    )

    def __init__(self) -> None:
        self._client = bytearray()
        self._server = bytearray()
        self._client_step = "version"
        self._server_step = "version"
        self._discard = 0  # bytes of a dropped message still to come
        self.version: float | None = None
        self.security: int | None = None
        self.server_done = False
        #: Input messages removed so far (for logs and tests).
        self.dropped = 0

    # ------------------------------------------------------------------ server -> viewer

    def from_server(self, data: bytes) -> bytes:
        """The server's bytes as the viewer may see them (the security list cut to what we follow)."""
        if self.server_done:
            return data
        self._server += data
        out = bytearray()
        while not self.server_done:
            buf = self._server
            if self._server_step == "version":
                if len(buf) < 12:
                    break
                out += buf[:12]
                del buf[:12]
                self._server_step = "security"
            elif self.version is None:
                break  # the server waits for the viewer's version before it goes on
            elif self.version >= 3.7:
                if not buf:
                    break
                count = buf[0]
                if count == 0:  # a failure and its reason: nothing left to follow
                    self._finish_server(out)
                    break
                if len(buf) < 1 + count:
                    break
                offered = bytes(buf[1 : 1 + count])
                kept = bytes(t for t in offered if t in FOLLOWED_SECURITY)
                if not kept:
                    raise RfbViolation(
                        f"the VNC server offers security types {list(offered)}; a view-only relay "
                        "can follow only None (1) and VncAuth (2)"
                    )
                out.append(len(kept))
                out += kept
                del buf[: 1 + count]
                self._finish_server(out)
            else:  # 3.3: the server chooses
                if len(buf) < 4:
                    break
                (chosen,) = struct.unpack_from("!I", buf)
                if chosen != 0 and chosen not in FOLLOWED_SECURITY:
                    raise RfbViolation(
                        f"the VNC server chose security type {chosen}, which cannot be followed"
                    )
                if chosen:
                    self.security = chosen
                self._finish_server(out)
        return bytes(out)

    def _finish_server(self, out: bytearray) -> None:
        out += self._server
        self._server = bytearray()
        self.server_done = True

    # ------------------------------------------------------------------ viewer -> server

    def from_client(self, data: bytes) -> bytes:
        """The viewer's bytes as the server may see them: input messages removed."""
        if self._discard:
            skipped = min(self._discard, len(data))
            self._discard -= skipped
            data = data[skipped:]
        buf = self._client
        buf += data
        out = bytearray()
        while buf:
            step = self._client_step
            if step == "messages":
                if not self._message(buf, out):
                    break
            elif step == "version":
                if len(buf) < 12:
                    break
                version = _VERSIONS.get(bytes(buf[:12]))
                if version is None:
                    raise RfbViolation(f"not an RFB version the relay follows: {bytes(buf[:12])!r}")
                self.version = version
                out += buf[:12]
                del buf[:12]
                self._client_step = "security"
            elif step == "security":
                if self.version is not None and self.version >= 3.7:
                    chosen = buf[0]
                    if chosen not in FOLLOWED_SECURITY:
                        raise RfbViolation(
                            f"the viewer chose security type {chosen}, which cannot be followed"
                        )
                    self.security = chosen
                    out.append(chosen)
                    del buf[:1]
                elif self.security is None:
                    break  # 3.3: wait for the server to choose
                self._client_step = "auth"
            elif step == "auth":
                need = 16 if self.security == SECURITY_VNC_AUTH else 0
                if len(buf) < need:
                    break
                out += buf[:need]
                del buf[:need]
                self._client_step = "init"
            elif step == "init":  # ClientInit: the shared flag
                out += buf[:1]
                del buf[:1]
                self._client_step = "messages"
        if len(buf) > MAX_BUFFERED:
            raise RfbViolation(f"a client message longer than {MAX_BUFFERED} bytes")
        return bytes(out)

    def _message(self, buf: bytearray, out: bytearray) -> bool:
        """Take one whole message off ``buf`` (passing or dropping it); False when it is incomplete."""
        kind = buf[0]
        fixed = _FIXED.get(kind)
        if fixed is not None:
            length, passes = fixed
            if len(buf) < length:
                return False
            self._take(buf, out, length, passes)
            return True
        if kind == _SET_ENCODINGS:
            if len(buf) < 4:
                return False
            (count,) = struct.unpack_from("!H", buf, 2)
            length = 4 + 4 * count
            if len(buf) < length:
                return False
            encodings = struct.unpack_from(f"!{count}i", buf, 4)
            kept = [e for e in encodings if e != EXTENDED_MOUSE_BUTTONS]
            out += struct.pack(f"!BxH{len(kept)}i", _SET_ENCODINGS, len(kept), *kept)
            del buf[:length]
            return True
        if kind == _CLIENT_CUT_TEXT:
            if len(buf) < 8:
                return False
            (size,) = struct.unpack_from("!i", buf, 4)  # negative: extended clipboard, -size bytes
            self._drop_streaming(buf, 8 + abs(size))
            return True
        if kind == _CLIENT_FENCE:
            if len(buf) < 9:
                return False
            length = 9 + buf[8]
            if len(buf) < length:
                return False
            self._take(buf, out, length, True)
            return True
        if kind == _SET_DESKTOP_SIZE:
            if len(buf) < 8:
                return False
            length = 8 + 16 * buf[6]
            if len(buf) < length:
                return False
            self._take(buf, out, length, False)
            return True
        if kind == _QEMU:
            if len(buf) < 2:
                return False
            if buf[1] != 0:
                raise RfbViolation(f"QEMU client message subtype {buf[1]} cannot be followed")
            if len(buf) < 12:
                return False
            self._take(buf, out, 12, False)
            return True
        raise RfbViolation(f"client message type {kind} cannot be followed")

    def _take(self, buf: bytearray, out: bytearray, length: int, passes: bool) -> None:
        if passes:
            out += buf[:length]
        else:
            self.dropped += 1
        del buf[:length]

    def _drop_streaming(self, buf: bytearray, length: int) -> None:
        """Drop a message that may be long without waiting for (or keeping) all of it."""
        self.dropped += 1
        here = min(length, len(buf))
        del buf[:here]
        self._discard = length - here
