"""``/audio/{handle}`` and ``/audio/{handle}.ogg``: a VM's sound, captured once, relayed to every listener.

The guest encodes (:mod:`guest_agent.audio`: ffmpeg from the PulseAudio null sink's monitor,
Ogg/Opus with 20 ms frames, or PCM); the controller dials it like the VNC server (the VM's
address, port 5901, ``Authorization: Bearer <session password>``) and keeps **one capture per
handle and format**, however many listeners, through an :class:`AudioSource`:

* ``/audio/{handle}`` (WebSocket) is for the worker's page: first a text message
  ``{"type": "format", "codec": "opus", "sampleRate": 48000, "channels", "preSkip", "head"}``
  (``head`` the OpusHead, base64, as WebCodecs' ``description``), then one binary message per
  Opus packet (20 ms).  ``?format=pcm`` gives ``{"codec": "pcm", "encoding": "s16le", ...}`` and
  binary PCM chunks instead, for browsers without WebCodecs.  A new format message means the
  capture restarted.
* ``/audio/{handle}.ogg`` (HTTP, chunked) is the live Ogg/Opus stream for a phone's media player:
  a late listener gets the cached header pages (OpusHead, OpusTags) first, then whole pages from
  the next one on.  (A media element buffers seconds; the WebSocket path is the low-latency one.)

A listener whose socket buffer is full (:data:`LISTENER_BUFFER`) misses packets until it drains:
live sound is dropped, never queued, so a slow listener costs a bounded buffer.  The capture
stops :data:`LINGER` seconds after its last listener left, restarts with back-off when the guest's
stream breaks, and ends with its listeners when the handle ends (it is a member of the
:class:`~vmcloud.console.registry.AccessRegistry` under the handle).
"""

from __future__ import annotations

import base64
import json
import typing
from collections.abc import Callable
from typing import Any, Literal, cast

import attrs
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IRequest, IResponse
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from vmcloud.api.errors import ApiError
from vmcloud.console.gate import Gate, check_handshake, refuse
from vmcloud.console.ogg import OggError, OggPage, OggReader, OpusHead
from vmcloud.console.registry import AccessRegistry
from vmcloud.console.targets import Target
from vmcloud.console.vnc import CLOSE_ACCESS_ENDED, CLOSE_GRACE, socket

log = Logger(namespace="vmcloud.console")

Kind = Literal["ogg", "pcm"]
#: Resolves a handle to its VM's audio server, or raises ApiError saying why there is none.
Resolve = Callable[[str], Target | None]

#: Seconds a capture outlives its last listener (a page reload must not restart the encoder).
LINGER = 5.0
#: Back-off between restarts of a broken capture, in seconds (doubling up to the last).
RETRY = (0.5, 1.0, 2.0, 4.0, 10.0)
#: Seconds the guest has to answer a capture request.
CAPTURE_TIMEOUT = 5.0
#: A listener's socket buffer (bytes) beyond which it misses packets: 16 KiB is 2 s of 64 kbit/s.
LISTENER_BUFFER = 16 * 1024
#: Listeners of one handle, and of the whole controller.
MAX_LISTENERS_PER_HANDLE = 16
MAX_LISTENERS = 1000
#: The PCM the guest sends: s16le, 48 kHz, mono.
PCM_FORMAT = {"type": "format", "codec": "pcm", "encoding": "s16le", "sampleRate": 48000, "channels": 1}
_PCM_FRAME = 2
#: Close code when the capture could not be (re)started for too long.
CLOSE_NO_AUDIO = 4002
#: Failures in a row after which a capture gives up and its listeners are closed with
#: :data:`CLOSE_NO_AUDIO` (with :data:`RETRY`, about 40 s without sound): a guest whose sound
#: server is gone for good (no PulseAudio, audio off) is not dialled every 10 s for ever.
GIVE_UP_AFTER = 8


class Listener(typing.Protocol):
    """One listener of a source (a WebSocket or an HTTP response): what the fan-out calls."""

    def begin(self, source: AudioSource) -> None:
        """The source's format is known (again): announce it (or send the header pages)."""

    def page(self, page: OggPage) -> None:
        """An audio page of an Ogg source."""

    def pcm(self, data: bytes) -> None:
        """PCM samples of a PCM source."""

    def end(self, code: int, reason: str) -> None:
        """The source ends (the handle ended): close."""


