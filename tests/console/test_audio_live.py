"""The audio relay end to end: the guest's capture server running a real ffmpeg (a sine instead of
PulseAudio), the controller's relay, real WebSocket and HTTP listeners, ffmpeg decoding what they got.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from guest_agent.audio import AudioServer
from tests.console.support import WsPipe, open_ws, wait_until
from vmcloud.console.audio import AudioFactory, AudioHub, AudioResource
from vmcloud.console.gate import Gate
from vmcloud.console.registry import AccessRegistry
from vmcloud.console.targets import Target, handle_key
from vmcloud.console.vnc import CLOSE_ACCESS_ENDED

FFMPEG = shutil.which("ffmpeg")
SINE = ("-re", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000")
pytestmark = pytest.mark.skipif(FFMPEG is None, reason="needs ffmpeg")


class _Messages(WsPipe):
    """Keeps messages apart (one Opus packet each) instead of a byte stream."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[dict[str, Any]] = []
        self.binaries: list[bytes] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N803
        if isBinary:
            self.binaries.append(payload)
        else:
            self.texts.append(json.loads(payload))


class Body(Protocol):
    """A response body, gathered whole; ``done`` fires when it ends."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(None)


def decode(ogg: bytes) -> bytes:
    """PCM (s16le mono 48 kHz) of an Ogg/Opus stream, as ffmpeg decodes it; fails on a broken stream."""
    assert FFMPEG is not None
    result = subprocess.run(
        [FFMPEG, "-hide_banner", "-loglevel", "error", "-xerror", "-f", "ogg", "-i", "pipe:0",
         "-ac", "1", "-ar", "48000", "-f", "s16le", "pipe:1"],
        input=ogg, capture_output=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def rms(pcm: bytes) -> float:
    samples = struct.unpack(f"<{len(pcm) // 2}h", pcm[: len(pcm) // 2 * 2])
    return (sum(s * s for s in samples) / max(1, len(samples))) ** 0.5


class AudioRelayTests(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        return ensureDeferred(self._set_up())

    async def _set_up(self) -> None:
        assert FFMPEG is not None
        self.password = "sessionpw"
        self.guest = AudioServer(reactor, FFMPEG, password=lambda: self.password, source=SINE)
        guest_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(self.guest))
        self.addCleanup(guest_port.stopListening)
        self.addCleanup(self.guest.close_all)
        self.registry = AccessRegistry()
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.hub = AudioHub(clock=reactor, agent=Agent(reactor, pool=self.pool), registry=self.registry)
        target = Target(handle_key("H1"), "127.0.0.1", guest_port.getHost().port, "vm1", self.password)
        self.targets = {"H1": target}
        root = Resource()
        factory = AudioFactory(clock=reactor, hub=self.hub)
        gate = Gate(token=None, cors_origins=["https://app.example"])
        root.putChild(b"audio", AudioResource(factory, gate, resolve=self.targets.get))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        self.agent = Agent(reactor, pool=self.pool)
        self.addCleanup(lambda: ensureDeferred(self._wind_down()))

    async def _wind_down(self) -> None:
        """End the handle (every listener and capture goes), then wait for the guest's encoders."""
        self.registry.handle_ended("H1", "test over")
        self.guest.close_all()
        await wait_until(reactor, lambda: not self.guest.streams, 5, "the guest's encoders ended")
        await deferLater(reactor, 0.05)  # the sockets' last close

    async def _socket(self, query: str = "") -> _Messages:
        pipe: Any = await open_ws(
            reactor, self.port, "/audio/H1" + query, origin="https://app.example", pipe=_Messages
        )
        self.addCleanup(lambda: pipe.transport and pipe.transport.abortConnection())
        return pipe  # type: ignore[no-any-return]

    async def _stream(self) -> tuple[Any, Body]:
        response = await self.agent.request(b"GET", f"http://127.0.0.1:{self.port}/audio/H1.ogg".encode())
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type") == [b"audio/ogg"]
        body = Body()
        response.deliverBody(body)
        self.addCleanup(lambda: body.transport and body.transport.stopProducing())
        return response, body

    def test_one_capture_for_every_listener(self) -> Deferred[None]:
        async def run() -> None:
            pipe = await self._socket()
            _, early = await self._stream()
            await wait_until(reactor, lambda: len(pipe.binaries) >= 25, 10, "half a second of Opus packets")
            _, late = await self._stream()  # joins mid-stream: gets the cached headers first
            await wait_until(reactor, lambda: len(late.data) > 8000, 10, "a second of the late stream")
            assert len(self.guest.streams) == 1  # one encoder in the VM for three listeners
            (fmt,) = pipe.texts
            assert (fmt["type"], fmt["codec"], fmt["sampleRate"], fmt["channels"]) == (
                "format",
                "opus",
                48000,
                2,
            )
            assert all(packet[0] >> 3 & 3 == 3 for packet in pipe.binaries)  # 20 ms frames
            for body in (early, late):
                pcm = decode(body.data)
                assert len(pcm) > 48000  # more than half a second decoded
                assert rms(pcm[9600:]) > 1000  # the tone, not silence
            # the handle ends: every listener closes, the guest's encoder stops
            self.registry.handle_ended("H1", "handle released")
            code, _ = await pipe.closed
            assert code == CLOSE_ACCESS_ENDED
            await early.done
            await late.done
            await wait_until(reactor, lambda: not self.guest.streams, 5, "the guest's encoder ended")
            assert self.hub.sources == {}

        return ensureDeferred(run())

    def test_pcm_for_browsers_without_webcodecs(self) -> Deferred[None]:
        async def run() -> None:
            pipe = await self._socket("?format=pcm")
            await wait_until(
                reactor, lambda: sum(map(len, pipe.binaries)) > 48000, 10, "half a second of PCM"
            )
            assert pipe.texts[0]["codec"] == "pcm"
            assert all(len(chunk) % 2 == 0 for chunk in pipe.binaries)
            assert rms(b"".join(pipe.binaries)[4800:]) > 1000

        return ensureDeferred(run())

    def test_capture_lingers_then_stops(self) -> Deferred[None]:
        async def run() -> None:
            pipe = await self._socket()
            await wait_until(reactor, lambda: len(pipe.binaries) >= 5, 10, "Opus packets")
            pipe.sendClose(1000)
            await pipe.closed
            again = await self._socket()  # a reload within the linger: the same capture
            await wait_until(reactor, lambda: len(again.binaries) >= 5, 10, "Opus packets again")
            assert len(self.guest.streams) == 1
            assert again.texts[0]["codec"] == "opus"  # told the format at once

        return ensureDeferred(run())

    def test_wrong_session_password_gets_nothing(self) -> Deferred[None]:
        async def run() -> None:
            self.password = "rotated!"  # the guest prepared a new session since
            pipe = await self._socket()
            await deferLater(reactor, 0.5)
            assert pipe.binaries == [] and pipe.texts == []
            assert not self.guest.streams

        return ensureDeferred(run())

    def test_refusals(self) -> Deferred[None]:
        import treq

        async def run() -> None:
            base = f"http://127.0.0.1:{self.port}/audio/"
            cases = [("nope.ogg", {}, 404), ("nope", {"Upgrade": "websocket"}, 404), ("H1", {}, 426),
                     ("H1?format=mp3", {"Upgrade": "websocket"}, 400),
                     ("H1", {"Upgrade": "websocket", "Origin": "https://evil.example"}, 403)]  # fmt: skip
            for path, headers, status in cases:
                response = await treq.get(base + path, headers=headers, pool=self.pool)
                body = await response.json()
                assert response.code == status, (path, body)
                assert body["error"] and body["message"]

        return ensureDeferred(run())
