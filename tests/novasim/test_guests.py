"""GuestProcesses: a real process per ACTIVE server, with its user-data, stopped on delete."""

from __future__ import annotations

import os
import sys

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from vmcloud.novasim.guests import GuestProcesses
from vmcloud.novasim.model import ServerView

SCRIPT = (
    "import os, sys, time\n"
    "data = open(sys.argv[1]).read()\n"
    "open(sys.argv[2] + '.tmp', 'w').write(os.environ['NOVASIM_MAC'] + ' ' + sys.argv[3] + ' ' + data)\n"
    "os.rename(sys.argv[2] + '.tmp', sys.argv[2])\n"
    "time.sleep(60)\n"
)


def view(server_id: str) -> ServerView:
    return ServerView(
        id=server_id,
        name=f"pool-{server_id}",
        status="ACTIVE",
        task_state=None,
        metadata={},
        user_data=b"[agent]\nlogin = vm-1\n",
        network="private",
        mac="fa:16:3e:00:00:01",
        ip="10.0.0.2",
        fault=None,
        created=0.0,
    )


class GuestProcessTests(TestCase):
    async def test_started_with_user_data_and_stopped_on_delete(self) -> None:
        seen = self.mktemp()
        guests = GuestProcesses(
            reactor, [sys.executable, "-c", SCRIPT, "{user_data}", seen, "{ip}"], stop_timeout=5
        )
        self.addCleanup(guests.stop_all)
        guests.on_active(view("s1"))
        self.assertEqual(guests.running(), {"s1"})
        for _ in range(600):  # a loaded machine can take seconds to start a Python
            if os.path.exists(seen):
                break
            await deferLater(reactor, 0.05)
        with open(seen) as f:
            self.assertEqual(f.read(), "fa:16:3e:00:00:01 10.0.0.2 [agent]\nlogin = vm-1\n")
        ended = guests.on_deleted(view("s1"))
        self.assertEqual(guests.running(), frozenset())
        await ended  # the process is gone, not only forgotten: nothing of it outlives the test

    def test_a_bad_placeholder_is_refused_at_once(self) -> None:
        with self.assertRaises(ValueError) as caught:
            GuestProcesses(reactor, ["agent", "{nope}"])
        self.assertIn("bad placeholder", str(caught.exception))
