"""The view-only filter follows RFB exactly: input removed, everything a viewer needs kept."""

from __future__ import annotations

import struct

import pytest

from tests.console.support import vnc_auth_response  # written apart from the code under test
from vmcloud.console.rfb import (
    EXTENDED_MOUSE_BUTTONS,
    OPERATOR_VERSION,
    OperatorOpening,
    RfbError,
    RfbViolation,
    ViewOnlyFilter,
    VncLogin,
)

SERVER_HELLO = b"RFB 003.008\n" + bytes([2, 2, 19])  # offers VncAuth and VeNCrypt
CLIENT_HANDSHAKE = b"RFB 003.008\n" + bytes([2]) + b"R" * 16 + bytes([1])

SET_PIXEL_FORMAT = bytes([0, 0, 0, 0]) + bytes(range(16))
SET_ENCODINGS = struct.pack("!BxH3i", 2, 3, 7, EXTENDED_MOUSE_BUTTONS, -223)
SET_ENCODINGS_KEPT = struct.pack("!BxH2i", 2, 2, 7, -223)
UPDATE_REQUEST = struct.pack("!BBHHHH", 3, 1, 0, 0, 1280, 800)
KEY_DOWN = struct.pack("!BBxxI", 4, 1, 0x61)
POINTER = struct.pack("!BBHH", 5, 1, 10, 20)
CUT_TEXT = struct.pack("!Bxxxi", 6, 5) + b"hello"
EXTENDED_CLIPBOARD = struct.pack("!Bxxxi", 6, -8) + b"\x01\x00\x00\x00abcd"
FENCE = struct.pack("!BxxxIB", 248, 0x80000000, 3) + b"abc"
CONTINUOUS = struct.pack("!BBHHHH", 150, 1, 0, 0, 100, 100)
XVP = bytes([250, 0, 1, 4])
DESKTOP_SIZE = struct.pack("!BxHHBx", 251, 800, 600, 1) + bytes(16)
QEMU_KEY = struct.pack("!BBHII", 255, 0, 1, 0x61, 30)

INPUT = [KEY_DOWN, POINTER, CUT_TEXT, EXTENDED_CLIPBOARD, XVP, DESKTOP_SIZE, QEMU_KEY]


def _ready() -> ViewOnlyFilter:
    f = ViewOnlyFilter()
    assert f.from_server(SERVER_HELLO) == b"RFB 003.008\n"  # the list waits for the viewer's version
    assert f.from_client(CLIENT_HANDSHAKE[:12]) == CLIENT_HANDSHAKE[:12]
    assert f.from_server(b"") == bytes([1, 2])
    assert f.from_client(CLIENT_HANDSHAKE[12:]) == CLIENT_HANDSHAKE[12:]
    assert f.server_done
    return f


def _byte_by_byte(f: ViewOnlyFilter, data: bytes) -> bytes:
    return b"".join(f.from_client(data[i : i + 1]) for i in range(len(data)))


SESSION = (
    SET_PIXEL_FORMAT
    + SET_ENCODINGS
    + UPDATE_REQUEST
    + KEY_DOWN
    + FENCE
    + POINTER
    + CUT_TEXT
    + UPDATE_REQUEST
    + EXTENDED_CLIPBOARD
    + CONTINUOUS
    + XVP
    + DESKTOP_SIZE
    + QEMU_KEY
    + UPDATE_REQUEST
)
EXPECTED = (
    SET_PIXEL_FORMAT
    + SET_ENCODINGS_KEPT
    + UPDATE_REQUEST
    + FENCE
    + UPDATE_REQUEST
    + CONTINUOUS
    + UPDATE_REQUEST
)


def test_input_dropped_all_at_once() -> None:
    f = _ready()
    assert f.from_client(SESSION) == EXPECTED
    assert f.dropped == 7


def test_input_dropped_byte_by_byte() -> None:
    f = _ready()
    assert _byte_by_byte(f, SESSION) == EXPECTED
    assert f.dropped == 7


@pytest.mark.parametrize("message", INPUT)
def test_each_input_message_alone(message: bytes) -> None:
    f = _ready()
    assert f.from_client(message + UPDATE_REQUEST) == UPDATE_REQUEST


def test_long_cut_text_is_not_kept_while_dropped() -> None:
    f = _ready()
    text = b"x" * 1_000_000
    head = struct.pack("!Bxxxi", 6, len(text))
    assert f.from_client(head + text[:10]) == b""
    assert f.from_client(text[10:500_000]) == b""
    assert len(f._client) == 0  # nothing of it is buffered
    assert f.from_client(text[500_000:] + UPDATE_REQUEST) == UPDATE_REQUEST


def test_handshake_byte_by_byte() -> None:
    f = ViewOnlyFilter()
    server = b"".join(f.from_server(SERVER_HELLO[i : i + 1]) for i in range(len(SERVER_HELLO)))
    # the security list cannot be rewritten before the viewer said its version
    client = _byte_by_byte(f, CLIENT_HANDSHAKE[:12])
    server += f.from_server(b"")
    client += _byte_by_byte(f, CLIENT_HANDSHAKE[12:])
    assert server == b"RFB 003.008\n" + bytes([1, 2])
    assert client == CLIENT_HANDSHAKE
    assert f.from_server(b"\x00\x00\x00\x00rest") == b"\x00\x00\x00\x00rest"  # passes untouched now


