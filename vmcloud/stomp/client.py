"""A STOMP 1.2 client for Twisted: one connection (:class:`StompClientProtocol`), and a session that
survives broker restarts (:class:`ReconnectingSession`).

The guest agent uses it to reach the controller's broker, and the controller uses it when
``[broker] external`` names another broker (RabbitMQ's STOMP plugin).  Both see it only as an
:class:`~vmcloud.stomp.session.IStompSession`: send, subscribe, unsubscribe.  Frames go through
our own codec: stomper (0.4.3) cannot carry binary bodies (it packs ``bytes`` as their repr and
never sets content-length).

The protocol speaks what a 1.2 client must: CONNECT with ``accept-version``, ``host``, login and
heart-beats; SUBSCRIBE/UNSUBSCRIBE with ids; RECEIPTs; ERROR frames (logged with the broker's
message, then the connection is closed); heart-beats both ways, dropping a broker silent for two
intervals.  The session reconnects with :class:`~twisted.application.internet.ClientService` and
back-off, subscribes again after every (re)connect, then calls an ``on_connected`` hook (where the
agent says HELLO again) and sends what was said while disconnected (a bounded outbox).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from vmcloud.stomp.codec import HEARTBEAT, Decoder, Limits, ProtocolError, encode
from vmcloud.stomp.frame import Frame
from vmcloud.stomp.session import IStompSession

log = Logger()

#: Frame limits for what a broker sends us (bodies up to the codec's default, 16 MiB).
DEFAULT_LIMITS = Limits()

#: What we offer in CONNECT: 1.2, and 1.1 for brokers that stop there (the codec speaks both).
ACCEPT_VERSION = "1.1,1.2"


class StompError(Exception):
    """The broker refused something: an ERROR frame (its ``message`` header), or no CONNECTED."""


class NotConnectedError(Exception):
    """There is no STOMP connection to send on right now."""


def _heartbeat(value: str | None) -> tuple[int, int]:
    try:
        first, second = (value or "0,0").split(",")
        return max(0, int(first)), max(0, int(second))
    except ValueError:
        return 0, 0


@implementer(IStompSession)
class StompClientProtocol(Protocol):
    """One STOMP connection, client side.

    ``ready`` fires once the broker said CONNECTED (and fails on ERROR or a lost connection
    before that); ``lost`` fires when the connection is gone.  ``heartbeat`` is what we offer, in
    milliseconds: (how often we can send, how often we want to hear from the broker).
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        login: str | None = None,
        passcode: str | None = None,
        host: str = "/",
        heartbeat: tuple[int, int] = (10_000, 10_000),
        limits: Limits = DEFAULT_LIMITS,
        connect_timeout: float = 15.0,
    ) -> None:
        self._clock = clock
        self._connect_timeout = connect_timeout
        self._login = login
        self._passcode = passcode
        self._host = host
        self._heartbeat = heartbeat
        self._decoder = Decoder(limits)
        self.version = "1.2"
        self.server: str | None = None
        self.ready: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.is_connected = False
        self._subscriptions: dict[str, Callable[[Frame], None]] = {}
        self._receipts: dict[str, Deferred[None]] = {}
        self._ids = itertools.count(1)
        self._beats: list[LoopingCall] = []
        self._last_received = 0.0
        self._closing_call: IDelayedCall | None = None

    # ------------------------------------------------------------------ Twisted's side

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        self._last_received = self._clock.seconds()
        headers = {"accept-version": ACCEPT_VERSION, "host": self._host}
        if self._login is not None:
            headers["login"] = self._login
        if self._passcode is not None:
            headers["passcode"] = self._passcode
        headers["heart-beat"] = f"{self._heartbeat[0]},{self._heartbeat[1]}"
        self._write(Frame("CONNECT", headers))
        self._closing_call = self._clock.callLater(self._connect_timeout, self._no_connected)

    def _no_connected(self) -> None:
        log.warn(
            "The broker {peer} did not answer CONNECT within {timeout} s; closing",
            peer=self._peer(),
            timeout=self._connect_timeout,
        )
        self.abort()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self._last_received = self._clock.seconds()
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as e:
            log.error("Broker {peer} sent bad STOMP ({reason}); closing", peer=self._peer(), reason=e.message)
            self.abort()
            return
        for frame in frames:
            if self.transport is None or self.lost.called:
                return
            self._frame_received(frame)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802 - Twisted's name
        self.is_connected = False
        for beat in self._beats:
            if beat.running:
                beat.stop()
        self._beats = []
        if self._closing_call is not None and self._closing_call.active():
            self._closing_call.cancel()
        receipts, self._receipts = self._receipts, {}
        for receipt in receipts.values():
            receipt.errback(NotConnectedError("the connection was lost before the broker's RECEIPT"))
        if not self.ready.called:
            self.ready.errback(StompError(f"connection lost before CONNECTED: {reason.getErrorMessage()}"))
        if not self.lost.called:
            self.lost.callback(None)

    # ------------------------------------------------------------------ IStompSession

    def send(self, destination: str, body: bytes, headers: Mapping[str, str] = {}) -> None:
        self._require_connected()
        self._write(Frame("SEND", {**headers, "destination": destination}, body))

    def send_with_receipt(
        self, destination: str, body: bytes, headers: Mapping[str, str] = {}
    ) -> Deferred[None]:
        """Send, and fire when the broker confirms it processed the message (RECEIPT)."""
        self._require_connected()
        receipt_id = f"r-{next(self._ids)}"
        done: Deferred[None] = Deferred()
        self._receipts[receipt_id] = done
        self._write(Frame("SEND", {**headers, "destination": destination, "receipt": receipt_id}, body))
        return done

    def subscribe(
        self, destination: str, on_message: Callable[[Frame], None], subscription_id: str | None = None
    ) -> str:
        self._require_connected()
        subscription_id = subscription_id or f"s-{next(self._ids)}"
        if subscription_id in self._subscriptions:
            raise ValueError(f"subscription id {subscription_id} is already in use")
        self._subscriptions[subscription_id] = on_message
        self._write(Frame("SUBSCRIBE", {"destination": destination, "id": subscription_id, "ack": "auto"}))
        return subscription_id

    def unsubscribe(self, subscription_id: str) -> None:
        if self._subscriptions.pop(subscription_id, None) is not None and self.is_connected:
            self._write(Frame("UNSUBSCRIBE", {"id": subscription_id}))

    def disconnect(self, timeout: float = 5.0) -> Deferred[None]:
        """Say DISCONNECT, wait for its RECEIPT (at most ``timeout`` s), close; fires when closed.

        The RECEIPT confirms the broker processed everything sent before, so nothing said just
        before a clean stop (BYE) is lost.
        """
        if self.transport is None or self.lost.called:
            return succeed(None)
        if not self.is_connected:
            self.transport.loseConnection()
            return self.lost
        self.is_connected = False
        receipt_id = f"bye-{next(self._ids)}"
        done: Deferred[None] = Deferred()
        self._receipts[receipt_id] = done
        self._write(Frame("DISCONNECT", {"receipt": receipt_id}))
        self._closing_call = self._clock.callLater(timeout, self.abort)
        done.addBoth(lambda _: self.transport.loseConnection() if self.transport is not None else None)
        return self.lost

    # ------------------------------------------------------------------ frames

    def _frame_received(self, frame: Frame) -> None:
        command = frame.command
        if command == "CONNECTED":
            self._on_connected(frame)
        elif command == "MESSAGE":
            subscription = frame.get("subscription") or ""
            on_message = self._subscriptions.get(subscription)
            if on_message is None:
                log.debug("MESSAGE for unknown subscription {sid}", sid=subscription)
                return
            try:
                on_message(frame)
            except Exception:
                log.failure(
                    "Handling a MESSAGE from {destination} failed", destination=frame.get("destination")
                )
        elif command == "RECEIPT":
            receipt = self._receipts.pop(frame.get("receipt-id") or "", None)
            if receipt is not None:
                receipt.callback(None)
        elif command == "ERROR":
            self._on_error(frame)
        else:
            log.warn("Ignoring unexpected {command} frame from the broker", command=command[:32])

    def _on_connected(self, frame: Frame) -> None:
        if self.ready.called:
            return
        if self._closing_call is not None and self._closing_call.active():
            self._closing_call.cancel()
        self.version = frame.get("version") or "1.0"
        self._decoder.version = self.version
        self.server = frame.get("server")
        self.is_connected = True
        server_send, server_want = _heartbeat(frame.get("heart-beat"))
        client_send, client_want = self._heartbeat
        if client_send and server_want:
            self._every(max(client_send, server_want) / 1000, self._send_heartbeat)
        if client_want and server_send:
            interval = max(client_want, server_send) / 1000
            self._every(interval, lambda: self._check_heartbeat(interval))
        log.info(
            "STOMP {version} session with {peer} ({server})",
            version=self.version,
            peer=self._peer(),
            server=self.server or "unknown broker",
        )
        self.ready.callback(None)

    def _on_error(self, frame: Frame) -> None:
        message = frame.get("message") or frame.body[:200].decode("utf-8", "replace") or "no message"
        log.error(
            "The broker {peer} said ERROR: {message}", peer=self._peer(), message=message, event="stomp-error"
        )
        receipt = self._receipts.pop(frame.get("receipt-id") or "", None)
        if receipt is not None:
            receipt.errback(StompError(message))
        if not self.ready.called:
            self.ready.errback(StompError(f"the broker refused the connection: {message}"))
        # The spec has the broker close after ERROR; not every broker does (RabbitMQ), so do it here.
        if self.transport is not None:
            self.transport.loseConnection()

    # ------------------------------------------------------------------ heart-beats and writing

    def _every(self, seconds: float, function: Callable[[], None]) -> None:
        beat = LoopingCall(function)
        beat.clock = self._clock
        beat.start(seconds, now=False).addErrback(lambda f: log.failure("heart-beat failed", f))
        self._beats.append(beat)

    def _send_heartbeat(self) -> None:
        if self.transport is not None:
            self.transport.write(HEARTBEAT)

    def _check_heartbeat(self, interval: float) -> None:
        silent = self._clock.seconds() - self._last_received
        if silent > 2 * interval:
            log.warn(
                "The broker {peer} was silent for {silent:.1f} s (heart-beat {interval} s); reconnecting",
                peer=self._peer(),
                silent=silent,
                interval=interval,
                event="stomp-heartbeat-lost",
            )
            self.abort()

    def _write(self, frame: Frame) -> None:
        assert self.transport is not None
        self.transport.write(encode(frame, self.version))

    def _require_connected(self) -> None:
        if not self.is_connected or self.transport is None:
            raise NotConnectedError("not connected to the broker")

    def abort(self) -> None:
        """Drop the connection at once, without a goodbye."""
        if self.transport is not None:
            abort = getattr(self.transport, "abortConnection", None)
            (abort or self.transport.loseConnection)()

    def _peer(self) -> str:
        if self.transport is None:
            return "?"
        peer = self.transport.getPeer()
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        return f"{host}:{port}" if host is not None else str(peer)


