"""Publishers resumed together are handled in one reactor turn, with one timed call."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.broker.support import Client, make_broker


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
