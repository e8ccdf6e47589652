"""Helpers for end-to-end tests with real processes: run a twistd plugin as a child and watch its log.

``spawn_twist(reactor, "vmcloud-guest", [...])`` starts ``python -m twisted --log-format=json
<plugin> ...``; every log line comes back parsed, so a test waits for a structured event
(``event="guest-hello"``) instead of grepping text, and a failing test shows the child's log.
:class:`GuestWatch` is an :class:`IGuestListener` whose hellos, gones and events can be awaited.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import eventFromJSON, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from vmcloud.pool.interfaces import GuestInfo, IGuestListener

Event = Mapping[str, Any]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Waiters:
    """Deferreds waiting for the n-th item that matches a predicate, with a timeout."""

    def __init__(self, reactor: Any, describe: Callable[[], str]) -> None:
        self.items: list[Any] = []
        self._reactor = reactor
        self._describe = describe
        self._waiting: list[tuple[Callable[[Any], bool], int, Deferred[Any]]] = []

    def add(self, item: Any) -> None:
        self.items.append(item)
        for waiter in list(self._waiting):
            self._check(waiter)

    def wait(self, predicate: Callable[[Any], bool], timeout: float, count: int = 1) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        waiter = (predicate, count, d)
        self._waiting.append(waiter)
        self._check(waiter)
        if d.called:
            return d
        d.addTimeout(timeout, self._reactor)

        def explain(failure: Failure) -> Failure:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
            if failure.check(TimeoutError) or failure.check("twisted.internet.defer.TimeoutError"):
                raise AssertionError(f"not seen within {timeout} s; seen so far:\n{self._describe()}")
            return failure

        return d.addErrback(explain)

    def _check(self, waiter: tuple[Callable[[Any], bool], int, Deferred[Any]]) -> None:
        predicate, count, d = waiter
        matches = [item for item in self.items if predicate(item)]
        if len(matches) >= count and not d.called:
            self._waiting.remove(waiter)
            d.callback(matches[count - 1])


class TwistProcess(ProcessProtocol):
    """A ``python -m twisted`` child; its JSON log lines are parsed into events as they arrive."""

    def __init__(self, reactor: Any, name: str) -> None:
        self.name = name
        self._reactor = reactor
        self._buffer = b""
        self.stderr = bytearray()
        self.events = _Waiters(reactor, self.log_text)
        self.ended: Deferred[int | None] = Deferred()
        self.exit_code: int | None = None

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            line = line.strip(b"\x1e \r")  # JSON text sequences: records start with RS
            if not line:
                continue
            try:
                event = eventFromJSON(line.decode("utf-8", "replace"))
            except ValueError:
                event = {"log_format": "{text}", "text": line.decode("utf-8", "replace")}
            self.events.add(event)

    def errReceived(self, data: bytes) -> None:
        if len(self.stderr) < 256 * 1024:
            self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        if isinstance(reason.value, ProcessDone):
            self.exit_code = 0
        elif isinstance(reason.value, ProcessTerminated):
            self.exit_code = reason.value.exitCode
        self.ended.callback(self.exit_code)

    def log_text(self) -> str:
        lines = [f"  {formatEvent(dict(e))}" for e in self.events.items[-60:]]
        if self.stderr:
            lines.append("  stderr: " + self.stderr.decode("utf-8", "replace")[-4000:])
        return f"{self.name}:\n" + "\n".join(lines)

    def wait_for_event(self, timeout: float, count: int = 1, **fields: Any) -> Deferred[Event]:
        """The ``count``-th log event whose fields include ``fields``."""
        return self.events.wait(lambda e: all(e.get(k) == v for k, v in fields.items()), timeout, count)

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (a clean twistd stop), then SIGKILL if it lingers; the exit code."""
        if not self.ended.called:
            self.transport.signalProcess("TERM")
            kill = self._reactor.callLater(timeout, self._kill)
            await self.ended
            if kill.active():
                kill.cancel()
        return self.exit_code

    def _kill(self) -> None:
        if not self.ended.called:
            self.transport.signalProcess("KILL")


def spawn_twist(
    reactor: Any, plugin: str, args: Sequence[str], *, cwd: str, env: Mapping[str, str] | None = None
) -> TwistProcess:
    """Start ``python -m twisted --log-format=json <plugin> <args>`` in ``cwd``."""
    process = TwistProcess(reactor, f"{plugin} {' '.join(args)}")
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("VMCLOUD_")}
    child_env.update(env or {})
    argv = [sys.executable, "-m", "twisted", "--log-format=json", plugin, *args]
    reactor.spawnProcess(process, sys.executable, argv, env=child_env, path=cwd)
    return process


@implementer(IGuestListener)
class GuestWatch:
    """Records what the guest channel tells its listeners; any of it can be awaited."""

    def __init__(self, reactor: Any) -> None:
        self.seen = _Waiters(reactor, lambda: "\n".join(f"  {item[:2]}" for item in self.seen.items))

    def guest_hello(self, guest: GuestInfo) -> None:
        self.seen.add(("hello", guest.identity, guest))

    def guest_gone(self, identity: str, reason: str) -> None:
        self.seen.add(("gone", identity, reason))

    def guest_event(self, identity: str, event: Mapping[str, Any]) -> None:
        self.seen.add(("event", identity, event))

    def wait(self, kind: str, identity: str, timeout: float, count: int = 1) -> Deferred[Any]:
        """The ``count``-th (kind, identity) notification's payload."""
        d = self.seen.wait(lambda item: item[:2] == (kind, identity), timeout, count)
        return d.addCallback(lambda item: item[2])
