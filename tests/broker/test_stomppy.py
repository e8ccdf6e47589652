"""Acceptance 3: stomp.py (a real client library) and raw sockets against a real listening broker.

The broker runs in a subprocess (``tests/broker/run_broker.py``) on 127.0.0.1 with a free port,
shared by the tests of this module; every wait has a timeout.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import stomp
import stomper
import stomper.stomp_10 as stomp_10
from twisted.trial.unittest import SynchronousTestCase

from tests.broker.live import BrokerProcess, Raw, raw_frame
from vmcloud.stomp.codec import Decoder, encode
from vmcloud.stomp.frame import Frame
from vmcloud.words.destinations import BROADCAST, CONTROLLER, guest_destination

TIMEOUT = 10.0
MAX_BODY = 2 * 1024 * 1024
HEARTBEAT_FLOOR_MS = 100
LOGIN = ("controller", "controller-secret")


class Listener(stomp.ConnectionListener):  # type: ignore[misc]
    """Collects what a stomp.py connection receives, with blocking waits."""

    def __init__(self) -> None:
        self.messages: queue.Queue[Any] = queue.Queue()
        self.errors: queue.Queue[Any] = queue.Queue()
        self.receipts: queue.Queue[str] = queue.Queue()
        self.disconnected = threading.Event()

    def on_message(self, frame: Any) -> None:
        self.messages.put(frame)

    def on_error(self, frame: Any) -> None:
        self.errors.put(frame)

    def on_receipt(self, frame: Any) -> None:
        self.receipts.put(frame.headers["receipt-id"])

    def on_disconnected(self) -> None:
        self.disconnected.set()

    def message(self) -> Any:
        return self.messages.get(timeout=TIMEOUT)

    def receipt(self, expected: str) -> None:
        self.assert_equal(self.receipts.get(timeout=TIMEOUT), expected)

    def nothing_more(self, wait: float = 0.3) -> bool:
        time.sleep(wait)
        return self.messages.empty()

    @staticmethod
    def assert_equal(got: object, expected: object) -> None:
        assert got == expected, (got, expected)


class StompPyTests(SynchronousTestCase):
    broker: ClassVar[BrokerProcess]

    @classmethod
    def setUpClass(cls) -> None:
        cls.broker = BrokerProcess(
            "--heartbeat-floor-ms",
            str(HEARTBEAT_FLOOR_MS),
            "--max-body",
            str(MAX_BODY),
            "--mint",
            "a",
            "--mint",
            "b",
        )

    @classmethod
    def tearDownClass(cls) -> None:
        cls.broker.stop()

    def setUp(self) -> None:
        self.connections: list[Any] = []

    def tearDown(self) -> None:
        for connection in self.connections:
            try:
                if connection.is_connected():
                    connection.disconnect()
            except Exception:  # already gone is fine here
                pass

    # -- helpers

    def connect(
        self,
        version: str = "1.2",
        login: tuple[str, str] = LOGIN,
        heartbeats: tuple[int, int] = (0, 0),
    ) -> tuple[Any, Listener]:
        cls = {"1.0": stomp.Connection10, "1.1": stomp.Connection11, "1.2": stomp.Connection12}[version]
        kwargs: dict[str, Any] = {"auto_decode": False}
        if version != "1.0":
            kwargs["heartbeats"] = heartbeats
            kwargs["vhost"] = "whatever.example"
        connection = cls([("127.0.0.1", self.broker.port)], **kwargs)
        listener = Listener()
        connection.set_listener("test", listener)
        connection.connect(*login, wait=True)
        self.connections.append(connection)
        return connection, listener

    @contextmanager
    def raw(self) -> Iterator[socket.socket]:
        sock = socket.create_connection(("127.0.0.1", self.broker.port), timeout=TIMEOUT)
        try:
            yield sock
        finally:
            sock.close()

    @staticmethod
    def read_until_closed(sock: socket.socket) -> list[Frame]:
        """Every frame the broker sends until it closes the connection (fails on timeout)."""
        decoder = Decoder()
        frames: list[Frame] = []
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                return frames
            frames.extend(decoder.feed(data))
        raise AssertionError(f"connection still open; got {frames}")

    def raw_connect(self, sock: socket.socket, heart_beat: str = "0,0") -> Frame:
        connect = Frame(
            "CONNECT",
            {
                "accept-version": "1.2",
                "host": "h",
                "login": LOGIN[0],
                "passcode": LOGIN[1],
                "heart-beat": heart_beat,
            },
        )
        sock.sendall(encode(connect))
        decoder = Decoder()
        frames: list[Frame] = []
        while not frames:
            frames = decoder.feed(sock.recv(65536))
        return frames[0]

    def assert_others_carry_on(self) -> None:
        connection, listener = self.connect()
        connection.subscribe("/queue/carry-on", id="1")
        connection.send("/queue/carry-on", b"still working", headers={"receipt": "ok"})
        listener.receipt("ok")
        self.assertEqual(listener.message().body, b"still working")

    # -- acceptance 3

    def test_version_negotiation(self) -> None:
        for version in ("1.0", "1.1", "1.2"):
            connection, listener = self.connect(version)
            connection.subscribe("/queue/negotiated-" + version, id="s", ack="auto")
            connection.send("/queue/negotiated-" + version, b"hi " + version.encode())
            message = listener.message()
            self.assertEqual(message.body, b"hi " + version.encode())
            connection.disconnect()

    def test_connected_frame_names_the_version(self) -> None:
        for version in ("1.0", "1.1", "1.2"):
            with self.raw() as sock:
                headers = {"login": LOGIN[0], "passcode": LOGIN[1]}
                if version != "1.0":
                    headers.update({"accept-version": f"1.0,{version}", "host": "h"})
                sock.sendall(encode(Frame("CONNECT", headers)))
                decoder = Decoder()
                frames: list[Frame] = []
                while not frames:
                    frames = decoder.feed(sock.recv(4096))
                self.assertEqual(frames[0].headers["version"], version)

    def test_receipts(self) -> None:
        connection, listener = self.connect()
        connection.subscribe("/topic/receipts", id="1", headers={"receipt": "sub-1"})
        listener.receipt("sub-1")
        connection.send("/topic/receipts", b"x", headers={"receipt": "send-1"})
        listener.receipt("send-1")
        connection.disconnect(receipt="bye-1")  # stomp.py waits for this receipt
        self.assertTrue(listener.disconnected.wait(TIMEOUT))

    def test_topic_fan_out_to_three_subscribers(self) -> None:
        listeners = []
        for n in range(3):
            connection, listener = self.connect()
            connection.subscribe("/topic/fan", id=str(n), headers={"receipt": f"r{n}"})
            listener.receipt(f"r{n}")
            listeners.append(listener)
        publisher, _ = self.connect()
        publisher.send("/topic/fan", b"to all", headers={"x-trace": "42"})
        for listener in listeners:
            message = listener.message()
            self.assertEqual((message.body, message.headers["x-trace"]), (b"to all", "42"))

    def test_queue_round_robin(self) -> None:
        listeners = []
        for n in range(2):
            connection, listener = self.connect()
            connection.subscribe("/queue/rr", id="1", headers={"receipt": f"r{n}"})
            listener.receipt(f"r{n}")
            listeners.append(listener)
        publisher, plistener = self.connect()
        for n in range(4):
            publisher.send("/queue/rr", str(n).encode())
        publisher.send("/topic/sync", b"", headers={"receipt": "sent"})
        plistener.receipt("sent")
        got = [sorted(listener.message().body for _ in range(2)) for listener in listeners]
        self.assertEqual(got, [[b"0", b"2"], [b"1", b"3"]])

    def test_client_individual_ack_and_redelivery_after_disconnect(self) -> None:
        first, first_listener = self.connect()
        first.subscribe("/queue/ci", id="1", ack="client-individual", headers={"receipt": "r"})
        first_listener.receipt("r")
        publisher, _ = self.connect()
        for n in range(3):
            publisher.send("/queue/ci", str(n).encode())
        messages = [first_listener.message() for _ in range(3)]
        self.assertEqual([m.body for m in messages], [b"0", b"1", b"2"])
        first.ack(messages[1].headers["ack"], receipt="acked")
        first_listener.receipt("acked")
        first.disconnect()
        second, second_listener = self.connect("1.1")
        second.subscribe("/queue/ci", id="2", ack="client-individual")
        redelivered = [second_listener.message() for _ in range(2)]
        self.assertEqual([m.body for m in redelivered], [b"0", b"2"])
        self.assertEqual({m.headers["redelivered"] for m in redelivered}, {"true"})
        for message in redelivered:
            second.ack(message.headers["message-id"], "2")  # the 1.1 form
        self.assertTrue(second_listener.nothing_more())

    def test_nul_inside_a_body(self) -> None:
        connection, listener = self.connect()
        connection.subscribe("/queue/binary", id="1")
        body = b"\x00head\x00\x00tail\x00" + bytes(range(256))
        connection.send("/queue/binary", body)
        self.assertEqual(listener.message().body, body)

    def test_one_megabyte_body(self) -> None:
        connection, listener = self.connect()
        connection.subscribe("/queue/big", id="1")
        body = os.urandom(1024 * 1024)
        connection.send("/queue/big", body)
        message = listener.message()
        self.assertEqual(len(message.body), len(body))
        self.assertEqual(message.body, body)

    def test_header_escaping_round_trip(self) -> None:
        for version in ("1.1", "1.2"):
            connection, listener = self.connect(version)
            connection.subscribe("/queue/esc:" + version, id="1")
            odd = "colon:backslash\\newline\nend" + ("\rcr" if version == "1.2" else "")
            connection.send("/queue/esc:" + version, b"x", headers={"x-odd": odd, "x-utf8": "héhé ✓"})
            message = listener.message()
            self.assertEqual(message.headers["x-odd"], odd)
            self.assertEqual(message.headers["x-utf8"], "héhé ✓")
            self.assertEqual(message.headers["destination"], "/queue/esc:" + version)

    def test_heart_beats_keep_a_client_and_silence_drops_one(self) -> None:
        beating, listener = self.connect("1.2", heartbeats=(500, 0))
        with self.raw() as silent:
            connected = self.raw_connect(silent, heart_beat="500,0")
            self.assertEqual(connected.headers["heart-beat"], "0,500")
            started = time.monotonic()
            frames = self.read_until_closed(silent)  # dropped after 2.5 intervals of silence
            elapsed = time.monotonic() - started
        self.assertEqual(frames[-1].headers["message"], "heart-beat timeout")
        self.assertGreaterEqual(elapsed, 1.2)
        time.sleep(max(0.0, 2.0 - elapsed))
        self.assertTrue(beating.is_connected())
        beating.send("/topic/alive", b"", headers={"receipt": "alive"})
        listener.receipt("alive")

    def test_the_broker_beats_as_often_as_stomp_py_asks(self) -> None:
        """stomp.py asking for a beat from the broker every 300 ms gets them (it got one per 10 s),
        and one asking below the floor gets one per floor, not more."""
        counts = []
        for asked in (300, 20):
            beats = threading.Semaphore(0)
            connection, listener = self.connect("1.2", heartbeats=(0, asked))
            listener.on_heartbeat = beats.release
            started = time.monotonic()
            got = 0
            while time.monotonic() - started < 1.5:
                if beats.acquire(timeout=0.05):
                    got += 1
            counts.append(got)
            self.assertTrue(connection.is_connected())
            connection.send("/topic/beaten", b"", headers={"receipt": f"beaten-{asked}"})
            listener.receipt(f"beaten-{asked}")
        # 1.5 s: 5 beats at 300 ms, 15 at the 100 ms floor (a loaded machine may lose a few)
        self.assertGreaterEqual(counts[0], 3)
        self.assertLessEqual(counts[0], 6)
        self.assertGreaterEqual(counts[1], 8)
        self.assertLessEqual(counts[1], 16)

    def test_error_cases_close_only_the_offender(self) -> None:
        cases = {
            "malformed": b"SEND\ndestination /queue/x\n\n\x00",
            "bad escape": b"SEND\ndestination:/queue/x\\t\n\n\x00",
            "unknown command": b"FROB\nreceipt:77\n\n\x00",
            "content-length mismatch": b"SEND\ndestination:/queue/x\ncontent-length:2\n\nabc\x00",
        }
        for name, data in cases.items():
            with self.raw() as sock:
                self.assertEqual(self.raw_connect(sock).command, "CONNECTED", name)
                sock.sendall(data)
                frames = self.read_until_closed(sock)
                self.assertEqual([f.command for f in frames], ["ERROR"], name)
                self.assertTrue(frames[0].headers["message"], name)
                self.assertEqual(frames[0].headers["content-length"], str(len(frames[0].body)))
                if name == "unknown command":
                    self.assertEqual(frames[0].headers["receipt-id"], "77")
        self.assert_others_carry_on()

    def test_a_client_still_writing_reads_its_error(self) -> None:
        """The broker shuts its side and reads on: a socket closed outright while the peer's bytes
        keep coming answers them with a reset, which destroys the ERROR the peer has not read
        (before, some five attempts in a hundred lost it)."""
        headers = [("destination", CONTROLLER), ("receipt", "r")] + [(f"x-{n}", "v") for n in range(82)]
        frame = raw_frame("SEND", headers)
        lost = 0
        for _ in range(100):
            raw = Raw(self.broker.port)
            raw.send(frame, [484, 613])  # the 65th header comes in the second piece
            if [f.command for f in raw.until_closed()] != ["ERROR"]:
                lost += 1
            raw.close()
        self.assertEqual(lost, 0)

    def test_frame_before_connect(self) -> None:
        with self.raw() as sock:
            sock.sendall(b"SEND\ndestination:/queue/x\n\nsneaky\x00")
            frames = self.read_until_closed(sock)
        self.assertEqual([f.command for f in frames], ["ERROR"])
        self.assertIn("CONNECT", frames[0].headers["message"])
        self.assert_others_carry_on()

    def test_oversize_frame(self) -> None:
        connection, listener = self.connect()
        connection.send("/queue/oversize", b"x" * (MAX_BODY + 1))
        error = listener.errors.get(timeout=TIMEOUT)
        self.assertIn("larger than", error.headers["message"])
        self.assertTrue(listener.disconnected.wait(TIMEOUT))
        self.assert_others_carry_on()

    def test_bad_login(self) -> None:
        with self.raw() as sock:
            sock.sendall(encode(Frame("CONNECT", {"accept-version": "1.2", "login": "x", "passcode": "y"})))
            frames = self.read_until_closed(sock)
        self.assertEqual([f.headers.get("message") for f in frames], ["authentication failed"])

    def test_guest_acl(self) -> None:
        login_a, passcode_a = self.broker.credentials["a"]
        login_b, passcode_b = self.broker.credentials["b"]
        controller, controller_listener = self.connect()
        controller.subscribe(CONTROLLER, id="c", headers={"receipt": "c"})
        controller_listener.receipt("c")
        guest_b, listener_b = self.connect(login=(login_b, passcode_b))
        guest_b.subscribe(guest_destination(login_b), id="own", headers={"receipt": "own"})
        listener_b.receipt("own")
        guest_a, listener_a = self.connect(login=(login_a, passcode_a))
        guest_a.subscribe(BROADCAST, id="all", headers={"receipt": "all"})
        listener_a.receipt("all")
        guest_a.send(CONTROLLER, b"HELLO")
        hello = controller_listener.message()
        self.assertEqual((hello.body, hello.headers["user-id"]), (b"HELLO", login_a))
        guest_a.subscribe(guest_destination(login_b), id="spy")
        error = listener_a.errors.get(timeout=TIMEOUT)
        self.assertIn("not allowed to subscribe", error.headers["message"])
        self.assertTrue(listener_a.disconnected.wait(TIMEOUT))
        controller.send(guest_destination(login_b), b"CMD_RUN")
        self.assertEqual(listener_b.message().body, b"CMD_RUN")
        guest_b.send(CONTROLLER, b"STILL_ALIVE")
        self.assertEqual(controller_listener.message().body, b"STILL_ALIVE")

    def test_flood_to_a_consumer_that_stopped_reading_pauses_the_publisher(self) -> None:
        """Back-pressure end to end: memory stays bounded, nothing is lost, delivery resumes."""
        import psutil

        broker_process = psutil.Process(self.broker.process.pid)
        rss_before = broker_process.memory_info().rss
        chunk = 64 * 1024
        message = encode(Frame("SEND", {"destination": "/topic/flood"}, b"f" * chunk))
        with self.raw() as consumer, self.raw() as publisher:
            self.raw_connect(consumer)
            consumer.sendall(
                encode(Frame("SUBSCRIBE", {"destination": "/topic/flood", "id": "1", "receipt": "s"}))
            )
            decoder = Decoder()
            frames: list[Frame] = []
            while not frames:
                frames = decoder.feed(consumer.recv(4096))
            self.assertEqual(frames[0].command, "RECEIPT")
            self.raw_connect(publisher)
            publisher.settimeout(1.0)
            sent = 0
            pending = memoryview(message)
            with self.assertRaises(socket.timeout):
                while sent < 200 * 1024 * 1024:
                    count = publisher.send(pending)
                    sent += count
                    pending = pending[count:] or memoryview(message)
            self.assertLess(sent, 100 * 1024 * 1024)  # the broker stopped reading long before
            self.assertLess(broker_process.memory_info().rss - rss_before, 50 * 1024 * 1024)
            # The consumer catches up; the publisher is read again and its last word arrives.
            messages_sent = -(-sent // len(message))
            rest = bytes(pending) if len(pending) < len(message) else b""
            received = 0
            marker = encode(Frame("SEND", {"destination": "/topic/flood", "x-last": "yes"}, b"end"))
            done = threading.Event()

            def finish_publishing() -> None:
                publisher.settimeout(TIMEOUT)
                publisher.sendall(rest + marker)
                done.set()

            threading.Thread(target=finish_publishing, daemon=True).start()
            consumer.settimeout(TIMEOUT)
            last = None
            while last is None:
                for frame in decoder.feed(consumer.recv(1024 * 1024)):
                    if frame.headers.get("x-last") == "yes":
                        last = frame
                    else:
                        received += len(frame.body)
            self.assertTrue(done.wait(TIMEOUT))
            self.assertEqual(last.body, b"end")
            self.assertEqual(received, messages_sent * chunk)  # nothing lost
        self.assert_others_carry_on()

    def test_transactions(self) -> None:
        connection, listener = self.connect()
        connection.subscribe("/queue/tx", id="1", headers={"receipt": "s"})
        listener.receipt("s")
        tx = connection.begin()
        connection.send("/queue/tx", b"held", headers={"transaction": tx})
        self.assertTrue(listener.nothing_more(0.2))
        connection.commit(tx)
        self.assertEqual(listener.message().body, b"held")
        tx = connection.begin()
        connection.send("/queue/tx", b"dropped", headers={"transaction": tx})
        connection.abort(tx)
        connection.send("/queue/tx", b"after", headers={"receipt": "after"})
        listener.receipt("after")
        self.assertEqual(listener.message().body, b"after")

    def test_stomper_frames(self) -> None:
        """A seed-001 agent built on stomper (1.1 frames, then stomp_10 with spaces)."""
        controller, controller_listener = self.connect()
        controller.subscribe("/queue/from-stomper", id="1", headers={"receipt": "r"})
        controller_listener.receipt("r")
        with self.raw() as sock:
            sock.sendall(
                (
                    stomper.connect(*LOGIN, "agent-host", (0, 0))
                    + stomper.subscribe("/queue/to-stomper", "7", "client-individual")
                    + stomper.send("/queue/from-stomper", "HELLO\nfrom stomper")
                ).encode()
            )
            self.assertEqual(controller_listener.message().body, b"HELLO\nfrom stomper")
            controller.send("/queue/to-stomper", b"CMD_RUN")
            decoder = Decoder()
            decoder.version = "1.1"
            frames: list[Frame] = []
            while len(frames) < 2:
                frames.extend(decoder.feed(sock.recv(65536)))
            self.assertEqual([f.command for f in frames], ["CONNECTED", "MESSAGE"])
            self.assertEqual(frames[0].headers["version"], "1.1")
            message = frames[1]
            sock.sendall(
                (stomper.ack(message.headers["message-id"], "7") + stomper.disconnect("bye")).encode()
            )
            closing = self.read_until_closed(sock)
        self.assertEqual(closing, [Frame("RECEIPT", {"receipt-id": "bye"})])
        with self.raw() as sock:
            sock.sendall(
                (
                    stomp_10.connect(*LOGIN)
                    + stomp_10.send("/queue/from-stomper", "old style")
                    + stomp_10.disconnect()
                ).encode()
            )
            self.assertEqual([f.command for f in self.read_until_closed(sock)], ["CONNECTED"])
        message = controller_listener.message()
        self.assertEqual(
            (message.body, message.headers["destination"]), (b"old style", "/queue/from-stomper")
        )
