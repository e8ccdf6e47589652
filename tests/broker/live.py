"""The embedded broker running for real in a child process (``tests/broker/run_broker.py``), for the
tests that talk to it over sockets (stomp.py, raw clients, the attack suite), and a raw client."""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from vmcloud.stomp.codec import Decoder, ProtocolError, encode
from vmcloud.stomp.frame import Frame

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Waits on a raw socket.
IO_TIMEOUT = 10.0


class BrokerProcess:
    """``run_broker`` with ``args``, listening on a free port of 127.0.0.1 once constructed."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.broker.run_broker", *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        info = self._line(30, "the broker did not start within 30 s")
        self.port: int = info["port"]
        self.credentials: dict[str, list[str]] = info["credentials"]

    def _line(self, timeout: float, failure: str) -> Any:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            self.stop()
            raise RuntimeError(failure)
        line = self.process.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError("the broker exited")
        return json.loads(line)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stats(self) -> dict[str, int]:
        """The broker's counts (:class:`~vmcloud.broker.realm.BrokerStats`), and what the process
        holds after a full collection: ``blocks`` (Python's allocated blocks) and ``rss``."""
        assert self.process.stdin is not None
        self.process.stdin.write(b"stats\n")
        self.process.stdin.flush()
        stats: dict[str, int] = self._line(30, "the broker did not answer stats within 30 s")
        return stats

    def stop(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


class Raw:
    """One raw TCP connection to the broker; what it sends and what comes back, as frames."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = Decoder()
        self.frames: list[Frame] = []
        self.closed = False  # the broker closed (or reset) the connection

    def send(self, data: bytes, cuts: Sequence[int] = ()) -> bool:
        """Write ``data`` in pieces cut at ``cuts``; False once the broker has closed."""
        start = 0
        for cut in [*sorted(c for c in cuts if 0 < c < len(data)), len(data)]:
            try:
                self.sock.sendall(data[start:cut])
            except (BrokenPipeError, ConnectionResetError):
                self.closed = True
                return False
            start = cut
        return True

    def _read(self, timeout: float) -> bool:
        """Read once (waiting up to ``timeout``); False if nothing came."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return False
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return True
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as e:
            raise AssertionError(f"the broker sent bytes our decoder refuses: {e.message}") from None
        for frame in frames:
            if frame.command == "CONNECTED":
                self.decoder.version = frame.headers.get("version", "1.0")
            if frame.command == "ERROR":
                assert b"Traceback" not in frame.body and "Traceback" not in frame.headers.get("message", "")
        self.frames.extend(frames)
        return True

    def until_closed(self, timeout: float = IO_TIMEOUT) -> list[Frame]:
        """Every frame until the broker closes the connection (which it must within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the broker did not close the connection; got {self.frames}")
            self._read(left)
        return self.frames

    def settle(self, quiet: float = 0.05) -> None:
        """Read until the broker closes, or says nothing for ``quiet`` seconds; after an ERROR,
        it must close."""
        while not self.closed and self._read(quiet):
            pass
        if any(f.command == "ERROR" for f in self.frames):
            self.until_closed()

    def frame(self, command: str, timeout: float = IO_TIMEOUT) -> Frame:
        """The next ``command`` frame (failing on an ERROR, a close or a timeout)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for frame in self.frames[seen:]:
                if frame.command == command:
                    self.frames.remove(frame)
                    return frame
                if frame.command == "ERROR":
                    raise AssertionError(f"ERROR instead of {command}: {frame}")
            seen = len(self.frames)
            left = deadline - time.monotonic()
            if self.closed or left <= 0:
                raise AssertionError(f"no {command}; got {self.frames} (closed: {self.closed})")
            self._read(left)

    def error(self) -> Frame:
        """The ERROR the broker sent, having closed the connection."""
        errors = [f for f in self.until_closed() if f.command == "ERROR"]
        assert len(errors) == 1, self.frames
        return errors[0]

    def close(self, reset: bool = False) -> None:
        if reset:  # RST instead of FIN, as a crashed or hostile peer leaves
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def connect_frame(
    login: str | None, passcode: str | None, heart_beat: str = "0,0", version: str = "1.2"
) -> bytes:
    headers = {"accept-version": version, "host": "fuzz", "heart-beat": heart_beat}
    if login is not None:
        headers["login"] = login
    if passcode is not None:
        headers["passcode"] = passcode
    return encode(Frame("CONNECT", headers))


def raw_frame(
    command: str,
    headers: Sequence[tuple[str, str]],
    body: bytes = b"",
    *,
    eol: bytes = b"\n",
    escape: bool = True,
    content_length: str | None = None,
    trailer: bytes = b"\x00",
) -> bytes:
    """Frame bytes as a (possibly broken) peer writes them: any command, any header, escaped or not."""

    def text(value: str) -> bytes:
        if escape:
            value = value.replace("\\", "\\\\").replace("\n", "\\n").replace(":", "\\c").replace("\r", "\\r")
        return value.encode("utf-8", "surrogatepass")

    lines = [command.encode("utf-8", "surrogatepass")]
    lines += [text(name) + b":" + text(value) for name, value in headers]
    if content_length is not None:
        lines.append(b"content-length:" + content_length.encode())
    return eol.join(lines) + eol + eol + body + trailer
