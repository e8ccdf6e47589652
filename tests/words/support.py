"""Recording fakes for the words and the guest channel: an in-memory broker and an agent context."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from vmcloud.stomp.codec import Decoder, encode
from vmcloud.stomp.frame import Frame
from vmcloud.stomp.session import IStompSession
from vmcloud.words.contexts import (
    CommandOutcome,
    CommandRequest,
    IAgentContext,
    PrepareRequest,
    StoredFile,
)
from vmcloud.words.destinations import CONTROLLER, LOGIN_HEADER
from vmcloud.words.grammar import EVERYONE, Said


def on_the_wire(destination: str, body: bytes, headers: Mapping[str, str], subscription: str = "1") -> Frame:
    """The MESSAGE a subscriber gets for a SEND, through the real codec (escaping, content-length)."""
    frame = Frame(
        "MESSAGE",
        {**headers, "destination": destination, "subscription": subscription, "message-id": "m"},
        body,
    )
    decoder = Decoder()
    (decoded,) = decoder.feed(encode(frame, "1.2"))
    return decoded


def said_on_the_wire(said: Said) -> Frame:
    return on_the_wire(said.destination, said.body, said.headers)


class MemoryBroker:
    """Delivers what any session sends to every subscriber of the destination, in order, via the codec.

    ``stamp`` maps a session name to the login the broker stamps on what it sends (as the embedded
    broker does with :data:`LOGIN_HEADER`).
    """

    def __init__(self) -> None:
        self.subscribers: dict[str, dict[str, Callable[[Frame], None]]] = {}
        self.sent: list[tuple[str, str, bytes, dict[str, str]]] = []
        self._queue: list[tuple[str, bytes, dict[str, str]]] = []
        self._delivering = False
        self._ids = itertools.count(1)

    def session(self, name: str, login: str | None = None) -> MemorySession:
        return MemorySession(self, name, login)

    def publish(self, destination: str, body: bytes, headers: Mapping[str, str], login: str | None) -> None:
        headers = {k: v for k, v in headers.items() if k != LOGIN_HEADER}
        if login is not None:
            headers[LOGIN_HEADER] = login
        self._queue.append((destination, body, headers))
        if self._delivering:
            return
        self._delivering = True
        try:
            while self._queue:
                destination, body, headers = self._queue.pop(0)
                for sid, callback in list(self.subscribers.get(destination, {}).items()):
                    callback(on_the_wire(destination, body, headers, sid))
        finally:
            self._delivering = False


@implementer(IStompSession)
class MemorySession:
    def __init__(self, broker: MemoryBroker, name: str, login: str | None) -> None:
        self.broker = broker
        self.name = name
        self.login = login

    def send(self, destination: str, body: bytes, headers: Mapping[str, str] = {}) -> None:
        self.broker.sent.append((self.name, destination, body, dict(headers)))
        self.broker.publish(destination, body, headers, self.login)

    def subscribe(self, destination: str, on_message: Callable[[Frame], None]) -> str:
        sid = f"{self.name}-{next(self.broker._ids)}"
        self.broker.subscribers.setdefault(destination, {})[sid] = on_message
        return sid

    def unsubscribe(self, subscription_id: str) -> None:
        for subscribers in self.broker.subscribers.values():
            subscribers.pop(subscription_id, None)


@implementer(IStompSession)
class RecordingSession:
    """Records sends and subscriptions; ``deliver`` plays a message to the subscribers."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, str]]] = []
        self.subscriptions: dict[str, tuple[str, Callable[[Frame], None]]] = {}
        self._ids = itertools.count(1)

    def send(self, destination: str, body: bytes, headers: Mapping[str, str] = {}) -> None:
        self.sent.append((destination, body, dict(headers)))

    def subscribe(self, destination: str, on_message: Callable[[Frame], None]) -> str:
        sid = str(next(self._ids))
        self.subscriptions[sid] = (destination, on_message)
        return sid

    def unsubscribe(self, subscription_id: str) -> None:
        del self.subscriptions[subscription_id]

    def deliver(self, destination: str, body: bytes, headers: Mapping[str, str] = {}) -> None:
        for sid, (subscribed, callback) in list(self.subscriptions.items()):
            if subscribed == destination:
                callback(on_the_wire(destination, body, headers, sid))

    def deliver_said(self, said: Said) -> None:
        self.deliver(said.destination, said.body, said.headers)


@implementer(IAgentContext)
class RecordingAgent:
    """An agent context that records what it was asked and answers from canned results."""

    def __init__(self, session: Any, name: str = "test-1") -> None:
        self.session = session
        self.name = name
        self.commands: list[CommandRequest] = []
        self.files: dict[str, bytes] = {}
        self.prepared: list[PrepareRequest] = []
        self.cleaned: list[str] = []
        self.not_understood: list[tuple[str | None, str, str, str | None]] = []
        self.outcome = CommandOutcome(
            out="hi\n", err="", finished=True, exit_code_or_signal=3, resources={"ru_utime": 0.01}
        )
        self.command_result: Deferred[CommandOutcome] | None = None
        self.fail_with: Exception | None = None

    def say(self, said: Said) -> None:
        self.session.send(said.destination, said.body, said.headers)

    def speaker(self) -> str | None:
        return self.name

    def identity(self) -> str:
        return self.name

    def answer_destination(self, frame: Frame) -> str | None:
        return CONTROLLER

    def heard_not_understood(self, cmd_id: str | None, word: str, reason: str, sender: str | None) -> None:
        self.not_understood.append((cmd_id, word, reason, sender))

    def addressed_to_me(self, to: str | None) -> bool:
        return to in (None, EVERYONE, self.name)

    async def run_command(self, request: CommandRequest) -> CommandOutcome:
        self.commands.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        if self.command_result is not None:
            return await self.command_result
        return self.outcome

    async def put_file(self, path: str, content: bytes, mode: int | None) -> StoredFile:
        if self.fail_with is not None:
            raise self.fail_with
        self.files[path] = content
        return StoredFile(path, len(content), hashlib.sha256(content).hexdigest())

    async def get_file(self, path: str) -> tuple[StoredFile, bytes]:
        if path not in self.files:
            raise ValueError("no such file")
        content = self.files[path]
        return StoredFile(path, len(content), hashlib.sha256(content).hexdigest()), content

    async def prepare(self, request: PrepareRequest) -> Mapping[str, Any]:
        self.prepared.append(request)
        return await succeed({"browser": "none"})

    async def cleanup(self, cmd_id: str) -> Mapping[str, Any]:
        self.cleaned.append(cmd_id)
        return {}