def test_rfb_33_server_chooses() -> None:
    f = ViewOnlyFilter()
    assert f.from_server(b"RFB 003.008\n") == b"RFB 003.008\n"
    assert f.from_client(b"RFB 003.003\n") == b"RFB 003.003\n"
    assert f.from_client(b"R" * 4) == b""  # held: the server has not chosen yet
    assert f.from_server(struct.pack("!I", 2) + b"C" * 16) == struct.pack("!I", 2) + b"C" * 16
    assert (
        f.from_client(b"R" * 12 + b"\x01" + KEY_DOWN + UPDATE_REQUEST) == b"R" * 16 + b"\x01" + UPDATE_REQUEST
    )


def test_security_none() -> None:
    f = ViewOnlyFilter()
    f.from_server(b"RFB 003.008\n\x01\x01")
    assert (
        f.from_client(b"RFB 003.008\n\x01\x01" + POINTER + UPDATE_REQUEST)
        == b"RFB 003.008\n\x01\x01" + UPDATE_REQUEST
    )


def test_server_failure_passes() -> None:
    f = ViewOnlyFilter()
    f.from_server(b"RFB 003.008\n")
    f.from_client(b"RFB 003.008\n")
    failure = b"\x00" + struct.pack("!I", 6) + b"denied"
    assert f.from_server(failure) == failure


@pytest.mark.parametrize(
    ("server", "client"),
    [
        (b"RFB 003.008\n\x01\x13", b"RFB 003.008\n"),  # only VeNCrypt offered
        (b"RFB 003.008\n\x02\x01\x02", b"RFB 003.008\n\x13"),  # the viewer picks a type not offered
        (b"RFB 003.008\n", b"HTTP/1.1 200\n"),  # not RFB
        (b"RFB 003.008\n\x01\x02", b"RFB 003.008\n\x02" + bytes(16) + b"\x01" + bytes([77])),  # unknown type
        (b"RFB 003.008\n\x01\x02", b"RFB 003.008\n\x02" + bytes(16) + b"\x01\xff\x01"),  # QEMU audio
    ],
)
def test_unfollowable_streams_are_refused(server: bytes, client: bytes) -> None:
    f = ViewOnlyFilter()
    with pytest.raises(RfbViolation):
        f.from_server(server)
        f.from_client(client)
        f.from_server(b"")


# ---------------------------------------------------------------------- the operator's opening

CHALLENGE = bytes(range(16, 32))
LOGIN = b"RFB 003.008\n" + b"\x01\x02" + CHALLENGE + struct.pack("!I", 0)


@pytest.mark.parametrize(
    ("version", "greeting"),
    [
        (b"RFB 003.008\n", b"\x01\x01" + b"\0\0\0\0"),  # None offered, then SecurityResult OK
        (b"RFB 003.007\n", b"\x01\x01"),  # 3.7: no SecurityResult for None
        (b"RFB 003.003\n", struct.pack("!I", 1)),  # 3.3: the server chooses None
    ],
)
def test_operator_opening_for_each_viewer_version(version: bytes, greeting: bytes) -> None:
    opening = OperatorOpening("op-view1")
    to_vm, to_viewer = opening.from_vm(LOGIN)
    assert to_vm == b"RFB 003.008\n\x02" + vnc_auth_response("op-view1", CHALLENGE)
    assert to_viewer == OPERATOR_VERSION
    choice = b"" if version == b"RFB 003.003\n" else b"\x01"
    heard = [opening.from_viewer(bytes([b])) for b in version + choice + b"\x00" + b"\x03"]
    assert b"".join(viewer for _, viewer in heard) == greeting
    assert b"".join(vm for vm, _ in heard) == b"\x01"  # ClientInit, shared
    assert opening.done and opening.rest() == b"\x03"  # the next message's first byte, for the filter


def test_operator_opening_refusals() -> None:
    refused = OperatorOpening("op-view1")
    with pytest.raises(RfbError, match="refused the password: no"):
        refused.from_vm(b"RFB 003.008\n\x01\x02" + CHALLENGE + struct.pack("!II", 1, 2) + b"no")
    chatty = OperatorOpening("op-view1")
    with pytest.raises(RfbViolation, match="too much"):
        chatty.from_viewer(b"x" * 2000)  # before the login is over nothing is read, but kept bounded
    bad_version = OperatorOpening("op-view1")
    bad_version.from_vm(LOGIN)
    with pytest.raises(RfbViolation, match="not an RFB version"):
        bad_version.from_viewer(b"GET / HTTP/1.1\r\n")


def test_vnc_login_with_security_none_and_leftover() -> None:
    login = VncLogin(None)
    assert login.feed(b"RFB 003.007\n\x01\x01") == b"RFB 003.007\n\x01"
    assert login.done and login.rest() == b""


def test_a_filter_past_the_opening_starts_at_the_messages() -> None:
    follower = ViewOnlyFilter.past_opening()
    key = struct.pack("!BBxxI", 4, 1, 0x61)
    update = struct.pack("!BBHHHH", 3, 1, 0, 0, 8, 6)
    assert follower.server_done
    assert follower.from_client(key + update) == update
