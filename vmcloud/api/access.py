"""Who may call what: the admin bearer token, and which browser origins may use the handle routes.

Admin routes need ``Authorization: Bearer <token>`` when a token is configured; handle routes
need only the handle (a capability), but a worker page on another origin can read their answers
only if CORS lets it.  Both decisions are pure functions of a header, so they are cheap on the
request path and easy to test.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import attrs


class BearerToken:
    """The admin token, compared in constant time.

    Both sides are hashed first, so the comparison takes the same time whatever the length of
    what the client sent, and the token itself is never kept in a form a log could print.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an empty token would let everyone in; pass None for 'no auth'")
        self._digest = hashlib.sha256(token.encode("utf-8")).digest()

    def __repr__(self) -> str:
        return "<BearerToken (hidden)>"

    def admits(self, authorization: bytes | None) -> bool:
        """Whether an ``Authorization`` header value carries this token."""
        if authorization is None:
            return False
        scheme, _, credentials = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        given = hashlib.sha256(credentials.strip()).digest()
        return hmac.compare_digest(given, self._digest)


@attrs.frozen
class CorsPolicy:
    """The origins allowed to call the handle routes from a browser (``"*"`` allows any)."""

    origins: frozenset[str]
    max_age: int = 600

    @classmethod
    def from_config(cls, origins: Sequence[str]) -> CorsPolicy:
        return cls(frozenset(o.strip().rstrip("/") for o in origins if o.strip()))

    def allow_origin(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        """The headers that let ``origin`` read an answer; none when it is not allowed.

        With a list of origins the answer depends on the request's ``Origin``, so caches are told
        with ``Vary: Origin``.
        """
        if "*" in self.origins:
            return [(b"Access-Control-Allow-Origin", b"*")]
        if not self.origins:
            return []
        vary = (b"Vary", b"Origin")
        if origin is not None and origin.decode("latin-1") in self.origins:
            return [(b"Access-Control-Allow-Origin", origin), vary]
        return [vary]

    def preflight(self, origin: bytes | None, methods: Sequence[str]) -> list[tuple[bytes, bytes]]:
        """The headers of a 204 answer to an ``OPTIONS`` preflight for a route with ``methods``."""
        headers = self.allow_origin(origin)
        if not any(name == b"Access-Control-Allow-Origin" for name, _ in headers):
            return headers
        return [
            *headers,
            (b"Access-Control-Allow-Methods", ", ".join([*methods, "OPTIONS"]).encode("ascii")),
            (b"Access-Control-Allow-Headers", b"Accept, Content-Type"),
            (b"Access-Control-Max-Age", str(self.max_age).encode("ascii")),
        ]
