"""The sans-IO RFB parts of the console: the view-only filter, and the controller's own logins.

* :class:`ViewOnlyFilter` follows a viewer's stream and removes its input (below);
* :class:`VncLogin` is the client half of an RFB opening, up to the SecurityResult: the controller
  logging in to a VM's VNC server itself, with the operator's view-only password (or the session's),
  for the monitor's stills (:mod:`vmcloud.console.screen`) and the operator's console;
* :class:`OperatorOpening` is both halves of the operator's console: the relay logs in to the VM
  with :class:`VncLogin`, then opens RFB 3.8 to the operator's browser with security type None, so
  no password ever reaches the operator's page, and the browser's stream goes through a
  :class:`ViewOnlyFilter` from its first message on.

What a view-only console viewer may say to a VNC server: RFB client messages, input removed.

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

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

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


class RfbError(Exception):
    """The VNC server said no (login refused, a failure reason) or spoke what we cannot follow."""


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

    @classmethod
    def past_opening(cls) -> ViewOnlyFilter:
        """A filter for a stream whose opening (version, security, ClientInit) someone else followed:
        the viewer's first byte is the first byte of a client message."""
        follower = cls()
        follower._client_step = "messages"
        follower.server_done = True
        return follower

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


# ---------------------------------------------------------------------- the controller's own logins


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """VncAuth (RFC 6143 7.2.2): the challenge encrypted with DES, keyed by the password's first
    8 bytes with each byte's bits reversed (the historical VNC quirk)."""
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in password.encode("utf-8")[:8].ljust(8, b"\0"))
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


def take(buffer: bytearray, count: int) -> bytes | None:
    """The first ``count`` bytes of ``buffer``, taken off it; None (nothing taken) while fewer are there."""
    if len(buffer) < count:
        return None
    taken = bytes(buffer[:count])
    del buffer[:count]
    return taken


class VncLogin:
    """The client half of an RFB opening, up to a SecurityResult that says OK.

    Call :meth:`feed` with what the server sent and send what it returns, until :attr:`done`;
    :meth:`rest` then gives what the server sent past the SecurityResult.  Versions 3.3, 3.7 and
    3.8, security None and VncAuth (with ``password``; without one, None only).  Raises
    :class:`RfbError` saying why the server cannot be logged in to.  The ClientInit is the caller's.
    """

    def __init__(self, password: str | None) -> None:
        self._password = password
        self._buffer = bytearray()
        self._step = "version"
        self.version = 3.8
        self.done = False

    def rest(self) -> bytes:
        """The server's bytes past the SecurityResult (taken once)."""
        rest = bytes(self._buffer)
        self._buffer = bytearray()
        return rest

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = bytearray()
        while not self.done and self._advance(out):
            pass
        return bytes(out)

    def _need(self, count: int) -> bytes | None:
        return take(self._buffer, count)

    def _reason(self, what: str) -> bool:
        """A failure reason (u32 length, text) follows; raise it once it is all here."""
        if len(self._buffer) < 4:
            return False
        (length,) = struct.unpack_from("!I", self._buffer)
        if len(self._buffer) < 4 + min(length, 1024):
            return False
        text = bytes(self._buffer[4 : 4 + min(length, 1024)]).decode("utf-8", "replace")
        raise RfbError(f"{what}: {text}")

    def _advance(self, out: bytearray) -> bool:
        """Take one step of the opening; False when it waits for more bytes."""
        step = self._step
        if step == "version":
            got = self._need(12)
            if got is None:
                return False
            if not got.startswith(b"RFB ") or not got.endswith(b"\n"):
                raise RfbError(f"not a VNC server (it said {got!r})")
            try:
                major, minor = int(got[4:7]), int(got[8:11])
            except ValueError:
                raise RfbError(f"not a VNC server (it said {got!r})") from None
            self.version = 3.8 if (major, minor) >= (3, 8) else 3.7 if (major, minor) >= (3, 7) else 3.3
            out += {3.8: b"RFB 003.008\n", 3.7: b"RFB 003.007\n", 3.3: b"RFB 003.003\n"}[self.version]
            self._step = "security" if self.version >= 3.7 else "security-3.3"
            return True
        if step == "security":
            if not self._buffer:
                return False
            count = self._buffer[0]
            if count == 0:
                if len(self._buffer) < 5:
                    return False
                del self._buffer[:1]
                return self._reason("the VNC server refused the connection")
            offered = self._need(1 + count)
            if offered is None:
                return False
            chosen = self._choose(offered[1:])
            out.append(chosen)
            self._after_security(chosen)
            return True
        if step == "security-3.3":
            got = self._need(4)
            if got is None:
                return False
            (chosen,) = struct.unpack("!I", got)
            if chosen == 0:
                self._step = "failed"
                return True
            self._choose(bytes([chosen]) if chosen < 256 else b"")
            self._after_security(chosen)
            return True
        if step == "failed":
            return self._reason("the VNC server refused the connection")
        if step == "challenge":
            challenge = self._need(16)
            if challenge is None:
                return False
            out += vnc_auth_response(self._password or "", challenge)
            self._step = "result"
            return True
        if step == "result":
            got = self._need(4)
            if got is None:
                return False
            if struct.unpack("!I", got)[0] != 0:
                if self.version >= 3.8:
                    self._step = "refused"
                    return True
                raise RfbError("the VNC server refused the password")
            self.done = True
            return False
        if step == "refused":
            return self._reason("the VNC server refused the password")
        raise AssertionError(step)  # pragma: no cover

    def _choose(self, offered: bytes) -> int:
        if self._password is not None and SECURITY_VNC_AUTH in offered:
            return SECURITY_VNC_AUTH
        if SECURITY_NONE in offered:
            return SECURITY_NONE
        if SECURITY_VNC_AUTH in offered:
            raise RfbError("the VNC server wants a password and the controller has none for this VM now")
        raise RfbError(f"the VNC server offers only security types {list(offered)}")

    def _after_security(self, chosen: int) -> None:
        if chosen == SECURITY_VNC_AUTH:
            self._step = "challenge"
        elif self.version >= 3.8:
            self._step = "result"  # 3.8 answers a SecurityResult for None too
        else:
            self._buffer[:0] = b"\0\0\0\0"  # 3.3 and 3.7 do not: as if it said OK
            self._step = "result"


