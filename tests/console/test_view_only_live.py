"""The operator's view-only VNC password against a real Xvnc, written as the guest agent writes it.

The password file is the one :class:`guest_agent.stack.BrowserStack` writes (its own
``set_vnc_password``, with its own view-only password), and Xvnc reads it as a VM's does:

* the view-only password logs in, sees the screen, and Xvnc ignores its keys and pointer (an X
  client, ``xev``, hears the session's keys and not the view-only login's; the pointer stays);
* the session password still logs in with full access, and dies when CLEANUP revokes it, while
  the view-only password lives on (the monitor keeps a FREE VM's screen);
* the controller's own capture (``screen.png``'s :class:`~vmcloud.console.screen.ScreenGrab`)
  logs in with the view-only password.

Real processes, blocking sockets with timeouts: Xvnc and xev run on their own.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import time

import pytest
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from guest_agent.stack import BrowserStack, StackPrograms
from tests.console.support import XDOTOOL, XVNC, vnc_auth_response
from tests.integration.conftest import free_port
from vmcloud.console.screen import ScreenGrab

XEV = shutil.which("xev")
STDBUF = shutil.which("stdbuf")
pytestmark = pytest.mark.skipif(
    XVNC is None or XDOTOOL is None or XEV is None or STDBUF is None, reason="needs Xvnc, xdotool, xev"
)
SESSION = "session1"


class Refused(Exception):
    """The VNC server refused the login."""


def _read(s: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = s.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def login(port: int, password: str) -> socket.socket:
    """A direct RFB 3.8 VncAuth login (no relay), ClientInit shared, ServerInit read."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        assert _read(s, 12).startswith(b"RFB 003.")
        s.sendall(b"RFB 003.008\n")
        assert 2 in _read(s, _read(s, 1)[0])
        s.sendall(b"\x02")
        s.sendall(vnc_auth_response(password, _read(s, 16)))
        if struct.unpack("!I", _read(s, 4))[0] != 0:
            raise Refused(_read(s, struct.unpack("!I", _read(s, 4))[0]).decode())
        s.sendall(b"\x01")
        _read(s, 20)
        _read(s, struct.unpack("!I", _read(s, 4))[0])
    except BaseException:
        s.close()
        raise
    return s


def round_trip(s: socket.socket) -> None:
    """Ask a small update and read its answer: whatever was sent before has been taken in."""
    s.sendall(struct.pack("!BxHi", 2, 1, 0))  # Raw only
    s.sendall(struct.pack("!BBHHHH", 3, 0, 0, 0, 1, 1))
    kind, rects = struct.unpack("!BxH", _read(s, 4))
    assert kind == 0
    for _ in range(rects):
        _, _, w, h, encoding = struct.unpack("!HHHHi", _read(s, 12))
        assert encoding == 0
        _read(s, w * h * 4)  # the server's default pixel format: 32 bits


def key(code: int) -> bytes:
    return struct.pack("!BBxxI", 4, 1, code) + struct.pack("!BBxxI", 4, 0, code)


