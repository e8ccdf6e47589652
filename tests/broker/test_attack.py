"""The STOMP attack suite (issue #8): the broker, running for real, against what a hostile peer sends.

The broker runs in a child process (``run_broker.py``) on a loopback listener.  While a
well-behaved pair -- a controller and a guest, both stomp.py -- round-trips through it the whole
time (the controller pings the guest's queue and the broadcast topic, the guest answers on the
controller's queue), hypothesis drives raw sockets at it: random bytes, valid sessions mutated
byte by byte, structured frames with hostile headers, all cut into random reads; giant header
lines, header counts, bodies and declared lengths; slowloris connections; floods of frames,
connections, subscriptions and transactions; and hostile guests trying every other destination
and identity (another guest's queue, the broadcast topic, other topics, another guest's or the
controller's login, forged ``user-id``/``vmcloud-login`` stamps).

What every test holds:

- the broker never dies, and never sends a traceback or a frame our decoder cannot read;
- after an ERROR the broker closes the connection;
- the well-behaved pair never fails: every round trip is answered within ``RTT_TIMEOUT``, no
  ERROR, no disconnect, no heart-beat timeout; the guest gets nothing but what the controller sent
  it, and the controller never sees a message stamped with the guest's login that the guest did
  not send;
- memory comes back: once the attackers are gone, the broker's connections, subscriptions, stored
  and un-acked messages are back to the baseline, and so (roughly) are Python's allocated blocks
  and the resident size;
- the broker logged no internal error.

By default each test runs a few dozen examples, the same ones every run (derandomized), seconds in
all.  A longer, random run: ``VMCLOUD_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest
tests/broker/test_attack.py`` (examples per test; a different set every run, hypothesis prints
how to reproduce a failure).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import tempfile
import threading
import time
from typing import Any, ClassVar

import attrs
import pytest
import stomp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.broker.live import IO_TIMEOUT, BrokerProcess, Raw, connect_frame, raw_frame
from vmcloud.words.destinations import BROADCAST, CONTROLLER, IDENTITY_RE, LOGIN_HEADER, guest_destination

#: Examples per test when set (a long, random run); unset: the few, fixed examples CI runs.
LONG_RUN = int(os.environ.get("VMCLOUD_FUZZ_EXAMPLES", "0") or 0)

if LONG_RUN:  # the suite's per-test timeout (pyproject.toml) is for the default run
    pytestmark = pytest.mark.timeout(0)

CONTROLLER_LOGIN = ("controller", "controller-secret")
OPERATOR_LOGIN = ("alice", "alice-secret")
#: Limits of the broker under attack: small, so that crossing them is cheap.
MAX_BODY = 64 * 1024
MAX_HEADER_LINE = 32 * 1024
MAX_HEADERS = 64
MAX_SUBSCRIPTIONS = 64
MAX_TRANSACTIONS = 16
CONNECT_TIMEOUT = 1.0
#: A round trip of the well-behaved pair taking longer than this is a failure.
RTT_TIMEOUT = 10.0
#: What "roughly back" allows over the baseline: Python's allocated blocks (the default run comes
#: back within a few dozen), and resident bytes (within about a megabyte).
BLOCKS_SLACK = 2_000
RSS_SLACK = 16 * 1024 * 1024

#: Destinations near the ones a guest may use, which it may neither send to nor subscribe to.
ELSEWHERE = (
    "/topic/x",
    "/queue/x",
    "/queue/vmcloud.guest.",
    BROADCAST + ".x",
    CONTROLLER + "x",
    CONTROLLER + ".x",
    CONTROLLER + ".events",
    CONTROLLER + "/",
    "/topic/vmcloud.controller",
    CONTROLLER.upper(),
    " " + CONTROLLER,
)

#: Fuzz destinations a full-access attacker may use: topics nobody in the pair listens to (a
#: full-access peer may legitimately write to the pair's destinations, and a queue stores).
FULL_ACCESS_DESTINATIONS = ("/topic/fuzz", "/topic/fuzz.a", "fuzz-no-prefix", "/topic/")


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=LONG_RUN or examples,
        deadline=None,
        derandomize=not LONG_RUN,
        database=None,
        print_blob=bool(LONG_RUN),
        suppress_health_check=list(HealthCheck),
    )


# ---------------------------------------------------------------------------------------------
# The well-behaved pair


class _Listener(stomp.ConnectionListener):  # type: ignore[misc]
    def __init__(self, pair: WellBehaved, who: str) -> None:
        self.pair = pair
        self.who = who
        self.receipts: set[str] = set()
        self.receipt_seen = threading.Condition()

    def on_message(self, frame: Any) -> None:
        try:
            self.pair.on_message(self.who, frame)
        except Exception as e:  # a bug here must show as a failure, not die in stomp.py's thread
            self.pair.fail(f"{self.who}: {e!r}")

    def on_receipt(self, frame: Any) -> None:
        with self.receipt_seen:
            self.receipts.add(frame.headers["receipt-id"])
            self.receipt_seen.notify_all()

    def on_error(self, frame: Any) -> None:
        self.pair.fail(f"ERROR to the well-behaved {self.who}: {frame.headers} {frame.body!r}")

    def on_disconnected(self) -> None:
        if not self.pair.stopping:
            self.pair.fail(f"the well-behaved {self.who} was disconnected")

    def on_heartbeat_timeout(self) -> None:
        self.pair.fail(f"the broker missed heart-beats to the well-behaved {self.who}")

    def wait_receipt(self, receipt: str) -> None:
        with self.receipt_seen:
            if not self.receipt_seen.wait_for(lambda: receipt in self.receipts, IO_TIMEOUT):
                raise AssertionError(f"{self.who}: no RECEIPT {receipt}")


class WellBehaved:
    """A controller and a guest round-tripping through the broker, as the daemon and an agent do,
    on a thread of their own; anything that goes wrong for them is recorded in ``failures``."""

    def __init__(self, port: int, guest: tuple[str, str]) -> None:
        self.token = secrets.token_hex(16)  # what the guest's genuine messages carry
        self.guest_login = guest[0]
        self.guest_queue = guest_destination(guest[0])
        self.failures: list[str] = []
        self.round_trips = 0
        self.slowest = 0.0
        self.stopping = False
        #: bodies of ``fuzz-mark-`` messages that reached the controller -> their headers
        self.marks: dict[str, dict[str, str]] = {}
        self.from_others = 0
        self._pending: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._progress = threading.Condition()
        self._stop = threading.Event()
        self.controller, controller_listener = self._connect(port, CONTROLLER_LOGIN, "controller")
        self.controller.subscribe(CONTROLLER, id="c", headers={"receipt": "c"})
        controller_listener.wait_receipt("c")
        self.guest, guest_listener = self._connect(port, guest, "guest")
        self.guest.subscribe(self.guest_queue, id="own")
        self.guest.subscribe(BROADCAST, id="all", headers={"receipt": "all"})
        guest_listener.wait_receipt("all")
        self._thread = threading.Thread(target=self._run, name="well-behaved", daemon=True)
        self._thread.start()

    def _connect(self, port: int, login: tuple[str, str], who: str) -> tuple[Any, _Listener]:
        connection = stomp.Connection12([("127.0.0.1", port)], heartbeats=(2000, 2000), auto_decode=False)
        listener = _Listener(self, who)
        connection.set_listener(who, listener)
        connection.connect(*login, wait=True, headers={"host": "/"})
        return connection, listener

    def fail(self, what: str) -> None:
        with self._progress:
            self.failures.append(what)
            self._progress.notify_all()

    def on_message(self, who: str, frame: Any) -> None:
        headers: dict[str, str] = frame.headers
        if who == "guest":
            destination = headers.get("destination")
            if destination not in (self.guest_queue, BROADCAST) or headers.get("x-token") != self.token:
                self.fail(f"the guest got a message it should not have: {headers} {frame.body[:80]!r}")
                return
            self.guest.send(CONTROLLER, b"pong", headers={"x-token": self.token, "x-seq": headers["x-seq"]})
            return
        login = headers.get(LOGIN_HEADER)
        if login is None or headers.get("user-id") != login:
            self.fail(f"a message on the controller's queue without the broker's stamp: {headers}")
        elif login == self.guest_login:
            with self._lock:
                answered = self._pending.pop(headers.get("x-seq", ""), None)
            if headers.get("x-token") != self.token or answered is None:
                self.fail(f"a message stamped as the guest that the guest did not send: {headers}")
            else:
                answered.set()
        else:
            with self._lock:
                self.from_others += 1
                if frame.body.startswith(b"fuzz-mark-"):
                    self.marks[frame.body.decode()] = dict(headers)

    def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            key = str(seq)
            answered = threading.Event()
            with self._lock:
                self._pending[key] = answered
            started = time.monotonic()
            destination = BROADCAST if seq % 10 == 0 else self.guest_queue
            try:
                self.controller.send(destination, b"ping", headers={"x-token": self.token, "x-seq": key})
            except Exception as e:
                self.fail(f"the controller could not send: {e!r}")
                return
            if not answered.wait(RTT_TIMEOUT):
                self.fail(f"round trip {key} ({destination}) not answered within {RTT_TIMEOUT} s")
                return
            with self._progress:
                self.round_trips += 1
                self.slowest = max(self.slowest, time.monotonic() - started)
                self._progress.notify_all()
            self._stop.wait(0.005)

    def check(self) -> None:
        """Nothing went wrong so far, and a round trip completes from now."""
        with self._progress:
            target = self.round_trips + 1
            self._progress.wait_for(
                lambda: self.round_trips >= target or bool(self.failures), 2 * RTT_TIMEOUT
            )
            assert not self.failures, self.failures
            assert self.round_trips >= target, "the well-behaved pair made no progress"

    def mark_arrived(self, mark: str, timeout: float = IO_TIMEOUT) -> dict[str, str]:
        """The headers of the ``fuzz-mark-`` message ``mark`` as the controller got it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if mark in self.marks:
                    return self.marks.pop(mark)
            time.sleep(0.005)
        raise AssertionError(f"{mark} never reached the controller")

    def stop(self) -> None:
        self.stopping = True
        self._stop.set()
        self._thread.join(RTT_TIMEOUT + 5)
        for connection in (self.guest, self.controller):
            with contextlib.suppress(Exception):
                connection.disconnect()


