"""The REST API of seed 000 as a Klein app: a thin HTTP skin over :class:`IPoolControl`.

Each route parses its path into typed values, calls one pool method and shapes the answer;
everything else is shared and done once here: the admin token, CORS for the handle routes, the
bare-or-JSON id answers and the JSON error shape.  A refused request gets its 4xx JSON and one
log line; an unexpected exception gets a 500 JSON with a reference, and its traceback goes to
the log once, never to the client.

The composition root calls :func:`make_api` and serves ``make_api(...).resource()``.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal

import attrs
from klein import Klein
from klein.resource import KleinResource
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import BaseConverter, RequestRedirect

from vmcloud.api.access import BearerToken, CorsPolicy
from vmcloud.api.errors import ApiError, error_body
from vmcloud.api.inputs import (
    MAX_BODY_BYTES,
    homepage_segment,
    parse_batch_options,
    parse_batch_size,
    parse_count,
    parse_wait,
    wants_json,
)
from vmcloud.api.metrics import Metrics, exposition
from vmcloud.api.openapi import openapi_document
from vmcloud.api.shapes import all_status_json, events_json, handle_status_json
from vmcloud.api.static import StaticFiles
from vmcloud.pool.interfaces import IPoolControl, PoolError

log = Logger(namespace="vmcloud.api")

JSON_TYPE = b"application/json"
TEXT_TYPE = b"text/plain; charset=utf-8"
MONITOR_PATH = b"/static/monitor.html"
#: The longest an /all-status?since= long poll waits (the daemon's long-poll cap may be lower).
STATUS_WAIT_MAX = 30.0
# A "%" that does not start a percent-escape: Twisted would pass it on as it is.
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")

Params = Mapping[str, str]
# "admin": needs the token (when one is set); "handle": the handle is the capability, CORS allowed;
# "public": anyone (static files, the OpenAPI document, the redirect to the monitor).
Access = Literal["admin", "handle", "public"]
Handler = Callable[[IRequest, Params], Awaitable[Any]]


@attrs.frozen
class Route:
    """One route: who may call it decides auth and CORS, the rest is Klein's."""

    method: str
    rule: str  # werkzeug rule, e.g. "/lock/<batch>"
    access: Access
    branch: bool = False


class _ApiResource(KleinResource):
    """Klein's resource, with a JSON 400 for a path that is not UTF-8 or not percent-encoded.

    Klein answers an undecodable path itself in plain text and logs a traceback for it; a client
    sending ``%FF`` in a path must get neither.  A stray ``%`` (``%ZZ``) would reach the routes
    as it is and, in a homepage, become part of a URL the client did not mean.
    """

    def render(self, request: IRequest) -> Any:
        # Every answer with a body names its type; an empty 202/204/302 must not claim text/html.
        request.defaultContentType = None  # type: ignore[attr-defined]
        try:
            b"/".join(request.prepath + request.postpath).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            message = "the path (after percent-decoding) is not UTF-8"
            return _refuse(request, None, 400, "bad-request", message, ())
        if _BAD_PERCENT.search(request.path):
            message = "the path holds a '%' that does not start a percent-escape (%XX, two hex digits)"
            return _refuse(request, None, 400, "bad-request", message, ())
        return super().render(request)


class _HomepageConverter(BaseConverter):
    """prepare-batch's homepage: the rest of the path, whatever characters it holds once decoded.

    werkzeug's ``path`` converter stops at a newline (its ``.`` does not match one), so a homepage
    holding ``%0A`` matched no route and got 404 "no such route"; taken whole, it reaches
    :func:`~vmcloud.pool.service.check_homepage`, whose 400 says what is wrong with it.  An empty
    homepage is taken too, for the same reason.
    """

    part_isolating = False
    regex = "(?s:.*)"


class _ApiApp(Klein):
    """A Klein app whose resource refuses undecodable paths with the API's JSON error shape."""

    def resource(self) -> KleinResource:
        return _ApiResource(self)