@implementer(IPushProducer)
class _PauseFlag:
    """Registered on a listener's socket: tells whether its buffer is full (then packets are skipped)."""

    paused = False

    def pauseProducing(self) -> None:  # noqa: N802 - Twisted's name
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802 - Twisted's name
        self.paused = False

    def stopProducing(self) -> None:  # noqa: N802 - Twisted's name
        self.paused = True


class _CaptureBody(Protocol):
    """The guest's response body: every chunk goes to the source."""

    def __init__(self, source: AudioSource) -> None:
        self.source = source

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self.source.captured(self, data)

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802 - Twisted's name
        self.source.capture_lost(self, reason)


class AudioSource:
    """One handle's capture in one format, fanned out to its listeners."""

    def __init__(self, hub: AudioHub, target: Target, kind: Kind) -> None:
        self.hub = hub
        self.target = target
        self.kind = kind
        self.listeners: dict[Listener, None] = {}
        self.head: OpusHead | None = None
        self.header_pages: list[bytes] = []
        self.ended = False
        self.bytes_in = 0
        self._reader = OggReader()
        self._in_headers = True
        self._odd = b""
        self._body: _CaptureBody | None = None
        self._request: Deferred[Any] | None = None
        self._linger: IDelayedCall | None = None
        self._retry_call: IDelayedCall | None = None
        self._failures = 0

    @property
    def ready(self) -> bool:
        """Whether a listener can be told the format now."""
        return self.kind == "pcm" or not self._in_headers

    # ------------------------------------------------------------------ listeners

    def add(self, listener: Listener) -> None:
        self.listeners[listener] = None
        self._linger = _cancel(self._linger)
        if self._body is None and self._request is None and self._retry_call is None:
            self._start()
        elif self.ready and self._body is not None:
            listener.begin(self)

    def remove(self, listener: Listener) -> None:
        self.listeners.pop(listener, None)
        if not self.listeners and not self.ended:
            self._linger = _cancel(self._linger)
            self._linger = self.hub.clock.callLater(LINGER, self._linger_over)

    def _linger_over(self) -> None:
        self._linger = None
        if not self.listeners:
            self._finish("no listener left")

    def revoke(self, reason: str) -> None:
        """The handle ended: every listener closes, the capture stops."""
        for listener in list(self.listeners):
            listener.end(CLOSE_ACCESS_ENDED, reason)
        self.listeners.clear()
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        self._linger = _cancel(self._linger)
        self._retry_call = _cancel(self._retry_call)
        self._stop_capture()
        self.hub.forget(self)
        log.info(
            "Audio capture ({kind}) of VM {vmid} stopped: {reason}; {count} bytes captured",
            kind=self.kind,
            vmid=self.target.vmid,
            reason=reason,
            count=self.bytes_in,
            event="audio-capture-stop",
        )

    # ------------------------------------------------------------------ the capture

    def _start(self) -> None:
        host = f"[{self.target.host}]" if ":" in self.target.host else self.target.host
        url = f"http://{host}:{self.target.port}/audio.{self.kind}".encode("ascii")
        headers = Headers()
        if self.target.password is not None:
            headers.setRawHeaders(b"authorization", [b"Bearer " + self.target.password.encode("utf-8")])
        self._reader = OggReader()
        self._in_headers = True
        self.header_pages = []
        self._odd = b""
        request = self.hub.agent.request(b"GET", url, headers)
        request.addTimeout(CAPTURE_TIMEOUT, self.hub.clock)
        self._request = request
        request.addCallbacks(self._answered, self._failed)

    def _answered(self, response: IResponse) -> None:
        self._request = None
        if self.ended:
            response.deliverBody(Protocol())  # read and forget; the connection closes
            return
        if response.code != 200:
            response.deliverBody(Protocol())
            self._failed(Failure(ConnectionError(f"the guest answered {response.code} {response.phrase!r}")))
            return
        body = _CaptureBody(self)
        self._body = body
        response.deliverBody(body)
        log.info(
            "Audio capture ({kind}) of VM {vmid} started from {host}:{port}",
            kind=self.kind,
            vmid=self.target.vmid,
            host=self.target.host,
            port=self.target.port,
            event="audio-capture-start",
        )
        if self.kind == "pcm":
            for listener in list(self.listeners):
                listener.begin(self)

    def _failed(self, failure: Failure) -> None:
        self._request = None
        if self.ended or failure.check(CancelledError):
            return
        self._retry(failure.getErrorMessage() or repr(failure.value))

    def _retry(self, why: str) -> None:
        delay = RETRY[min(self._failures, len(RETRY) - 1)]
        self._failures += 1
        log.warn(
            "Audio capture ({kind}) of VM {vmid} failed ({why}); again in {delay} s",
            kind=self.kind,
            vmid=self.target.vmid,
            why=why,
            delay=delay,
            event="audio-capture-failed",
        )
        if not self.listeners:
            self._finish("capture failed with no listener")
            return
        if self._failures >= GIVE_UP_AFTER:
            reason = f"no sound from the VM after {self._failures} tries ({why})"
            for listener in list(self.listeners):
                listener.end(CLOSE_NO_AUDIO, reason)
            self.listeners.clear()
            self._finish(reason)
            return
        self._retry_call = self.hub.clock.callLater(delay, self._restart)

    def _restart(self) -> None:
        self._retry_call = None
        if not self.ended:
            self._start()

    def captured(self, body: _CaptureBody, data: bytes) -> None:
        if body is not self._body or self.ended:
            return
        self.bytes_in += len(data)
        self._failures = 0
        if self.kind == "pcm":
            data = self._odd + data
            cut = len(data) - len(data) % _PCM_FRAME
            data, self._odd = data[:cut], data[cut:]
            if data:
                for listener in list(self.listeners):
                    listener.pcm(data)
            return
        try:
            pages = self._reader.feed(data)
        except OggError as e:
            self._stop_capture()
            self._retry(f"bad stream: {e}")
            return
        for page in pages:
            if self._in_headers:
                self._header_page(page)
            else:
                for listener in list(self.listeners):
                    listener.page(page)

    def _header_page(self, page: OggPage) -> None:
        """OpusHead alone on the first page, OpusTags on the next one(s) (RFC 7845 §3)."""
        if page.first:
            self.header_pages = [page.raw]
            self.head = OpusHead.parse(page.packets[0]) if page.packets else None
            return
        self.header_pages.append(page.raw)
        if any(packet.startswith(b"OpusTags") for packet in page.packets):
            self._in_headers = False
            for listener in list(self.listeners):
                listener.begin(self)

    def capture_lost(self, body: _CaptureBody, reason: Failure | None) -> None:
        if body is not self._body:
            return
        self._body = None
        if self.ended:
            return
        why = (
            "the guest ended the stream"
            if reason is None or reason.check(ResponseDone)
            else str(reason.value)
        )
        self._retry(why)

    def _stop_capture(self) -> None:
        if self._request is not None:
            request, self._request = self._request, None
            request.cancel()
        if self._body is not None:
            body, self._body = self._body, None
            if body.transport is not None:
                body.transport.stopProducing()  # type: ignore[attr-defined]

    def format(self) -> dict[str, Any]:
        """The WebSocket's format message for this source."""
        if self.kind == "pcm" or self.head is None:
            return dict(PCM_FORMAT)
        return {
            "type": "format",
            "codec": "opus",
            "sampleRate": 48000,
            "channels": self.head.channels,
            "preSkip": self.head.pre_skip,
            "head": base64.b64encode(self.head.raw).decode("ascii"),
        }


