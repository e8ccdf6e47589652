"""Delivery semantics and back-pressure of the broker: topics, queues, acks, transactions, bounds."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tests.broker.support import Client, make_broker
from vmcloud.broker import BrokerLimits
from vmcloud.stomp.frame import Frame
from vmcloud.words.destinations import guest_destination


def bodies(frames: list[Frame]) -> list[bytes]:
    return [f.body for f in frames if f.command == "MESSAGE"]


class TopicTests(SynchronousTestCase):
    def test_fan_out_to_every_subscriber(self) -> None:
        broker = make_broker()
        subscribers = []
        for _ in range(3):
            client = Client(broker)
            client.connect()
            client.subscribe("/topic/news")
            subscribers.append(client)
        publisher = Client(broker)
        publisher.connect()
        publisher.send_frame("SEND", {"destination": "/topic/news", "x-kind": "flash"}, b"one")
        publisher.send_frame("SEND", {"destination": "/topic/other"}, b"nobody listens")
        for client in subscribers:
            [message] = client.frames()
            self.assertEqual(message.body, b"one")
            self.assertEqual(message.headers["x-kind"], "flash")
            self.assertEqual(message.headers["subscription"], "0")
            self.assertEqual(message.headers["destination"], "/topic/news")
            self.assertEqual(message.headers["content-length"], "3")
        self.assertEqual(broker.stats().queued_messages, 0)

    def test_topics_store_nothing(self) -> None:
        broker = make_broker()
        publisher = Client(broker)
        publisher.connect()
        publisher.send_frame("SEND", {"destination": "/topic/news"}, b"lost")
        late = Client(broker)
        late.connect()
        late.subscribe("/topic/news")
        self.assertEqual(late.frames(), [])


class QueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.broker = make_broker()
        self.publisher = self.broker.attach_local("controller")

    def consumer(self, ack: str = "auto", sub_id: str = "0") -> Client:
        client = Client(self.broker)
        client.connect()
        client.subscribe("/queue/work", sub_id, ack)
        return client

    def publish(self, *payloads: bytes) -> None:
        for payload in payloads:
            self.publisher.send("/queue/work", payload)

    def test_round_robin(self) -> None:
        first, second = self.consumer(), self.consumer()
        self.publish(b"1", b"2", b"3", b"4")
        self.assertEqual(bodies(first.frames()), [b"1", b"3"])
        self.assertEqual(bodies(second.frames()), [b"2", b"4"])

    def test_stored_while_nobody_listens_then_delivered_in_order(self) -> None:
        self.publish(b"1", b"2", b"3")
        self.assertEqual(self.broker.stats().queued_messages, 3)
        consumer = self.consumer()
        self.assertEqual(bodies(consumer.frames()), [b"1", b"2", b"3"])
        self.assertEqual(self.broker.stats().queued_messages, 0)

    def test_client_individual_redelivery_after_disconnect(self) -> None:
        first = self.consumer("client-individual")
        self.publish(b"1", b"2", b"3")
        messages = first.frames()
        self.assertEqual(bodies(messages), [b"1", b"2", b"3"])
        self.assertEqual(messages[0].headers["ack"], messages[0].headers["message-id"])
        first.send_frame("ACK", {"id": messages[1].headers["ack"]})
        self.assertEqual(self.broker.stats().unacked_messages, 2)
        first.lose()
        second = self.consumer("client-individual")
        redelivered = second.frames()
        self.assertEqual(bodies(redelivered), [b"1", b"3"])
        self.assertEqual({f.headers.get("redelivered") for f in redelivered}, {"true"})

    def test_client_ack_is_cumulative(self) -> None:
        consumer = self.consumer("client")
        self.publish(b"1", b"2", b"3")
        messages = consumer.frames()
        consumer.send_frame("ACK", {"id": messages[1].headers["ack"]})
        self.assertEqual(self.broker.stats().unacked_messages, 1)
        consumer.send_frame("UNSUBSCRIBE", {"id": "0"})
        again = self.consumer("auto", "1")
        self.assertEqual(bodies(again.frames()), [b"3"])

    def test_ack_forms_of_every_version(self) -> None:
        consumer = self.consumer("client-individual")
        self.publish(b"1", b"2", b"3")
        m1, m2, m3 = consumer.frames()
        consumer.send_frame("ACK", {"id": m1.headers["ack"]})  # 1.2
        consumer.send_frame("ACK", {"message-id": m2.headers["message-id"], "subscription": "0"})  # 1.1
        consumer.send_frame("ACK", {"message-id": m3.headers["message-id"]})  # 1.0
        self.assertEqual(self.broker.stats().unacked_messages, 0)

    def test_unknown_ack_is_ignored(self) -> None:
        consumer = self.consumer("client-individual")
        consumer.send_frame("ACK", {"id": "m-999", "receipt": "r"})
        self.assertEqual(consumer.frames(), [Frame("RECEIPT", {"receipt-id": "r"})])

    def test_nack_requeues(self) -> None:
        first = self.consumer("client-individual")
        second = self.consumer("client-individual")
        self.publish(b"1")
        [message] = first.frames()
        first.send_frame("NACK", {"id": message.headers["ack"]})
        [again] = second.frames()
        self.assertEqual(again.body, b"1")
        self.assertEqual(again.headers["redelivered"], "true")

    def test_unacked_limit_holds_messages_in_the_queue(self) -> None:
        self.broker = make_broker(limits=BrokerLimits(max_unacked=2))
        self.publisher = self.broker.attach_local("controller")
        consumer = self.consumer("client-individual")
        self.publish(b"1", b"2", b"3")
        messages = consumer.frames()
        self.assertEqual(bodies(messages), [b"1", b"2"])
        self.assertEqual(self.broker.stats().queued_messages, 1)
        consumer.send_frame("ACK", {"id": messages[0].headers["ack"]})
        self.assertEqual(bodies(consumer.frames()), [b"3"])


class TransactionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.broker = make_broker()
        self.consumer = Client(self.broker)
        self.consumer.connect()
        self.consumer.subscribe("/queue/tx", "0", "client-individual")
        self.client = Client(self.broker)
        self.client.connect()

    def test_commit_and_abort(self) -> None:
        self.client.send_frame("BEGIN", {"transaction": "a"})
        self.client.send_frame("SEND", {"destination": "/queue/tx", "transaction": "a"}, b"committed")
        self.client.send_frame("BEGIN", {"transaction": "b"})
        self.client.send_frame("SEND", {"destination": "/queue/tx", "transaction": "b"}, b"aborted")
        self.assertEqual(self.consumer.frames(), [])
        self.client.send_frame("COMMIT", {"transaction": "a"})
        self.client.send_frame("ABORT", {"transaction": "b"})
        self.assertEqual(bodies(self.consumer.frames()), [b"committed"])

    def test_acks_in_a_transaction(self) -> None:
        self.client.send_frame("SEND", {"destination": "/queue/tx"}, b"x")
        [message] = self.consumer.frames()
        self.consumer.send_frame("BEGIN", {"transaction": "t"})
        self.consumer.send_frame("ACK", {"id": message.headers["ack"], "transaction": "t"})
        self.assertEqual(self.broker.stats().unacked_messages, 1)
        self.consumer.send_frame("COMMIT", {"transaction": "t"})
        self.assertEqual(self.broker.stats().unacked_messages, 0)

    def test_disconnect_aborts(self) -> None:
        self.client.send_frame("BEGIN", {"transaction": "t"})
        self.client.send_frame("SEND", {"destination": "/queue/tx", "transaction": "t"}, b"never")
        self.client.lose()
        self.assertEqual(self.consumer.frames(), [])

    def test_transaction_limits(self) -> None:
        broker = make_broker(limits=BrokerLimits(max_transactions=1, max_transaction_frames=2))
        client = Client(broker)
        client.connect()
        client.send_frame("BEGIN", {"transaction": "t"})
        for _ in range(2):
            client.send_frame("SEND", {"destination": "/queue/x", "transaction": "t"}, b"x")
        client.send_frame("SEND", {"destination": "/queue/x", "transaction": "t"}, b"x")
        self.assertIn("transaction too large", client.error().headers["message"])
        other = Client(broker)
        other.connect()
        other.send_frame("BEGIN", {"transaction": "1"})
        other.send_frame("BEGIN", {"transaction": "2"})
        self.assertIn("open transactions", other.error().headers["message"])


class LocalSessionTests(SynchronousTestCase):
    def test_messages_arrive_by_direct_call_shaped_like_the_wire(self) -> None:
        broker = make_broker()
        controller = broker.attach_local("controller")
        got: list[Frame] = []
        sub_id = controller.subscribe("/queue/vmcloud.controller", got.append)
        guest = Client(broker)
        guest.connect()
        guest.send_frame(
            "SEND", {"destination": "/queue/vmcloud.controller", "ip": "10.0.0.5"}, b"HELLO\x00!"
        )
        [frame] = got
        self.assertEqual(frame.command, "MESSAGE")
        self.assertEqual(frame.body, b"HELLO\x00!")
        self.assertEqual(frame.headers["ip"], "10.0.0.5")
        self.assertEqual(frame.headers["subscription"], sub_id)
        controller.unsubscribe(sub_id)
        guest.send_frame("SEND", {"destination": "/queue/vmcloud.controller"}, b"stored")
        self.assertEqual(len(got), 1)
        self.assertEqual(broker.stats().queued_messages, 1)

    def test_stored_messages_reach_a_new_local_subscriber(self) -> None:
        broker = make_broker()
        controller = broker.attach_local("controller")
        controller.send("/queue/q", b"early")
        got: list[Frame] = []
        controller.subscribe("/queue/q", got.append)
        self.assertEqual(bodies(got), [b"early"])

    def test_a_failing_callback_is_logged_and_delivery_goes_on(self) -> None:
        broker = make_broker()
        controller = broker.attach_local("controller")

        def explode(frame: Frame) -> None:
            raise ValueError("bug in a word")

        got: list[Frame] = []
        controller.subscribe("/topic/t", explode)
        controller.subscribe("/topic/t", got.append)
        with capturedLogs() as events:
            controller.send("/topic/t", b"x")
        self.assertEqual(bodies(got), [b"x"])
        self.assertEqual([e["log_level"] for e in events], [LogLevel.critical])
        self.flushLoggedErrors(ValueError)

    def test_close_ends_subscriptions(self) -> None:
        broker = make_broker()
        controller = broker.attach_local("controller")
        controller.subscribe("/topic/t", lambda f: None)
        self.assertEqual(broker.stats().subscriptions, 1)
        controller.close()
        self.assertEqual(broker.stats().subscriptions, 0)


class BackPressureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_publisher_paused_while_a_topic_consumer_is_congested(self) -> None:
        broker = make_broker(self.clock)
        consumer = Client(broker)
        consumer.connect()
        consumer.subscribe("/topic/flood")
        publisher = Client(broker)
        publisher.connect()
        consumer.protocol.pauseProducing()  # its socket buffer is full
        publisher.write(
            b"SEND\ndestination:/topic/flood\n\n1\x00"
            b"SEND\ndestination:/topic/flood\n\n2\x00"
            b"SEND\ndestination:/topic/flood\n\n3\x00"
        )
        self.assertEqual(publisher.transport.producerState, "paused")
        self.assertEqual(broker.stats().paused_publishers, 1)
        self.assertEqual(bodies(consumer.frames()), [b"1"])  # the rest waits, unparsed into work
        consumer.protocol.resumeProducing()  # drained
        self.assertEqual(publisher.transport.producerState, "producing")
        self.assertEqual(broker.stats().paused_publishers, 0)
        self.clock.advance(0)
        self.assertEqual(bodies(consumer.frames()), [b"2", b"3"])

    def test_publisher_paused_while_a_queue_backlog_is_high(self) -> None:
        broker = make_broker(self.clock, limits=BrokerLimits(queue_high_water_messages=4))
        publisher = Client(broker)
        publisher.connect()
        for n in range(4):
            publisher.send_frame("SEND", {"destination": "/queue/backlog"}, str(n).encode())
        self.assertEqual(publisher.transport.producerState, "paused")
        self.assertEqual(broker.stats().queued_messages, 4)
        consumer = Client(broker)
        consumer.connect()
        consumer.subscribe("/queue/backlog")
        self.assertEqual(bodies(consumer.frames()), [b"0", b"1", b"2", b"3"])
        self.assertEqual(publisher.transport.producerState, "producing")

    def test_paused_publisher_is_not_taken_for_silent(self) -> None:
        limits = BrokerLimits(queue_high_water_messages=1)
        broker = make_broker(self.clock, limits=limits)
        publisher = Client(broker)
        publisher.connect(heart_beat="1000,0")
        publisher.send_frame("SEND", {"destination": "/queue/backlog"}, b"x")
        self.assertEqual(publisher.transport.producerState, "paused")
        self.clock.pump([0.5] * 20)
        self.assertFalse(publisher.closing)

    def test_congested_queue_consumer_is_skipped(self) -> None:
        broker = make_broker(self.clock)
        controller = broker.attach_local("controller")
        slow, fast = Client(broker), Client(broker)
        for client in (slow, fast):
            client.connect()
            client.subscribe("/queue/jobs")
        slow.protocol.pauseProducing()
        for n in range(4):
            controller.send("/queue/jobs", str(n).encode())
        self.assertEqual(bodies(fast.frames()), [b"0", b"1", b"2", b"3"])
        self.assertEqual(slow.frames(), [])

    def test_slow_topic_consumer_is_dropped(self) -> None:
        broker = make_broker(self.clock, limits=BrokerLimits(max_consumer_lag_bytes=1000))
        controller = broker.attach_local("controller")
        slow = Client(broker)
        slow.connect()
        slow.subscribe("/topic/firehose")
        slow.protocol.pauseProducing()
        for _ in range(10):
            controller.send("/topic/firehose", b"x" * 200)
        self.assertIn("slow consumer", slow.error().headers["message"])

    def test_one_large_message_does_not_make_a_consumer_slow(self) -> None:
        """The write that fills the socket buffer is not lag; only what follows it counts."""

        class SmallBuffer(StringTransport):
            def write(self, data: bytes) -> None:
                super().write(data)
                if len(self.value()) > 4096 and self.producer is not None:
                    self.producer.pauseProducing()

        broker = make_broker(self.clock, limits=BrokerLimits(max_consumer_lag_bytes=10_000))
        controller = broker.attach_local("controller")
        consumer = Client(broker, transport_class=SmallBuffer)
        consumer.connect()
        consumer.subscribe("/topic/files")
        controller.send("/topic/files", b"x" * 50_000)
        self.assertFalse(consumer.closing)
        self.assertEqual(bodies(consumer.frames()), [b"x" * 50_000])
        controller.send("/topic/files", b"y" * 50_000)  # still congested: this one is lag
        self.assertIn("slow consumer", consumer.error().headers["message"])

    def test_queue_hard_cap_drops_the_oldest(self) -> None:
        limits = BrokerLimits(queue_max_messages=5, queue_high_water_messages=3)
        broker = make_broker(self.clock, limits=limits)
        controller = broker.attach_local("controller")
        for n in range(8):
            controller.send("/queue/vmcloud.guest.gone", str(n).encode())
        stats = broker.stats()
        self.assertEqual((stats.queued_messages, stats.dropped_messages), (5, 3))
        consumer = Client(broker)
        consumer.connect()
        consumer.subscribe("/queue/vmcloud.guest.gone")
        self.assertEqual(bodies(consumer.frames()), [b"3", b"4", b"5", b"6", b"7"])

    def test_full_store_refuses_a_send(self) -> None:
        limits = BrokerLimits(max_stored_messages=2, queue_high_water_messages=100)
        broker = make_broker(self.clock, limits=limits)
        publisher = Client(broker)
        publisher.connect()
        for n in range(3):
            publisher.send_frame("SEND", {"destination": f"/queue/q{n}"}, b"x")
        self.assertIn("store is full", publisher.error().headers["message"])
        self.assertEqual(broker.stats().queued_messages, 2)

    def test_revoke_purges_the_guest_queue(self) -> None:
        broker = make_broker(self.clock)
        controller = broker.attach_local("controller")
        login, _passcode = broker.credentials.mint("5")
        controller.send(guest_destination(login), b"CMD_RUN")
        self.assertEqual(broker.stats().queued_messages, 1)
        broker.credentials.revoke("5")
        self.assertEqual(broker.stats().queued_messages, 0)


class StatsTests(SynchronousTestCase):
    def test_stats(self) -> None:
        broker = make_broker()
        client = Client(broker)
        client.connect()
        client.subscribe("/queue/a", "1", "client")
        client.subscribe("/topic/b", "2")
        controller = broker.attach_local("controller")
        controller.send("/queue/a", b"x")
        controller.send("/queue/c", b"y")
        stats = broker.stats()
        self.assertEqual(
            (
                stats.connections,
                stats.subscriptions,
                stats.queues,
                stats.queued_messages,
                stats.unacked_messages,
            ),
            (1, 2, 2, 1, 1),
        )
        client.lose()
        stats = broker.stats()
        self.assertEqual((stats.connections, stats.subscriptions, stats.queued_messages), (0, 0, 2))
