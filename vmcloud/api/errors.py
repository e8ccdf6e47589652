"""What a refused request looks like on the wire: one JSON shape for every 4xx and 5xx.

The SPEC promises ``{"error": "<code>", "message": "<text>"}`` for every error, never a silent
200 and never a traceback; everything in the API that refuses a request raises :class:`ApiError`
(or a :class:`~vmcloud.pool.interfaces.PoolError`, which carries the same two fields) and one
place turns it into a response.
"""

from __future__ import annotations

import json


class ApiError(Exception):
    """A request the HTTP layer refuses by itself, before or instead of asking the pool.

    ``headers`` are added to the error response (``WWW-Authenticate`` on a 401, ``Allow`` on a 405).
    """

    def __init__(
        self, status: int, code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def bad_request(message: str) -> ApiError:
    """The 400 for input that cannot be a valid request (not a number, not JSON, too big)."""
    return ApiError(400, "bad-request", message)


def error_body(code: str, message: str) -> bytes:
    """The JSON body of an error response."""
    return json.dumps({"error": code, "message": message}).encode("utf-8")
