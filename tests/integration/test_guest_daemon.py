"""Acceptance 1 of issue #2 with both real daemons: ``vmcloud`` (embedded broker) registers a
``vmcloud-guest`` started with ``--broker tcp:127.0.0.1:<port> --identity test-1``."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from tests.integration.conftest import free_port, spawn_twist


class DaemonRegistersGuestTests(TestCase):
    timeout = 90

    def test_controller_registers_the_guest(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._registers())

    async def _registers(self) -> None:
        base = FilePath(self.mktemp())
        base.makedirs()
        config = base.child("vmcloud.conf")
        # Only what keeps the test from touching shared state: no network namespaces, free ports.
        config.setContent(b"[local]\nnetns = no\n")
        stomp, api = free_port(), free_port()
        controller = spawn_twist(
            reactor,
            "vmcloud",
            [
                "--config",
                config.path,
                "--stomp",
                f"tcp:{stomp}:interface=127.0.0.1",
                "--api",
                f"tcp:{api}:interface=127.0.0.1",
                "--state-dir",
                base.child("state").path,
            ],
            cwd=base.path,
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(controller.stop()))
        try:
            await controller.wait_for_event(timeout=30, log_format="Guest channel listening on {destination}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{controller.log_text()}") from None

        agent = spawn_twist(
            reactor,
            "vmcloud-guest",
            [
                "--broker",
                f"tcp:127.0.0.1:{stomp}",
                "--identity",
                "test-1",
                "--workdir",
                base.child("work").path,
            ],
            cwd=base.path,
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(agent.stop()))
        try:
            hello = await controller.wait_for_event(timeout=30, event="guest-hello", identity="test-1")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{agent.log_text()}") from None
        self.assertIn("cmd", hello["capabilities"].split(","))

        await agent.stop()
        gone = await controller.wait_for_event(timeout=15, event="guest-bye", identity="test-1")
        self.assertEqual(gone["identity"], "test-1")
