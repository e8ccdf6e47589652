"""End to end with real processes: the embedded broker and the guest channel in this test's reactor,
``python -m twisted vmcloud-guest`` as a child process on 127.0.0.1 (issue #2, acceptance 2).

:class:`GuestScenarios` is the conversation itself; ``test_rabbitmq_guest.py`` runs it again with
RabbitMQ as the broker.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Coroutine, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from tests.integration.conftest import GuestWatch, TwistProcess, spawn_twist
from vmcloud.broker import Broker
from vmcloud.words.channel import GuestChannel


def run(coroutine: Coroutine[Any, Any, None]) -> Deferred[None]:
    return Deferred.fromCoroutine(coroutine)


class GuestScenarios:
    """What a controller does with a real guest agent; the subclass provides the broker.

    It sets ``self.channel`` (a started GuestChannel), ``self.watch`` (its GuestWatch),
    ``self.broker_endpoint`` and ``self.agent_args`` (extra flags, e.g. credentials).
    """

    channel: GuestChannel
    watch: GuestWatch
    broker_endpoint: str
    agent_args: Sequence[str] = ()

    def start_agent(self, identity: str) -> TwistProcess:
        test: Any = self
        base = FilePath(test.mktemp())
        base.makedirs()
        self.workdir = base.child("work")
        agent = spawn_twist(
            reactor,
            "vmcloud-guest",
            [
                "--broker",
                self.broker_endpoint,
                *self.agent_args,
                "--identity",
                identity,
                "--workdir",
                self.workdir.path,
                "--beacon-interval",
                "1",
            ],
            cwd=base.path,
        )

        async def stop() -> None:
            await agent.stop()

        test.addCleanup(lambda: run(stop()))
        return agent

    async def hello(self, agent: TwistProcess, identity: str, count: int = 1) -> Any:
        try:
            return await self.watch.wait("hello", identity, timeout=30, count=count)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{agent.log_text()}") from None

    async def commands_files_and_goodbye(self, identity: str) -> None:
        test: Any = self
        agent = self.start_agent(identity)
        guest = await self.hello(agent, identity)
        test.assertEqual(guest.identity, identity)
        test.assertIn("cmd", guest.capabilities)
        test.assertIn("file", guest.capabilities)
        test.assertIn(identity, self.channel.guests())

        result = await self.channel.call(
            identity, "CMD_RUN", {"cmd": "sh", "args": ["-c", "echo hi; exit 3"]}, timeout=30
        )
        test.assertEqual(result["out"], "hi\n")
        test.assertEqual(result["exitCodeOrSignal"], 3)
        test.assertIs(result["finished"], True)
        test.assertGreater(result["resources"]["ru_maxrss"], 0)
        test.assertIn("ru_utime", result["resources"])

        result = await self.channel.call(
            identity, "CMD_RUN", {"cmd": "sleep", "args": ["30"], "timeout": 1}, 30
        )
        test.assertIs(result["finished"], False)
        test.assertEqual(result["exitCodeOrSignal"], signal.SIGTERM)
        test.assertIs(result["timedOut"], True)

        content = os.urandom(5 * 1024 * 1024)
        stored = await self.channel.call(
            identity, "FILE_PUT", {"path": "in/blob.bin", "content": content}, 30
        )
        test.assertEqual(stored["size"], len(content))
        test.assertEqual(self.workdir.descendant(["in", "blob.bin"]).getContent(), content)
        fetched = await self.channel.call(identity, "FILE_GET", {"path": "in/blob.bin"}, 30)
        test.assertEqual(fetched["content"], content)

        await agent.stop()  # SIGTERM: twistd stops the service tree cleanly
        await agent.wait_for_event(timeout=1, event="agent-stopped")
        reason = await self.watch.wait("gone", identity, timeout=10)
        test.assertEqual(reason, "said BYE")


class EmbeddedBrokerGuestTests(GuestScenarios, TestCase):
    """A controller (embedded broker + GuestChannel) here, a guest agent in a child process."""

    timeout = 90

    def setUp(self) -> None:
        self.broker = Broker(
            reactor, controller_login="controller", controller_passcode="x" * 16, anonymous_guests=True
        )
        self.listening = reactor.listenTCP(0, self.broker.factory(), interface="127.0.0.1")
        self.addCleanup(lambda: self.listening.stopListening())
        self.port = self.listening.getHost().port
        self.broker_endpoint = f"tcp:127.0.0.1:{self.port}"
        self.channel = GuestChannel(
            reactor,
            self.broker.attach_local("controller"),
            credentials=self.broker.credentials,
            guest_broker=self.broker_endpoint,
            beacon_timeout=15,
        )
        self.watch = GuestWatch(reactor)
        self.channel.add_listener(self.watch)
        self.channel.startService()
        self.addCleanup(self.channel.stopService)

    def test_commands_files_and_goodbye(self) -> Deferred[None]:
        return run(self.commands_files_and_goodbye("test-1"))

    def test_survives_a_broker_restart(self) -> Deferred[None]:
        return run(self._survives_a_broker_restart())

    async def _survives_a_broker_restart(self) -> None:
        agent = self.start_agent("test-2")
        await self.hello(agent, "test-2")
        # The broker goes away (listener closed, connections dropped) and comes back on its port.
        await self.listening.stopListening()
        self.assertEqual(self.broker.factory().drop_identity("test-2", "broker restarting"), 1)
        self.listening = reactor.listenTCP(self.port, self.broker.factory(), interface="127.0.0.1")
        await self.hello(agent, "test-2", count=2)
        result = await self.channel.call("test-2", "CMD_RUN", {"cmd": "echo", "args": ["again"]}, 30)
        self.assertEqual(result["out"], "again\n")
