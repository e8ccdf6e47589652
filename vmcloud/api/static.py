"""The files under ``/static/``: the monitor page, the worker page, the client library.

Twisted's :class:`~twisted.web.static.File` does the real work (content types, conditional GET,
ranges); this subclass only closes what a public file server must not do here: list a directory,
serve an ``index.html`` nobody asked for, or answer an error with an HTML page instead of the
API's JSON error shape.
"""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.static import File

from vmcloud.api.errors import error_body


class JsonErrorPage(Resource):
    """A leaf that answers every method with one JSON error."""

    isLeaf = True

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__()
        self._status = status
        self._body = error_body(code, message)

    def render(self, request: IRequest) -> bytes:
        request.setResponseCode(self._status)
        request.setHeader(b"Content-Type", b"application/json")
        return self._body

    def getChild(self, path: bytes, request: IRequest) -> Resource:  # noqa: N802 - Twisted's name
        return self


_NOT_FOUND = JsonErrorPage(404, "not-found", "no such file")


class StaticFiles(File):
    """A directory of public files, served file by file, never listed."""

    indexNames: list[str] = []  # File's own class attribute: never serve an index nobody asked for
    # File types these as its own HTML error pages; any resource will do for Twisted.
    childNotFound = _NOT_FOUND  # type: ignore[assignment]
    forbidden = JsonErrorPage(403, "forbidden", "this file cannot be read")  # type: ignore[assignment]

    def directoryListing(self) -> Resource:  # noqa: N802 - Twisted's name
        return _NOT_FOUND

    def redirect(self, request: IRequest) -> Any:
        # A directory asked for without its trailing slash: File would redirect to the listing.
        return _NOT_FOUND.render(request)