class RestApi:
    """The handlers, holding what they need: the pool, the access rules and the long-poll limits."""

    def __init__(
        self,
        pool: IPoolControl,
        *,
        token: str | None,
        cors_origins: Sequence[str],
        static_dir: FilePath[str],
        long_poll_default: float,
        max_long_poll: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._pool = pool
        self._token = BearerToken(token) if token else None
        self._cors = CorsPolicy.from_config(cors_origins)
        self._static = StaticFiles(static_dir.path)
        self._long_poll_default = long_poll_default
        self._max_long_poll = max_long_poll
        self._openapi = json.dumps(openapi_document(), indent=1).encode("utf-8")
        metrics = metrics if metrics is not None else Metrics()
        metrics.watch_pool(pool)
        self._metrics = metrics.registry

    def routes(self) -> list[tuple[Route, Handler]]:
        """Every route of the SPEC, with its handler."""
        return [
            (Route("POST", "/set-pool-size/<min>/<max>/<linger>", "admin"), self.set_pool_size),
            (Route("POST", "/prepare-batch/<size>/<homepage:homepage>", "admin"), self.prepare_batch),
            (Route("POST", "/lock/<batch>", "admin"), self.lock),
            (Route("POST", "/release/<handle>", "handle"), self.release),
            (Route("GET", "/handle-status/<handle>", "handle"), self.handle_status),
            (Route("POST", "/renew-expire/<handle>/<expireTime>", "handle"), self.renew_expire),
            (Route("GET", "/last-event-id/<handle>", "handle"), self.last_event_id),
            (Route("GET", "/fetch-events/<handle>/<lastId>", "handle"), self.fetch_events),
            (Route("POST", "/cancel-batch/<batch>", "admin"), self.cancel_batch),
            (Route("POST", "/terminate-vm/<vmid>", "admin"), self.terminate_vm),
            (Route("POST", "/shutdown", "admin"), self.shutdown),
            (Route("GET", "/all-status", "admin"), self.all_status),
            (Route("GET", "/metrics", "admin"), self.metrics),
            (Route("GET", "/openapi.json", "public"), self.openapi),
            (Route("GET", "/", "public"), self.index),
            (Route("GET", "/static/", "public", branch=True), self.static),
        ]

    # ------------------------------------------------------------------ admin routes

    async def set_pool_size(self, request: IRequest, params: Params) -> bytes:
        minimum = parse_count("min", params["min"])
        maximum = parse_count("max", params["max"])
        linger = parse_count("linger", params["linger"])
        self._pool.set_pool_size(minimum, maximum, linger)
        return _no_content(request)

    async def prepare_batch(self, request: IRequest, params: Params) -> bytes:
        size = parse_batch_size(params["size"])
        # Klein moved the segments up to the homepage's first one into prepath.
        homepage = homepage_segment(request.path, len(request.prepath) - 1)
        body = request.content.read(MAX_BODY_BYTES + 1) if request.content is not None else b""
        options = parse_batch_options(body)
        batch = self._pool.prepare_batch(size, homepage, options)
        return _id_answer(request, "batch", batch)

    async def lock(self, request: IRequest, params: Params) -> bytes:
        handle = self._pool.lock(params["batch"])
        if not wants_json(request.getHeader(b"accept")):
            return _id_answer(request, "handle", handle)
        # With JSON the answer also says whether a READY VM was assigned at once, which saves the
        # application a handle-status round trip in the common case of a warm pool.
        status = handle_status_json(self._pool.handle_status(handle))
        answer: dict[str, Any] = {"handle": handle, "assigned": status["assigned"]}
        if answer["assigned"]:
            answer["vmid"] = status.get("vmid")
        return _json(request, answer)

    async def cancel_batch(self, request: IRequest, params: Params) -> bytes:
        self._pool.cancel_batch(params["batch"])
        return _no_content(request)

    async def terminate_vm(self, request: IRequest, params: Params) -> bytes:
        self._pool.terminate_vm(params["vmid"])
        return _no_content(request)

    async def shutdown(self, request: IRequest, params: Params) -> bytes:
        self._pool.shutdown()
        return _no_content(request, 202)

    async def all_status(self, request: IRequest, params: Params) -> bytes:
        # ?since=<version>: answer once the status is at another version (at once if it already
        # is), waiting up to ?wait= seconds for that; without since, at once.
        since = _query(request, b"since")
        wait = parse_wait(
            _query(request, b"wait"),
            default=self._long_poll_default,
            maximum=min(STATUS_WAIT_MAX, self._max_long_poll),
        )
        if since is None:
            status = self._pool.all_status()
        else:
            version = parse_count("since", since.decode("ascii", "replace"))
            status = await self._pool.status_after(version, wait)
        return _json(request, all_status_json(status))

    async def metrics(self, request: IRequest, params: Params) -> bytes:
        body, content_type = exposition(self._metrics, request.getHeader(b"accept"))
        request.setHeader(b"Content-Type", content_type)
        return body

    # ------------------------------------------------------------------ handle routes

    async def release(self, request: IRequest, params: Params) -> bytes:
        self._pool.release(params["handle"])
        return _no_content(request)

    async def handle_status(self, request: IRequest, params: Params) -> bytes:
        return _json(request, handle_status_json(self._pool.handle_status(params["handle"])))

    async def renew_expire(self, request: IRequest, params: Params) -> bytes:
        expire_ms = parse_count("expireTime", params["expireTime"])
        self._pool.renew_expire(params["handle"], expire_ms)
        return _no_content(request)

    async def last_event_id(self, request: IRequest, params: Params) -> bytes:
        return _id_answer(request, "lastId", self._pool.last_event_id(params["handle"]))

    async def fetch_events(self, request: IRequest, params: Params) -> bytes:
        last_id = parse_count("lastId", params["lastId"])
        wait = parse_wait(
            _query(request, b"wait"), default=self._long_poll_default, maximum=self._max_long_poll
        )
        events = await self._pool.fetch_events(params["handle"], last_id, wait)
        return _json(request, events_json(events))

    # ------------------------------------------------------------------ public routes

    async def openapi(self, request: IRequest, params: Params) -> bytes:
        request.setHeader(b"Content-Type", JSON_TYPE)
        return self._openapi

    async def index(self, request: IRequest, params: Params) -> bytes:
        request.redirect(MONITOR_PATH)
        return b""

    async def static(self, request: IRequest, params: Params) -> StaticFiles:
        # Public files; a worker page on another origin imports noVNC's ES modules from here, and
        # module scripts are fetched with CORS.
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        return self._static

    # ------------------------------------------------------------------ shared

    def serve(self, route: Route, handler: Handler) -> Callable[..., Awaitable[Any]]:
        """The Klein endpoint for a route: access checks, then the handler, then the error shape."""
        admin = route.access == "admin" and self._token is not None
        cors = route.access == "handle"

        async def endpoint(request: IRequest, **params: str) -> Any:
            if cors:
                for name, value in self._cors.allow_origin(request.getHeader(b"origin")):
                    request.setHeader(name, value)
            try:
                if admin and not self._admits(request):
                    raise ApiError(
                        401,
                        "unauthorized",
                        "this route needs Authorization: Bearer <token>",
                        headers=((b"WWW-Authenticate", b'Bearer realm="vmcloud"'),),
                    )
                return await handler(request, params)
            except CancelledError:
                raise  # the client went away during a long poll: nothing to answer
            except (ApiError, PoolError) as e:
                headers = e.headers if isinstance(e, ApiError) else ()
                return _refuse(request, route.rule, e.status, e.code, e.message, headers)
            except Exception:
                return _internal_error(request, route.rule, Failure())

        return endpoint

    def preflight(self, route: Route) -> Callable[..., Awaitable[bytes]]:
        """The ``OPTIONS`` endpoint that lets a browser on another origin call a handle route."""

        async def endpoint(request: IRequest, **params: str) -> bytes:
            for name, value in self._cors.preflight(request.getHeader(b"origin"), [route.method]):
                request.setHeader(name, value)
            return _no_content(request)

        return endpoint

    def _admits(self, request: IRequest) -> bool:
        assert self._token is not None
        return self._token.admits(request.getHeader(b"authorization"))


def make_api(
    pool: IPoolControl,
    *,
    token: str | None,
    cors_origins: Sequence[str],
    static_dir: FilePath[str],
    long_poll_default: float = 5.0,
    max_long_poll: float = 30.0,
    mounts: Mapping[str, IResource] | None = None,
    metrics: Metrics | None = None,
) -> Klein:
    """The Klein app of the REST API over ``pool``.

    ``token`` None (or empty) means no admin auth: the composition root then listens on loopback
    only.  ``cors_origins`` lists the browser origins allowed on the handle routes (``"*"`` for
    any).  ``long_poll_default`` is how long fetch-events waits without ``?wait=``, and
    ``max_long_poll`` caps what a client may ask for.  ``mounts`` serve whole subtrees
    (``{"console": ...}`` answers everything under ``/console/``: the WebSocket and streaming
    proxies of :mod:`vmcloud.console`, which make their own checks and JSON refusals).  ``metrics``
    is what ``/metrics`` serves, with the pool read at each scrape (the composition root's, fed by
    the components it built; a fresh one without).
    """
    api = RestApi(
        pool,
        token=token,
        cors_origins=cors_origins,
        static_dir=static_dir,
        long_poll_default=long_poll_default,
        max_long_poll=max_long_poll,
        metrics=metrics,
    )
    app = _ApiApp()
    # A homepage may hold "//" once decoded; merging slashes would redirect instead of routing.
    app.url_map.merge_slashes = False
    app.url_map.converters["homepage"] = _HomepageConverter
    for route, handler in api.routes():
        name = handler.__name__
        app.route(route.rule, methods=[route.method], endpoint=name, branch=route.branch)(
            api.serve(route, handler)
        )
        if route.access == "handle":
            app.route(route.rule, methods=["OPTIONS"], endpoint=f"{name}_preflight")(api.preflight(route))
    for prefix, mounted in (mounts or {}).items():
        app.route(f"/{prefix}/", branch=True, endpoint=f"mount_{prefix}")(lambda request, _r=mounted: _r)

    @app.handle_errors(HTTPException)
    def routing_error(request: IRequest, failure: Failure) -> bytes:
        """No route matched: 404 or 405 in the JSON error shape (a redirect stays a redirect)."""
        error = failure.value
        assert isinstance(error, HTTPException)
        if isinstance(error, RequestRedirect):
            request.redirect(error.new_url.encode("utf-8"))
            return b""
        status = error.code or 500
        if isinstance(error, MethodNotAllowed):
            allowed = ", ".join(error.valid_methods or ())
            request.setHeader(b"Allow", allowed.encode("ascii"))
            return _refuse(request, None, 405, "method-not-allowed", f"use {allowed} on this path", ())
        if status == 404:
            return _refuse(request, None, 404, "not-found", "no such route", ())
        return _refuse(request, None, status, error.name.lower().replace(" ", "-"), error.name, ())

    @app.handle_errors(Exception)
    def unexpected(request: IRequest, failure: Failure) -> bytes:
        """Anything that escaped a route (rendering a static file, a bug in the error path)."""
        return _internal_error(request, None, failure)

    return app


# ---------------------------------------------------------------------- answers


def _query(request: IRequest, name: bytes) -> bytes | None:
    """The last value of a query parameter, or None when the request has none."""
    values = request.args.get(name) if request.args else None
    return values[-1] if values else None


def _no_content(request: IRequest, status: int = 204) -> bytes:
    request.setResponseCode(status)
    return b""


def _json(request: IRequest, value: Any) -> bytes:
    body = json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")
    request.setHeader(b"Content-Type", JSON_TYPE)
    request.setHeader(b"Cache-Control", b"no-store")
    return body


def _id_answer(request: IRequest, key: str, value: str | int) -> bytes:
    """An id alone: bare text (``H=$(curl ...)`` works) or ``{key: value}`` when JSON is asked for."""
    if wants_json(request.getHeader(b"accept")):
        return _json(request, {key: value})
    request.setHeader(b"Content-Type", TEXT_TYPE)
    request.setHeader(b"Cache-Control", b"no-store")
    return str(value).encode("utf-8")


def _where(request: IRequest, rule: str | None) -> str:
    """What a log line names: the route's rule (never the handle in it), or the path cut short."""
    if rule is not None:
        return rule
    path = bytes(request.path).decode("utf-8", "replace")
    return path if len(path) <= 120 else path[:120] + "..."


def _refuse(
    request: IRequest,
    rule: str | None,
    status: int,
    code: str,
    message: str,
    headers: Sequence[tuple[bytes, bytes]],
) -> bytes:
    log.info(
        "{method} {where} refused: {status} {code}: {message}",
        method=request.method.decode("ascii", "replace"),
        where=_where(request, rule),
        status=status,
        code=code,
        message=message,
        event="api-refused",
    )
    request.setResponseCode(status)
    for name, value in headers:
        request.setHeader(name, value)
    request.setHeader(b"Content-Type", JSON_TYPE)
    return error_body(code, message)


def _internal_error(request: IRequest, rule: str | None, failure: Failure) -> bytes:
    reference = secrets.token_hex(4)
    log.failure(
        "{method} {where} failed unexpectedly (reference {reference})",
        failure,
        method=request.method.decode("ascii", "replace"),
        where=_where(request, rule),
        reference=reference,
        event="api-internal-error",
    )
    request.setResponseCode(500)
    request.setHeader(b"Content-Type", JSON_TYPE)
    return error_body(
        "internal-error", f"unexpected error (reference {reference}); the daemon log has the details"
    )