# ---------------------------------------------------------------------------------------------
# Strategies

_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)
_HEADER_NAMES = st.sampled_from(
    [
        "destination", "id", "ack", "receipt", "transaction", "content-length", "content-type",
        "accept-version", "host", "login", "passcode", "heart-beat", "message-id", "subscription",
        "user-id", LOGIN_HEADER, "identity", "version",
    ]
) | _TEXT  # fmt: skip
_COMMANDS = st.sampled_from(
    [
        "CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN", "COMMIT",
        "ABORT", "DISCONNECT", "MESSAGE", "CONNECTED", "ERROR", "RECEIPT", "send", "SEND ", "",
    ]
) | _TEXT  # fmt: skip
_ODD_VALUES = st.sampled_from(
    [
        "", " ", "1.2", "1.0,1.1,1.2", "9.9", "0,0", "100,100", "-1,5", "99999999999,1", "a,b", ",",
        "auto", "client", "client-individual", "bogus", "m-1", "m-2", "t1", "0", "-1", "99999999",
        "\\", "\\t", "a\\cb", "x\ny", "\x00", "é✓", "/queue/", "/topic/",
    ]
)  # fmt: skip
_CUTS = st.lists(st.integers(1, 4000), max_size=8)


@attrs.frozen
class Session:
    """Who an attacker connects as: ``kind`` is none (no CONNECT), guest (minted), anonymous or
    full (full access)."""

    kind: str
    login: str | None = None
    passcode: str | None = None

    @property
    def connect(self) -> bytes:
        return b"" if self.kind == "none" else connect_frame(self.login, self.passcode)


