"""The OpenAPI 3.1 document of the REST API, served at ``/openapi.json``.

Written out by hand rather than generated from the routes, so that it says what a client needs
(meanings, shapes, which errors to expect) and so that the test comparing it with the Klein
routes and with the statuses the handlers really produce has something independent to compare.
"""

from __future__ import annotations

from typing import Any

JSON = "application/json"
TEXT = "text/plain"

_ERROR = {"$ref": "#/components/schemas/Error"}
_ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]


def _path_param(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _count_param(name: str, description: str, minimum: int = 0) -> dict[str, Any]:
    return _path_param(name, description, {"type": "integer", "minimum": minimum})


_HANDLE = _path_param("handle", "A VM handle returned by lock; the capability to use that VM.")
_BATCH = _path_param("batch", "A batch id returned by prepare-batch.")

_COMMON_ERRORS: dict[str, str] = {
    "400": "Bad input: not a non-negative integer, min > max, a batch size of 0 or over the cap, a homepage "
    "that is not http(s) or holds control characters, a body that is not the expected JSON (or nests deeper "
    "than 32 levels), or too large; on lock, too many locks already waiting for a VM.",
    "401": "An admin route called without `Authorization: Bearer <token>` while a token is configured.",
    "404": "Unknown (or released, or expired) handle, or unknown batch.",
    "409": "The batch is cancelled, or the pool is shutting down.",
    "500": "An unexpected error; the daemon log has the details (the answer never does).",
}


def _errors(*statuses: str) -> dict[str, Any]:
    return {
        status: {"description": _COMMON_ERRORS[status], "content": {JSON: {"schema": _ERROR}}}
        for status in statuses
    }


def _id_answer(key: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "description": f'{description} Bare as text/plain, or `{{"{key}": ...}}` when the client sends '
        "`Accept: application/json`.",
        "content": {
            TEXT: {"schema": {"type": "string"}},
            JSON: {
                "schema": {
                    "type": "object",
                    "required": [key],
                    "properties": {key: schema},
                    "additionalProperties": False,
                }
            },
        },
    }


def _lock_answer() -> dict[str, Any]:
    answer = _id_answer("handle", {"type": "string"}, "The new VM handle.")
    answer["description"] += " The JSON form also says whether a VM was assigned at once (and which)."
    schema = answer["content"][JSON]["schema"]
    schema["required"] = ["handle", "assigned"]
    schema["properties"] = {
        "handle": {"type": "string"},
        "assigned": {"type": "boolean"},
        "vmid": {"type": "string"},
    }
    return answer


def _json_answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _operation(
    summary: str,
    responses: dict[str, Any],
    *,
    admin: bool = False,
    parameters: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if parameters:
        operation["parameters"] = parameters
    operation["security"] = _ADMIN if admin else []
    operation.update(extra)
    return operation


def _preflight(methods: str) -> dict[str, Any]:
    return _operation(
        f"CORS preflight for a worker page on another origin (allows {methods}).",
        {"204": {"description": "Access-Control-Allow-* headers for the configured origins."}},
    )


#: The paths served by the console and audio proxies (``vmcloud.console``, mounted under
#: ``/console/`` and ``/audio/``) rather than by Klein routes of their own.
MOUNTED_PATHS = (
    "/console/{handle}",
    "/console/vm/{vmid}",
    "/console/vm/{vmid}/screen.png",
    "/audio/{handle}",
    "/audio/{handle}.ogg",
)

_WS_HANDSHAKE = (
    " A WebSocket (RFC 6455, version 13): a GET with `Upgrade: websocket`, `Connection: Upgrade`, "
    "`Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key`; answers 101 and the socket on success. "
    "Every refusal is made before the upgrade, as the API's JSON error. Browsers send `Origin`: it must "
    "be one of `[api] cors_origins` (or the controller's own); a client without `Origin` is not a page."
)
_CLOSE_CODES = (
    " Close codes: 4000 access ended (release, expiry, VM death: sent at once, the socket dropped 0.5 s "
    "later if the peer does not answer), 4001 the VM's server cannot be reached or went away, 4002 no "
    "audio for too long, 4008 a rule broken."
)


def _refusals(**statuses: str) -> dict[str, Any]:
    """JSON error answers of the proxies, by status (``_409="..."``)."""
    return {
        status.lstrip("_"): {"description": text, "content": {JSON: {"schema": _ERROR}}}
        for status, text in statuses.items()
    }


_ORIGIN = "A browser page from an origin not in `[api] cors_origins` (code origin-refused)."
_METHOD = "Not a GET (code method-not-allowed)."
_UPGRADE = "Not a WebSocket request (code websocket-required); answers `Upgrade: websocket`."
_HANDSHAKE = (
    "A broken opening handshake (code bad-handshake): no Host, no `Connection: Upgrade`, a version "
    "other than 13, a key that is not 16 bytes of base64, a header given twice."
)
_ADDRESS = "The VM has no known address yet (code no-address)."
_HANDLE_STATE = (
    "The handle waits for a VM (not-assigned: try again once assigned), or its VM's guest said it has no "
    "such server (no-vnc, no-audio)."
)
_LOST = "The handle's VM died (code vm-lost); the handle is still known: release it."
_SWITCHING = {"101": {"description": "Switching Protocols: the WebSocket is open."}}
_VIEW_ONLY = {
    "name": "view_only",
    "in": "query",
    "required": False,
    "description": "`1`: the controller drops this viewer's input (keys, pointer, clipboard, resizes).",
    "schema": {"type": "string", "enum": ["0", "1", "true", "false"]},
}


def _console_paths() -> dict[str, Any]:
    """``/console/...`` and ``/audio/...``: the worker's screen and sound, through the controller."""
    return {
        "/console/{handle}": {
            "get": _operation(
                "The VM's VNC stream for noVNC: raw RFB both ways in binary messages (subprotocol "
                "`binary`), relayed to the handle's VM; several viewers per handle; closed within a second "
                "of release, expiry or the VM's death. The handle is the credential; VncAuth with the "
                "handle-status `vncPassword` follows inside the stream." + _WS_HANDSHAKE + _CLOSE_CODES,
                {
                    **_SWITCHING,
                    **_refusals(
                        _400=_HANDSHAKE,
                        _403=_ORIGIN,
                        _404="Unknown, released or expired handle (code unknown-handle).",
                        _405=_METHOD,
                        _409=_HANDLE_STATE,
                        _410=_LOST,
                        _426=_UPGRADE,
                        _429="Already 8 viewers of this handle (code too-many-viewers).",
                        _503="The controller serves as many viewers as it may (too-many-viewers), or "
                        + _ADDRESS,
                    ),
                },
                parameters=[_HANDLE, _VIEW_ONLY],
            )
        },
        "/console/vm/{vmid}": {
            "get": _operation(
                "The operator's view of any live VM's screen (the monitor), view only whatever `view_only` "
                "says: the controller logs in to the VM's VNC server itself (with the operator's view-only "
                "password the VM's guest said in HELLO, so FREE VMs too; the session's for older guests), "
                "then speaks RFB 3.8 with security type None to the browser, whose input it drops: no "
                "password in the operator's page. Browsers cannot set headers on a WebSocket: the admin "
                "token is also taken as `?token=` or the cookie `vmcloud_token`."
                + _WS_HANDSHAKE
                + _CLOSE_CODES,
                {
                    **_SWITCHING,
                    **_refusals(
                        _400=_HANDSHAKE,
                        _401="No admin token while one is configured (code unauthorized).",
                        _403=_ORIGIN,
                        _404="No live VM of that id (code unknown-vm).",
                        _405=_METHOD,
                        _409="The VM's guest said it has no VNC server (code no-vnc), or the controller has "
                        "no login to it now: an older guest's VM that is neither READY nor OCCUPIED "
                        "(no-session).",
                        _426=_UPGRADE,
                        _429="Already 8 viewers of this VM (code too-many-viewers).",
                        _503="The controller serves as many viewers as it may (too-many-viewers), or "
                        + _ADDRESS,
                    ),
                },
                admin=True,
                parameters=[
                    _path_param("vmid", "A VM id of /all-status."),
                    _VIEW_ONLY,
                    {
                        "name": "token",
                        "in": "query",
                        "required": False,
                        "description": "The admin token, for browsers (kept out of the access log).",
                        "schema": {"type": "string"},
                    },
                ],
            )
        },
        "/console/vm/{vmid}/screen.png": {
            "get": _operation(
                "A still of a VM's screen as a PNG (the monitor's thumbnails): the controller logs in to the "
                "VM's VNC server with the operator's view-only password (any state; the session's for "
                "older guests), takes one full frame and scales it down to "
                "`width` (never up). At most 4 captures run at "
                "once and 16 wait; each has 5 s. The admin token as for /console/vm/{vmid} (header, "
                "`?token=` or the cookie `vmcloud_token`).",
                {
                    "200": {
                        "description": "The screen; `X-Screen-Size` says the VM's own size (`1280x800`).",
                        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    **_refusals(
                        _400="`width` is not a whole number from 16 to 1920 (code bad-width).",
                        _401="No admin token while one is configured (code unauthorized).",
                        _403=_ORIGIN,
                        _404="No live VM of that id (unknown-vm), or its guest has no VNC server (no-vnc).",
                        _405=_METHOD,
                        _409="No login to the VM's screen now: its guest said no view-only password and the "
                        "VM is neither READY nor OCCUPIED (no-session).",
                        _502="The VM's VNC server cannot be reached (vnc-unreachable) or refused the session "
                        "or spoke what a capture cannot follow (vnc-error).",
                        _503="No frame within 5 s (vnc-timeout), or 4 captures run and 16 wait "
                        "(too-many-captures; see Retry-After), or " + _ADDRESS,
                    ),
                },
                admin=True,
                parameters=[
                    _path_param("vmid", "A VM id of /all-status."),
                    {
                        "name": "width",
                        "in": "query",
                        "required": False,
                        "description": "The picture's width in pixels (default 320; at most the screen's).",
                        "schema": {"type": "integer", "minimum": 16, "maximum": 1920},
                    },
                    {
                        "name": "token",
                        "in": "query",
                        "required": False,
                        "description": "The admin token, for browsers (kept out of the access log).",
                        "schema": {"type": "string"},
                    },
                ],
            )
        },
        "/audio/{handle}": {
            "get": _operation(
                "The VM's sound for a page (Web Audio), for batches that asked for audio: first a text "
                'message `{"type": "format", "codec": "opus", "sampleRate": 48000, "channels", "preSkip", '
                '"head"}` (`head`: the OpusHead in base64, the WebCodecs description), then one binary '
                "message per 20 ms Opus packet; with `?format=pcm`, "
                '`{"codec": "pcm", "encoding": "s16le", "sampleRate": 48000, "channels": 1}` and PCM chunks. '
                "A new format message means the capture restarted. A listener that falls 16 KiB behind "
                "misses packets rather than queueing them." + _WS_HANDSHAKE + _CLOSE_CODES,
                {
                    **_SWITCHING,
                    **_refusals(
                        _400="format other than opus or pcm (code bad-request), or " + _HANDSHAKE,
                        _403=_ORIGIN,
                        _404="Unknown, released or expired handle (unknown-handle), or a batch that did not "
                        "ask for audio (no-audio).",
                        _405=_METHOD,
                        _409=_HANDLE_STATE,
                        _410=_LOST,
                        _426=_UPGRADE + " The HTTP stream is /audio/{handle}.ogg.",
                        _429="Already 16 listeners of this handle (code too-many-listeners).",
                        _503="The controller serves as many listeners as it may (too-many-listeners), or "
                        + _ADDRESS,
                    ),
                },
                parameters=[
                    _HANDLE,
                    {
                        "name": "format",
                        "in": "query",
                        "required": False,
                        "description": "`opus` (default, for WebCodecs) or `pcm` (browsers without it).",
                        "schema": {"type": "string", "enum": ["opus", "pcm"]},
                    },
                ],
            )
        },
        "/audio/{handle}.ogg": {
            "get": _operation(
                "The VM's sound as a live Ogg/Opus stream (chunked HTTP) for a phone's media player: the "
                "header pages (OpusHead, OpusTags) first, then a page per 20 ms packet, until the handle "
                "ends (the response then finishes). A media element buffers seconds of it: the low-latency "
                "path is /audio/{handle}. CORS as the handle routes. HEAD answers the headers alone.",
                {
                    "200": {
                        "description": "The live stream (never ends on its own while the handle lives).",
                        "content": {"audio/ogg": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    **_refusals(
                        _404="Unknown, released or expired handle (unknown-handle), or a batch that did not "
                        "ask for audio (no-audio).",
                        _405="Not a GET or HEAD (code method-not-allowed).",
                        _409=_HANDLE_STATE,
                        _410=_LOST,
                        _429="Already 16 listeners of this handle (code too-many-listeners).",
                        _503="The controller serves as many listeners as it may (too-many-listeners), or "
                        + _ADDRESS,
                    ),
                },
                parameters=[_HANDLE],
            )
        },
    }


def openapi_document() -> dict[str, Any]:
    """The whole document, as plain JSON-ready data."""
    handle_routes_note = "A handle route: needs only the handle; CORS-enabled for the configured origins."
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "vmcloud",
            "version": "1",
            "description": (
                "A pool of VMs each running a browser, for crowd work. Admin routes need "
                "`Authorization: Bearer <token>` when a token is configured. Every error is JSON "
                '`{"error": "<code>", "message": "<text>"}`; an unknown path answers 404 and a known '
                "path with the wrong method 405, both in that shape.  So does the HTTP layer, before any "
                "route: 400 for a request that is not HTTP/1.1 (or a path that is not UTF-8 or not "
                "percent-encoded), 413 for a body over 64 KiB, 414 for a request line over 16 KiB, 431 "
                "for header lines over 16 KiB in all or more than 100 of them.  Form bodies are never "
                "parsed: a body is whatever the route says (JSON), whatever its Content-Type."
            ),
        },
        "paths": {
            "/set-pool-size/{min}/{max}/{linger}": {
                "post": _operation(
                    "Keep between min and max VMs; a FREE VM above min idle for linger ms is terminated.",
                    {"204": {"description": "Applied."}, **_errors("400", "401", "409", "500")},
                    admin=True,
                    parameters=[
                        _count_param("min", "The pool holds at least this many VMs."),
                        _count_param("max", "At most this many (clamped by the configured max_pool_size)."),
                        _count_param("linger", "Milliseconds a FREE VM above min may stay idle."),
                    ],
                )
            },
            "/prepare-batch/{size}/{homepage}": {
                "post": _operation(
                    "Prepare a batch of size VMs whose browsers open homepage.",
                    {
                        "200": _id_answer("batch", {"type": "string"}, "The new batch id."),
                        **_errors("400", "401", "409", "500"),
                    },
                    admin=True,
                    parameters=[
                        _count_param(
                            "size",
                            "How many VMs the batch keeps READY; at least 1 (a batch of none would have "
                            "nothing to lend, yet its locks would be served on demand).",
                            minimum=1,
                        ),
                        _path_param(
                            "homepage",
                            "An http(s) URL as ONE URL-encoded path segment (encode `/` as %2F).",
                            {"type": "string", "format": "uri"},
                        ),
                    ],
                    requestBody={
                        "required": False,
                        "content": {JSON: {"schema": {"$ref": "#/components/schemas/BatchOptions"}}},
                    },
                )
            },
            "/lock/{batch}": {
                "post": _operation(
                    "Lock a VM of the batch; the handle may wait unassigned until a VM is READY.",
                    {
                        "200": _lock_answer(),
                        **_errors("400", "401", "404", "409", "500"),
                    },
                    admin=True,
                    parameters=[_BATCH],
                )
            },
            "/release/{handle}": {
                "post": _operation(
                    "Release the handle: its VM is cleaned and reused. " + handle_routes_note,
                    {"204": {"description": "Released."}, **_errors("404", "500")},
                    parameters=[_HANDLE],
                ),
                "options": _preflight("POST"),
            },
            "/handle-status/{handle}": {
                "get": _operation(
                    "Whether the handle has a VM, and what a worker page needs of it. " + handle_routes_note,
                    {
                        "200": _json_answer(
                            "The handle's state.", {"$ref": "#/components/schemas/HandleStatus"}
                        ),
                        **_errors("404", "500"),
                    },
                    parameters=[_HANDLE],
                ),
                "options": _preflight("GET"),
            },
            "/renew-expire/{handle}/{expireTime}": {
                "post": _operation(
                    "Release the handle expireTime ms from now; a new call resets the timer. "
                    + handle_routes_note,
                    {"204": {"description": "Timer set."}, **_errors("400", "404", "500")},
                    parameters=[_HANDLE, _count_param("expireTime", "Milliseconds from now.")],
                ),
                "options": _preflight("POST"),
            },
            "/last-event-id/{handle}": {
                "get": _operation(
                    "The id to pass to the first fetch-events. " + handle_routes_note,
                    {
                        "200": _id_answer("lastId", {"type": "integer"}, "The last event id."),
                        **_errors("404", "500"),
                    },
                    parameters=[_HANDLE],
                ),
                "options": _preflight("GET"),
            },
            "/fetch-events/{handle}/{lastId}": {
                "get": _operation(
                    "Events after lastId; long-polls when there are none. " + handle_routes_note,
                    {
                        "200": _json_answer("New events.", {"$ref": "#/components/schemas/Events"}),
                        **_errors("400", "404", "500"),
                    },
                    parameters=[
                        _HANDLE,
                        _count_param("lastId", "The lastId of the previous answer (or last-event-id)."),
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "description": "Seconds to wait for an event (default 5, capped by the server).",
                            "schema": {"type": "number", "minimum": 0},
                        },
                    ],
                ),
                "options": _preflight("GET"),
            },
            "/cancel-batch/{batch}": {
                "post": _operation(
                    "No new locks from the batch; VMs already locked stay usable until released.",
                    {"204": {"description": "Cancelled."}, **_errors("401", "404", "500")},
                    admin=True,
                    parameters=[_BATCH],
                )
            },
            "/terminate-vm/{vmid}": {
                "post": _operation(
                    "The operator terminates one VM, whatever its state: it goes to ERROR and is deleted, "
                    "and the pool replaces it by its rules. A handle holding it loses it as when a VM dies "
                    '(a `vm-died` event, reason "terminated by the operator"; handle-status says `lost`). '
                    "A VM already ERROR or KILLING is left to its termination.",
                    {
                        "204": {"description": "Termination under way."},
                        **_errors("401"),
                        **_refusals(
                            _404="No VM of that id (code unknown-vm): never known, or already gone.",
                            _409="The pool is shut down or the controller is stopping (code shutting-down).",
                        ),
                        **_errors("500"),
                    },
                    admin=True,
                    parameters=[_path_param("vmid", "A VM id of /all-status.")],
                )
            },
            "/shutdown": {
                "post": _operation(
                    "Release every handle, cancel every batch, terminate every VM.",
                    {"202": {"description": "Shutdown under way."}, **_errors("401", "500")},
                    admin=True,
                )
            },
            "/all-status": {
                "get": _operation(
                    "Everything the monitor shows, with its `version`: a number that changes whenever "
                    "anything shown changes (VMs, batches, preparations, handles and their events, pending "
                    "locks, pool size, cloud health, shutdown), not with time alone (`time`, `reconciler`, "
                    "`cloud.lastListingAt`). With `since`, a long poll: the answer comes at once when the "
                    "version is not `since` any more, else at the next change, or after `wait` seconds "
                    "(then possibly with the same version).",
                    {
                        "200": _json_answer("The pool.", {"$ref": "#/components/schemas/AllStatus"}),
                        **_refusals(
                            _400="since is not a non-negative integer, or wait not a non-negative number "
                            "(code bad-request)."
                        ),
                        **_errors("401", "500"),
                    },
                    admin=True,
                    parameters=[
                        {
                            "name": "since",
                            "in": "query",
                            "required": False,
                            "description": "The version the client has: the answer comes once it is not.",
                            "schema": {"type": "integer", "minimum": 0},
                        },
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "description": "With since: seconds to wait for a change (default 5, at most 30)",
                            "schema": {"type": "number", "minimum": 0},
                        },
                    ],
                )
            },
            "/metrics": {
                "get": _operation(
                    "Prometheus metrics: the pool's gauges read from all-status at each scrape, and"
                    " histograms of durations (lock to VM, prepare, cleanup, boot, reconcile pass,"
                    " Nova calls, checkpoint writes) filled as they happen; the text format 0.0.4, or"
                    " OpenMetrics 1.0 when the scraper's Accept asks for it; seconds, full precision.",
                    {
                        "200": {
                            "description": "VMs per state, pool size, batches, handles, pending locks,"
                            " cloud health, reconciler passes.",
                            "content": {TEXT: {"schema": {"type": "string"}}},
                        },
                        **_errors("401", "500"),
                    },
                    admin=True,
                )
            },
            "/openapi.json": {
                "get": _operation("This document.", {"200": _json_answer("OpenAPI 3.1.", {"type": "object"})})
            },
            "/": {
                "get": _operation(
                    "The monitor page.", {"302": {"description": "Redirect to /static/monitor.html."}}
                )
            },
            "/static/{path}": {
                "get": _operation(
                    "Public files: monitor.html, worker.html, vmcloud.js, noVNC's modules (novnc/, with "
                    "`Access-Control-Allow-Origin: *` so pages on other origins import them). Directories "
                    "are never listed.",
                    {
                        "200": {"description": "The file."},
                        "304": {"description": "Not modified since If-Modified-Since."},
                        "404": {
                            "description": "No such file.",
                            "content": {JSON: {"schema": _ERROR}},
                        },
                    },
                    parameters=[_path_param("path", "File name under the static directory.")],
                )
            },
            **_console_paths(),
        },
        "components": {
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The [api] token of the daemon's configuration.",
                }
            },
            "schemas": _schemas(),
        },
    }


