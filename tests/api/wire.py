"""The API's whole HTTP server (ApiSite, its channel, the Klein app) on an in-memory connection.

StubTreq builds a plain ``Site`` and speaks through a well-behaved client, so it can neither send
what a hostile client sends (a 20 KB request line, a header with no colon, a broken chunked body)
nor see what the API's own channel answers.  Here raw request bytes go into an ``ApiChannel`` over
a ``StringTransport`` and the raw answer bytes are parsed back, with a minimal HTTP/1.1 response
parser (Content-Length, chunked, or no body).
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import IResource

from vmcloud.api.site import ApiSite

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


@attrs.frozen
class RawAnswer:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


@attrs.frozen
class Exchange:
    """What came back on one connection: the answers in order, and whether the server closed it."""

    answers: list[RawAnswer]
    closed: bool
    leftover: bytes  # bytes after the last complete answer (should be none)

    @property
    def only(self) -> RawAnswer:
        assert len(self.answers) == 1 and not self.leftover, self
        return self.answers[0]


class Wire:
    """Connections to an ApiSite over ``resource``, on ``clock``."""

    def __init__(self, resource: IResource, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.site = ApiSite(resource, reactor=self.clock, logPath=None)
        self.site.log = lambda request: None  # type: ignore[method-assign]  # no access log in tests

    def exchange(
        self, raw: bytes, *, methods: tuple[bytes, ...] | None = None, step: int = 0, settle: float = 0
    ) -> Exchange:
        """Send ``raw`` on a new connection (all at once, or ``step`` bytes at a time).

        ``methods`` are the methods of the requests in ``raw``, in order (a HEAD answer has no body);
        by default they are read from ``raw``'s request lines.  The clock then moves ``settle``
        seconds (for answers that wait, like a long poll).  A static file's body streams through
        the global reactor's cooperator, which never runs here: serve no files through this.
        """
        channel = self.site.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        channel.makeConnection(transport)
        if step:
            for i in range(0, len(raw), step):
                channel.dataReceived(raw[i : i + step])
        else:
            channel.dataReceived(raw)
        self.clock.advance(0)
        if settle:
            self.clock.advance(settle)
        if methods is None:
            methods = tuple(line.split(b" ", 1)[0] for line in _request_lines(raw))
        answers, leftover = parse_answers(transport.value(), methods)
        closed = transport.disconnecting
        if not closed:
            channel.connectionLost(Failure(ConnectionDone()))
        return Exchange(answers, closed, leftover)


def _request_lines(raw: bytes) -> list[bytes]:
    """The request lines of (possibly pipelined) requests, best effort: for HEAD detection only."""
    return [line for line in raw.split(b"\r\n") if line.endswith((b" HTTP/1.1", b" HTTP/1.0"))]


def parse_answers(data: bytes, methods: tuple[bytes, ...]) -> tuple[list[RawAnswer], bytes]:
    """Complete HTTP/1.1 responses in ``data`` (interim 1xx skipped), and the bytes after the last."""
    answers: list[RawAnswer] = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        head, rest = data[:end].decode("latin-1").split("\r\n"), data[end + 4 :]
        status = int(head[0].split(" ")[1])
        headers: dict[str, list[str]] = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        if status < 200:  # an interim answer ("100 Continue"): the real one follows
            data = rest
            continue
        method = methods[len(answers)] if len(answers) < len(methods) else b"GET"
        if method == b"HEAD" or status in (204, 304):
            body = b""
        elif "content-length" in headers:
            length = int(headers["content-length"][-1])
            if len(rest) < length:
                break
            body, rest = rest[:length], rest[length:]
        elif headers.get("transfer-encoding", [""])[-1].lower() == "chunked":
            parsed = _dechunk(rest)
            if parsed is None:
                break
            body, rest = parsed
        else:
            body, rest = rest, b""
        answers.append(RawAnswer(status, headers, body))
        data = rest
    return answers, data


def _dechunk(data: bytes) -> tuple[bytes, bytes] | None:
    body = b""
    while True:
        end = data.find(b"\r\n")
        if end < 0:
            return None
        size = int(data[:end].split(b";")[0], 16)
        data = data[end + 2 :]
        if size == 0:
            if not data.startswith(b"\r\n"):
                return None
            return body, data[2:]
        if len(data) < size + 2:
            return None
        body, data = body + data[:size], data[size + 2 :]
