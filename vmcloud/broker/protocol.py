"""The STOMP server side of one TCP connection, and the factory that listens for them.

The protocol adapts the sans-IO codec and the realm to a transport and a clock: it negotiates
the version, logs the peer in through twisted.cred, enforces the ACL and the limits, keeps
transactions, beats and watches heart-beats, and applies back-pressure both ways (it is a push
producer on its own transport, so it learns when the peer stops reading; the realm tells it to
stop reading when a consumer it publishes to falls behind).

Every refusal is an ERROR frame (``message`` header, ``receipt-id`` when the bad frame asked for a
receipt, a text body), then the connection closes once the ERROR is flushed; the broker and its
other clients carry on.
"""

from __future__ import annotations

import enum
import importlib.metadata
import itertools
import math
import typing
from collections import deque
from collections.abc import Callable, Mapping

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import tcp
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from vmcloud.broker.auth import IStompAvatar, StompLogin, is_loopback
from vmcloud.broker.heartbeats import Heartbeats
from vmcloud.broker.limits import BrokerLimits
from vmcloud.broker.realm import (
    AckMode,
    IBrokerClient,
    Message,
    Peer,
    Realm,
    RealmError,
    Subscription,
)
from vmcloud.stomp.codec import HEARTBEAT, VERSIONS, Decoder, ProtocolError, encode, encode_message
from vmcloud.stomp.frame import Frame
from vmcloud.words.destinations import LOGIN_HEADER

log = Logger()


def _server_name() -> str:
    try:
        return f"vmcloud/{importlib.metadata.version('vmcloud')}"
    except importlib.metadata.PackageNotFoundError:
        return "vmcloud/dev"


#: The ``server`` header of CONNECTED frames.
SERVER_NAME = _server_name()

#: Seconds past a peer's silence deadline after which the broker, looking at it for the first
#: time, does not trust the silence (the reactor was busy and did not read) and looks once more
#: after the next read (see :meth:`StompServerProtocol.wake`).
STALL = 0.02


