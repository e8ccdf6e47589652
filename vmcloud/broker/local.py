"""In-process attachment to the embedded broker: the controller's guest channel without a socket.

A :class:`LocalSession` is an :class:`~vmcloud.stomp.session.IStompSession` with full access;
messages reach its callbacks by direct call, as MESSAGE frames shaped exactly like the ones a
TCP client receives, so the guest channel code is the same whichever way it is attached.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

from twisted.logger import Logger
from zope.interface import implementer

from vmcloud.broker.realm import AckMode, IBrokerClient, Message, Realm, StoreFullError, Subscription
from vmcloud.stomp.frame import Frame
from vmcloud.stomp.session import IStompSession

log = Logger()


@implementer(IStompSession, IBrokerClient)
class LocalSession:
    """A full-access session living in the broker's process (subscriptions are ``auto`` ack)."""

    local = True

    def __init__(self, realm: Realm, name: str) -> None:
        self.name = name
        self._realm = realm
        self._peer = realm.attach(self)
        self._callbacks: dict[str, Callable[[Frame], None]] = {}
        self._ids = itertools.count(1)
        self._closed = False

    def send(self, destination: str, body: bytes, headers: Mapping[str, str] = {}) -> None:
        """Publish; a message the full broker store cannot take is dropped and logged."""
        if self._closed:
            raise RuntimeError(f"local STOMP session {self.name} is closed")
        try:
            self._realm.send(self._peer, destination, headers, body)
        except StoreFullError as e:
            log.warn(
                "Message from {session} to {destination} dropped: {reason}",
                session=self.name,
                destination=destination,
                reason=str(e),
                event="broker-local-dropped",
            )

    def subscribe(self, destination: str, on_message: Callable[[Frame], None]) -> str:
        """Subscribe; ``on_message`` may be called right away with stored queue messages."""
        if self._closed:
            raise RuntimeError(f"local STOMP session {self.name} is closed")
        sub_id = f"local-{next(self._ids)}"
        self._callbacks[sub_id] = on_message
        try:
            self._realm.subscribe(self._peer, sub_id, destination, AckMode.AUTO)
        except Exception:
            del self._callbacks[sub_id]
            raise
        return sub_id

    def unsubscribe(self, subscription_id: str) -> None:
        self._realm.unsubscribe(self._peer, subscription_id)
        self._callbacks.pop(subscription_id, None)

    def close(self) -> None:
        """Leave the broker: every subscription ends."""
        self._closed = True
        self._realm.detach(self._peer)
        self._callbacks.clear()

    # -- IBrokerClient

    def deliver(self, subscription: Subscription, message: Message) -> int:
        callback = self._callbacks.get(subscription.id)
        if callback is None:
            return 0
        headers = {
            "destination": message.destination,
            "message-id": message.message_id,
            "subscription": subscription.id,
        }
        if message.redelivered:
            headers["redelivered"] = "true"
        headers.update(message.headers)
        try:
            callback(Frame.adopting("MESSAGE", headers, message.body))
        except Exception:
            log.failure(
                "Local subscriber {session} failed on a message to {destination}",
                session=self.name,
                destination=message.destination,
                event="broker-local-callback-failed",
            )
        return 0

    def pause_reading(self) -> None:
        """Never called: the realm does not pause in-process publishers."""

    def resume_reading(self) -> None:
        """Never called: the realm does not pause in-process publishers."""

    def kill(self, reason: str) -> None:
        log.warn("Local session {session} asked to close: {reason}", session=self.name, reason=reason)