#: What the relay says to the operator's browser first: RFB 3.8 (noVNC answers 3.8).
OPERATOR_VERSION = b"RFB 003.008\n"
#: The most a viewer may send before its opening is over (a version, a choice, a ClientInit: 14).
MAX_OPENING = 1024


class OperatorOpening:
    """The operator's console opening: the relay logs in to the VM, then lets the browser in.

    1. :meth:`from_vm` follows the :class:`VncLogin` (the operator's password, never sent to the
       browser); until it is over the browser hears nothing.
    2. Then the browser is greeted as a VNC server would: ``RFB 003.008``, security type None only
       (3.3 and 3.7 viewers are followed too), a SecurityResult OK; its ClientInit goes on to the
       VM as *shared* whatever it said, so an operator watching never pushes a worker out.
    3. :attr:`done`: from then on the VM's bytes pass as they come and the browser's go through
       :meth:`ViewOnlyFilter.past_opening`; :meth:`rest` gives the browser's bytes past its ClientInit.

    Both feeding methods return ``(to_vm, to_viewer)``.  :class:`RfbError`: the VM refused the
    login; :class:`RfbViolation`: the browser did not speak an opening this relay follows.
    """

    def __init__(self, password: str) -> None:
        self._login = VncLogin(password)
        self._viewer = bytearray()
        self._step = "login"
        self._version: float | None = None
        self.done = False

    def rest(self) -> bytes:
        """The browser's bytes past its ClientInit (taken once): client messages, to be filtered."""
        rest = bytes(self._viewer)
        self._viewer = bytearray()
        return rest

    def from_vm(self, data: bytes) -> tuple[bytes, bytes]:
        if self._step != "login":
            # the VM speaks after the ClientInit only; anything earlier waits for the browser's turn
            raise RfbError("the VNC server spoke out of turn after the login")
        to_vm = self._login.feed(data)
        if not self._login.done:
            return to_vm, b""
        if self._login.rest():
            raise RfbError("the VNC server spoke out of turn after the login")
        self._step = "version"
        _, to_viewer = self.from_viewer(b"")
        return to_vm, OPERATOR_VERSION + to_viewer

    def from_viewer(self, data: bytes) -> tuple[bytes, bytes]:
        buf = self._viewer
        buf += data
        to_vm, to_viewer = bytearray(), bytearray()
        while not self.done and self._step != "login":
            if self._step == "version":
                if len(buf) < 12:
                    break
                self._version = _VERSIONS.get(bytes(buf[:12]))
                if self._version is None:
                    raise RfbViolation(f"not an RFB version the relay follows: {bytes(buf[:12])!r}")
                del buf[:12]
                if self._version >= 3.7:
                    to_viewer += bytes((1, SECURITY_NONE))
                    self._step = "security"
                else:
                    to_viewer += struct.pack("!I", SECURITY_NONE)
                    self._step = "init"
            elif self._step == "security":
                if not buf:
                    break
                if buf[0] != SECURITY_NONE:
                    raise RfbViolation(f"the viewer chose security type {buf[0]}; only None (1) is offered")
                del buf[:1]
                if self._version == 3.8:
                    to_viewer += struct.pack("!I", 0)  # SecurityResult: OK
                self._step = "init"
            else:  # ClientInit: shared, whatever the browser asked
                if not buf:
                    break
                del buf[:1]
                to_vm += b"\x01"
                self.done = True
        if not self.done and len(buf) > MAX_OPENING:
            raise RfbViolation("too much said before the console's opening was over")
        return bytes(to_vm), bytes(to_viewer)