class _Transport(typing.Protocol):
    """What the protocol uses of its transport: a TCP transport, a StringTransport, iosim's."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...  # noqa: N802
    def getPeer(self) -> IAddress: ...  # noqa: N802
    def getHost(self) -> IAddress: ...  # noqa: N802
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...  # noqa: N802
    def unregisterProducer(self) -> None: ...  # noqa: N802
    def pauseProducing(self) -> None: ...  # noqa: N802
    def resumeProducing(self) -> None: ...  # noqa: N802


class _State(enum.Enum):
    AWAIT_CONNECT = "await-connect"
    AUTHENTICATING = "authenticating"
    CONNECTED = "connected"
    CLOSING = "closing"
    CLOSED = "closed"


#: States in which frames are handled, or kept to be handled once the login is through.
_HANDLING = frozenset({_State.AWAIT_CONNECT, _State.AUTHENTICATING, _State.CONNECTED})


class _Transaction:
    __slots__ = ("frames", "size")

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.size = 0


#: The longest heart-beat interval a client may name, ms (a Java int, about 24.8 days): larger
#: figures are refused rather than turned into timer deadlines.
MAX_HEART_BEAT_MS = 2**31 - 1


def _heart_beat(value: str | None) -> tuple[int, int]:
    if value is None:
        return 0, 0
    try:
        cx, cy = (int(part) for part in value.split(","))
    except ValueError:
        raise ProtocolError("heart-beat header must be two integers: cx,cy") from None
    if cx < 0 or cy < 0:
        raise ProtocolError("heart-beat values must not be negative")
    if cx > MAX_HEART_BEAT_MS or cy > MAX_HEART_BEAT_MS:
        raise ProtocolError(f"heart-beat values must be at most {MAX_HEART_BEAT_MS} ms")
    return cx, cy


def negotiate_heart_beats(cx: int, cy: int, floor_ms: int) -> tuple[int, int]:
    """The broker's ``heart-beat:sx,sy`` answer to a client's ``cx,cy``, as RabbitMQ answers.

    STOMP makes each direction ``max`` of what the sender can do and the receiver wants (0 on
    either side: none).  The broker can beat and listen at any pace down to ``floor_ms``, so it
    answers with the client's own figures raised to the floor: ``sx`` (its beats) is what the
    client wants to hear, ``sy`` (what it wants to hear) is what the client can send.  Then
    ``max(sx, cy) = sx`` and ``max(cx, sy) = sy``: the answer is the negotiated pair, which a
    client that gets the arithmetic wrong reads right too.
    """
    sx = max(cy, floor_ms) if cy else 0
    sy = max(cx, floor_ms) if cx else 0
    return sx, sy


def _short(text: str, limit: int = 64) -> str:
    """Peer-provided text made safe and short for an ERROR message or a log line."""
    text = text.replace("\r", " ").replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


@implementer(IBrokerClient, IPushProducer)
class StompServerProtocol(Protocol):
    """One client connection to the embedded broker.

    The broker holds one per guest for as long as the guest runs: what most connections never
    need (frames waiting behind a pause, transactions) is created on first use, and heart-beats
    are kept by the factory's :class:`~vmcloud.broker.heartbeats.Heartbeats` rather than by
    timed calls of their own.
    """

    local = False

    def __init__(self, factory: StompServerFactory) -> None:
        self.factory = factory
        self.out: _Transport
        self.limits = factory.limits
        self.decoder = Decoder(factory.limits.frame, hold_after_connect=True)
        self.version = "1.2"  # what ERROR frames use until a version is negotiated
        self.state = _State.AWAIT_CONNECT
        self.avatar: IStompAvatar | None = None
        self.peer: Peer | None = None
        #: frames decoded but not handled yet (reading is paused, or the login is not through)
        self._inbox: deque[Frame] | None = None
        self._reading_paused = False
        self._registered = False
        self._transactions: dict[str, _Transaction] | None = None
        #: heart-beats: seconds between beats we send (0: none), the last time we wrote; seconds
        #: of silence after which the peer is dropped (0: never), the last time it was heard
        self._out_interval = 0.0
        self._last_write = 0.0
        self._silence_limit = 0.0
        self._heard_at = 0.0
        #: the factory's :class:`Heartbeats` keeps these
        self.wake_at = 0.0
        self.scheduled = False
        self._timer: IDelayedCall | None = None  # CONNECT timeout, then the close timeout
        self._process_pending = False  # queued in the factory's next batch of resumed readers

    def __lt__(self, other: StompServerProtocol) -> bool:
        """Order by the next heart-beat wake-up (the factory's :class:`Heartbeats` is a heap)."""
        return self.wake_at < other.wake_at

    @property
    def address(self) -> str:
        """``host:port`` of the peer, for log lines (worked out when asked: only logs need it)."""
        transport = self.transport
        if transport is None:
            return "?"
        try:
            peer = transport.getPeer()
        except Exception:
            return "?"
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        return f"{host}:{port}" if host is not None else str(peer)

    def _on_loopback(self) -> bool:
        """Whether this connection came from this very host (the anonymous-guest rule)."""
        transport = self.transport
        try:
            if transport is None:
                return False
            return is_loopback(transport.getHost()) and is_loopback(transport.getPeer())
        except Exception:
            return False

    @property
    def name(self) -> str:
        """IBrokerClient: who this is in the realm's log lines."""
        identity = self.avatar.identity if self.avatar is not None else "?"
        return f"{identity}@{self.address}"

    # -- connection life

    def connectionMade(self) -> None:  # noqa: N802
        factory = self.factory
        self.out = typing.cast(_Transport, self.transport)
        factory.connections += 1
        factory.opened += 1
        self.out.registerProducer(self, True)
        self._registered = True
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)  # frames are whole messages: Nagle only adds latency
        if factory.connections > self.limits.max_connections:
            factory.refused += 1
            log.warn(
                "Refusing STOMP connection from {address}: {limit} connections already",
                address=self.address,
                limit=self.limits.max_connections,
                event="broker-connection-limit",
            )
            self._fail("too many connections")
            return
        self._timer = factory.clock.callLater(self.limits.connect_timeout, self._connect_timed_out)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        was = self.state
        self.state = _State.CLOSED
        self._cancel_timers()
        self._inbox = None
        self._transactions = None
        self.factory.forget(self)
        if self.peer is not None:
            self.factory.realm.detach(self.peer)
        if was is _State.CONNECTED and self.avatar is not None:
            log.info(
                "STOMP {identity} from {address} disconnected",
                identity=self.avatar.identity,
                address=self.address,
                event="broker-disconnect",
            )

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.state is _State.CLOSING or self.state is _State.CLOSED:
            return
        if self._silence_limit:
            self._heard_at = self.factory.clock.seconds()
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as e:
            self._fail(e.message)
            return
        if frames or self._inbox:
            self._process(frames)

    # -- frames

    def _process(self, frames: list[Frame] | None = None) -> None:
        """Handle ``frames`` after those already waiting, until reading is paused or the
        connection is not in a state to handle frames; keep what is left for later.

        Frames go straight from the decoder's list to their handlers; the inbox (a deque) exists
        only while frames wait.
        """
        self._process_pending = False
        inbox = self._inbox
        if inbox is None:
            if not frames:
                return
            done = 0
            for frame in frames:
                if self._reading_paused or not self._handle_one(frame):
                    break
                done += 1
            if done < len(frames) and self._can_handle():
                rest = frames[done:]
                if self._inbox is None:
                    self._inbox = deque(rest)
                else:  # frames queued meanwhile (by a login during the loop) come after these
                    self._inbox.extendleft(reversed(rest))
            return
        if frames:
            inbox.extend(frames)
        while inbox and not self._reading_paused:
            if self.state is not _State.AWAIT_CONNECT and self.state is not _State.CONNECTED:
                break
            if not self._handle_one(inbox.popleft()):
                break
        if not inbox and self._inbox is inbox:
            self._inbox = None

    def _can_handle(self) -> bool:
        """Whether frames may be handled now or later (not once the connection is closing)."""
        return self.state in _HANDLING

    def _handle_one(self, frame: Frame) -> bool:
        """Handle one frame; False when it was not handled, or when handling must stop after it."""
        if self.state is not _State.AWAIT_CONNECT and self.state is not _State.CONNECTED:
            return False
        try:
            self._handle(frame)
        except ProtocolError as e:
            self._fail(e.message, frame)
            return False
        except Exception:
            log.failure(
                "Internal error handling a {command} frame from {address}",
                command=_short(frame.command),
                address=self.address,
                event="broker-internal-error",
            )
            self._fail("internal broker error", frame)
            return False
        return True

    def _handle(self, frame: Frame) -> None:
        command = frame.command
        if self.state is _State.AWAIT_CONNECT:
            if command == "CONNECT" or command == "STOMP":
                self._connect(frame)
                return
            raise ProtocolError(f"expected CONNECT or STOMP first, got {_short(command)}")
        handler = _HANDLERS.get(command)
        if handler is None:
            if command == "CONNECT" or command == "STOMP":
                raise ProtocolError("already connected")
            raise ProtocolError(f"unknown command {_short(command)}")
        handler(self, frame)
        receipt = frame.headers.get("receipt")
        if receipt is not None and self.state is _State.CONNECTED:
            self._receipt(receipt)

    def _receipt(self, receipt: str) -> None:
        self._write(Frame.adopting("RECEIPT", {"receipt-id": receipt}))

    def _connect(self, frame: Frame) -> None:
        headers = frame.headers
        accept = headers.get("accept-version")
        if accept is None:
            version = "1.0"
        else:
            offered = {v.strip() for v in accept.split(",")}
            common = [v for v in VERSIONS if v in offered]
            if not common:
                self._fail(
                    f"no common STOMP version (client offers {_short(accept)})",
                    frame,
                    {"version": ",".join(VERSIONS)},
                )
                return
            version = common[-1]
        self.version = version
        self.decoder.version = version
        login = headers.get("login", "")
        passcode = headers.get("passcode", "")
        beats = (0, 0)
        if version == "1.0":
            login, passcode = login.strip(), passcode.strip()
        else:
            beats = _heart_beat(headers.get("heart-beat"))
        self.state = _State.AUTHENTICATING
        d = self.factory.portal.login(StompLogin(login, passcode, self._on_loopback()), None, IStompAvatar)
        d.addCallbacks(self._logged_in, self._login_failed, callbackArgs=(beats,), errbackArgs=(login,))
        d.addErrback(
            lambda f: log.failure(
                "Login of {address} failed unexpectedly",
                f,
                address=self.address,
                event="broker-internal-error",
            )
        )

    def _logged_in(
        self, result: tuple[type[Interface], IStompAvatar, Callable[[], None]], beats: tuple[int, int]
    ) -> None:
        if self.state is not _State.AUTHENTICATING:
            return  # the connection went away meanwhile
        _interface, avatar, _logout = result
        self.avatar = avatar
        self.state = _State.CONNECTED
        self._cancel_timer()
        factory = self.factory
        self.peer = factory.realm.attach(self)
        if avatar.full_access and hasattr(self.out, "bufferSize"):  # a TCP transport
            self.out.bufferSize = self.limits.full_access_buffer_bytes
        factory.logged_in(self, avatar)
        headers = {
            "version": self.version,
            "session": f"session-{next(factory.session_ids)}",
            "server": factory.server,
        }
        if self.version != "1.0":
            out_ms, in_ms = negotiate_heart_beats(*beats, self.limits.heartbeat_floor_ms)
            headers["heart-beat"] = f"{out_ms},{in_ms}"
            self._start_heartbeats(out_ms, in_ms)
        self._write(Frame("CONNECTED", headers))
        log.info(
            "STOMP {identity} connected from {address} (STOMP {version}, {access})",
            identity=avatar.identity,
            address=self.address,
            version=self.version,
            access="full access" if avatar.full_access else "guest",
            event="broker-connect",
        )
        try:
            frames = self.decoder.feed(b"")
        except ProtocolError as e:
            self._fail(e.message)
            return
        self._process(frames)

    def _login_failed(self, failure: Failure, login: str) -> None:
        if self.state is not _State.AUTHENTICATING:
            return
        reason = failure.getErrorMessage() if failure.check(UnauthorizedLogin) else "login error"
        log.warn(
            "STOMP login {login!r} from {address} refused: {reason}",
            login=_short(login),
            address=self.address,
            reason=reason,
            event="broker-auth-failed",
        )
        self._fail("authentication failed")

    # -- commands after CONNECT

    def _send(self, frame: Frame) -> None:
        destination = self._destination(frame)
        assert self.avatar is not None
        if not self.avatar.may_send(destination):
            raise ProtocolError(f"not allowed to send to {_short(destination)}")
        if not self._held(frame):
            self._publish(frame)

    def _publish(self, frame: Frame) -> None:
        avatar = self.avatar
        assert avatar is not None and self.peer is not None
        headers = frame.headers
        # A guest's messages say who it logged in as (built per message: kept, it would cost
        # every guest connection a dict for as long as it lives).
        stamp = None if avatar.full_access else {"user-id": avatar.identity, LOGIN_HEADER: avatar.identity}
        try:
            self.factory.realm.send(self.peer, headers["destination"], headers, frame.body, stamp)
        except RealmError as e:
            raise ProtocolError(str(e)) from None

    def _subscribe(self, frame: Frame) -> None:
        assert self.avatar is not None and self.peer is not None
        destination = self._destination(frame)
        sub_id = frame.headers.get("id")
        if sub_id is None:
            if self.version != "1.0":
                raise ProtocolError("SUBSCRIBE without an id header")
            sub_id = destination
        try:
            ack = AckMode(frame.headers.get("ack", "auto"))
        except ValueError:
            raise ProtocolError("ack must be auto, client or client-individual") from None
        if not self.avatar.may_subscribe(destination):
            raise ProtocolError(f"not allowed to subscribe to {_short(destination)}")
        try:
            self.factory.realm.subscribe(self.peer, sub_id, destination, ack)
        except RealmError as e:
            raise ProtocolError(str(e)) from None

    def _unsubscribe(self, frame: Frame) -> None:
        assert self.peer is not None
        sub_id = frame.headers.get("id")
        if sub_id is None:
            destination = frame.headers.get("destination")
            if destination is None:
                raise ProtocolError("UNSUBSCRIBE without an id header")
            sub_id = next((s.id for s in self.peer.subscriptions if s.destination == destination), None)
            if sub_id is None:
                return
        self.factory.realm.unsubscribe(self.peer, sub_id)

    def _ack(self, frame: Frame) -> None:
        self._ack_id(frame)
        if not self._held(frame):
            self._apply_ack(frame)

    def _apply_ack(self, frame: Frame) -> None:
        assert self.peer is not None
        ack_id = self._ack_id(frame)
        realm = self.factory.realm
        if frame.command == "ACK":
            realm.ack(self.peer, ack_id)
        else:
            realm.nack(self.peer, ack_id)

    def _begin(self, frame: Frame) -> None:
        tx = self._transaction_id(frame)
        transactions = self._transactions
        if transactions is None:
            transactions = self._transactions = {}
        if tx in transactions:
            raise ProtocolError(f"transaction {_short(tx)} is already open")
        if len(transactions) >= self.limits.max_transactions:
            raise ProtocolError(f"more than {self.limits.max_transactions} open transactions")
        transactions[tx] = _Transaction()

    def _commit(self, frame: Frame) -> None:
        transaction = self._pop_transaction(frame)
        for held in transaction.frames:
            if held.command == "SEND":
                self._publish(held)
            else:
                self._apply_ack(held)

    def _abort(self, frame: Frame) -> None:
        self._pop_transaction(frame)

    def _disconnect(self, frame: Frame) -> None:
        self._transactions = None
        receipt = frame.headers.get("receipt")
        if receipt is not None:
            self._receipt(receipt)
        self._close()

    # -- helpers for commands

    @staticmethod
    def _destination(frame: Frame) -> str:
        destination = frame.headers.get("destination")
        if not destination:
            raise ProtocolError(f"{frame.command} without a destination header")
        return destination

    @staticmethod
    def _ack_id(frame: Frame) -> str:
        ack_id = frame.headers.get("id") or frame.headers.get("message-id")
        if not ack_id:
            raise ProtocolError(f"{frame.command} without an id (or message-id) header")
        return ack_id

    @staticmethod
    def _transaction_id(frame: Frame) -> str:
        tx = frame.headers.get("transaction")
        if not tx:
            raise ProtocolError(f"{frame.command} without a transaction header")
        return tx

    def _pop_transaction(self, frame: Frame) -> _Transaction:
        tx = self._transaction_id(frame)
        transactions = self._transactions
        transaction = transactions.pop(tx, None) if transactions else None
        if transaction is None:
            raise ProtocolError(f"unknown transaction {_short(tx)}")
        return transaction

    def _held(self, frame: Frame) -> bool:
        """Hold ``frame`` in its transaction, if it names one; False when it has none."""
        tx = frame.headers.get("transaction")
        if tx is None:
            return False
        transactions = self._transactions
        transaction = transactions.get(tx) if transactions else None
        if transaction is None:
            raise ProtocolError(f"unknown transaction {_short(tx)}")
        limits = self.limits
        transaction.size += len(frame.body) + 256
        transaction.frames.append(frame)
        if (
            len(transaction.frames) > limits.max_transaction_frames
            or transaction.size > limits.max_transaction_bytes
        ):
            raise ProtocolError("transaction too large")
        return True

    # -- output

    def _write(self, frame: Frame) -> int:
        try:
            data = encode(frame, self.version)
        except ValueError:
            # A 1.0 peer cannot receive headers with line breaks: leave those out.
            headers = {k: v for k, v in frame.headers.items() if _representable(k, v)}
            data = encode(Frame(frame.command, headers, frame.body), self.version)
        if self._out_interval:
            self._last_write = self.factory.clock.seconds()
        self.out.write(data)
        return len(data)

    def deliver(self, subscription: Subscription, message: Message) -> int:
        """IBrokerClient: write one MESSAGE frame for ``subscription``."""
        try:
            data = encode_message(
                message.destination,
                message.message_id,
                subscription.id,
                message.headers,
                message.body,
                self.version,
                ack=None if subscription.ack is AckMode.AUTO else message.message_id,
                redelivered=message.redelivered,
            )
        except ValueError:  # headers a 1.0 peer cannot receive: the slow path leaves them out
            return self._write(_message_frame(subscription, message))
        if self._out_interval:
            self._last_write = self.factory.clock.seconds()
        self.out.write(data)
        return len(data)

    def _fail(self, message: str, frame: Frame | None = None, extra: Mapping[str, str] | None = None) -> None:
        """Send ERROR saying ``message``, then close once it is flushed."""
        if self.state is _State.CLOSING or self.state is _State.CLOSED:
            return
        identity = self.avatar.identity if self.avatar is not None else None
        log.warn(
            "STOMP ERROR to {identity} at {address}: {reason}",
            identity=identity,
            address=self.address,
            reason=message,
            event="broker-error-sent",
        )
        headers = {"message": _short(message, 200), "content-type": "text/plain"}
        if extra:
            headers.update(extra)
        if frame is not None and frame.command not in ("CONNECT", "STOMP"):
            receipt = frame.headers.get("receipt")
            if receipt is not None:
                headers["receipt-id"] = receipt
        self._write(Frame("ERROR", headers, message.encode("utf-8")))
        self._close()

    def _close(self) -> None:
        """Stop everything and close the connection after flushing what was written.

        On a TCP socket this is a lingering close: the broker's side is shut once the ERROR (or
        RECEIPT) is flushed, and what the peer still sends is read and dropped until it closes
        too, or ``close_timeout`` runs out.  Closing the socket outright while the peer's bytes
        keep arriving makes the kernel answer them with a reset, and a reset throws away the
        ERROR the peer had not read yet: a client cut off mid-write (a body over the limit, a
        pipelined session) would see its connection reset and never learn why.
        """
        self.state = _State.CLOSING
        self._cancel_timers()
        self._inbox = None
        if self.peer is not None:
            self.factory.realm.detach(self.peer)
        transport = self.out
        if self._registered:
            self._registered = False
            transport.unregisterProducer()
        if isinstance(transport, tcp.Connection):
            if self._reading_paused:
                transport.resumeProducing()  # read on, to see the peer's end
            transport.loseWriteConnection()
        else:
            transport.loseConnection()
        self._reading_paused = False
        self._timer = self.factory.clock.callLater(self.limits.close_timeout, self._abort_connection)

    def _abort_connection(self) -> None:
        self._timer = None
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    def kill(self, reason: str) -> None:
        """IBrokerClient: ERROR and close (a slow consumer, revoked credentials)."""
        self._fail(reason)

    # -- back-pressure: the realm pauses our reading

    def pause_reading(self) -> None:
        if self.state is not _State.CONNECTED:
            return
        self._reading_paused = True
        self.out.pauseProducing()
        self._heard_now()

    def resume_reading(self) -> None:
        if not self._reading_paused or self.state is not _State.CONNECTED:
            return
        self._reading_paused = False
        self.out.resumeProducing()
        self._heard_now()
        if self._inbox and not self._process_pending:
            self._process_pending = True
            self.factory.process_soon(self)

    # -- IPushProducer: the transport tells us the peer is not reading

    def pauseProducing(self) -> None:  # noqa: N802
        if self.peer is not None:
            self.factory.realm.consumer_congested(self.peer)

    def resumeProducing(self) -> None:  # noqa: N802
        if self.peer is not None and self.state is _State.CONNECTED:
            self.factory.realm.consumer_drained(self.peer)

    def stopProducing(self) -> None:  # noqa: N802
        pass

    # -- timers

    def _connect_timed_out(self) -> None:
        self._timer = None
        self._fail(f"no CONNECT within {self.limits.connect_timeout:g} s")

    def _start_heartbeats(self, out_ms: int, in_ms: int) -> None:
        """Beat every ``out_ms`` and drop the peer after ``heartbeat_grace`` times ``in_ms`` of
        silence (0: not at all), woken by the factory's :class:`Heartbeats`."""
        if not out_ms and not in_ms:
            return
        factory = self.factory
        now = factory.clock.seconds()
        wake = math.inf
        if out_ms:
            self._out_interval = out_ms / 1000
            self._last_write = now
            wake = now + self._out_interval
        if in_ms:
            self._silence_limit = self.limits.heartbeat_grace * in_ms / 1000
            self._heard_at = now
            wake = min(wake, now + self._silence_limit)
        factory.heartbeats.add(self, wake)

    def wake(self, now: float) -> float | None:
        """Heartbeats: beat unless something went out within the interval, drop the peer if it
        has been silent too long; say when to come back."""
        if self.state is not _State.CONNECTED:
            return None
        wake = math.inf
        if self._out_interval:
            due = self._last_write + self._out_interval
            if now >= due - 0.001:
                self.out.write(HEARTBEAT)
                self._last_write = now
                due = now + self._out_interval
            wake = due
        if self._silence_limit:
            if self._reading_paused:
                self._heard_at = now  # not reading, so not hearing: not the peer's silence
            deadline = self._heard_at + self._silence_limit
            if now >= deadline - 0.001:
                if now - deadline > STALL and self.wake_at < deadline + STALL:
                    # The first look comes late: the reactor was held up, and what the peer sent
                    # meanwhile may be waiting unread.  Look once more after the next read (that
                    # wake-up is due after the deadline, so it is never put off again).
                    return now
                log.info(
                    "Dropping STOMP {identity} at {address}: silent for {silence:.1f} s",
                    identity=self.avatar.identity if self.avatar is not None else None,
                    address=self.address,
                    silence=now - self._heard_at,
                    event="broker-heartbeat-timeout",
                )
                self._fail("heart-beat timeout")
                return None
            wake = min(wake, deadline)
        return wake

    def _heard_now(self) -> None:
        """Silence is counted from now (reading was paused or resumed: the peer may have been
        talking all along without us reading it)."""
        if self._silence_limit:
            self._heard_at = self.factory.clock.seconds()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _cancel_timers(self) -> None:
        self._cancel_timer()
        self.factory.heartbeats.remove(self)


