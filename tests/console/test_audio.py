"""The audio fan-out on a Clock: one capture per handle, header pages for late joiners, linger,
restart with back-off, revocation, and listeners that miss packets instead of queueing them."""

from __future__ import annotations

import json
import struct
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from vmcloud.console.audio import (
    CLOSE_NO_AUDIO,
    GIVE_UP_AFTER,
    LINGER,
    RETRY,
    AudioHub,
    AudioSource,
    OggResponse,
)
from vmcloud.console.ogg import FIRST, OggPage
from vmcloud.console.registry import AccessRegistry
from vmcloud.console.targets import Target, handle_key
from vmcloud.console.vnc import CLOSE_ACCESS_ENDED

TARGET = Target(handle_key("H1"), "10.0.0.5", 5901, "vm1", "pw")


def page(header_type: int, *packets: bytes, sequence: int = 0) -> bytes:
    lacing = b"".join(bytes([255] * (len(p) // 255) + [len(p) % 255]) for p in packets)
    head = struct.pack("<4sBBqIIIB", b"OggS", 0, header_type, 0, 7, sequence, 0, len(lacing))
    return head + lacing + b"".join(packets)


OPUS_HEAD = b"OpusHead" + struct.pack("<BBHIhB", 1, 2, 312, 48000, 0, 0)
HEADERS = page(FIRST, OPUS_HEAD) + page(0, b"OpusTags" + b"\0" * 8, sequence=1)


class FakeResponse:
    def __init__(self, code: int = 200) -> None:
        self.code = code
        self.phrase = b"OK" if code == 200 else b"Refused"
        self.headers = Headers()
        self.body: Protocol | None = None
        self.transport = StringTransport()

    def deliverBody(self, protocol: Protocol) -> None:
        self.body = protocol
        protocol.makeConnection(self.transport)


class FakeAgent:
    def __init__(self) -> None:
        self.requests: list[tuple[bytes, Headers, Deferred[Any]]] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,  # noqa: N803 - IAgent's name
    ) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.requests.append((uri, headers or Headers(), d))
        return d

    def answer(self, response: FakeResponse, index: int = -1) -> FakeResponse:
        self.requests[index][2].callback(response)
        return response


class Recorder:
    def __init__(self) -> None:
        self.begun = 0
        self.pages: list[OggPage] = []
        self.ended: tuple[int, str] | None = None

    def begin(self, source: AudioSource) -> None:
        self.begun += 1
        self.format = source.format()

    def page(self, page: OggPage) -> None:
        self.pages.append(page)

    def pcm(self, data: bytes) -> None:
        raise AssertionError("an Ogg source")

    def end(self, code: int, reason: str) -> None:
        self.ended = (code, reason)


class FakeRequest:
    """What OggResponse uses of a twisted.web request (DummyRequest pulls from push producers)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.finished = False
        self._finish: Deferred[None] = Deferred()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def finish(self) -> None:
        self.finished = True

    def notifyFinish(self) -> Deferred[None]:
        return self._finish


class AudioSourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.agent = FakeAgent()
        self.registry = AccessRegistry()
        self.hub = AudioHub(clock=self.clock, agent=self.agent, registry=self.registry)  # type: ignore[arg-type]

    def start(self) -> tuple[AudioSource, Recorder, FakeResponse]:
        first = Recorder()
        source = self.hub.listen(TARGET, "ogg", first)
        ((uri, headers, _),) = self.agent.requests
        assert uri == b"http://10.0.0.5:5901/audio.ogg"
        assert headers.getRawHeaders(b"authorization") == [b"Bearer pw"]
        response = self.agent.answer(FakeResponse())
        return source, first, response

    def test_one_capture_and_headers_for_late_joiners(self) -> None:
        source, first, response = self.start()
        assert response.body is not None
        response.body.dataReceived(HEADERS[:30])
        assert first.begun == 0  # not before OpusTags
        response.body.dataReceived(HEADERS[30:] + page(0, b"\xfc" + b"a" * 40, sequence=2))
        assert first.begun == 1 and len(first.pages) == 1
        assert first.format["channels"] == 2 and first.format["preSkip"] == 312
        late = Recorder()
        assert self.hub.listen(TARGET, "ogg", late) is source
        assert len(self.agent.requests) == 1  # the same capture
        assert late.begun == 1 and source.header_pages == [
            HEADERS[: len(page(FIRST, OPUS_HEAD))],
            HEADERS[len(page(FIRST, OPUS_HEAD)) :],
        ]
        response.body.dataReceived(page(0, b"\xfc" + b"b" * 40, sequence=3))
        assert len(first.pages) == 2 and len(late.pages) == 1

    def test_linger_then_stop(self) -> None:
        source, first, response = self.start()
        source.remove(first)
        self.clock.advance(LINGER - 0.1)
        again = Recorder()
        self.hub.listen(TARGET, "ogg", again)  # a reload: same capture, no new request
        assert len(self.agent.requests) == 1 and not source.ended
        source.remove(again)
        self.clock.advance(LINGER)
        assert source.ended and response.transport.producerState == "stopped"
        assert self.hub.sources == {} and self.registry.total == 0

    def test_broken_capture_restarts_with_back_off(self) -> None:
        _, first, response = self.start()
        assert response.body is not None
        response.body.connectionLost(Failure(ResponseDone()))
        assert len(self.agent.requests) == 1
        self.clock.advance(RETRY[0])
        assert len(self.agent.requests) == 2
        self.agent.answer(FakeResponse(503))
        self.clock.advance(RETRY[1] - 0.01)
        assert len(self.agent.requests) == 2
        self.clock.advance(0.01)
        assert len(self.agent.requests) == 3
        again = self.agent.answer(FakeResponse())
        assert again.body is not None
        again.body.dataReceived(HEADERS)
        assert first.begun == 1  # told the (new) format

    def test_a_capture_that_never_comes_back_closes_its_listeners(self) -> None:
        _, first, response = self.start()
        assert response.body is not None
        response.body.connectionLost(Failure(ResponseDone()))
        for n in range(1, GIVE_UP_AFTER):
            self.clock.advance(RETRY[min(n - 1, len(RETRY) - 1)])
            assert len(self.agent.requests) == n + 1
            self.agent.answer(FakeResponse(503))
        assert first.ended is not None and first.ended[0] == CLOSE_NO_AUDIO
        assert self.hub.sources == {} and not self.clock.getDelayedCalls()

    def test_garbage_from_the_guest_restarts_the_capture(self) -> None:
        _, _, response = self.start()
        assert response.body is not None
        response.body.dataReceived(b"<html>" + b"x" * 40)
        assert response.transport.producerState == "stopped"
        self.clock.advance(RETRY[0])
        assert len(self.agent.requests) == 2

    def test_revoke_ends_listeners_and_capture(self) -> None:
        source, first, response = self.start()
        self.registry.handle_ended("H1", "handle released")
        assert first.ended == (CLOSE_ACCESS_ENDED, "handle released")
        assert source.ended and response.transport.producerState == "stopped"
        assert self.hub.sources == {} and not self.clock.getDelayedCalls()

    def test_revoke_while_the_guest_has_not_answered(self) -> None:
        self.hub.listen(TARGET, "ogg", Recorder())
        self.registry.handle_ended("H1", "handle released")
        ((_, _, d),) = self.agent.requests
        assert d.called and not self.clock.getDelayedCalls()  # cancelled, no retry

    def test_a_full_http_listener_misses_pages(self) -> None:
        _, first, response = self.start()
        request = FakeRequest()
        listener = OggResponse(self.hub, request)  # type: ignore[arg-type]
        listener.source = self.hub.listen(TARGET, "ogg", listener)
        assert response.body is not None
        response.body.dataReceived(HEADERS)
        assert b"".join(request.written) == HEADERS
        flag = request.producer
        flag.pauseProducing()  # its socket buffer is full
        response.body.dataReceived(page(0, b"\xfc" + b"a" * 40, sequence=2))
        assert listener.skipped == 1 and b"".join(request.written) == HEADERS
        flag.resumeProducing()
        third = page(0, b"\xfc" + b"b" * 40, sequence=3)
        response.body.dataReceived(third)
        assert b"".join(request.written) == HEADERS + third
        assert len(first.pages) == 2  # the other listener missed nothing
        self.registry.handle_ended("H1", "expired")
        assert request.finished

    def test_pcm_keeps_samples_whole(self) -> None:
        got: list[bytes] = []

        class Pcm(Recorder):
            def pcm(self, data: bytes) -> None:
                got.append(data)

        listener = Pcm()
        self.hub.listen(TARGET, "pcm", listener)
        response = self.agent.answer(FakeResponse())
        assert listener.begun == 1 and listener.format["codec"] == "pcm"
        assert response.body is not None
        response.body.dataReceived(b"abc")
        response.body.dataReceived(b"defg")
        assert got == [b"ab", b"cdef"]

    def test_format_message_is_json(self) -> None:
        source, _, response = self.start()
        assert response.body is not None
        response.body.dataReceived(HEADERS)
        message = json.loads(json.dumps(source.format()))
        assert message["codec"] == "opus" and message["head"]
