"""A thin Chrome DevTools Protocol client: one browser-level WebSocket, flattened sessions.

Why our own: no Twisted-native CDP library exists; pychrome uses threads,
the others asyncio.  CDP is JSON-RPC over one WebSocket, so the client is small:

- :class:`CdpConnection` is the protocol without I/O: it numbers requests, matches answers to
  them (``id``), hands events (``method`` without ``id``) to a listener with their ``sessionId``,
  fails what is pending when the link goes, and times out requests on an injected clock, so a
  hung browser is noticed instead of awaited for ever.  Tests drive it with a fake peer.
- :class:`CdpClientProtocol` adapts it to autobahn's ``WebSocketClientProtocol``.
- :func:`connect` opens the browser target's WebSocket (``ws://127.0.0.1:PORT/devtools/browser/ID``,
  as Chromium writes it into ``DevToolsActivePort``) and gives the connection once it is open.

Flattened sessions (``Target.setAutoAttach{flatten: true}``) put every tab and popup on this one
connection: a command for a tab carries its ``sessionId``, and so do the tab's events.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.logger import Logger

log = Logger()

#: Called with (method, params, sessionId or None) for every event the browser sends.
EventListener = Callable[[str, Mapping[str, Any], str | None], None]

#: Largest message accepted from the browser (a page's targetInfo list can be long; a screenshot
#: is never asked for).
MAX_MESSAGE = 16 * 1024 * 1024


class CdpError(Exception):
    """The browser answered a command with an error, or never answered it."""

    def __init__(self, method: str, message: str, code: int | None = None) -> None:
        super().__init__(f"{method}: {message}")
        self.method = method
        self.code = code


class CdpTimeout(CdpError):
    """No answer within the timeout: the browser (or that tab) hangs."""


class CdpClosed(CdpError):
    """The connection closed before the answer came."""


class CdpConnection:
    """Requests and answers over a text channel; ``write`` sends one JSON message.

    ``timeout`` is the default seconds a command may take before it fails with
    :class:`CdpTimeout`; each :meth:`send` may give its own.
    """

    def __init__(
        self,
        clock: IReactorTime,
        write: Callable[[str], None],
        *,
        timeout: float = 10.0,
        on_event: EventListener | None = None,
        close: Callable[[], None] | None = None,
    ) -> None:
        self._clock = clock
        self._write = write
        self._close = close
        self.timeout = timeout
        self.on_event = on_event
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, Deferred[dict[str, Any]], IDelayedCall | None]] = {}
        self.closed: str | None = None  # why, once closed
        self.when_closed: Deferred[str] = Deferred()

    def send(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        session_id: str | None = None,
        *,
        timeout: float | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Send one command; the Deferred fires with its ``result`` or fails with :class:`CdpError`."""
        if self.closed is not None:
            raise CdpClosed(method, f"connection closed ({self.closed})")
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": dict(params or {})}
        if session_id is not None:
            message["sessionId"] = session_id
        d: Deferred[dict[str, Any]] = Deferred()
        seconds = self.timeout if timeout is None else timeout
        timer = self._clock.callLater(seconds, self._expire, message_id, seconds) if seconds > 0 else None
        self._pending[message_id] = (method, d, timer)
        self._write(json.dumps(message, separators=(",", ":")))
        return d

    async def call(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        session_id: str | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """:meth:`send`, awaited."""
        return await self.send(method, params, session_id, timeout=timeout)

    def message_received(self, text: str | bytes) -> None:
        """One message from the browser; a malformed one is logged and dropped, so is any once closed."""
        if self.closed is not None:
            return  # the WebSocket's closing handshake may still bring messages: nobody awaits them
        try:
            message = json.loads(text)
        except ValueError:
            log.warn("CDP: dropped a message that is not JSON", event="cdp-bad-message")
            return
        if not isinstance(message, dict):
            log.warn("CDP: dropped a message that is not an object", event="cdp-bad-message")
            return
        message_id = message.get("id")
        if message_id is not None:
            pending = self._pending.pop(message_id, None) if isinstance(message_id, int) else None
            if pending is None:
                return  # answer to a command that already timed out
            method, d, timer = pending
            if timer is not None and timer.active():
                timer.cancel()
            error = message.get("error")
            if error is not None:
                if not isinstance(error, dict):
                    error = {"message": str(error)}
                code = error.get("code")
                d.errback(
                    CdpError(
                        method, str(error.get("message", "error")), code if isinstance(code, int) else None
                    )
                )
            else:
                result = message.get("result")
                d.callback(result if isinstance(result, dict) else {})
            return
        event = message.get("method")
        if not isinstance(event, str):
            return
        params = message.get("params")
        session_id = message.get("sessionId")
        listener = self.on_event
        if listener is None:
            return
        try:
            listener(
                event,
                params if isinstance(params, dict) else {},
                session_id if isinstance(session_id, str) else None,
            )
        except Exception:
            log.failure("CDP: the listener failed on {method}", method=event, event="cdp-listener-failed")

    def connection_lost(self, reason: str) -> None:
        """The link is gone: every pending command fails with :class:`CdpClosed`."""
        if self.closed is not None:
            return
        self.closed = reason
        pending, self._pending = self._pending, {}
        for method, d, timer in pending.values():
            if timer is not None and timer.active():
                timer.cancel()
            d.errback(CdpClosed(method, f"connection closed ({reason})"))
        self.when_closed.callback(reason)

    def close(self) -> None:
        """Close the link (the browser keeps running)."""
        if self._close is not None and self.closed is None:
            self._close()
        self.connection_lost("closed by us")

    def _expire(self, message_id: int, seconds: float) -> None:
        pending = self._pending.pop(message_id, None)
        if pending is not None:
            method, d, _ = pending
            d.errback(CdpTimeout(method, f"no answer within {seconds:g} s"))


class CdpClientProtocol(WebSocketClientProtocol):
    """autobahn's WebSocket client carrying one :class:`CdpConnection`."""

    factory: _CdpFactory
    cdp: CdpConnection

    def onOpen(self) -> None:  # noqa: N802 - autobahn's name
        self.cdp = CdpConnection(
            self.factory.clock,
            lambda text: self.sendMessage(text.encode("utf-8"), isBinary=False),
            timeout=self.factory.timeout,
            close=lambda: self.sendClose(),
        )
        opened = self.factory.opened
        if opened is not None and not opened.called:
            opened.callback(self.cdp)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803 - autobahn's names
        self.cdp.message_received(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
        cdp = getattr(self, "cdp", None)
        if cdp is not None:
            cdp.connection_lost(reason or f"WebSocket closed (code {code})")
        opened = self.factory.opened
        if opened is not None and not opened.called:
            opened.errback(CdpClosed("connect", reason or f"WebSocket closed (code {code})"))


class _CdpFactory(WebSocketClientFactory):
    protocol = CdpClientProtocol  # type: ignore[assignment]

    def __init__(self, url: str, clock: IReactorTime, timeout: float) -> None:
        super().__init__(url)
        self.setProtocolOptions(maxMessagePayloadSize=MAX_MESSAGE, maxFramePayloadSize=MAX_MESSAGE)
        self.clock = clock
        self.timeout = timeout
        self.opened: Deferred[CdpConnection] | None = Deferred()


async def connect(
    reactor: Any, ws_url: str, *, timeout: float = 10.0, connect_timeout: float = 5.0
) -> CdpConnection:
    """Open the browser's DevTools WebSocket at ``ws_url``; the connection, once open."""
    parts = urlsplit(ws_url)
    if parts.scheme != "ws" or parts.hostname is None or parts.port is None:
        raise ValueError(f"not a DevTools WebSocket URL: {ws_url!r}")
    factory = _CdpFactory(ws_url, reactor, timeout)
    assert factory.opened is not None
    opened = factory.opened
    endpoint = TCP4ClientEndpoint(IReactorTCP(reactor), parts.hostname, parts.port, timeout=connect_timeout)
    await endpoint.connect(factory)
    opened.addTimeout(connect_timeout, reactor)
    connection: CdpConnection = await opened
    factory.opened = None
    return connection


def read_devtools_port(content: str) -> str:
    """The browser WebSocket path from a ``DevToolsActivePort`` file: ``PORT\\n/devtools/browser/ID``."""
    lines = content.split("\n")
    if len(lines) < 2 or not lines[0].strip().isdigit() or not lines[1].startswith("/devtools/browser/"):
        raise ValueError("DevToolsActivePort holds no port and browser path yet")
    return f"ws://127.0.0.1:{int(lines[0])}{lines[1].strip()}"