def _schemas() -> dict[str, Any]:
    return {
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": {
                    "type": "string",
                    "description": "Stable code: bad-request, unauthorized, unknown-batch, unknown-handle, "
                    "batch-cancelled, shutting-down, not-found, method-not-allowed, internal-error; from "
                    "the HTTP layer: body-too-large (413), uri-too-long (414), headers-too-large (431); from "
                    "/console and /audio: origin-refused, unknown-vm, not-assigned, no-vnc, no-audio, "
                    "vm-lost, no-address, websocket-required, bad-handshake, too-many-viewers, "
                    "too-many-listeners.",
                },
                "message": {"type": "string", "description": "For humans."},
            },
        },
        "BatchOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "cookies": {
                    "type": "array",
                    "maxItems": 100,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "value"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "value": {"type": "string"},
                            "domain": {"type": ["string", "null"]},
                            "path": {"type": "string", "default": "/"},
                            "secure": {"type": "boolean", "default": False},
                            "httpOnly": {"type": "boolean", "default": False},
                            "expires": {
                                "type": ["number", "null"],
                                "description": "Seconds since the epoch; null for a session cookie.",
                            },
                        },
                    },
                },
                "window": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "width": {"type": "integer", "minimum": 100, "maximum": 8192, "default": 1280},
                        "height": {"type": "integer", "minimum": 100, "maximum": 8192, "default": 800},
                    },
                },
                "audio": {"type": "boolean", "default": False},
            },
        },
        "HandleStatus": _record(
            {
                "assigned": {"type": "boolean"},
                "batch": {"type": "string"},
                "expires": {"type": "boolean"},
                "expireTime": _MS_OR_NULL,
                "vmid": {"type": "string", "description": "While a VM is lent to the handle."},
                "vm": _record(
                    {
                        "vmid": {"type": "string"},
                        "state": {"type": "string"},
                        "since": _MS,
                        "recovering": {"type": "boolean"},
                        "console": {"type": "string", "description": "/console/{handle}: the screen (noVNC)"},
                        "audio": {
                            "type": ["string", "null"],
                            "description": "/audio/{handle}: the sound, when the batch asked for it",
                        },
                        "vncPassword": _TEXT_OR_NULL,
                    }
                ),
                "lost": _record(
                    {"vmid": {"type": "string"}, "reason": {"type": "string"}, "time": _MS},
                ),
            },
            optional=("vmid", "vm", "lost"),
        ),
        "Events": _record(
            {
                "lastId": {"type": "integer"},
                "newEvents": _list_of(
                    _record(
                        {
                            "id": {"type": "integer"},
                            "time": _MS,
                            "data": {
                                "type": "object",
                                "description": 'e.g. {"action": "page-load", "url": ..., "title": ...}',
                            },
                        }
                    )
                ),
                "dropped": {
                    "type": "integer",
                    "description": "Events after lastId that were dropped (the handle's log is bounded).",
                },
            }
        ),
        "AllStatus": _all_status_schema(),
    }


