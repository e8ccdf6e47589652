"""The guest agent: what runs inside every VM and answers the controller's words (seed 001's ``VM``).

:class:`GuestAgent` is the agent's side of the word context.  It listens on its own command
destination and on BROADCAST, says HELLO after every (re)connect, beacons STILL_ALIVE every
``beacon_interval``, runs CMD_RUN with the :class:`~guest_agent.commands.CommandRunner`, moves
FILE_PUT / FILE_GET through the confined :class:`~guest_agent.files.FileStore`, drives the browser
for PREPARE / CLEANUP and reports its page loads, and says BYE when it stops cleanly.

Everything it needs is given to it (clock, session, runner, file store, browser, a dispatcher for
blocking file I/O), so tests build it on a ``Clock`` and a recording session; only
``guest_agent/tap.py`` touches the reactor, files and the network.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from guest_agent.browser import IBrowser
from guest_agent.commands import CommandRunner
from guest_agent.files import FileRefused, FileStore
from vmcloud.stomp.frame import Frame
from vmcloud.threads import Dispatch, synchronous_dispatch
from vmcloud.words.browser import PageLoad
from vmcloud.words.contexts import CommandOutcome, CommandRequest, IAgentContext, PrepareRequest, StoredFile
from vmcloud.words.destinations import BROADCAST, CONTROLLER, guest_destination
from vmcloud.words.grammar import EVERYONE, Said
from vmcloud.words.interpreter import Interpreter
from vmcloud.words.presence import Bye, Hello, StillAlive
from vmcloud.words.vocabulary import agent_words

log = Logger()

T = TypeVar("T")

#: What every agent can do, whatever its browser.
BASE_CAPABILITIES = ("cmd", "file")


class AgentSession(Protocol):
    """What the agent needs of its STOMP session: an IStompSession that knows if it is connected."""

    @property
    def is_connected(self) -> bool: ...

    def send(self, destination: str, body: bytes, headers: Mapping[str, str] = {}) -> None: ...

    def subscribe(self, destination: str, on_message: Callable[[Frame], None]) -> str: ...

    def unsubscribe(self, subscription_id: str) -> None: ...


@implementer(IAgentContext)
class GuestAgent(Service):
    """One guest: its identity, its words, its beacon.

    ``dispatch`` runs blocking file I/O off the reactor thread (a thread pool in production).
    ``session`` should call :meth:`connected` after every (re)connect (the ``on_connected`` hook
    of :class:`~vmcloud.stomp.client.ReconnectingSession`).
    """

    name = "guest-agent"

    def __init__(
        self,
        clock: IReactorTime,
        session: AgentSession,
        *,
        identity: str,
        ip: str | None,
        mac: str | None,
        agent_version: str,
        runner: CommandRunner,
        files: FileStore,
        browser: IBrowser,
        workdir: str,
        beacon_interval: float,
        dispatch: Dispatch = synchronous_dispatch,
    ) -> None:
        guest_destination(identity)  # validates
        if beacon_interval <= 0:
            raise ValueError("beacon_interval must be positive")
        self._clock = clock
        self._session = session
        self._identity = identity
        self._ip = ip
        self._mac = mac
        self.agent_version = agent_version
        self._runner = runner
        self._files = files
        self._browser = browser
        self._workdir = workdir
        self.beacon_interval = beacon_interval
        self._dispatch = dispatch
        self.capabilities: tuple[str, ...] = BASE_CAPABILITIES + tuple(browser.capabilities)
        self._interpreter: Interpreter[IAgentContext] = Interpreter(agent_words(), self)
        self._subscriptions: list[str] = []
        self._beacon: LoopingCall | None = None
        #: Why the browser is beyond repair; then the agent said BYE and stays silent.
        self.broken: str | None = None

    # ------------------------------------------------------------------ service

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self._browser.on_page_load = self._page_loaded
        self._browser.on_broken = self._browser_broken
        for destination in (guest_destination(self._identity), BROADCAST):
            self._subscriptions.append(self._session.subscribe(destination, self._heard))
        self._beacon = LoopingCall(self._say_still_alive)
        self._beacon.clock = self._clock
        self._beacon.start(self.beacon_interval, now=False).addErrback(
            lambda f: log.failure("The beacon stopped", f)
        )
        log.info(
            "Guest agent {identity} ({version}) listening on {destination}; capabilities {capabilities}",
            identity=self._identity,
            version=self.agent_version,
            destination=guest_destination(self._identity),
            capabilities=",".join(self.capabilities),
            event="agent-started",
        )

    def stopService(self) -> None:  # noqa: N802 - Twisted's name
        """Say BYE (the session, stopped after us, makes sure it is delivered) and kill commands."""
        super().stopService()
        if self._beacon is not None and self._beacon.running:
            self._beacon.stop()
        self._beacon = None
        if self._session.is_connected and self.broken is None:
            self.say(self._presence(Bye))
        for subscription in self._subscriptions:
            self._session.unsubscribe(subscription)
        self._subscriptions = []
        self._browser.on_page_load = None
        self._browser.on_broken = None
        self._runner.kill_all()
        log.info("Guest agent {identity} stopped", identity=self._identity, event="agent-stopped")

    def _heard(self, frame: Frame) -> None:
        self._interpreter.hear(frame)  # never fails; every failure ends as a log line

    def connected(self) -> None:
        """The session is (again) up: say HELLO, so the controller (re)registers us."""
        if self.broken is not None:
            self.say(self._presence(Bye))  # a broken VM must not be registered again, only replaced
            return
        # HELLO alone tells the operator's view-only VNC password (never a beacon, which would say it
        # every few seconds); a controller that restarted hears it again at the reconnect
        self.say(self._presence(Hello, vnc_view=self._browser.vnc_view))
        log.info("Said HELLO as {identity}", identity=self._identity, event="agent-hello")

    def _say_still_alive(self) -> None:
        try:
            if (
                self._session.is_connected and self.broken is None
            ):  # queued beacons would only say something stale
                self.say(self._presence(StillAlive))
        except Exception:
            log.failure("Could not say STILL_ALIVE")

    def _presence(
        self, word: type[Hello] | type[Bye] | type[StillAlive], vnc_view: tuple[int, str] | None = None
    ) -> Said:
        return word.how_to_say(
            identity=self._identity,
            ip=self._ip,
            mac=self._mac,
            agent_version=self.agent_version,
            capabilities=self.capabilities,
            vnc_view=vnc_view,
        )

    def _page_loaded(self, event: Mapping[str, Any]) -> None:
        tab = event.get("tab")
        self.say(
            PageLoad.how_to_say(
                identity=self._identity,
                action=str(event.get("action", PageLoad.action)),
                url=str(event.get("url", "")),
                title=str(event.get("title", "")),
                tab=tab if isinstance(tab, int) else None,
                error=str(event["error"]) if event.get("error") is not None else None,
                reason=str(event["reason"]) if event.get("reason") is not None else None,
            )
        )

    def _browser_broken(self, reason: str) -> None:
        """The browser cannot be repaired: say BYE (the controller marks the VM ERROR, tells an
        occupied VM's handle ``vm-died`` and boots a replacement), then stay silent: no beacon, no
        HELLO after a reconnect, so the VM is never handed out again."""
        if self.broken is not None:
            return
        self.broken = reason
        log.error(
            "The browser is beyond repair ({reason}); saying BYE so the controller replaces this VM",
            reason=reason,
            event="agent-browser-broken",
        )
        if self._session.is_connected:
            self.say(self._presence(Bye))

    # ------------------------------------------------------------------ IAgentContext

    def say(self, said: Said) -> None:
        self._session.send(said.destination, said.body, said.headers)

    def speaker(self) -> str | None:
        return self._identity

    def identity(self) -> str:
        return self._identity

    def answer_destination(self, frame: Frame) -> str | None:
        return CONTROLLER

    def addressed_to_me(self, to: str | None) -> bool:
        return to is None or to == EVERYONE or to == self._identity

    def heard_not_understood(self, cmd_id: str | None, word: str, reason: str, sender: str | None) -> None:
        log.warn(
            "The controller did not understand our {word} (cmd-id {cmd_id}): {reason}",
            word=word,
            cmd_id=cmd_id,
            reason=reason,
            event="agent-not-understood",
        )

    async def run_command(self, request: CommandRequest) -> CommandOutcome:
        path = request.path
        if path is None:
            path = self._workdir
        elif not os.path.isabs(path):
            path = os.path.join(self._workdir, path)
        result = await self._runner.run(request.cmd, request.args, request.env or {}, path, request.timeout)
        return CommandOutcome(
            out=result.out,
            err=result.err,
            finished=result.finished,
            exit_code_or_signal=result.exit_code_or_signal,
            resources=result.resources,
            timed_out=result.timed_out,
            truncated=result.truncated,
            duration=result.duration,
            error=result.error,
        )

    async def put_file(self, path: str, content: bytes, mode: int | None) -> StoredFile:
        try:
            size = await self._dispatch(lambda: self._files.put(path, content, mode))
        except FileRefused as e:
            raise ValueError(e.reason) from None
        return StoredFile(path, size, hashlib.sha256(content).hexdigest())

    async def get_file(self, path: str) -> tuple[StoredFile, bytes]:
        try:
            content: bytes = await self._dispatch(lambda: self._files.get(path))
        except FileRefused as e:
            raise ValueError(e.reason) from None
        return StoredFile(path, len(content), hashlib.sha256(content).hexdigest()), content

    async def prepare(self, request: PrepareRequest) -> Mapping[str, Any]:
        result: Mapping[str, Any] = await self._browser.prepare(
            request.homepage,
            request.cookies,
            (request.window_width, request.window_height),
            request.audio,
            vnc_password=request.vnc_password,
        )
        return result

    async def cleanup(self, cmd_id: str) -> Mapping[str, Any]:
        result: Mapping[str, Any] = await self._browser.cleanup()
        return result
