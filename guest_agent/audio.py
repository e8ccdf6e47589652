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
runs its own ffmpeg (``-f pulse`` from ``vmsink.monitor``, see GUEST-STACK.md §4), killed when the
request ends.  The request must carry ``Authorization: Bearer <session VNC password>``: without a
session (a FREE VM) nothing is served, and :meth:`AudioServer.close_all` ends every stream at
CLEANUP, as the VNC connections are.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

log = Logger()

#: The VM's audio capture server's port on its address (the controller dials it).
AUDIO_PORT = 5901
#: What ffmpeg reads by default: the PulseAudio null sink's monitor (GUEST-STACK.md §4).
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


class AudioServer(Resource):
    """``/audio.ogg`` and ``/audio.pcm``, each request its own encoder.

    ``password`` returns the current session's password (None between sessions: nothing is
    served); ``source`` is ffmpeg's input (the PulseAudio monitor; a test gives ``-f lavfi``);
    ``environ`` is the encoder's environment (``PULSE_SERVER=unix:<runtime>/native``).
    """

    isLeaf = True

    def __init__(
        self,
        reactor: Any,
        ffmpeg: str,
        *,
        password: Callable[[], str | None],
        source: Sequence[str] = PULSE_SOURCE,
        environ: Mapping[str, str] | None = None,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._ffmpeg = ffmpeg
        self._password = password
        self._source = tuple(source)
        self._environ = dict(os.environ if environ is None else environ)
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
        self._reactor.spawnProcess(
            encoder, argv[0], argv, env=self._environ, childFDs={0: "w", 1: "r", 2: "r"}
        )
        self.streams[encoder] = None
        request.notifyFinish().addBoth(lambda _: self._gone(encoder))
        log.info("Audio stream {name} started", name=encoder.name, event="audio-stream")
        return NOT_DONE_YET

    def _gone(self, encoder: _Encoder) -> None:
        encoder.finished = True
        encoder.stop()

    def close_all(self) -> None:
        """End every stream (CLEANUP: the next worker's sound must not reach the last one's listeners)."""
        for encoder in list(self.streams):
            encoder.stop()


def _answer(request: IRequest, status: int, message: bytes) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return message
