"""A broker on a Clock and clients on StringTransports, for the broker's unit tests."""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from vmcloud.broker import Broker, BrokerLimits
from vmcloud.broker.protocol import StompServerProtocol
from vmcloud.stomp.codec import Decoder, encode
from vmcloud.stomp.frame import Frame

CONTROLLER = ("controller", "controller-secret")
OPERATORS = {"alice": "alice-secret"}


def make_broker(
    clock: Clock | None = None, *, anonymous_guests: bool = False, limits: BrokerLimits | None = None
) -> Broker:
    return Broker(
        clock or Clock(),
        controller_login=CONTROLLER[0],
        controller_passcode=CONTROLLER[1],
        operators=OPERATORS,
        anonymous_guests=anonymous_guests,
        limits=limits or BrokerLimits(),
    )


class Client:
    """One connection to the broker; frames in, frames out, through real bytes."""

    _ports = iter(range(40000, 60000))

    def __init__(
        self,
        broker: Broker,
        *,
        bytewise: bool = False,
        transport_class: type[StringTransport] = StringTransport,
        address: str = "127.0.0.1",
    ) -> None:
        # ``address``: both ends of the connection (a VM on a bridge: its subnet, not loopback)
        self.transport = transport_class(
            hostAddress=IPv4Address("TCP", address, 61613),
            peerAddress=IPv4Address("TCP", address, next(self._ports)),
        )
        protocol = broker.factory().buildProtocol(None)
        assert isinstance(protocol, StompServerProtocol)
        self.protocol = protocol
        self.protocol.makeConnection(self.transport)
        self.decoder = Decoder()
        self.version = "1.2"
        self.bytewise = bytewise
        self.received: list[Frame] = []
        self._early: list[Frame] = []  # frames that arrived before a SUBSCRIBE's receipt
        self.lost = False

    def write(self, data: bytes) -> None:
        if self.bytewise:
            for i in range(len(data)):
                self.protocol.dataReceived(data[i : i + 1])
        else:
            self.protocol.dataReceived(data)

    def send_frame(self, command: str, headers: Mapping[str, str] | None = None, body: bytes = b"") -> None:
        self.write(encode(Frame(command, headers or {}, body), self.version))

    def frames(self) -> list[Frame]:
        """Frames written to this client since the last call."""
        data = self.transport.value()
        self.transport.clear()
        frames = self._early + self.decoder.feed(data)
        self._early = []
        self.received.extend(frames)
        return frames

    def connect(
        self,
        login: str | None = CONTROLLER[0],
        passcode: str | None = CONTROLLER[1],
        version: str | None = "1.2",
        heart_beat: str | None = None,
        command: str = "CONNECT",
    ) -> Frame:
        headers = {"host": "anything"}
        if version is not None:
            headers["accept-version"] = version
        if login is not None:
            headers["login"] = login
        if passcode is not None:
            headers["passcode"] = passcode
        if heart_beat is not None:
            headers["heart-beat"] = heart_beat
        self.send_frame(command, headers)
        [frame] = self.frames()
        if frame.command == "CONNECTED":
            self.version = frame.headers["version"]
            self.decoder.version = self.version
        return frame

    @property
    def closing(self) -> bool:
        """The broker asked the transport to close (after flushing what it wrote)."""
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        """The TCP connection goes away."""
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(connectionDone)

    def subscribe(self, destination: str, sub_id: str = "0", ack: str = "auto") -> None:
        self.send_frame("SUBSCRIBE", {"destination": destination, "id": sub_id, "ack": ack, "receipt": "s"})
        frames = self.frames()
        assert frames and frames[-1] == Frame("RECEIPT", {"receipt-id": "s"}), frames
        self._early = frames[:-1]

    def error(self) -> Frame:
        """The single ERROR the broker sent, and it closed the connection."""
        frames = self.frames()
        errors = [f for f in frames if f.command == "ERROR"]
        assert len(errors) == 1, frames
        assert self.closing
        return errors[0]
