"""What an idle guest connection costs the broker: the figure that decides how many VMs one
controller can hold (issue #4 wants the whole daemon under 10 KB per VM at 5,000 VMs)."""

from __future__ import annotations

import gc
import tracemalloc

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.broker.support import Client, make_broker
from vmcloud.broker import Broker
from vmcloud.stomp.frame import Frame
from vmcloud.words.destinations import BROADCAST, CONTROLLER, guest_destination
from vmcloud.words.presence import StillAlive

#: Bytes per idle guest connection, the test's client end (StringTransport, decoder) included;
#: about 2.7 KB now, 8.9 KB before the broker kept its idle connections lean.
BUDGET = 4096


def idle_guest(broker: Broker, vmid: str) -> Client:
    """A guest as the agent behaves: logged in with minted credentials and heart-beats, its two
    subscriptions, one beacon said."""
    login, passcode = broker.credentials.mint(vmid)
    client = Client(broker)
    client.connect(login, passcode, heart_beat="10000,10000")
    client.subscribe(guest_destination(login), "sub-1")
    client.subscribe(BROADCAST, "sub-2")
    said = StillAlive.how_to_say(
        identity=login, ip="10.0.0.1", mac="fa:16:3e:00:00:01", agent_version="1.0", capabilities=("cmd",)
    )
    client.send_frame("SEND", {"destination": said.destination, **said.headers}, said.body)
    client.frames()
    client.received.clear()
    return client


class IdleConnectionMemoryTests(SynchronousTestCase):
    def test_an_idle_guest_connection_is_small(self) -> None:
        clock = Clock()
        broker = make_broker(clock)
        heard: list[Frame] = []
        broker.attach_local("controller").subscribe(CONTROLLER, heard.append)
        idle_guest(broker, "warm-up")
        count = 200
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            guests = [idle_guest(broker, str(i)) for i in range(count)]
            clock.advance(20)  # two heart-beats out; within the 25 s the guests may stay silent
            heard.clear()
            gc.collect()
            per_connection = (tracemalloc.get_traced_memory()[0] - before) / count
        finally:
            tracemalloc.stop()
        self.assertEqual(broker.stats().connections, count + 1)
        self.assertEqual(sum(g.closing for g in guests), 0)
        self.assertLess(per_connection, BUDGET)