def _cancel(call: IDelayedCall | None) -> IDelayedCall | None:
    """Cancel a timed call if it is still to come; returns None, for ``x = _cancel(x)``."""
    if call is not None and call.active():
        call.cancel()
    return None


class AudioHub:
    """Every audio capture the controller runs, by handle and format."""

    def __init__(self, *, clock: IReactorTime, agent: IAgent, registry: AccessRegistry) -> None:
        self.clock = clock
        self.agent = agent
        self.registry = registry
        self.sources: dict[tuple[Any, Kind], AudioSource] = {}
        self.listener_count = 0

    def listen(self, target: Target, kind: Kind, listener: Listener) -> AudioSource:
        source = self.sources.get((target.key, kind))
        if source is None:
            source = AudioSource(self, target, kind)
            self.sources[(target.key, kind)] = source
            self.registry.add(target.key, source)
        source.add(listener)
        return source

    def listeners_of(self, target: Target) -> int:
        return sum(len(s.listeners) for (key, _), s in self.sources.items() if key == target.key)

    def forget(self, source: AudioSource) -> None:
        if self.sources.get((source.target.key, source.kind)) is source:
            del self.sources[(source.target.key, source.kind)]
        self.registry.discard(source.target.key, source)


# ---------------------------------------------------------------------- the WebSocket listener


