"""Who may open a console or audio socket: the checks made on the HTTP request, before any upgrade.

Refusals are made here, while the request is still plain HTTP, so they get the API's JSON error
shape and status (404 unknown handle, 403 foreign origin, 401 no admin token, 426 not a WebSocket)
rather than a WebSocket library's HTML page.

* **Origin.** A browser always sends ``Origin`` with a WebSocket request, and cross-origin
  WebSockets are not subject to CORS, so the proxy checks it itself: an origin listed in
  ``[api] cors_origins`` (``*`` allows any), or the controller's own (its ``/static/`` pages) is
  let in.  A request without ``Origin`` is not from a browser page and is let in: the handle
  (or the admin token) is the credential, the origin check only stops other sites' pages.
* **Admin token** (the operator's ``/console/vm/{vmid}``).  Browsers cannot set
  ``Authorization`` on a WebSocket, so the token is also accepted as ``?token=`` or as the cookie
  ``vmcloud_token``; all three are compared in constant time.  The access log redacts ``token=``.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from http.cookies import CookieError, SimpleCookie
from urllib.parse import urlsplit

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from vmcloud.api.access import BearerToken, CorsPolicy
from vmcloud.api.errors import ApiError, error_body

log = Logger(namespace="vmcloud.console")

#: The cookie an operator's page may set to carry the admin token to WebSocket routes.
TOKEN_COOKIE = "vmcloud_token"


class Gate:
    """The origin and admin-token checks shared by the console and audio resources."""

    def __init__(self, *, token: str | None, cors_origins: Sequence[str]) -> None:
        self._token = BearerToken(token) if token else None
        self.cors = CorsPolicy.from_config(cors_origins)

    def check_origin(self, request: IRequest) -> None:
        """Refuse (403) a browser page from an origin that is neither listed nor the controller's."""
        origin = request.getHeader(b"origin")
        if origin is None or "*" in self.cors.origins:
            return
        text = origin.decode("latin-1").rstrip("/")
        if text in self.cors.origins:
            return
        host = request.getHeader(b"host")
        if host is not None and urlsplit(text).netloc.lower() == host.decode("latin-1").lower():
            return
        raise ApiError(
            403, "origin-refused", f"pages from {text} may not open this socket (see [api] cors_origins)"
        )

    def check_admin(self, request: IRequest) -> None:
        """Refuse (401) an operator route without the admin token (header, ``?token=`` or cookie)."""
        if self._token is None:
            return  # no token configured: the API listens on loopback only
        if self._token.admits(request.getHeader(b"authorization")):
            return
        given = [*((request.args or {}).get(b"token") or ())]
        cookie = _cookie(request.getHeader(b"cookie"), TOKEN_COOKIE)
        if cookie is not None:
            given.append(cookie.encode("utf-8"))
        if any(self._token.admits(b"Bearer " + value) for value in given):
            return
        raise ApiError(
            401,
            "unauthorized",
            "this route needs the admin token: Authorization: Bearer <token>, ?token=<token> "
            f"or the cookie {TOKEN_COOKIE}",
            headers=((b"WWW-Authenticate", b'Bearer realm="vmcloud"'),),
        )

    def allow_origin(self, request: IRequest) -> None:
        """CORS headers for a plain HTTP answer (the Ogg stream fetched by a page)."""
        for name, value in self.cors.allow_origin(request.getHeader(b"origin")):
            request.setHeader(name, value)


def check_handshake(request: IRequest) -> None:
    """Refuse (426, 400) what the WebSocket library would refuse with an HTML page of its own.

    Once a request is handed over for the upgrade, a bad opening handshake is answered by
    autobahn with its own page; the checks it makes (RFC 6455 §4.2.1) are made here first, so a
    refusal is the API's JSON error like every other.
    """
    upgrade = request.getHeader(b"upgrade")
    if upgrade is None or b"websocket" not in [t.strip() for t in upgrade.lower().split(b",")]:
        raise ApiError(
            426,
            "websocket-required",
            "this route is a WebSocket: send Upgrade: websocket",
            headers=((b"Upgrade", b"websocket"),),
        )
    headers = request.requestHeaders

    def one(name: bytes) -> bytes | None:
        values = headers.getRawHeaders(name) or []
        if len(values) > 1:
            raise ApiError(400, "bad-handshake", f"{name.decode()} appears more than once")
        return values[0] if values else None

    if not one(b"host"):
        raise ApiError(400, "bad-handshake", "the opening handshake needs a Host header")
    connection = b",".join(headers.getRawHeaders(b"connection") or [])
    if b"upgrade" not in [t.strip() for t in connection.lower().split(b",")]:
        raise ApiError(400, "bad-handshake", "the opening handshake needs Connection: Upgrade")
    if one(b"sec-websocket-version") != b"13":
        raise ApiError(
            400,
            "bad-handshake",
            "only WebSocket version 13 is spoken (Sec-WebSocket-Version: 13)",
            headers=((b"Sec-WebSocket-Version", b"13"),),
        )
    key = one(b"sec-websocket-key") or b""
    try:
        nonce = base64.b64decode(key, validate=True)
    except ValueError:
        nonce = b""
    if len(key) != 24 or len(nonce) != 16:
        raise ApiError(400, "bad-handshake", "Sec-WebSocket-Key must be 16 bytes in base64")
    one(b"origin")
    one(b"sec-websocket-extensions")
    protocols = [
        p.strip() for v in headers.getRawHeaders(b"sec-websocket-protocol") or [] for p in v.split(b",")
    ]
    if len(protocols) != len(set(protocols)):
        raise ApiError(400, "bad-handshake", "a subprotocol is named twice in Sec-WebSocket-Protocol")


def flag(request: IRequest, name: bytes) -> bool:
    """A boolean query flag: ``?view_only=1`` (also ``true``/``yes``); absent or ``0`` is False."""
    values = (request.args or {}).get(name)
    if not values:
        return False
    return values[-1].lower() in (b"1", b"true", b"yes", b"on", b"")


def refuse(request: IRequest, error: ApiError, where: str) -> bytes:
    """The JSON error answer (and its one log line) for a refused console or audio request."""
    log.info(
        "{method} {where} refused: {status} {code}: {message}",
        method=request.method.decode("ascii", "replace"),
        where=where,
        status=error.status,
        code=error.code,
        message=error.message,
        event="console-refused",
    )
    request.setResponseCode(error.status)
    for name, value in error.headers:
        request.setHeader(name, value)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return error_body(error.code, error.message)


def _cookie(header: bytes | None, name: str) -> str | None:
    if header is None:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header.decode("latin-1"))
    except CookieError:
        return None
    morsel = jar.get(name)
    return None if morsel is None else morsel.value