_MS = {"type": "integer", "description": "ms since the epoch"}
_MS_OR_NULL = {"type": ["integer", "null"], "description": "ms since the epoch"}
_TEXT_OR_NULL = {"type": ["string", "null"]}
_COUNT = {"type": "integer", "minimum": 0}


def _record(properties: dict[str, Any], *, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """An object whose every property is always there (but ``optional`` ones)."""
    return {
        "type": "object",
        "required": [name for name in properties if name not in optional],
        "properties": properties,
    }


def _list_of(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": item}


def _all_status_schema() -> dict[str, Any]:
    """What GET /all-status answers, key by key (tests/api/test_shapes.py holds it to the real pool)."""
    return _record(
        {
            "poolSize": _record(
                {
                    "min": _COUNT,
                    "max": _COUNT,
                    "linger": {"type": "integer", "description": "ms"},
                    "effectiveMin": _COUNT,
                    "effectiveMax": _COUNT,
                    "maxPoolSize": _COUNT,
                }
            ),
            "vms": _list_of(
                _record(
                    {
                        "vmid": {"type": "string"},
                        "state": {
                            "type": "string",
                            "enum": [
                                "CREATING",
                                "BOOTING",
                                "FREE",
                                "WAIT",
                                "READY",
                                "OCCUPIED",
                                "ERROR",
                                "KILLING",
                            ],
                        },
                        "version": {"type": "integer"},
                        "since": _MS,
                        "serverId": _TEXT_OR_NULL,
                        "identity": _TEXT_OR_NULL,
                        "ip": _TEXT_OR_NULL,
                        "mac": _TEXT_OR_NULL,
                        "batch": _TEXT_OR_NULL,
                        "handle": _TEXT_OR_NULL,
                        "lastUsed": _MS,
                        "recovering": {"type": "boolean"},
                        "reason": _TEXT_OR_NULL,
                        "capabilities": _list_of({"type": "string"}),
                        "image": {
                            "type": ["string", "null"],
                            "description": "the image the cloud says the server was booted from "
                            "(null until listed, and with the local driver)",
                        },
                        "outdated": {
                            "type": "boolean",
                            "description": "booted from another image than cloud.image: retired once "
                            "FREE (as replacements come up) or released",
                        },
                    }
                )
            ),
            "batches": _list_of(
                _record(
                    {
                        "id": {"type": "string"},
                        "size": _COUNT,
                        "homepage": {"type": "string"},
                        "cancelled": {"type": "boolean"},
                        "createdAt": _MS,
                        "ready": _COUNT,
                        "preparing": _COUNT,
                        "occupied": _COUNT,
                        "pendingLocks": _COUNT,
                    }
                )
            ),
            "preps": _list_of(
                _record(
                    {
                        "batch": {"type": "string"},
                        "vmid": _TEXT_OR_NULL,
                        "state": {"type": "string", "enum": ["preparing", "queued"]},
                        "since": {**_MS, "description": "ms since the epoch; only while preparing"},
                    },
                    optional=("since",),
                )
            ),
            "handles": _list_of(
                _record(
                    {
                        "handle": {"type": "string"},
                        "batch": {"type": "string"},
                        "vmid": _TEXT_OR_NULL,
                        "createdAt": _MS,
                        "expireTime": _MS_OR_NULL,
                        "lost": {"type": ["string", "null"], "description": "why it lost its VM"},
                        "lastEventId": _COUNT,
                        "events": _COUNT,
                        "droppedEvents": _COUNT,
                    }
                )
            ),
            "pendingLocks": _list_of(
                _record({"handle": {"type": "string"}, "batch": {"type": "string"}, "since": _MS})
            ),
            "cloud": _record(
                {
                    "driver": {"type": "string"},
                    "backingOff": {"type": "boolean"},
                    "backoffUntil": _MS_OR_NULL,
                    "quotaExceeded": {"type": "boolean"},
                    "quotaRetryAt": _MS_OR_NULL,
                    "failures": _COUNT,
                    "quotaRefusals": _COUNT,
                    "bootFailures": _COUNT,
                    "bootBackoffUntil": _MS_OR_NULL,
                    "lastError": _TEXT_OR_NULL,
                    "lastErrorAt": _MS_OR_NULL,
                    "lastListingAt": _MS_OR_NULL,
                    "strays": _COUNT,
                    "image": {
                        "type": ["string", "null"],
                        "description": "the image new VMs boot from (null: the driver has no images)",
                    },
                    "outdatedVMs": {
                        **_COUNT,
                        "description": "VMs (dying ones aside) booted from another image, to be retired",
                    },
                }
            ),
            "shuttingDown": {"type": "boolean"},
            "reconciler": _record(
                {"passes": _COUNT, "lastPassMs": {"type": "number"}, "slowestPassMs": {"type": "number"}}
            ),
            "time": {**_MS, "description": "the controller's clock when the status was made"},
            "version": {
                "type": "integer",
                "description": "Changes with anything shown but time; pass it as since to wait for a change.",
            },
        }
    )
