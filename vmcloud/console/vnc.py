"""``/console/{handle}``: a worker's noVNC reaches its VM's VNC server through the controller.

Each viewer is one WebSocket (subprotocol ``binary``, raw RFB in binary messages, as noVNC
speaks it) relayed to its own TCP connection to the VM's VNC server: RFB state (pixel format,
encodings, update requests) is per connection, so viewers of one handle share the VM's session
(Xvnc's shared flag), not a socket.  The operator's ``/console/vm/{vmid}`` is the same relay with
the admin token instead of a handle.

* **Access ends, sockets close.**  Every viewer is registered under its handle (or vmid) in the
  :class:`~vmcloud.console.registry.AccessRegistry`; when the pool says the handle ended or the VM
  died, each gets a WebSocket close (code :data:`CLOSE_ACCESS_ENDED`) and its VNC connection is
  cut at once; a viewer that does not complete the close handshake is dropped after
  :data:`CLOSE_GRACE` seconds.
* **View only.**  ``?view_only=1`` passes the viewer's bytes through
  :class:`~vmcloud.console.rfb.ViewOnlyFilter`, which removes input messages.  Without it the
  relay does not parse anything.
* **The operator's console logs in itself.**  On ``/console/vm/{vmid}`` the relay opens the VM's
  VNC server with the password the pool gives it (the operator's view-only one, which the VM's
  guest said in HELLO, so FREE VMs too; the session's for older guests), then greets the browser
  as RFB 3.8 with security type None (:class:`~vmcloud.console.rfb.OperatorOpening`): the
  operator's page holds no password.  Such a viewer is always view only: its input is filtered out
  here, and Xvnc ignores the input of a view-only login anyway.  The opening has
  :data:`OPENING_TIMEOUT` seconds: a VNC server that never finishes the login does not keep a
  viewer's place.
* **Back-pressure both ways.**  The WebSocket's transport consumes from the VNC connection and the
  VNC connection's transport from the WebSocket, as streaming producers: when a viewer's socket
  buffer is over Twisted's bound (64 KiB), the relay stops reading the VNC server (which then
  stops sending), and a viewer flooding a slow VNC server stops being read.  A slow viewer costs
  at most its buffer and one read, never a growing queue.

The resource makes its refusals while the request is still HTTP (see :mod:`vmcloud.console.gate`),
then hands the request to autobahn's ``WebSocketResource``.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any, cast

import attrs
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import implementer

from vmcloud.api.errors import ApiError
from vmcloud.console.gate import Gate, check_handshake, flag, refuse
from vmcloud.console.registry import AccessRegistry
from vmcloud.console.rfb import OperatorOpening, RfbError, RfbViolation, ViewOnlyFilter
from vmcloud.console.targets import Target

log = Logger(namespace="vmcloud.console")

#: Close code when the handle was released or expired, or its VM died (an application code).
CLOSE_ACCESS_ENDED = 4000
#: Close code when the VM's VNC server cannot be reached or closed the connection.
CLOSE_VNC_GONE = 4001
#: Close code when the viewer broke the rules: a text message, or a view-only stream that cannot be
#: followed (RFC 6455's 1008 "policy violation" is not an application's to send; 4008 mirrors it).
CLOSE_POLICY = 4008
#: Seconds a revoked viewer has to answer the close before its TCP connection is dropped.
CLOSE_GRACE = 0.5
#: Seconds the operator's opening may take, dial, the VM's login and the browser's answers included.
OPENING_TIMEOUT = 15.0
#: Largest WebSocket message a viewer may send (RFB client messages are tiny; SetEncodings < 256 KiB).
MAX_MESSAGE = 512 * 1024
#: Bytes a viewer may send before the VNC connection is up (noVNC sends none: the server speaks first).
MAX_EARLY = 64 * 1024
#: Viewers of one handle (or one VM), and of the whole controller.
MAX_VIEWERS_PER_KEY = 8
MAX_VIEWERS = 1000

#: Dials a VM's server: connects ``protocol`` to ``target``, firing when connected.
Dial = Callable[[Target, Protocol], Deferred[Any]]
#: Resolves a handle (or a vmid) to its target, or raises ApiError saying why there is none.
Resolve = Callable[[str], Target | None]


class Socket(typing.Protocol):
    """What the relay uses of a transport: TCP's and TLS's both have it (iosim's too)."""

    connected: int

    def write(self, data: bytes) -> None: ...
    def pauseProducing(self) -> None: ...  # noqa: N802
    def resumeProducing(self) -> None: ...  # noqa: N802
    def registerProducer(self, producer: Any, streaming: bool) -> None: ...  # noqa: N802
    def unregisterProducer(self) -> None: ...  # noqa: N802
    def abortConnection(self) -> None: ...  # noqa: N802


def socket(protocol: Any) -> Socket:
    """The transport of a connected protocol, as the relay uses it."""
    return cast(Socket, protocol.transport)


@attrs.frozen
class Ticket:
    """What the HTTP checks decided for one viewer, handed to its WebSocket protocol."""

    target: Target
    view_only: bool
    who: str  # for logs: "handle abcdef..." or "operator, VM x"
    operator: bool = False  # the relay logs in with ``target.password`` and greets with security None


@implementer(IPushProducer)
class _Valve:
    """One side of the relay as the other side's producer: pausing and resuming it, never stopping it.

    A transport whose connection is lost stops its producer; if that producer were the other
    side's transport itself, the VNC server closing would shut the viewer's socket before the
    relay could send its close reason.  Ending is the relay's business (:meth:`ConsoleViewer._end`).
    """

    def __init__(self, transport: Socket) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:  # noqa: N802 - Twisted's name
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802 - Twisted's name
        self._transport.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802 - Twisted's name
        pass


class _VncConnection(Protocol):
    """The relay's TCP connection to a VM's VNC server; everything it hears goes to its viewer."""

    def __init__(self, viewer: ConsoleViewer) -> None:
        self.viewer = viewer

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self.viewer.from_vnc(data)

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802 - Twisted's name
        self.viewer.vnc_lost()


class ConsoleViewer(WebSocketServerProtocol):
    """One viewer's WebSocket, relayed to its own connection to the VM's VNC server."""

    factory: ConsoleFactory
    ticket: Ticket

    def __init__(self) -> None:
        super().__init__()
        self._vnc: _VncConnection | None = None
        self._dialing: Deferred[Any] | None = None
        self._early: list[bytes] = []
        self._early_size = 0
        self._filter: ViewOnlyFilter | None = None
        self._opening: OperatorOpening | None = None
        self._opening_deadline: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self._ended = False
        self.relayed_in = 0
        self.relayed_out = 0

    # ------------------------------------------------------------------ WebSocket side

    def onConnect(self, request: ConnectionRequest) -> str | None:  # noqa: N802 - autobahn's name
        return "binary" if "binary" in request.protocols else None

    def onOpen(self) -> None:  # noqa: N802 - autobahn's name
        ticket = self.ticket
        self.factory.registry.add(ticket.target.key, self)
        if ticket.operator and ticket.target.password is not None:
            self._opening = OperatorOpening(ticket.target.password)
            self._filter = ViewOnlyFilter.past_opening()
            self._opening_deadline = self.factory.clock.callLater(OPENING_TIMEOUT, self._opening_too_long)
        elif ticket.view_only:
            self._filter = ViewOnlyFilter()
        log.info(
            "Console open for {who} ({mode}) to {host}:{port}",
            who=ticket.who,
            mode="view only" if ticket.view_only else "interactive",
            host=ticket.target.host,
            port=ticket.target.port,
            event="console-open",
        )
        socket(self).pauseProducing()  # nothing to relay to until the VNC server answers
        vnc = _VncConnection(self)
        self._dialing = self.factory.dial(ticket.target, vnc)
        self._dialing.addCallbacks(lambda _: self._vnc_connected(vnc), self._vnc_failed)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803 - autobahn's names
        if self._ended:
            return
        if not isBinary:
            self._end(CLOSE_POLICY, "the console speaks binary RFB messages only")
            return
        if self._opening is not None:
            try:
                to_vnc, to_viewer = self._opening.from_viewer(payload)
            except RfbViolation as e:
                self._violation(e)
                return
            payload = self._opening_said(to_vnc, to_viewer)
            if not payload:
                return
        if self._filter is not None:
            try:
                payload = self._filter.from_client(payload)
                # what the server said past its version waits for the viewer's version
                held = b"" if self._filter.server_done else self._filter.from_server(b"")
            except RfbViolation as e:
                self._violation(e)
                return
            if held:
                self.relayed_out += len(held)
                self.sendMessage(held, isBinary=True)
            if not payload:
                return
        if self._vnc is None:
            self._early.append(payload)
            self._early_size += len(payload)
            if self._early_size > MAX_EARLY:
                self._end(CLOSE_POLICY, "too much sent before the VNC server answered")
            return
        self.relayed_in += len(payload)
        socket(self._vnc).write(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
        self._close_down(f"closed by the viewer (code {code})")
        self._cut_vnc()  # again: the VNC connection may have come up while our close was under way
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()

    def revoke(self, reason: str) -> None:
        """Access ended (release, expiry, VM death): close now, drop if the viewer does not answer."""
        self._end(CLOSE_ACCESS_ENDED, reason)

    # ------------------------------------------------------------------ VNC side

    def _vnc_connected(self, vnc: _VncConnection) -> None:
        self._dialing = None
        if self._ended:
            socket(vnc).abortConnection()
            return
        self._vnc = vnc
        viewer, server = socket(self), socket(vnc)
        # The HTTP channel registered itself as the producer of the socket it served the upgrade
        # request on; the socket is ours now, and its producer is the VNC connection.
        viewer.unregisterProducer()
        viewer.registerProducer(_Valve(server), True)
        server.registerProducer(_Valve(viewer), True)
        for payload in self._early:
            self.relayed_in += len(payload)
            server.write(payload)
        self._early = []
        viewer.resumeProducing()

    def _vnc_failed(self, failure: Failure) -> None:
        self._dialing = None
        if self._ended:
            return
        log.warn(
            "Console of {who}: cannot reach the VNC server at {host}:{port}: {reason}",
            who=self.ticket.who,
            host=self.ticket.target.host,
            port=self.ticket.target.port,
            reason=failure.getErrorMessage(),
            event="console-unreachable",
        )
        self._end(CLOSE_VNC_GONE, "the VM's VNC server cannot be reached")

    def from_vnc(self, data: bytes) -> None:
        if self._ended:
            return
        if self._opening is not None:
            try:
                to_vnc, to_viewer = self._opening.from_vm(data)
            except RfbError as e:
                self._login_refused(e)
                return
            except RfbViolation as e:  # what the viewer said too early, read once the login is over
                self._violation(e)
                return
            rest = self._opening_said(to_vnc, to_viewer)
            if rest:
                self.onMessage(rest, True)
            return
        if self._filter is not None and not self._filter.server_done:
            try:
                data = self._filter.from_server(data)
            except RfbViolation as e:
                self._violation(e)
                return
            if not data:
                return
        self.relayed_out += len(data)
        self.sendMessage(data, isBinary=True)

    def _opening_said(self, to_vnc: bytes, to_viewer: bytes) -> bytes:
        """Send what a step of the operator's opening says; once it is over, what the viewer said
        past it (client messages, for the filter)."""
        if to_viewer:
            self.relayed_out += len(to_viewer)
            self.sendMessage(to_viewer, isBinary=True)
        if to_vnc and self._vnc is not None:
            self.relayed_in += len(to_vnc)
            socket(self._vnc).write(to_vnc)
        if self._opening is None or not self._opening.done:
            return b""
        rest, self._opening = self._opening.rest(), None
        self._stop_opening_deadline()
        log.info(
            "Console of {who}: the controller logged in to the VM's VNC server; the viewer watches",
            who=self.ticket.who,
            event="console-operator-login",
        )
        return rest

    def _opening_too_long(self) -> None:
        self._opening_deadline = None
        if self._opening is not None:
            self._end(CLOSE_VNC_GONE, f"the VM's VNC server gave no login within {OPENING_TIMEOUT:g} s")

    def _stop_opening_deadline(self) -> None:
        if self._opening_deadline is not None and self._opening_deadline.active():
            self._opening_deadline.cancel()
        self._opening_deadline = None

    def _login_refused(self, error: RfbError) -> None:
        log.warn(
            "Console of {who}: the VM's VNC server refused the controller's login: {reason}",
            who=self.ticket.who,
            reason=str(error),
            event="console-login-refused",
        )
        self._end(CLOSE_VNC_GONE, "the VM's VNC server refused the controller's login: " + str(error))

    def vnc_lost(self) -> None:
        self._vnc = None
        if not self._ended:
            self._end(CLOSE_VNC_GONE, "the VM's VNC server closed the connection")

    # ------------------------------------------------------------------ ending

    def _violation(self, error: RfbViolation) -> None:
        log.warn(
            "Console of {who}: view-only stream refused: {reason}",
            who=self.ticket.who,
            reason=str(error),
            event="console-view-only-violation",
        )
        self._end(CLOSE_POLICY, "view-only: " + str(error))

    def _end(self, code: int, reason: str) -> None:
        """Close the WebSocket with ``code`` and cut the VNC connection; idempotent."""
        if not self._close_down(reason):
            return
        # a close reason is at most 123 bytes of UTF-8
        self.sendClose(code, reason.encode("utf-8")[:123].decode("utf-8", "ignore"))
        socket(self).resumeProducing()  # let the viewer's close answer in
        self._deadline = self.factory.clock.callLater(CLOSE_GRACE, self._drop)

    def _close_down(self, reason: str) -> bool:
        """The viewer's end, whoever closes: one log line, the VNC side cut, out of the registry.

        False when it had already ended (the other side's close follows ours, or the reverse).
        """
        if self._ended:
            return False
        self._ended = True
        log.info(
            "Console of {who} closed: {reason}; {sent} bytes sent, {received} received",
            who=self.ticket.who,
            reason=reason,
            sent=self.relayed_out,
            received=self.relayed_in,
            event="console-close",
        )
        self._cut_vnc()
        self._stop_opening_deadline()
        self.factory.registry.discard(self.ticket.target.key, self)
        return True

    def _drop(self) -> None:
        self._deadline = None
        if self.transport is not None and self.state != self.STATE_CLOSED:
            socket(self).abortConnection()

    def _cut_vnc(self) -> None:
        if self._dialing is not None:
            dialing, self._dialing = self._dialing, None
            dialing.cancel()
        if self._vnc is not None and self._vnc.transport is not None:
            vnc, self._vnc = self._vnc, None
            socket(vnc).abortConnection()


class ConsoleFactory(WebSocketServerFactory):
    """Builds a :class:`ConsoleViewer` for the ticket the resource just issued.

    ``timeouts`` off leaves autobahn's own timers (opening handshake, pings) unarmed: they run on
    the global reactor, which a test on a ``Clock`` must not touch.  The relay's own deadline
    (:data:`CLOSE_GRACE`) runs on ``clock`` either way.
    """

    protocol = ConsoleViewer  # type: ignore[assignment]

    def __init__(
        self, *, clock: IReactorTime, dial: Dial, registry: AccessRegistry, timeouts: bool = True
    ) -> None:
        super().__init__()
        self.clock = clock
        self.dial = dial
        self.registry = registry
        self.next_ticket: Ticket | None = None
        self.setProtocolOptions(
            maxFramePayloadSize=MAX_MESSAGE,
            maxMessagePayloadSize=MAX_MESSAGE,
            openHandshakeTimeout=5 if timeouts else 0,
            closeHandshakeTimeout=0,  # our own deadline, on our clock
            autoPingInterval=20 if timeouts else 0,  # keeps reverse proxies from closing a still screen
            autoPingTimeout=10 if timeouts else 0,
            failByDrop=False,
        )

    def buildProtocol(self, addr: IAddress | None) -> Any:  # noqa: N802 - Twisted's name
        ticket = self.next_ticket
        if ticket is None:
            return None  # only the resource hands out viewers
        viewer = cast(ConsoleViewer, super().buildProtocol(addr))
        viewer.ticket = ticket
        return viewer


class ConsoleResource(WebSocketResource):
    """``/console/{handle}`` and ``/console/vm/{vmid}``: HTTP checks, then the WebSocket upgrade.

    Mounted under ``/console/``: ``request.postpath`` is what follows.  ``screen`` serves
    ``/console/vm/{vmid}/screen.png`` (:mod:`vmcloud.console.screen`), a plain HTTP answer.
    """

    def __init__(
        self,
        factory: ConsoleFactory,
        gate: Gate,
        *,
        resolve_handle: Resolve,
        resolve_vm: Resolve,
        max_per_key: int = MAX_VIEWERS_PER_KEY,
        max_total: int = MAX_VIEWERS,
        screen: IResource | None = None,
    ) -> None:
        super().__init__(factory)
        self._screen = screen
        self._console = factory
        self._gate = gate
        self._resolve_handle = resolve_handle
        self._resolve_vm = resolve_vm
        self._max_per_key = max_per_key
        self._max_total = max_total

    def render(self, request: IRequest) -> Any:
        path = request.postpath
        if self._screen is not None and len(path) == 3 and path[0] == b"vm" and path[2] == b"screen.png":
            return self._screen.render(request)  # /console/vm/{vmid}/screen.png: plain HTTP
        try:
            ticket = self._ticket(request)
        except ApiError as e:
            return refuse(request, e, _where(request))
        self._console.next_ticket = ticket
        try:
            return super().render(request)
        finally:
            self._console.next_ticket = None

    def _ticket(self, request: IRequest) -> Ticket:
        if request.method != b"GET":
            raise ApiError(
                405,
                "method-not-allowed",
                "use GET (a WebSocket upgrade) on this path",
                headers=((b"Allow", b"GET"),),
            )
        path = [segment.decode("utf-8", "replace") for segment in request.postpath]
        if len(path) == 1 and path[0]:
            operator = False
            resolve, key = self._resolve_handle, path[0]
        elif len(path) == 2 and path[0] == "vm" and path[1]:
            operator = True
            resolve, key = self._resolve_vm, path[1]
        else:
            raise ApiError(404, "not-found", "use /console/{handle} or /console/vm/{vmid}")
        if operator:
            self._gate.check_admin(request)
        self._gate.check_origin(request)
        target = resolve(key)
        if target is None:
            raise ApiError(404, "unknown-handle", "no such handle (released, expired, or never issued)")
        if operator and target.password is None:
            raise ApiError(409, "no-session", f"the controller has no login to VM {key}'s screen now")
        check_handshake(request)
        registry = self._console.registry
        if registry.count(target.key) >= self._max_per_key:
            raise ApiError(429, "too-many-viewers", f"at most {self._max_per_key} viewers of one console")
        if registry.total >= self._max_total:
            raise ApiError(503, "too-many-viewers", "the controller has as many console viewers as it serves")
        if operator:  # always view only, whatever ?view_only says
            return Ticket(target, True, f"operator, VM {key}", operator=True)
        who = f"handle {key[:6]}... (VM {target.vmid})"
        return Ticket(target, flag(request, b"view_only"), who)


def _where(request: IRequest) -> str:
    """The path as a log line may show it: a handle cut to its first six characters."""
    path = [segment.decode("utf-8", "replace") for segment in request.postpath]
    if len(path) == 1 and len(path[0]) > 6:
        return f"/console/{path[0][:6]}..."
    return "/console/" + "/".join(path)[:80]
