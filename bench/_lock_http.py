"""A minimal keep-alive HTTP/1.1 client for the lock benchmark, and a canned server to weigh it.

The client is a blocking socket with ``TCP_NODELAY``: one ``sendall`` per request, responses read
by Content-Length or chunked encoding.  No event loop, no header dictionary, no URL parsing: the
point is that the client adds as little as possible to the round trip it measures.

:func:`canned_server` runs, in another process, a server that answers every request with the same
bytes without parsing more than the end of the headers; a round trip to it is the client's and the
kernel's share of any figure (the floor below which no server can go).
"""

from __future__ import annotations

import multiprocessing
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager


class HttpError(Exception):
    """The server answered something this client cannot read (or closed the connection)."""


class KeepAlive:
    """One persistent connection to ``127.0.0.1:port``."""

    def __init__(self, port: int, *, token: str | None = None, timeout: float = 30.0) -> None:
        self._port = port
        self._timeout = timeout
        self._auth = f"Authorization: Bearer {token}\r\n".encode() if token else b""
        self._sock = self._connect()
        self._buf = bytearray()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self._port), timeout=self._timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def close(self) -> None:
        self._sock.close()

    def encode(self, method: str, path: str, *, json: bool = False) -> bytes:
        """The bytes of a bodiless request (build once, send many times with :meth:`send`)."""
        accept = b"Accept: application/json\r\n" if json else b""
        return (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n".encode()
            + self._auth
            + accept
            + b"\r\n"
        )

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        return self.send(self.encode(method, path))

    def send(self, raw: bytes) -> tuple[int, bytes]:
        """Send one encoded request and read its response: (status, body)."""
        self._sock.sendall(raw)
        return self._response()

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise HttpError("connection closed by the server")
        self._buf += chunk

    def _response(self) -> tuple[int, bytes]:
        buf = self._buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head = bytes(buf[:end]).lower()
        del buf[: end + 4]
        status = int(head[9:12])
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else None])
            while len(buf) < length:
                self._fill()
            body = bytes(buf[:length])
            del buf[:length]
            return status, body
        if b"\r\ntransfer-encoding: chunked" in head:
            return status, self._chunked()
        if status in (204, 304) or 100 <= status < 200:
            return status, b""
        raise HttpError(f"response without length: {head[:200]!r}")

    def _chunked(self) -> bytes:
        buf = self._buf
        parts: list[bytes] = []
        while True:
            while (end := buf.find(b"\r\n")) < 0:
                self._fill()
            size = int(bytes(buf[:end]).split(b";")[0], 16)
            del buf[: end + 2]
            while len(buf) < size + 2:
                self._fill()
            parts.append(bytes(buf[:size]))
            del buf[: size + 2]
            if size == 0:
                return b"".join(parts)


def _serve_canned(sock: socket.socket, answer: bytes) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
    while True:
        conn, _ = sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = b""
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                pending += data
                while (end := pending.find(b"\r\n\r\n")) >= 0:
                    pending = pending[end + 4 :]
                    conn.sendall(answer)


@contextmanager
def canned_server(body: bytes) -> Iterator[int]:
    """A server in another process answering every request with ``body``; yields its port."""
    answer = (
        b"HTTP/1.1 200 OK\r\nServer: canned\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nCache-Control: no-store\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    process = multiprocessing.get_context("fork").Process(
        target=_serve_canned, args=(sock, answer), daemon=True
    )
    process.start()
    try:
        yield int(sock.getsockname()[1])
    finally:
        process.terminate()
        process.join(5)
        sock.close()


def timed(client: KeepAlive, raw: bytes, count: int, expect: int = 200) -> tuple[list[float], float]:
    """``count`` round trips of ``raw``: their latencies in ms, and the client CPU per request in µs."""
    samples: list[float] = []
    cpu0 = time.thread_time()
    clock = time.perf_counter
    for _ in range(count):
        t0 = clock()
        status, _body = client.send(raw)
        samples.append((clock() - t0) * 1000.0)
        if status != expect:
            raise HttpError(f"expected {expect}, got {status}: {_body[:200]!r}")
    cpu = (time.thread_time() - cpu0) / count * 1e6
    return samples, cpu
