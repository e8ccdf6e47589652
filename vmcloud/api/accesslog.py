"""An access log that does not spread capabilities: handles in logged paths are cut short.

A handle is the whole credential of its VM, and Twisted's combined access log prints every
request's path, so a plain ``Site`` would copy live handles into every log archive.  Passing
``logFormatter=redacted_log_formatter`` to the ``Site`` keeps the combined format and the first
six characters of a handle (enough to follow one worker through the log).
"""

from __future__ import annotations

import re
from typing import Any

from twisted.web.http import combinedLogFormatter
from twisted.web.iweb import IRequest

HANDLE_ROUTES = frozenset(
    {b"release", b"handle-status", b"renew-expire", b"last-event-id", b"fetch-events", b"console", b"audio"}
)
KEPT_CHARS = 6
#: The console's operator route takes the admin token as ``?token=`` (browsers cannot set headers on
#: a WebSocket); it never reaches a log.
_TOKEN = re.compile(rb"(^|&)token=[^&]*")


def redact_uri(uri: bytes) -> bytes:
    """The request URI with the handle segment of a handle route shortened to ``abcdef...``."""
    path, question, query = uri.partition(b"?")
    segments = path.split(b"/")
    if len(segments) > 2 and segments[1] in HANDLE_ROUTES and len(segments[2]) > KEPT_CHARS:
        segments[2] = segments[2][:KEPT_CHARS] + b"..."
    return b"/".join(segments) + question + _TOKEN.sub(rb"\1token=...", query)


class _RedactedRequest:
    """The request as the log formatter sees it: everything the same but ``uri``."""

    def __init__(self, request: IRequest) -> None:
        self._request = request
        self.uri = redact_uri(request.uri)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def redacted_log_formatter(timestamp: str, request: IRequest) -> str:
    """Twisted's combined log line (an ``IAccessLogFormatter``), with handles shortened."""
    line: str = combinedLogFormatter(timestamp, _RedactedRequest(request))
    return line
