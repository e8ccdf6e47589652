"""The VM's sound for the controller: live Ogg/Opus (or PCM) of the null sink's monitor, over HTTP.

The controller dials this server the way it dials the VNC server (the VM's address, port 5901) and
fans one capture out to every listener of the handle (:mod:`vmcloud.console.audio`), so a VM
encodes once whatever the number of listeners, and no worker needs a route to the VM.  Why HTTP on
a port of its own rather than the STOMP channel: the sound is 50 packets a second per VM, which
would triple the broker's traffic for nothing a broker adds (no fan-out, no persistence), and a
TCP connection gives back-pressure and a clean end for free; HTTP makes it debuggable with curl or
ffplay.

``GET /audio.ogg``: Ogg/Opus, 48 kHz stereo, 64 kbit/s CBR, 20 ms frames, one page per frame
(``-page_duration 20000 -flush_packets 1``: ffmpeg's default 1 s pages would add a second of
latency).  ``GET /audio.pcm``: s16le, 48 kHz mono, for browsers without WebCodecs.  Each request
runs its own ffmpeg (``-f pulse`` from ``vmsink.monitor``, the null sink's monitor), killed when the
request ends.  The request must carry ``Authorization: Bearer <session VNC password>``: without a
session (a FREE VM) nothing is served, and :meth:`AudioServer.close_all` ends every stream at
CLEANUP, as the VNC connections are.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from guest_agent.browser import BrokenCallback, IBrowser, PageLoadCallback

log = Logger()

#: The VM's audio capture server's port on its address (the controller dials it).
AUDIO_PORT = 5901
#: What ffmpeg reads by default: the PulseAudio null sink's monitor.
PULSE_SOURCE = ("-f", "pulse", "-fragment_size", "1920", "-i", "vmsink.monitor")
#: Streams served at once (the controller needs one per format per handle).
MAX_STREAMS = 4

_OUTPUTS = {
    b"audio.ogg": (
        b"audio/ogg",
        ["-ac", "2", "-ar", "48000", "-c:a", "libopus", "-b:a", "64k", "-vbr", "off",
         "-application", "lowdelay", "-frame_duration", "20", "-page_duration", "20000",
         "-flush_packets", "1", "-f", "ogg", "pipe:1"],
    ),
    b"audio.pcm": (
        b"audio/L16; rate=48000; channels=1",
        ["-ac", "1", "-ar", "48000", "-f", "s16le", "-flush_packets", "1", "pipe:1"],
    ),
}  # fmt: skip


def encoder_argv(ffmpeg: str, name: bytes, source: Sequence[str] = PULSE_SOURCE) -> list[str]:
    """ffmpeg's command line for ``audio.ogg`` or ``audio.pcm`` reading ``source``."""
    _, output = _OUTPUTS[name]
    return [ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", "-fflags", "nobuffer", *source, *output]


class _Encoder(ProcessProtocol):
    """One ffmpeg whose standard output is one HTTP response."""

    def __init__(self, server: AudioServer, request: Request, name: str) -> None:
        self.server = server
        self.request = request
        self.name = name
        self.errors = b""
        self.finished = False
        self.dropped = False  # CLEANUP: the connection goes too, not only the response
        self.channel = request.channel  # a finished request forgets its connection

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        self.request.registerProducer(self, True)  # a slow reader pauses ffmpeg's pipe

    # IPushProducer for the response: the process transport pauses and resumes, but cannot stop
    def pauseProducing(self) -> None:  # noqa: N802 - Twisted's name
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:  # noqa: N802 - Twisted's name
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:  # noqa: N802 - Twisted's name
        self.finished = True
        self.stop()

    def childDataReceived(self, fd: int, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if fd == 1:
            if not self.finished:
                self.request.write(data)
        else:
            self.errors = (self.errors + data)[-2000:]

    def stop(self) -> None:
        """End the stream: kill ffmpeg (the response ends when it has exited)."""
        with contextlib.suppress(ProcessExitedAlready):
            self.transport.signalProcess(signal.SIGKILL)  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 - Twisted's name
        self.server.streams.pop(self, None)
        if not reason.check(ProcessDone) and not self.finished:
            log.warn(
                "Audio encoder for {name} ended: {reason} {errors}",
                name=self.name,
                reason=reason.getErrorMessage(),
                errors=self.errors.decode("utf-8", "replace").strip()[-500:],
                event="audio-encoder-ended",
            )
        if not self.finished:
            self.finished = True
            self.request.unregisterProducer()
            self.request.finish()
        if self.dropped and self.channel is not None:
            self.channel.loseConnection()


class AudioServer(Resource):
    """``/audio.ogg`` and ``/audio.pcm``, each request its own encoder.

    ``password`` returns the current session's password (None between sessions: nothing is
    served); ``source`` is ffmpeg's input (the PulseAudio monitor; a test gives ``-f lavfi``);
    ``environ`` is the encoder's environment (``PULSE_SERVER=unix:<runtime>/native``), or a
    callable asked at each request (the VM's PulseAudio socket is known once the stack started).
    """

    isLeaf = True

    def __init__(
        self,
        reactor: Any,
        ffmpeg: str,
        *,
        password: Callable[[], str | None],
        source: Sequence[str] = PULSE_SOURCE,
        environ: Mapping[str, str] | Callable[[], Mapping[str, str]] | None = None,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._ffmpeg = ffmpeg
        self._password = password
        self._source = tuple(source)
        self._environ = environ if callable(environ) else dict(os.environ if environ is None else environ)
        self._max_streams = max_streams
        self.streams: dict[_Encoder, None] = {}

    def render_GET(self, request: Request) -> bytes | int:  # noqa: N802 - Twisted's name
        name = b"/".join(request.postpath or ())
        if name not in _OUTPUTS:
            return _answer(request, 404, b"no such stream: use /audio.ogg or /audio.pcm\n")
        password = self._password()
        if password is None:
            return _answer(request, 403, b"no session: the VM is not lent to anyone\n")
        given = request.getHeader(b"authorization") or b""
        if not hmac.compare_digest(given, b"Bearer " + password.encode("utf-8")):
            return _answer(request, 401, b"this stream needs Authorization: Bearer <session password>\n")
        if len(self.streams) >= self._max_streams:
            return _answer(request, 503, b"too many audio streams\n")
        content_type, _ = _OUTPUTS[name]
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Cache-Control", b"no-store")
        encoder = _Encoder(self, request, name.decode("ascii"))
        argv = encoder_argv(self._ffmpeg, name, self._source)
        environ = self._environ() if callable(self._environ) else self._environ
        self._reactor.spawnProcess(
            encoder, argv[0], argv, env=dict(environ), childFDs={0: "w", 1: "r", 2: "r"}
        )
        self.streams[encoder] = None
        request.notifyFinish().addBoth(lambda _: self._gone(encoder))
        log.info("Audio stream {name} started", name=encoder.name, event="audio-stream")
        return NOT_DONE_YET

    def _gone(self, encoder: _Encoder) -> None:
        encoder.finished = True
        encoder.stop()

    def close_all(self) -> None:
        """End every stream and drop its connection (CLEANUP: the next worker's sound must not
        reach the last one's listeners, not even on a kept-alive connection)."""
        for encoder in list(self.streams):
            encoder.dropped = True
            encoder.stop()


def _answer(request: IRequest, status: int, message: bytes) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return message


def find_encoder(
    which: Callable[[str], str | None] = shutil.which,
    run: Callable[..., subprocess.CompletedProcess[bytes]] = subprocess.run,
) -> tuple[str | None, str]:
    """ffmpeg if it can do the capture (the ``pulse`` input and the ``libopus`` encoder), else None;
    and why not.  Asked once, by the composition root: HELLO's ``audio`` must be true."""
    ffmpeg = which("ffmpeg")
    if ffmpeg is None:
        return None, "ffmpeg is not installed"
    try:
        demuxers = run([ffmpeg, "-hide_banner", "-demuxers"], capture_output=True, timeout=20).stdout
        encoders = run([ffmpeg, "-hide_banner", "-encoders"], capture_output=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{ffmpeg} does not run: {e}"
    if not any(line.split()[1:2] == [b"pulse"] for line in demuxers.splitlines()):
        return None, f"{ffmpeg} has no PulseAudio input"
    if not any(line.split()[1:2] == [b"libopus"] for line in encoders.splitlines()):
        return None, f"{ffmpeg} has no libopus encoder"
    return ffmpeg, ""


@implementer(IBrowser)
class AudibleBrowser(MultiService):
    """The VM's browser with its sound served to the controller (:class:`AudioServer`).

    ``browser`` does the browsing (a service of this one when it is a service).  ``ffmpeg`` None
    means no capture is possible: HELLO loses ``audio`` and PREPARE answers ``"audio": false``.
    ``endpoint`` is where the capture server listens (the VM's address, port 5901), ``host`` the
    address PREPARE's answer names (the controller takes only the port of it).  ``environ`` and
    ``source`` are the encoder's, as :class:`AudioServer`'s.
    """

    name = "browser"

    def __init__(
        self,
        browser: IBrowser,
        reactor: Any,
        *,
        ffmpeg: str | None,
        endpoint: IStreamServerEndpoint,
        host: str,
        environ: Mapping[str, str] | Callable[[], Mapping[str, str]] | None = None,
        source: Sequence[str] = PULSE_SOURCE,
    ) -> None:
        super().__init__()
        self.browser = browser
        self._host = host
        self._endpoint = endpoint
        self._session_password: str | None = None
        self.server = (
            AudioServer(
                reactor, ffmpeg, password=lambda: self._session_password, source=source, environ=environ
            )
            if ffmpeg is not None
            else None
        )
        self.port: IListeningPort | None = None
        inner = tuple(browser.capabilities)
        self.capabilities: tuple[str, ...] = (
            inner if self.server is not None else tuple(c for c in inner if c != "audio")
        )
        if IService.providedBy(browser):
            IService(browser).setServiceParent(self)

    # the agent sets these on the browser it was given: they belong to the browser inside
    @property
    def on_page_load(self) -> PageLoadCallback | None:
        callback: PageLoadCallback | None = self.browser.on_page_load
        return callback

    @on_page_load.setter
    def on_page_load(self, callback: PageLoadCallback | None) -> None:
        self.browser.on_page_load = callback

    @property
    def on_broken(self) -> BrokenCallback | None:
        callback: BrokenCallback | None = self.browser.on_broken
        return callback

    @on_broken.setter
    def on_broken(self, callback: BrokenCallback | None) -> None:
        self.browser.on_broken = callback

    @property
    def vnc_view(self) -> tuple[int, str] | None:
        view: tuple[int, str] | None = self.browser.vnc_view
        return view

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        if self.server is None or "audio" not in self.capabilities:
            return
        d: Deferred[IListeningPort] = self._endpoint.listen(Site(self.server))

        def listening(port: IListeningPort) -> None:
            self.port = port
            log.info(
                "Audio capture server on {host}:{port}",
                host=self._host,
                port=_port_of(port),
                event="audio-server-listening",
            )

        def failed(failure: Failure) -> None:
            log.error(
                "The audio capture server cannot listen: {error}; sessions get no sound",
                error=failure.getErrorMessage(),
                event="audio-server-failed",
            )

        d.addCallbacks(listening, failed)

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        self._revoke()
        port, self.port = self.port, None
        stopped: Deferred[None] = Deferred.fromCoroutine(self._stop_all(port))
        return stopped

    async def _stop_all(self, port: IListeningPort | None) -> None:
        if port is not None:
            await _stop_listening(port)
        await super().stopService()

    def _revoke(self) -> None:
        """No session from now on: nothing is served, every stream and its connection dropped."""
        self._session_password = None
        if self.server is not None:
            self.server.close_all()

    async def prepare(
        self,
        homepage: str,
        cookies: Sequence[Mapping[str, Any]],
        window: tuple[int, int] | Mapping[str, Any],
        audio: bool,
        *,
        vnc_password: str | None = None,
    ) -> dict[str, Any]:
        self._revoke()  # a replaced session's listeners must not hear the next one
        answer: dict[str, Any] = dict(
            await self.browser.prepare(homepage, cookies, window, audio, vnc_password=vnc_password)
        )
        if answer.get("audio") and self.port is not None and vnc_password:
            self._session_password = vnc_password
            answer["audioServer"] = {"host": self._host, "port": _port_of(self.port)}
        else:
            answer["audio"] = False
        return answer

    async def cleanup(self) -> dict[str, Any]:
        self._revoke()  # before the browser is cleaned: the VM is FREE only after both
        answer: dict[str, Any] = await self.browser.cleanup()
        return answer


def _port_of(port: IListeningPort) -> int:
    number: int = port.getHost().port  # type: ignore[attr-defined]
    return number


async def _stop_listening(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped
