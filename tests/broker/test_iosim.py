"""The broker and a minimal codec-based client wired together with twisted.test.iosim."""

from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from tests.broker.support import CONTROLLER, make_broker
from vmcloud.broker.protocol import StompServerProtocol
from vmcloud.stomp.codec import Decoder, encode
from vmcloud.stomp.frame import Frame


class FrameClient(Protocol):
    """Writes frames, collects frames; what the guest agent's client does at its core."""

    def __init__(self) -> None:
        self.decoder = Decoder()
        self.frames: list[Frame] = []
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.frames.extend(self.decoder.feed(data))

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True

    def say(self, command: str, headers: dict[str, str], body: bytes = b"") -> None:
        self.transport.write(encode(Frame(command, headers, body)))  # type: ignore[union-attr]


class IOSimTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = make_broker(self.clock)

    def pair(self) -> tuple[FrameClient, iosim.IOPump]:
        def server() -> StompServerProtocol:
            protocol = self.broker.factory().buildProtocol(None)
            assert isinstance(protocol, StompServerProtocol)
            return protocol

        client, _server, pump = iosim.connectedServerAndClient(server, FrameClient, clock=self.clock)
        client.say(
            "CONNECT",
            {"accept-version": "1.2", "host": "h", "login": CONTROLLER[0], "passcode": CONTROLLER[1]},
        )
        pump.flush()
        self.assertEqual(client.frames[-1].command, "CONNECTED")
        return client, pump

    def test_message_between_two_connections(self) -> None:
        consumer, consumer_pump = self.pair()
        producer, producer_pump = self.pair()
        consumer.say("SUBSCRIBE", {"destination": "/queue/q", "id": "1", "ack": "client", "receipt": "r"})
        consumer_pump.flush()
        producer.say("SEND", {"destination": "/queue/q", "receipt": "sent"}, b"\x00binary\x00")
        producer_pump.flush()
        consumer_pump.flush()
        self.assertEqual(producer.frames[-1], Frame("RECEIPT", {"receipt-id": "sent"}))
        message = consumer.frames[-1]
        self.assertEqual(message.body, b"\x00binary\x00")
        consumer.say("ACK", {"id": message.headers["ack"]})
        consumer.say("DISCONNECT", {"receipt": "bye"})
        consumer_pump.flush()
        self.assertEqual(consumer.frames[-1], Frame("RECEIPT", {"receipt-id": "bye"}))
        self.assertTrue(consumer.lost)
        self.assertEqual(self.broker.stats().unacked_messages, 0)

    def test_error_then_close(self) -> None:
        client, pump = self.pair()
        client.say("FROB", {})
        pump.flush()
        self.assertEqual(client.frames[-1].command, "ERROR")
        self.assertTrue(client.lost)
        self.assertEqual(self.broker.stats().connections, 0)