def _message_frame(subscription: Subscription, message: Message) -> Frame:
    """The MESSAGE frame delivering ``message`` to ``subscription``."""
    message_id = message.message_id
    headers = {
        "destination": message.destination,
        "message-id": message_id,
        "subscription": subscription.id,
    }
    if subscription.ack is not AckMode.AUTO:
        headers["ack"] = message_id
    if message.redelivered:
        headers["redelivered"] = "true"
    headers.update(message.headers)
    return Frame.adopting("MESSAGE", headers, message.body)


def _representable(name: str, value: str) -> bool:
    return not any(c in name for c in ":\r\n") and "\n" not in value and "\r" not in value


_HANDLERS: dict[str, Callable[[StompServerProtocol, Frame], None]] = {
    "SEND": StompServerProtocol._send,
    "SUBSCRIBE": StompServerProtocol._subscribe,
    "UNSUBSCRIBE": StompServerProtocol._unsubscribe,
    "ACK": StompServerProtocol._ack,
    "NACK": StompServerProtocol._ack,
    "BEGIN": StompServerProtocol._begin,
    "COMMIT": StompServerProtocol._commit,
    "ABORT": StompServerProtocol._abort,
    "DISCONNECT": StompServerProtocol._disconnect,
}


class StompServerFactory(Factory):
    """Builds a :class:`StompServerProtocol` per connection and knows who is connected."""

    noisy = False

    def __init__(self, clock: IReactorTime, realm: Realm, portal: Portal, limits: BrokerLimits) -> None:
        self.clock = clock
        self.realm = realm
        self.portal = portal
        self.limits = limits
        self.server = SERVER_NAME
        self.session_ids = itertools.count(1)
        #: open connections (a count: nothing needs to walk them)
        self.connections = 0
        #: connections made since the start, and those refused for the connection limit
        self.opened = 0
        self.refused = 0
        #: the heart-beats of every connection
        self.heartbeats = Heartbeats(clock)
        #: guests' connections by identity: the connection itself, or a set when there are several
        self._by_identity: dict[str, StompServerProtocol | set[StompServerProtocol]] = {}
        self._to_process: list[StompServerProtocol] = []

    def process_soon(self, protocol: StompServerProtocol) -> None:
        """Have ``protocol`` handle the frames it holds on the next reactor turn.

        Publishers are resumed in bursts (a queue falls below its low-water mark, a consumer
        drains): one timed call for the whole burst instead of one each.
        """
        if not self._to_process:
            self.clock.callLater(0, self._process_resumed)
        self._to_process.append(protocol)

    def _process_resumed(self) -> None:
        protocols, self._to_process = self._to_process, []
        for protocol in protocols:
            try:
                protocol._process()
            except Exception:
                log.failure(
                    "Resuming {address} failed", address=protocol.address, event="broker-internal-error"
                )

    def buildProtocol(self, addr: IAddress | None) -> StompServerProtocol:  # noqa: N802
        return StompServerProtocol(self)

    def logged_in(self, protocol: StompServerProtocol, avatar: IStompAvatar) -> None:
        """Remember guests by identity, so that revoking credentials can drop them.

        A guest has one connection, but for a while two (a reconnect before the old connection
        is known dead): a set only then.
        """
        if avatar.full_access:
            return
        by_identity = self._by_identity
        held = by_identity.get(avatar.identity)
        if held is None:
            by_identity[avatar.identity] = protocol
        elif isinstance(held, set):
            held.add(protocol)
        elif held is not protocol:
            by_identity[avatar.identity] = {held, protocol}

    def forget(self, protocol: StompServerProtocol) -> None:
        """The connection is gone."""
        self.connections -= 1
        avatar = protocol.avatar
        if avatar is None:
            return
        by_identity = self._by_identity
        held = by_identity.get(avatar.identity)
        if held is protocol:
            del by_identity[avatar.identity]
        elif isinstance(held, set):
            held.discard(protocol)
            if len(held) == 1:
                by_identity[avatar.identity] = next(iter(held))
            elif not held:
                del by_identity[avatar.identity]

    def drop_identity(self, identity: str, reason: str) -> int:
        """ERROR and close every connection of the guest ``identity``; return how many."""
        held = self._by_identity.get(identity)
        if held is None:
            return 0
        protocols = list(held) if isinstance(held, set) else [held]
        for protocol in protocols:
            protocol.kill(reason)
        return len(protocols)
