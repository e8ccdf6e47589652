"""Acceptance 5 of issue #2: the same guest + controller conversation with RabbitMQ as the broker.

RabbitMQ's STOMP plugin listens on 127.0.0.1:61614 (``scripts/rabbitmq-stomp.sh`` sets it up).
The controller's GuestChannel runs on a :class:`~vmcloud.stomp.client.ReconnectingSession` to it,
the guest agent is a real ``vmcloud-guest`` process; everyone logs in as guest/guest.  When the
environment variable ``CI`` is set an unreachable RabbitMQ fails the tests; elsewhere they skip.

RabbitMQ's queues are shared by everyone using that RabbitMQ: two runs of these tests at the same
moment would take each other's messages.  Each test starts from fresh queues (a queue left broken
by an earlier run — RabbitMQ can keep one whose process died — would otherwise swallow every
message) and uses an identity of its own.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
from unittest import SkipTest

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from tests.integration.conftest import GuestWatch, free_port, spawn_twist
from tests.integration.test_guest_agent_process import GuestScenarios, run
from vmcloud.stomp.client import ReconnectingSession
from vmcloud.words.channel import GuestChannel, SharedGuestLogin

RABBITMQ_STOMP = ("127.0.0.1", int(os.environ.get("VMCLOUD_RABBITMQ_STOMP_PORT", "61614")))
ENDPOINT = f"tcp:{RABBITMQ_STOMP[0]}:{RABBITMQ_STOMP[1]}"


def require_rabbitmq(test: TestCase) -> None:
    """Fail (in CI) or skip (elsewhere) unless RabbitMQ's STOMP port accepts connections."""
    try:
        socket.create_connection(RABBITMQ_STOMP, timeout=3).close()
    except OSError as e:
        reason = (
            f"RabbitMQ STOMP is not reachable on {RABBITMQ_STOMP[0]}:{RABBITMQ_STOMP[1]} ({e.strerror or e});"
            " run scripts/rabbitmq-stomp.sh"
        )
        if os.environ.get("CI"):
            test.fail(reason)
        raise SkipTest(reason) from None


def fresh_queues(*identities: str) -> None:
    """Delete the controller's queue and these guests' queues, whatever state RabbitMQ has them in."""
    for name in ("vmcloud.controller", *(f"vmcloud.guest.{identity}" for identity in identities)):
        subprocess.run(
            ["rabbitmqctl", "delete_queue", name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )


class RabbitMQGuestTests(GuestScenarios, TestCase):
    """The controller's guest channel on a STOMP client session to RabbitMQ."""

    timeout = 90
    agent_args = ("--login", "guest", "--passcode", "guest")
    broker_endpoint = ENDPOINT

    def setUp(self) -> Deferred[None]:
        require_rabbitmq(self)
        self.identity = f"rabbitmq-guest-{secrets.token_hex(4)}"
        fresh_queues(self.identity)
        self.session = ReconnectingSession(reactor, ENDPOINT, login="guest", passcode="guest")
        self.channel = GuestChannel(
            reactor,
            self.session,
            credentials=SharedGuestLogin("guest", "guest"),
            guest_broker=ENDPOINT,
            beacon_timeout=15,
        )
        self.watch = GuestWatch(reactor)
        self.channel.add_listener(self.watch)
        self.session.startService()
        self.addCleanup(self.session.stopService)
        self.channel.startService()
        self.addCleanup(self.channel.stopService)
        connected = self.session.when_connected()
        connected.addTimeout(20, reactor)
        return connected.addCallback(lambda _: None)

    def test_commands_files_and_goodbye(self) -> Deferred[None]:
        return run(self.commands_files_and_goodbye(self.identity))


class RabbitMQDaemonTests(TestCase):
    """``vmcloud`` with ``[broker] external`` pointing at RabbitMQ registers a guest agent."""

    timeout = 90

    def setUp(self) -> None:
        require_rabbitmq(self)
        self.identity = f"rabbitmq-guest-{secrets.token_hex(4)}"
        fresh_queues(self.identity)

    def test_external_broker_daemon_registers_the_guest(self) -> Deferred[None]:
        return run(self._registers())

    async def _registers(self) -> None:
        base = FilePath(self.mktemp())
        base.makedirs()
        config = base.child("vmcloud.conf")
        config.setContent(
            (
                "[broker]\n"
                f"external = {ENDPOINT}\n"
                "login = guest\npasscode = guest\nguest_login = guest\nguest_passcode = guest\n"
                "[local]\nnetns = no\n"
            ).encode()
        )
        controller = spawn_twist(
            reactor,
            "vmcloud",
            [
                "--config",
                config.path,
                "--api",
                f"tcp:{free_port()}:interface=127.0.0.1",
                "--state-dir",
                base.child("state").path,
            ],
            cwd=base.path,
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(controller.stop()))
        agent = spawn_twist(
            reactor,
            "vmcloud-guest",
            [
                "--broker",
                ENDPOINT,
                "--login",
                "guest",
                "--passcode",
                "guest",
                "--identity",
                self.identity,
                "--workdir",
                base.child("work").path,
            ],
            cwd=base.path,
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(agent.stop()))
        try:
            await controller.wait_for_event(timeout=30, event="guest-hello", identity=self.identity)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{agent.log_text()}") from None