class StompClientFactory(Factory):
    """Builds :class:`StompClientProtocol` s with the same credentials and heart-beat offer."""

    noisy = False  # a reconnecting client would log "Starting factory" on every attempt

    def __init__(self, clock: IReactorTime, **options: Any) -> None:
        self._clock = clock
        self._options = options

    def buildProtocol(self, addr: IAddress | None) -> StompClientProtocol:  # noqa: N802 - Twisted's name
        protocol = StompClientProtocol(self._clock, **self._options)
        protocol.factory = self
        return protocol


@implementer(IStompSession)
class ReconnectingSession(Service):
    """An :class:`IStompSession` that stays up: reconnects with back-off and subscribes again.

    ``endpoint`` is a client endpoint or its description (``tcp:127.0.0.1:61613``).  Until the
    first connection, and between connections, what is sent waits in an outbox of at most
    ``max_outbox`` messages / ``max_outbox_bytes`` bytes (the oldest are dropped, with a log line).
    ``on_connected`` is called after every (re)connect, once subscriptions are in place and before
    the outbox is sent.
    """

    name = "stomp-session"

    def __init__(
        self,
        reactor: Any,
        endpoint: str | IStreamClientEndpoint,
        *,
        login: str | None = None,
        passcode: str | None = None,
        host: str = "/",
        heartbeat: tuple[int, int] = (10_000, 10_000),
        connect_timeout: float = 15.0,
        on_connected: Callable[[], object] | None = None,
        clock: IReactorTime | None = None,
        retry_policy: Callable[[int], float] | None = None,
        max_outbox: int = 1000,
        max_outbox_bytes: int = 64 * 1024 * 1024,
        disconnect_timeout: float = 5.0,
    ) -> None:
        self._clock: IReactorTime = clock if clock is not None else reactor
        if isinstance(endpoint, str):
            self.endpoint_description = endpoint
            client_endpoint: IStreamClientEndpoint = clientFromString(reactor, endpoint)
        else:
            self.endpoint_description = repr(endpoint)
            client_endpoint = endpoint
        self.on_connected = on_connected
        self._factory = StompClientFactory(
            self._clock,
            login=login,
            passcode=passcode,
            host=host,
            heartbeat=heartbeat,
            connect_timeout=connect_timeout,
        )
        self._client = ClientService(
            client_endpoint,
            self._factory,
            retryPolicy=self._retry_delay,
            clock=self._clock,
            prepareConnection=self._prepare,
        )
        self._retry_policy = retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=15.0)
        self._failed_sessions = 0
        self._protocol: StompClientProtocol | None = None
        self._subscriptions: dict[str, tuple[str, Callable[[Frame], None]]] = {}
        self._ids = itertools.count(1)
        self._outbox: deque[tuple[str, bytes, dict[str, str]]] = deque()
        self._outbox_bytes = 0
        self._max_outbox = max_outbox
        self._max_outbox_bytes = max_outbox_bytes
        self._disconnect_timeout = disconnect_timeout
        self.connections = 0

    @property
    def is_connected(self) -> bool:
        return self._protocol is not None and self._protocol.is_connected

    # ------------------------------------------------------------------ service

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        log.info("Connecting to the STOMP broker at {endpoint}", endpoint=self.endpoint_description)
        self._client.startService()

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        """Leave cleanly: DISCONNECT with a receipt (so what was sent arrived), then stop retrying."""
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            try:
                await protocol.disconnect(self._disconnect_timeout)
            except Exception:
                log.failure("Disconnecting from the broker failed")
        await self._client.stopService()
        if self._outbox:
            log.warn("{count} messages were never sent: no connection to the broker", count=len(self._outbox))
            self._outbox.clear()
            self._outbox_bytes = 0

    def when_connected(self) -> Deferred[Any]:
        """Fires with the protocol once a STOMP session is up (for tests and start-up ordering)."""
        return self._client.whenConnected()

    # ------------------------------------------------------------------ IStompSession

    def send(self, destination: str, body: bytes, headers: Mapping[str, str] = {}) -> None:
        protocol = self._protocol
        if protocol is not None and protocol.is_connected:
            protocol.send(destination, body, headers)
            return
        self._outbox.append((destination, body, dict(headers)))
        self._outbox_bytes += len(body)
        while len(self._outbox) > self._max_outbox or self._outbox_bytes > self._max_outbox_bytes:
            dropped, body, _ = self._outbox.popleft()
            self._outbox_bytes -= len(body)
            log.warn(
                "Not connected and the outbox is full: dropped a message for {destination}",
                destination=dropped,
                event="stomp-outbox-dropped",
            )

    def subscribe(self, destination: str, on_message: Callable[[Frame], None]) -> str:
        subscription_id = f"sub-{next(self._ids)}"
        self._subscriptions[subscription_id] = (destination, on_message)
        protocol = self._protocol
        if protocol is not None and protocol.is_connected:
            protocol.subscribe(destination, on_message, subscription_id)
        return subscription_id

    def unsubscribe(self, subscription_id: str) -> None:
        self._subscriptions.pop(subscription_id, None)
        if self._protocol is not None:
            self._protocol.unsubscribe(subscription_id)

    # ------------------------------------------------------------------ (re)connecting

    def _retry_delay(self, failed_attempts: int) -> float:
        """Back off on refused sessions too, not only on refused TCP connections."""
        return self._retry_policy(failed_attempts + self._failed_sessions)

    def _prepare(self, protocol: Any) -> Deferred[None]:
        """Run by ClientService on every new connection: wait for CONNECTED, then set up the session."""
        return Deferred.fromCoroutine(self._session_up(protocol))

    async def _session_up(self, proxy: Any) -> None:
        protocol: StompClientProtocol = getattr(proxy, "_protocol", proxy)
        try:
            await protocol.ready
        except StompError as e:
            # Not raised on purpose: ClientService cannot take a failed preparation whose
            # connection then closes (automat NoTransition).  The connection is closing; our own
            # count of failed sessions makes the next retry wait longer.
            self._failed_sessions += 1
            log.warn("Could not open a STOMP session: {reason}", reason=str(e), event="stomp-connect-failed")
            return
        except CancelledError:
            protocol.abort()
            raise
        self._failed_sessions = 0
        self._protocol = protocol
        self.connections += 1
        protocol.lost.addCallback(self._lost, protocol)
        for subscription_id, (destination, on_message) in self._subscriptions.items():
            protocol.subscribe(destination, on_message, subscription_id)
        if self.on_connected is not None:
            try:
                self.on_connected()
            except Exception:
                log.failure("The on-connected hook failed")
        while self._outbox and protocol.is_connected:
            destination, body, headers = self._outbox.popleft()
            self._outbox_bytes -= len(body)
            protocol.send(destination, body, headers)

    def _lost(self, _: None, protocol: StompClientProtocol) -> None:
        if self._protocol is protocol:
            self._protocol = None
            if self.running:
                log.warn(
                    "Lost the STOMP session with {endpoint}; reconnecting", endpoint=self.endpoint_description
                )