class AttackTests(SynchronousTestCase):
    broker: ClassVar[BrokerProcess]
    pair: ClassVar[WellBehaved]
    baseline: ClassVar[dict[str, int]]
    log_path: ClassVar[str]
    mallory: ClassVar[tuple[str, str]]
    victim: ClassVar[tuple[str, str]]

    @classmethod
    def setUpClass(cls) -> None:
        cls.log_path = os.path.join(tempfile.mkdtemp(prefix="vmcloud-attack-"), "broker.log")
        cls.broker = BrokerProcess(
            "--anonymous",
            "--mint", "victim", "--mint", "mallory",
            "--max-body", str(MAX_BODY),
            "--connect-timeout", str(CONNECT_TIMEOUT),
            "--log-file", cls.log_path,
        )  # fmt: skip
        cls.victim = tuple(cls.broker.credentials["victim"])  # type: ignore[assignment]
        cls.mallory = tuple(cls.broker.credentials["mallory"])  # type: ignore[assignment]
        try:
            cls.pair = WellBehaved(cls.broker.port, cls.victim)
            cls._warm_up()
            cls.baseline = cls.broker.stats()
        except BaseException:
            cls.broker.stop()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            cls.pair.stop()
        finally:
            alive = cls.broker.alive()
            cls.broker.stop()
        assert alive, "the broker died"
        events = []
        with open(cls.log_path) as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line.strip("\x1e \r\n")))
        internal = [e for e in events if e.get("event") == "broker-internal-error" or "log_failure" in e]
        assert not internal, internal[:3]

    @classmethod
    def _warm_up(cls) -> None:
        """One of each kind of attack before the baseline, so that what the broker creates once
        (caches, interned names, code paths' first allocations) is not counted as a leak."""
        for session in (
            Session("guest", *cls.mallory),
            Session("anonymous", "warm-up"),
            Session("full", *CONTROLLER_LOGIN),
        ):
            raw = Raw(cls.broker.port)
            raw.send(
                session.connect
                + raw_frame("SUBSCRIBE", [("destination", "/queue/nope"), ("id", "1")])
                + raw_frame("DISCONNECT", [("receipt", "bye")])
            )
            raw.until_closed()
        raw = Raw(cls.broker.port)
        raw.send(b"\x00garbage" * 10)
        raw.until_closed()
        raw = Raw(cls.broker.port)
        raw.send(
            connect_frame(*cls.mallory)
            + raw_frame(
                "SEND", [("destination", CONTROLLER)], b"x" * (MAX_BODY + 1), content_length=str(MAX_BODY + 1)
            )
        )
        raw.until_closed()
        cls.pair.check()

    # -- helpers

    def setUp(self) -> None:
        self.raws: list[Raw] = []

    def tearDown(self) -> None:
        for raw in self.raws:
            raw.close()

    def raw(self) -> Raw:
        raw = Raw(self.broker.port)
        self.raws.append(raw)
        return raw

    def connected(self, session: Session) -> Raw:
        raw = self.raw()
        raw.send(session.connect)
        raw.frame("CONNECTED")
        return raw

    def sessions(self, full: bool = True) -> st.SearchStrategy[Session]:
        kinds = [
            st.just(Session("none")),
            st.just(Session("guest", *self.mallory)),
            st.from_regex(IDENTITY_RE, fullmatch=True).map(lambda identity: Session("anonymous", identity)),
        ]
        if full:
            kinds.append(st.just(Session("full", *CONTROLLER_LOGIN)))
        return st.one_of(kinds)

    def after_each(self) -> None:
        """The broker lives and the pair carries on; the attacker's sockets are closed."""
        for raw in self.raws:
            raw.close()
        self.raws.clear()
        self.assertTrue(self.broker.alive(), "the broker died")
        self.pair.check()

    def assert_came_back(self) -> None:
        """Once every attacker is gone, the broker holds what it held before the attacks."""
        for raw in self.raws:
            raw.close()
        self.raws.clear()
        base = self.baseline
        counted = ("connections", "subscriptions", "queued_messages", "unacked_messages", "paused_publishers")
        deadline = time.monotonic() + 20
        while True:
            stats = self.broker.stats()
            if all(stats[k] == base[k] for k in counted) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertEqual({k: stats[k] for k in counted}, {k: base[k] for k in counted})
        self.assertLess(stats["blocks"] - base["blocks"], BLOCKS_SLACK, (stats, base))
        self.assertLess(stats["rss"] - base["rss"], RSS_SLACK, (stats, base))
        self.pair.check()

    # -- random and mutated frames

    def test_random_bytes_and_mutated_sessions(self) -> None:
        mallory_queue = guest_destination(self.mallory[0])

        def stream(session: Session) -> bytes:
            if session.kind == "full":
                dest, sub, topic = "/topic/fuzz", "/topic/fuzz.a", "/topic/fuzz"
            else:
                dest, sub, topic = CONTROLLER, mallory_queue, BROADCAST
            to = ("destination", dest)
            return b"".join(
                [
                    raw_frame("SUBSCRIBE", [("destination", sub), ("id", "1"), ("ack", "client-individual")]),
                    raw_frame("SUBSCRIBE", [("destination", topic), ("id", "2")]),
                    raw_frame("SEND", [to, ("x", "b:c\\d")], b"body\x00nul", content_length="9"),
                    raw_frame("SEND", [to], b"no length"),
                    raw_frame("BEGIN", [("transaction", "t1")]),
                    raw_frame("SEND", [to, ("transaction", "t1")], b"in tx", content_length="5"),
                    raw_frame("ACK", [("id", "m-1"), ("transaction", "t1")]),
                    raw_frame("COMMIT", [("transaction", "t1"), ("receipt", "r1")]),
                    raw_frame("NACK", [("id", "m-2")]),
                    raw_frame("UNSUBSCRIBE", [("id", "1")]),
                    b"\n\r\n\n",
                    raw_frame("DISCONNECT", [("receipt", "bye")]),
                ]
            )  # fmt: skip

        inserts = st.sampled_from(
            [b"\x00", b"\n", b"\r\n", b":", b"\\", b"\\t", b"\xff\xfe", b"content-length:99999\n",
             b"content-length:-3\n", b"CONNECT\n\n\x00", b"\n\n", b"A" * 5000, b"\x00" * 100]
        ) | st.binary(max_size=16)  # fmt: skip
        mutation = st.tuples(
            st.sampled_from(["flip", "insert", "delete", "duplicate", "truncate"]),
            st.floats(0, 1),
            st.floats(0, 1),
            inserts,
        )

        def mutate(data: bytes, mutations: list[tuple[str, float, float, bytes]]) -> bytes:
            buf = bytearray(data)
            for op, where, extent, insert in mutations:
                at = int(where * len(buf))
                span = 1 + int(extent * 64)
                if op == "flip" and buf:
                    at = min(at, len(buf) - 1)
                    buf[at] ^= 1 << int(extent * 7.99)
                elif op == "insert":
                    buf[at:at] = insert
                elif op == "delete":
                    del buf[at : at + span]
                elif op == "duplicate":
                    buf[at:at] = buf[at : at + span]
                elif op == "truncate":
                    del buf[at:]
            return bytes(buf)

        @st.composite
        def structured(draw: st.DrawFn, session: Session) -> bytes:
            destinations = FULL_ACCESS_DESTINATIONS if session.kind == "full" else (
                CONTROLLER, self.pair.guest_queue, BROADCAST, mallory_queue, "/topic/fuzz", "/queue/fuzz"
            )  # fmt: skip
            values = _ODD_VALUES | _TEXT | st.sampled_from(destinations)
            frames = []
            for _ in range(draw(st.integers(1, 6))):
                headers = draw(st.lists(st.tuples(_HEADER_NAMES, values), max_size=8))
                if session.kind == "full":  # a full-access peer's destinations stay on fuzz topics
                    headers = [(n, v) for n, v in headers if n != "destination"]
                    headers.append(("destination", draw(st.sampled_from(FULL_ACCESS_DESTINATIONS))))
                frames.append(
                    raw_frame(
                        draw(_COMMANDS),
                        headers,
                        draw(st.binary(max_size=300)),
                        eol=draw(st.sampled_from([b"\n", b"\r\n"])),
                        escape=draw(st.booleans()),
                        content_length=draw(
                            st.none()
                            | st.integers(-2, 400).map(str)
                            | st.sampled_from(["abc", " 5", "9" * 30, ""])
                        ),
                        trailer=draw(
                            st.sampled_from([b"\x00", b"\x00\n", b"\x00\r\n\n", b"", b"\n", b"\x00\x00"])
                        ),
                    )
                )
            return b"".join(frames)

        @st.composite
        def attack(draw: st.DrawFn) -> tuple[Session, bytes, list[int], bool]:
            session = draw(self.sessions())
            kind = draw(st.sampled_from(["random", "mutated", "mutated-connect", "structured"]))
            if kind == "random":
                payload = draw(st.binary(max_size=2000))
            elif kind == "structured":
                payload = draw(structured(session))
            else:
                base = stream(session)
                if kind == "mutated-connect":
                    base = session.connect + base
                    session = Session("none")
                payload = mutate(base, draw(st.lists(mutation, min_size=1, max_size=6)))
            return session, payload, draw(_CUTS), draw(st.booleans())

        @fuzz_settings(60)
        @given(attack())
        def run(example: tuple[Session, bytes, list[int], bool]) -> None:
            session, payload, cuts, linger = example
            raw = self.raw()
            data = session.connect + payload
            raw.send(data, [len(session.connect), *(len(session.connect) + c for c in cuts)])
            if linger:
                raw.settle()
            else:  # the broker sees the end of the stream and closes
                with contextlib.suppress(OSError):  # it may have closed already
                    raw.sock.shutdown(socket.SHUT_WR)
                raw.until_closed()
            self.after_each()

        run()
        self.assert_came_back()

    # -- hostile guests

    def test_hostile_guests(self) -> None:
        victim_login, victim_passcode = self.victim
        mallory_login, mallory_passcode = self.mallory

        @st.composite
        def attack(draw: st.DrawFn) -> tuple[Session, str, str]:
            if draw(st.booleans()):
                session = Session("guest", mallory_login, mallory_passcode)
            else:
                identity = draw(
                    st.from_regex(IDENTITY_RE, fullmatch=True).filter(lambda i: not i.startswith("vm-"))
                )
                session = Session("anonymous", identity)
            action = draw(
                st.sampled_from(
                    [
                        "subscribe-victim", "subscribe-controller", "subscribe-other", "send-victim",
                        "send-broadcast", "send-topic", "send-other", "forge-stamp", "connect-as",
                        "ack-others", "send-in-transaction", "second-connect", "many-subscriptions",
                    ]
                )
            )  # fmt: skip
            other = draw(
                st.sampled_from(ELSEWHERE)
                | _TEXT.filter(lambda d: d not in (CONTROLLER, BROADCAST) and d.strip() and "\x00" not in d)
            )
            return session, action, other

        def refused(raw: Raw, why: str) -> None:
            error = raw.error()
            self.assertIn(why, error.headers["message"])

        def attempt(example: tuple[Session, str, str]) -> None:
            session, action, other = example
            own = guest_destination(session.login or "")
            if action == "connect-as":
                for login, passcode in [
                    (victim_login, ""),
                    (victim_login, None),
                    (victim_login, mallory_passcode),
                    (victim_login, victim_passcode[:-1] + ("A" if victim_passcode[-1] != "A" else "B")),
                    (CONTROLLER_LOGIN[0], ""),
                    (CONTROLLER_LOGIN[0], mallory_passcode),
                    (OPERATOR_LOGIN[0], None),
                    (mallory_login, victim_passcode),
                ]:
                    raw = self.raw()
                    raw.send(connect_frame(login, passcode))
                    refused(raw, "authentication failed")
                self.after_each()
                return
            raw = self.connected(session)
            if action == "subscribe-victim":
                raw.send(raw_frame("SUBSCRIBE", [("destination", self.pair.guest_queue), ("id", "1")]))
                refused(raw, "not allowed to subscribe")
            elif action == "subscribe-controller":
                raw.send(raw_frame("SUBSCRIBE", [("destination", CONTROLLER), ("id", "1")]))
                refused(raw, "not allowed to subscribe")
            elif action == "subscribe-other":
                raw.send(raw_frame("SUBSCRIBE", [("destination", other), ("id", "1")]))
                refused(raw, "not allowed to subscribe")
            elif action == "send-victim":
                raw.send(
                    raw_frame(
                        "SEND", [("destination", self.pair.guest_queue), ("x-token", "guess")], b"CMD_RUN"
                    )
                )
                refused(raw, "not allowed to send")
            elif action == "send-broadcast":
                raw.send(raw_frame("SEND", [("destination", BROADCAST)], b"to everyone"))
                refused(raw, "not allowed to send")
            elif action == "send-topic":
                raw.send(raw_frame("SEND", [("destination", "/topic/" + other)], b"x"))
                refused(raw, "not allowed to send")
            elif action == "send-other":
                raw.send(raw_frame("SEND", [("destination", other)], b"x"))
                refused(raw, "not allowed to send")
            elif action == "forge-stamp":
                mark = f"fuzz-mark-{secrets.token_hex(8)}"
                forged = [
                    ("destination", CONTROLLER),
                    ("user-id", victim_login),
                    (LOGIN_HEADER, victim_login),
                    ("identity", victim_login),
                    ("x-token", "guess"),
                    ("x-seq", "1"),
                    ("receipt", "sent"),
                ]
                raw.send(raw_frame("SEND", forged, mark.encode()))
                raw.frame("RECEIPT")
                headers = self.pair.mark_arrived(mark)
                self.assertEqual((headers["user-id"], headers[LOGIN_HEADER]), (session.login, session.login))
            elif action == "ack-others":
                raw.send(
                    b"".join(raw_frame(c, [("id", f"m-{n}")]) for n in range(1, 50) for c in ("ACK", "NACK"))
                    + raw_frame("UNSUBSCRIBE", [("id", "own"), ("receipt", "done")])
                )
                raw.frame("RECEIPT")  # nothing of the victim's is ours to acknowledge
            elif action == "send-in-transaction":
                raw.send(
                    raw_frame("BEGIN", [("transaction", "t")])
                    + raw_frame("SEND", [("destination", self.pair.guest_queue), ("transaction", "t")], b"x")
                    + raw_frame("COMMIT", [("transaction", "t")])
                )
                refused(raw, "not allowed to send")
            elif action == "second-connect":
                raw.send(connect_frame(victim_login, victim_passcode))
                refused(raw, "already connected")
            elif action == "many-subscriptions":
                raw.send(
                    b"".join(
                        raw_frame("SUBSCRIBE", [("destination", own if n % 2 else BROADCAST), ("id", str(n))])
                        for n in range(MAX_SUBSCRIPTIONS + 1)
                    )
                )
                refused(raw, str(MAX_SUBSCRIPTIONS))
            self.after_each()

        run = given(attack())(attempt)
        mallory = Session("guest", mallory_login, mallory_passcode)
        for destination in ELSEWHERE:  # every one of these, every run
            for action in ("send-other", "subscribe-other"):
                run = example((mallory, action, destination))(run)
        fuzz_settings(60)(run)()
        self.assert_came_back()

    # -- giant frames

    def test_giant_headers_and_bodies(self) -> None:
        @st.composite
        def attack(draw: st.DrawFn) -> tuple[Session, str, int, bool]:
            session = draw(self.sessions(full=True).filter(lambda s: s.kind in ("full", "guest", "none")))
            kind = draw(
                st.sampled_from(["header-line", "headers", "body", "declared", "command", "unending"])
            )
            over = draw(st.booleans())
            if kind == "header-line":
                size = draw(
                    st.integers(MAX_HEADER_LINE + 1, 8 * MAX_HEADER_LINE)
                    if over
                    else st.integers(1, MAX_HEADER_LINE - 100)
                )
            elif kind == "headers":
                size = draw(st.integers(MAX_HEADERS + 1, 1000) if over else st.integers(0, MAX_HEADERS - 3))
            elif kind == "body":
                size = draw(st.integers(MAX_BODY + 1, 8 * MAX_BODY) if over else st.integers(0, MAX_BODY))
            else:
                size = draw(st.integers(1, 1 << 22))
            return session, kind, size, over

        @fuzz_settings(30)
        @given(attack(), st.booleans(), _CUTS)
        def run(example: tuple[Session, str, int, bool], with_length: bool, cuts: list[int]) -> None:
            session, kind, size, over = example
            destination = "/topic/fuzz" if session.kind == "full" else CONTROLLER
            headers = [("destination", destination), ("receipt", "r")]
            body = b""
            length = None
            expect_error = over or session.kind == "none"
            if kind == "header-line":
                headers.append(("x-big", "v" * size))
            elif kind == "headers":
                headers += [(f"x-{n}", "v") for n in range(size)]
            elif kind == "body":
                body = b"b" * size
                length = str(size) if with_length else None
            elif kind == "declared":
                length = str(MAX_BODY + size)
                expect_error = True
            raw = self.raw()
            if kind == "command":
                data = b"S" * (MAX_HEADER_LINE + size)
                expect_error = True
            elif kind == "unending":
                data = raw_frame("SEND", headers)[:-3] + b"".join(
                    b"x-%d:%s\n" % (n, b"v" * 1000) for n in range(size % 500 + MAX_HEADERS)
                )
                expect_error = True
            else:
                data = raw_frame("SEND", headers, body, content_length=length)
            raw.send(session.connect + data, cuts)
            if expect_error:
                self.assertEqual(raw.error().command, "ERROR")
            else:
                raw.frame("RECEIPT")
            self.after_each()

        run()
        self.assert_came_back()

    # -- slowloris

    def test_slowloris(self) -> None:
        """Connections that never finish CONNECT are dropped after the connect timeout; guests
        that go silent are dropped by heart-beat; guests that dribble bytes are kept (they are
        talking) until they leave; the pair carries on throughout."""
        dribble_connect = connect_frame(*self.mallory)[:-5]
        never_connect = [self.raw() for _ in range(40)]
        silent = []
        for n in range(10):
            raw = self.raw()
            raw.send(connect_frame(f"silent-{n}", None, heart_beat="100,0"))
            silent.append(raw)
        dribblers = [self.connected(Session("guest", *self.mallory)) for _ in range(10)]
        dribble_send = raw_frame("SEND", [("destination", CONTROLLER)] * 30, b"")
        started = time.monotonic()
        step = 0
        while time.monotonic() - started < CONNECT_TIMEOUT + 0.8:
            for raw in never_connect:
                raw.send(dribble_connect[step : step + 1])
            for raw in dribblers:
                raw.send(dribble_send[step : step + 1])
            step += 1
            time.sleep(0.05)
        for raw in never_connect:
            self.assertIn("no CONNECT", raw.error().headers["message"])
            raw.close()
        for raw in silent:
            raw.frame("CONNECTED")
            self.assertEqual(raw.error().headers["message"], "heart-beat timeout")
            raw.close()
        expected = self.baseline["connections"] + len(dribblers)
        deadline = time.monotonic() + IO_TIMEOUT
        while self.broker.stats()["connections"] != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(self.broker.stats()["connections"], expected)
        for raw in dribblers:
            raw.settle(0.01)
            self.assertFalse(raw.closed)
        self.after_each()
        self.assert_came_back()

    # -- floods

    def test_floods(self) -> None:
        @fuzz_settings(12)
        @given(
            st.sampled_from(["frames", "connections", "churn", "transactions", "eols", "unread"]),
            st.integers(1, 400),
        )
        def run(kind: str, size: int) -> None:
            mallory = Session("guest", *self.mallory)
            if kind == "frames":  # a guest floods the controller's queue; the pair's pongs queue behind
                raw = self.connected(mallory)
                mark = f"fuzz-mark-{secrets.token_hex(8)}"
                flood = raw_frame("SEND", [("destination", CONTROLLER), ("x", "y")], b"STILL_ALIVE") * (
                    size * 10
                )
                raw.send(
                    flood
                    + raw_frame("SEND", [("destination", CONTROLLER), ("receipt", "end")], mark.encode())
                )
                raw.frame("RECEIPT", timeout=RTT_TIMEOUT)
                self.pair.mark_arrived(mark, RTT_TIMEOUT)
            elif kind == "connections":  # many at once, half logged in, all reset
                raws = []
                for n in range(size):
                    raw = Raw(self.broker.port)
                    raws.append(raw)
                    if n % 2:
                        raw.send(
                            connect_frame(f"flood-{n}", None) if n % 4 == 1 else connect_frame(*self.mallory)
                        )
                for raw in raws:
                    raw.close(reset=True)
            elif kind == "churn":
                raw = self.connected(mallory)
                own = guest_destination(self.mallory[0])
                churn = b"".join(
                    raw_frame("SUBSCRIBE", [("destination", own), ("id", str(n)), ("ack", "client")])
                    + raw_frame("UNSUBSCRIBE", [("id", str(n))])
                    for n in range(size)
                )
                raw.send(
                    churn
                    + raw_frame("SUBSCRIBE", [("destination", BROADCAST), ("id", "b"), ("receipt", "end")])
                )
                raw.frame("RECEIPT")
            elif kind == "transactions":
                raw = self.connected(mallory)
                if size % 2:
                    raw.send(
                        b"".join(
                            raw_frame("BEGIN", [("transaction", f"t{n}")])
                            for n in range(MAX_TRANSACTIONS + 1)
                        )
                    )
                    self.assertIn("open transactions", raw.error().headers["message"])
                else:
                    held = raw_frame("SEND", [("destination", CONTROLLER), ("transaction", "t")], b"held")
                    raw.send(raw_frame("BEGIN", [("transaction", "t")]) + held * 1001)
                    self.assertIn("transaction too large", raw.error().headers["message"])
            elif kind == "eols":
                raw = self.connected(mallory)
                raw.send(
                    b"\r\n" * (size * 1000)
                    + raw_frame("SEND", [("destination", CONTROLLER), ("receipt", "e")], b"x")
                )
                raw.frame("RECEIPT")
            elif kind == "unread":  # a consumer that never reads; its publisher is paused, then both go
                consumer = self.connected(Session("full", *CONTROLLER_LOGIN))
                consumer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                consumer.send(
                    raw_frame(
                        "SUBSCRIBE", [("destination", "/topic/fuzz.flood"), ("id", "1"), ("receipt", "s")]
                    )
                )
                consumer.frame("RECEIPT")
                publisher = self.connected(Session("full", *OPERATOR_LOGIN))
                publisher.sock.settimeout(0.5)
                message = raw_frame(
                    "SEND", [("destination", "/topic/fuzz.flood")], b"f" * 60_000, content_length="60000"
                )
                with contextlib.suppress(TimeoutError, OSError):
                    for _ in range(size):
                        publisher.sock.sendall(message)
                publisher.close(reset=True)
                consumer.close(reset=True)
            self.after_each()

        run()
        self.assert_came_back()