@attrs.frozen
class AudioTicket:
    target: Target
    kind: Kind


class AudioSocket(WebSocketServerProtocol):
    """A page's WebSocket to a source: a format message, then Opus packets (or PCM chunks)."""

    factory: AudioFactory
    ticket: AudioTicket

    def __init__(self) -> None:
        super().__init__()
        self._source: AudioSource | None = None
        self._flag = _PauseFlag()
        self._deadline: IDelayedCall | None = None
        self._ended = False
        self.sent = 0
        self.skipped = 0

    def onConnect(self, request: ConnectionRequest) -> str | None:  # noqa: N802 - autobahn's name
        return "binary" if "binary" in request.protocols else None

    def onOpen(self) -> None:  # noqa: N802 - autobahn's name
        transport = socket(self)
        transport.unregisterProducer()  # the HTTP channel's, from the upgrade request
        transport.registerProducer(self._flag, True)
        if hasattr(transport, "bufferSize"):  # TCP: miss packets early rather than queue seconds
            transport.bufferSize = LISTENER_BUFFER
        self.factory.hub.listener_count += 1
        self._source = self.factory.hub.listen(self.ticket.target, self.ticket.kind, self)

    def begin(self, source: AudioSource) -> None:
        self.sendMessage(json.dumps(source.format()).encode("utf-8"), isBinary=False)

    def page(self, page: OggPage) -> None:
        for packet in page.packets:
            self._deliver(packet)

    def pcm(self, data: bytes) -> None:
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        if self._flag.paused or self._ended:
            self.skipped += 1
            return
        self.sent += len(data)
        self.sendMessage(data, isBinary=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803 - autobahn's names
        pass  # nothing to say to the capture

    def end(self, code: int, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        self._leave()
        self.sendClose(code, reason.encode("utf-8")[:123].decode("utf-8", "ignore"))
        self._deadline = self.factory.clock.callLater(CLOSE_GRACE, self._drop)

    def _drop(self) -> None:
        self._deadline = None
        if self.transport is not None and self.state != self.STATE_CLOSED:
            socket(self).abortConnection()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
        self._ended = True
        self._leave()
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()

    def _leave(self) -> None:
        if self._source is not None:
            source, self._source = self._source, None
            self.factory.hub.listener_count -= 1
            source.remove(self)


class AudioFactory(WebSocketServerFactory):
    """Builds an :class:`AudioSocket` for the ticket the resource just issued (see ConsoleFactory)."""

    protocol = AudioSocket  # type: ignore[assignment]

    def __init__(self, *, clock: IReactorTime, hub: AudioHub, timeouts: bool = True) -> None:
        super().__init__()
        self.clock = clock
        self.hub = hub
        self.next_ticket: AudioTicket | None = None
        self.setProtocolOptions(
            maxFramePayloadSize=4096,
            maxMessagePayloadSize=4096,
            openHandshakeTimeout=5 if timeouts else 0,
            closeHandshakeTimeout=0,
            autoPingInterval=20 if timeouts else 0,
            autoPingTimeout=10 if timeouts else 0,
            failByDrop=False,
        )

    def buildProtocol(self, addr: IAddress | None) -> Any:  # noqa: N802 - Twisted's name
        ticket = self.next_ticket
        if ticket is None:
            return None
        listener = cast(AudioSocket, super().buildProtocol(addr))
        listener.ticket = ticket
        return listener


# ---------------------------------------------------------------------- the HTTP listener


class OggResponse:
    """A live Ogg/Opus HTTP response (chunked): header pages first, then whole pages."""

    def __init__(self, hub: AudioHub, request: Request) -> None:
        self.hub = hub
        self.request = request
        self.source: AudioSource | None = None
        self._flag = _PauseFlag()
        self._started = False
        self._done = False
        self.sent = 0
        self.skipped = 0
        request.registerProducer(self._flag, True)
        request.notifyFinish().addBoth(self._gone)

    def begin(self, source: AudioSource) -> None:
        if self._done:
            return
        self._started = True  # a restarted capture starts a new chained Ogg stream
        for raw in source.header_pages:
            self._write(raw)

    def page(self, page: OggPage) -> None:
        if not self._started or self._done:
            return
        if self._flag.paused:
            self.skipped += 1
            return
        self._write(page.raw)

    def pcm(self, data: bytes) -> None:
        pass  # an Ogg response listens to Ogg sources only

    def _write(self, data: bytes) -> None:
        self.sent += len(data)
        self.request.write(data)

    def end(self, code: int, reason: str) -> None:
        if self._done:
            return
        self._done = True
        self.request.unregisterProducer()
        self.request.finish()
        self._leave()

    def _gone(self, result: Any) -> None:
        self._done = True
        self._leave()

    def _leave(self) -> None:
        if self.source is not None:
            source, self.source = self.source, None
            self.hub.listener_count -= 1
            source.remove(self)


# ---------------------------------------------------------------------- the resource


class AudioResource(WebSocketResource):
    """``/audio/{handle}`` (WebSocket) and ``/audio/{handle}.ogg`` (HTTP); mounted under ``/audio/``."""

    def __init__(
        self,
        factory: AudioFactory,
        gate: Gate,
        *,
        resolve: Resolve,
        max_per_handle: int = MAX_LISTENERS_PER_HANDLE,
        max_total: int = MAX_LISTENERS,
    ) -> None:
        super().__init__(factory)
        self._audio = factory
        self._gate = gate
        self._resolve = resolve
        self._max_per_handle = max_per_handle
        self._max_total = max_total

    def render(self, request: IRequest) -> Any:
        path = [segment.decode("utf-8", "replace") for segment in request.postpath]
        stream = len(path) == 1 and path[0].endswith(".ogg")
        try:
            target, kind = self._check(request, path, stream)
        except ApiError as e:
            return refuse(request, e, _where(path))
        if stream:
            return self._stream(cast(Request, request), target)
        self._audio.next_ticket = AudioTicket(target, kind)
        try:
            return super().render(request)
        finally:
            self._audio.next_ticket = None

    def _check(self, request: IRequest, path: list[str], stream: bool) -> tuple[Target, Kind]:
        if request.method not in (b"GET", b"HEAD"):
            raise ApiError(405, "method-not-allowed", "use GET on this path", headers=((b"Allow", b"GET"),))
        if len(path) != 1 or not path[0] or path[0] == ".ogg":
            raise ApiError(404, "not-found", "use /audio/{handle} (WebSocket) or /audio/{handle}.ogg")
        token = path[0][: -len(".ogg")] if stream else path[0]
        if stream:
            self._gate.allow_origin(request)
        else:
            self._gate.check_origin(request)
        kind: Kind = "ogg"
        formats = (request.args or {}).get(b"format")
        if formats and not stream:
            if formats[-1] == b"pcm":
                kind = "pcm"
            elif formats[-1] != b"opus":
                raise ApiError(400, "bad-request", "format must be opus or pcm")
        target = self._resolve(token)
        if target is None:
            raise ApiError(404, "unknown-handle", "no such handle (released, expired, or never issued)")
        if not stream:
            check_handshake(request)  # (/audio/{handle}.ogg is the plain HTTP stream)
        hub = self._audio.hub
        if hub.listeners_of(target) >= self._max_per_handle:
            raise ApiError(
                429, "too-many-listeners", f"at most {self._max_per_handle} listeners of one handle"
            )
        if hub.listener_count >= self._max_total:
            raise ApiError(503, "too-many-listeners", "the controller has as many listeners as it serves")
        return target, kind

    def _stream(self, request: Request, target: Target) -> Any:
        request.setHeader(b"Content-Type", b"audio/ogg")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        if request.method == b"HEAD":
            return b""
        hub = self._audio.hub
        listener = OggResponse(hub, request)
        hub.listener_count += 1
        listener.source = hub.listen(target, "ogg", listener)
        request.write(b"")  # the headers now: a player waits for them before it buffers
        return NOT_DONE_YET


def _where(path: list[str]) -> str:
    if len(path) == 1 and len(path[0]) > 6:
        return f"/audio/{path[0][:6]}..."
    return "/audio/" + "/".join(path)[:80]
