"""The API's HTTP server: Twisted's ``Site`` with request limits, refusing in the API's JSON shape.

Twisted's HTTP/1.1 server refuses some requests on its own, before any resource sees them: a
malformed request line or header, a broken chunked body, or a form body it cannot parse gets a
bare ``400 Bad Request`` with no body, and a request line or header line over 16 KiB gets no
answer at all (the connection is dropped).  The SPEC promises the JSON error shape for every
answer, so :class:`ApiChannel` answers these itself, with the status that says what is wrong:

* 400 ``bad-request``: not an HTTP/1.x request (request line, a header, the body's framing);
* 413 ``body-too-large``: a body over :data:`MAX_BODY_BYTES` (told by Content-Length: refused
  before it is read; chunked: as soon as it is over);
* 414 ``uri-too-long``: a request line over :data:`MAX_REQUEST_LINE` bytes;
* 431 ``headers-too-large``: header lines over :data:`MAX_HEADER_BYTES` in all, one over
  :data:`MAX_REQUEST_LINE`, or more than :data:`MAX_HEADER_LINES` of them;

and :class:`ApiSite` never parses form bodies (``multipart/form-data``, urlencoded): no route
takes a form, and Twisted answered a malformed one with its bare 400.  A body is whatever the
route reads, whatever its Content-Type.

After a refusal the rest of what the client sends is read and dropped, with the write side shut,
for up to :data:`LINGER_SECONDS`: closing at once while the client is still sending (an 8 MB path,
measured) fails the client's send with EPIPE or a reset, which clients report instead of the answer.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.internet.interfaces import ISSLTransport, ITCPTransport
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from vmcloud.api.errors import error_body
from vmcloud.api.inputs import MAX_BODY_BYTES

log = Logger(namespace="vmcloud.api")

#: The request line (method, path and query, version) and any single header line.
MAX_REQUEST_LINE = 16 * 1024
#: All header lines of a request together (Twisted's own limit counted the request line in).
MAX_HEADER_BYTES = 16 * 1024
#: Header lines of a request (a real client sends about ten).
MAX_HEADER_LINES = 100
#: How long a refused connection may keep sending before it is closed.
LINGER_SECONDS = 5.0

_REASONS = {
    400: b"Bad Request",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


class ApiRequest(Request):
    """A request whose body is counted as it arrives and kept in memory (it is small or refused)."""

    _body_bytes = 0

    def gotLength(self, length: int | None) -> None:  # noqa: N802 - Twisted's name
        # Twisted spools a body of unknown length (chunked) to a temporary file; ours are capped.
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self._body_bytes += len(data)
        if self._body_bytes > MAX_BODY_BYTES:
            channel = self.channel
            if isinstance(channel, ApiChannel):
                channel.refuse(
                    413, "body-too-large", f"the request body is larger than {MAX_BODY_BYTES} bytes"
                )
            return
        super().handleContentChunk(data)


class ApiChannel(HTTPChannel):
    """Twisted's HTTP/1.1 channel, answering what it would refuse bare (or not at all) in JSON.

    It counts the head of each request itself (lines, header bytes) to tell a too-long request
    line (414) from too many or too large headers (431); Twisted's own limits are set just behind
    these, so they never fire first.
    """

    MAX_LENGTH = MAX_REQUEST_LINE  # LineReceiver's limit: the request line and each header line
    maxHeaders = MAX_HEADER_LINES
    totalHeadersSize = MAX_REQUEST_LINE + MAX_HEADER_BYTES

    _refused = False
    _head_lines = 0  # lines of the current request's head so far (the request line is the first)
    _header_bytes = 0
    _method = b""  # of the request being read: the answer to a HEAD has no body

    def refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` in the JSON error shape, then read and drop the rest and close."""
        transport = self.transport
        if self._refused or transport is None:
            return
        self._refused = True
        log.info(
            "HTTP request from {peer} refused: {status} {code}: {message}",
            peer=str(transport.getPeer()),
            status=status,
            code=code,
            message=message,
            event="api-refused",
        )
        body = error_body(code, message)
        head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error"))
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        head += b"Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        transport.write(head if self._method == b"HEAD" else head + body)
        if ITCPTransport.providedBy(transport) and not ISSLTransport.providedBy(transport):
            transport.loseWriteConnection()
            self.setTimeout(LINGER_SECONDS)  # then timeoutConnection closes it
        else:
            self.loseConnection()

    # ---------------------------------------------------------------- Twisted's hooks

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if not self._refused:
            super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if not self._refused:
            super().rawDataReceived(data)

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 - Twisted's name
        if self._refused:
            return
        if self._head_lines == 0 and not line:
            super().lineReceived(line)  # the empty line some clients send between requests
            return
        self._head_lines += 1
        if self._head_lines == 1:
            self._method = line.split(b" ", 1)[0]
        elif line:
            self._header_bytes += len(line)
            if self._header_bytes > MAX_HEADER_BYTES or self._head_lines - 1 > MAX_HEADER_LINES:
                self.refuse(
                    431,
                    "headers-too-large",
                    f"at most {MAX_HEADER_LINES} header lines of {MAX_HEADER_BYTES} bytes in all",
                )
                return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802 - Twisted's name
        if self._head_lines == 0:
            self._method = line.split(b" ", 1)[0]  # the start of the request line that was too long
            self.refuse(414, "uri-too-long", f"the request line is longer than {MAX_REQUEST_LINE} bytes")
        else:
            self.refuse(431, "headers-too-large", f"a header line is longer than {MAX_REQUEST_LINE} bytes")

    def allHeadersReceived(self) -> None:  # noqa: N802 - Twisted's name
        if self.length is not None and self.length > MAX_BODY_BYTES:
            # Before Twisted reads it (or says "100 Continue" to a client waiting to send it).
            self.refuse(413, "body-too-large", f"the request body is larger than {MAX_BODY_BYTES} bytes")
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:  # noqa: N802 - Twisted's name
        if self._refused:
            return
        self._head_lines = 0
        self._header_bytes = 0
        self._method = b""
        super().allContentReceived()

    def _respondToBadRequestAndDisconnect(self) -> None:  # noqa: N802 - Twisted's name
        # Twisted's one way out for every malformed request (request line, header, Content-Length
        # or Transfer-Encoding, chunked body); tests/api/test_hostile.py sends each of them.
        self.refuse(400, "bad-request", "malformed HTTP request (request line, a header or the body framing)")


class ApiSite(Site):
    """The API's ``Site``: :class:`ApiChannel` connections, :class:`ApiRequest` requests, no forms.

    Plain HTTP/1.1 (Twisted would offer HTTP/2 only over TLS, and only with ``h2`` installed).
    Takes ``Site``'s arguments.
    """

    protocol = ApiChannel  # type: ignore[assignment]
    requestFactory = ApiRequest

    def __init__(self, resource: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, *args, **kwargs)
