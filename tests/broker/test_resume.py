"""Publishers resumed together are handled in one reactor turn, with one timed call."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.broker.support import Client, make_broker
from vmcloud.broker import BrokerLimits


class BatchedResumeTests(SynchronousTestCase):
    def test_one_timed_call_resumes_every_released_publisher(self) -> None:
        clock = Clock()
        broker = make_broker(clock)
        consumer = Client(broker)
        consumer.connect()
        consumer.subscribe("/topic/flood")
        consumer.protocol.pauseProducing()  # its socket buffer is full
        publishers = [Client(broker) for _ in range(3)]
        for n, publisher in enumerate(publishers):
            publisher.connect()
            publisher.write(
                f"SEND\ndestination:/topic/flood\n\n{n}a\x00SEND\ndestination:/topic/flood\n\n{n}b\x00".encode()
            )
            self.assertEqual(publisher.transport.producerState, "paused")
        self.assertEqual(broker.stats().paused_publishers, 3)
        consumer.protocol.resumeProducing()  # drained
        self.assertEqual(broker.stats().paused_publishers, 0)
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], [0.0])
        clock.advance(0)
        delivered = [f.body for f in consumer.frames() if f.command == "MESSAGE"]
        self.assertEqual(delivered[:3], [b"0a", b"1a", b"2a"])  # sent before the consumer filled up
        self.assertEqual(sorted(delivered[3:]), [b"0b", b"1b", b"2b"])
        self.assertEqual(clock.getDelayedCalls(), [])


class TransportBufferTests(SynchronousTestCase):
    def test_full_access_connections_get_the_larger_buffer_guests_keep_the_default(self) -> None:
        class TCPLike(StringTransport):
            bufferSize = 65536

        broker = make_broker(anonymous_guests=True, limits=BrokerLimits(full_access_buffer_bytes=123_456))
        controller = Client(broker, transport_class=TCPLike)
        controller.connect()
        guest = Client(broker, transport_class=TCPLike)
        guest.connect(login="guest-1", passcode=None)
        self.assertEqual(controller.transport.bufferSize, 123_456)  # type: ignore[attr-defined]
        self.assertEqual(guest.transport.bufferSize, 65536)  # type: ignore[attr-defined]