class ViewOnlyPasswordLiveTests(SynchronousTestCase):
    def setUp(self) -> None:
        programs = StackPrograms(str(XVNC), "/bin/false", None, None, None)
        self.port = free_port()
        self.stack = BrowserStack(Clock(), programs, vnc_host="127.0.0.1", vnc_port=self.port)
        self.stack.run_dir = tempfile.mkdtemp(prefix="vmcloud-view-test-")
        self.addCleanup(shutil.rmtree, self.stack.run_dir, True)
        self.stack.set_vnc_password(SESSION)
        password_file = os.path.join(self.stack.run_dir, "vnc-passwd")
        self.xvnc = subprocess.Popen(
            [str(XVNC), "-displayfd", "1", "-rfbport", str(self.port), "-interface", "127.0.0.1",
             "-SecurityTypes", "VncAuth", "-PasswordFile", password_file, "-UseBlacklist=0",
             "-AlwaysShared", "-geometry", "320x200", "-depth", "24", "-wr", "-nolisten", "tcp"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.addCleanup(self._stop, self.xvnc)
        assert self.xvnc.stdout is not None
        self.display = int(self.xvnc.stdout.readline())
        self.env = {"DISPLAY": f":{self.display}", "PATH": "/usr/bin:/bin"}
        self.sockets: list[socket.socket] = []

    def _stop(self, process: subprocess.Popen[bytes]) -> None:
        for s in self.sockets:
            s.close()
        process.terminate()
        process.wait(10)

    def login(self, password: str) -> socket.socket:
        s = login(self.port, password)
        self.sockets.append(s)
        return s

    def pointer(self) -> tuple[int, int]:
        out = subprocess.run(
            [str(XDOTOOL), "getmouselocation"], env=self.env, capture_output=True, check=True, timeout=10
        ).stdout.decode()
        fields = dict(part.split(":") for part in out.split())
        return int(fields["x"]), int(fields["y"])

    def xev(self) -> subprocess.Popen[bytes]:
        """``xev`` on the root window, reporting key events (X sends them to the root: no window),
        line-buffered (``stdbuf``) so each event can be read as it comes."""
        xev = subprocess.Popen(
            [str(STDBUF), "-oL", str(XEV), "-root", "-event", "keyboard"],
            env=self.env,
            stdout=subprocess.PIPE,
        )
        self.addCleanup(lambda: (xev.kill(), xev.wait(10)))
        self.xev_output = b""
        return xev

    def next_key(self, xev: subprocess.Popen[bytes], timeout: float = 2.0) -> str | None:
        """The keysym name of the next key press ``xev`` reports, or None within ``timeout``."""
        assert xev.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            event, found, rest = self.xev_output.partition(b"\n\n")  # xev ends each event with a blank line
            if found:
                self.xev_output = rest
                if event.lstrip().startswith(b"KeyPress") and b"keysym 0x" in event:
                    return event.split(b"keysym 0x", 1)[1].split(b", ", 1)[1].split(b")", 1)[0].decode()
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([xev.stdout], [], [], left)[0]:
                return None
            self.xev_output += os.read(xev.stdout.fileno(), 65536)

    def test_the_view_only_login_watches_and_xvnc_ignores_its_input(self) -> None:
        view = self.stack.view_password
        assert view != SESSION and len(view) == 8
        watcher = self.login(view)
        worker = self.login(SESSION)
        xev = self.xev()
        for _ in range(20):  # xev listens once it hears the worker's keys
            worker.sendall(key(ord("b")))
            if self.next_key(xev, 0.5) == "b":
                break
        else:
            raise AssertionError("xev never heard the worker's key")
        while self.next_key(xev, 0.3) is not None:
            pass  # the other b's
        before = self.pointer()
        watcher.sendall(key(ord("a")) + struct.pack("!BBHH", 5, 0, 101, 57))
        round_trip(watcher)
        worker.sendall(key(ord("c")))
        assert self.next_key(xev) == "c"  # not "a": the view-only login's key never reached X
        assert self.pointer() == before
        worker.sendall(struct.pack("!BBHH", 5, 0, 101, 57))
        round_trip(worker)
        assert self.pointer() == (101, 57)

    def test_the_session_password_dies_at_cleanup_and_the_view_password_lives_on(self) -> None:
        view = self.stack.view_password
        self.login(SESSION).close()
        self.stack.set_vnc_password(None)  # what CLEANUP does
        with pytest.raises(Refused):
            self.login(SESSION)
        with pytest.raises(Refused):
            self.login("")  # the revoked file's first password is not the empty one anyone knows
        self.login(view).close()
        self.stack.set_vnc_password("session2")  # the next worker's PREPARE
        self.login("session2").close()
        with pytest.raises(Refused):
            self.login(SESSION)
        self.login(view).close()

    def test_the_controllers_capture_logs_in_with_the_view_password(self) -> None:
        self.stack.set_vnc_password(None)  # a FREE VM
        grab = ScreenGrab(self.stack.view_password)
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.sockets.append(s)
        while grab.frame is None:
            s.sendall(grab.feed(s.recv(65536)))
        assert (grab.frame.width, grab.frame.height) == (320, 200)
        assert grab.frame.pixels[:3] == b"\xff\xff\xff"  # the white root window (-wr)
