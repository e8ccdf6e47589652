"""The view of a STOMP connection that the guest channel needs, whatever carries it.

Two implementations: a session attached in-process to the embedded broker (no socket hop), and a
client connection over TCP to any broker (the embedded one from a guest, or RabbitMQ).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from zope.interface import Interface

from vmcloud.stomp.frame import Frame


class IStompSession(Interface):
    """Send and subscribe on a connected STOMP session."""

    def send(destination: str, body: bytes, headers: Mapping[str, str] = {}) -> None:  # noqa: N805
        """Send a message; user headers travel to the MESSAGE unchanged."""

    def subscribe(destination: str, on_message: Callable[[Frame], None]) -> str:  # noqa: N805
        """Subscribe (ack mode auto); ``on_message`` gets every MESSAGE frame; returns the id."""

    def unsubscribe(subscription_id: str) -> None:  # noqa: N805
        """Stop a subscription."""
