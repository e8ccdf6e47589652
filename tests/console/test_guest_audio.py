"""The guest's audio capture server beside its browser (``AudibleBrowser``), with a real ffmpeg.

What the controller and a worker would notice: HELLO says ``audio`` only when the capture can run;
PREPARE's answer names the server (``audioServer``) only for a batch that asked for sound; only the
session's password is served, a FREE VM serves nothing, and CLEANUP drops every stream together
with its connection, before the browser is cleaned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from guest_agent.audio import AudibleBrowser, find_encoder
from tests.console.support import wait_until
from tests.console.test_audio_live import FFMPEG, SINE, Body

pytestmark = pytest.mark.skipif(FFMPEG is None, reason="needs ffmpeg")


class RawClient(Protocol):
    """Sends one request and keeps whatever comes back, until the server closes the connection."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


class RecordingBrowser:
    """The browser inside: says it has sound when asked for it, records what happens to it."""

    def __init__(self, capabilities: tuple[str, ...] = ("cdp", "vnc", "audio")) -> None:
        self.capabilities = capabilities
        self.on_page_load: Any = None
        self.on_broken: Any = None
        self.calls: list[str] = []
        self.streams_at_cleanup: int | None = None
        self.outer: AudibleBrowser | None = None

    async def prepare(
        self,
        homepage: str,
        cookies: Sequence[Mapping[str, Any]],
        window: Any,
        audio: bool,
        *,
        vnc_password: str | None = None,
    ) -> dict[str, Any]:
        self.calls.append("prepare")
        return {"browser": "chromium", "audio": audio, "vnc": {"host": "10.0.0.5", "port": 5900}}

    async def cleanup(self) -> dict[str, Any]:
        self.calls.append("cleanup")
        assert self.outer is not None and self.outer.server is not None
        self.streams_at_cleanup = len(self.outer.server.streams)
        return {"browser": "chromium", "wasPrepared": True}


class AudibleBrowserTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.inner = RecordingBrowser()
        self.browser = self.audible(self.inner, FFMPEG)
        self.browser.startService()
        self.addCleanup(self.browser.stopService)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def audible(self, inner: RecordingBrowser, ffmpeg: str | None) -> AudibleBrowser:
        browser = AudibleBrowser(
            inner,  # type: ignore[arg-type]
            reactor,
            ffmpeg=ffmpeg,
            endpoint=TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            host="10.0.0.5",
            source=SINE,
        )
        inner.outer = browser
        return browser

    async def listening(self) -> int:
        await wait_until(reactor, lambda: self.browser.port is not None, 5, "the capture server listens")
        assert self.browser.port is not None
        port: int = self.browser.port.getHost().port  # type: ignore[attr-defined]
        return port

    async def get(self, password: str | None, pool: HTTPConnectionPool | None = None) -> Any:
        headers = Headers({b"authorization": [f"Bearer {password}".encode()]} if password else {})
        url = f"http://127.0.0.1:{await self.listening()}/audio.ogg".encode()
        return await Agent(reactor, pool=pool or self.pool).request(b"GET", url, headers)

    def test_capabilities_say_audio_only_when_the_capture_can_run(self) -> None:
        assert self.browser.capabilities == ("cdp", "vnc", "audio")
        assert self.audible(RecordingBrowser(), None).capabilities == ("cdp", "vnc")
        assert self.audible(RecordingBrowser(("cdp", "vnc")), FFMPEG).capabilities == ("cdp", "vnc")

    def test_find_encoder_checks_pulse_input_and_opus(self) -> None:
        assert find_encoder() == (FFMPEG, "")
        assert find_encoder(which=lambda name: None) == (None, "ffmpeg is not installed")

        class Ran:
            def __init__(self, out: bytes) -> None:
                self.stdout = out

        no_opus = find_encoder(
            which=lambda name: "/x/ffmpeg",
            run=lambda argv, **kw: Ran(b" D  pulse  Pulse audio input\n A....D libvorbis  Vorbis\n"),  # type: ignore[arg-type]
        )
        assert no_opus == (None, "/x/ffmpeg has no libopus encoder")

    def test_page_events_and_breakage_reach_the_agent_through_the_wrapper(self) -> None:
        def heard(event: Mapping[str, Any]) -> None:
            pass

        self.browser.on_page_load = heard
        assert self.inner.on_page_load is heard
        assert self.browser.on_page_load is heard

    def test_a_session_with_sound_is_served_until_cleanup(self) -> Deferred[None]:
        async def run() -> None:
            port = await self.listening()
            answer = await self.browser.prepare("http://x/", [], (800, 600), True, vnc_password="pw345678")
            assert answer["audio"] is True
            assert answer["audioServer"] == {"host": "10.0.0.5", "port": port}
            assert (await self.get("wrong")).code == 401
            # a client that would keep its connection alive for another request
            client = RawClient(
                b"GET /audio.ogg HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer pw345678\r\n\r\n"
            )
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
            await wait_until(reactor, lambda: len(client.data) > 8000, 10, "a second of the stream")
            assert client.data.startswith(b"HTTP/1.1 200 ")
            # CLEANUP: the stream and its (kept-alive) connection end before the browser is cleaned
            await self.browser.cleanup()
            assert self.inner.calls == ["prepare", "cleanup"]
            await client.closed  # the guest closed the connection too: nothing kept for the next worker
            assert not self.browser.server.streams  # type: ignore[union-attr]
            assert (await self.get("pw345678")).code == 403  # a FREE VM serves nothing

        return ensureDeferred(run())

    def test_a_batch_without_sound_gets_no_server(self) -> Deferred[None]:
        async def run() -> None:
            await self.listening()
            answer = await self.browser.prepare("http://x/", [], (800, 600), False, vnc_password="pw345678")
            assert answer["audio"] is False
            assert "audioServer" not in answer
            assert (await self.get("pw345678")).code == 403

        return ensureDeferred(run())

    def test_a_new_prepare_ends_the_last_sessions_streams(self) -> Deferred[None]:
        async def run() -> None:
            await self.browser.prepare("http://x/", [], (800, 600), True, vnc_password="first111")
            response = await self.get("first111")
            body = Body()
            response.deliverBody(body)
            await wait_until(reactor, lambda: len(body.data) > 1000, 10, "the stream flows")
            await self.browser.prepare("http://x/", [], (800, 600), True, vnc_password="second22")
            await body.done
            assert (await self.get("first111")).code == 401
            second = RawClient(
                b"GET /audio.pcm HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer second22\r\n\r\n"
            )
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", await self.listening()), second)
            await wait_until(reactor, lambda: len(second.data) > 4800, 10, "the new session's stream")
            assert second.data.startswith(b"HTTP/1.1 200 ")
            await self.browser.cleanup()
            await second.closed

        return ensureDeferred(run())

    def test_stopping_closes_the_port(self) -> Deferred[None]:
        async def run() -> None:
            port = await self.listening()
            await self.browser.stopService()
            assert self.browser.port is None
            failed = await treq.get(f"http://127.0.0.1:{port}/audio.ogg", pool=self.pool).addErrback(
                lambda f: f.value
            )
            assert isinstance(failed, ConnectionRefusedError)
            self.browser.startService()  # for the cleanup's stopService

        return ensureDeferred(run())
