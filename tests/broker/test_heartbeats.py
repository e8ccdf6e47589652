"""The broker's heart-beat schedule: one timed call, sleepers woken in time order."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from vmcloud.broker.heartbeats import Heartbeats


class Sleeper:
    """Wakes every ``every`` seconds, ``times`` times, recording when; raises if told to."""

    def __init__(self, name: str, every: float, woken: list[tuple[str, float]], times: int = 1000) -> None:
        self.name = name
        self.every = every
        self.woken = woken
        self.times = times
        self.fail = False
        self.wake_at = 0.0
        self.scheduled = False

    def __lt__(self, other: Sleeper) -> bool:
        return self.wake_at < other.wake_at

    def wake(self, now: float) -> float | None:
        self.woken.append((self.name, now))
        if self.fail:
            raise RuntimeError("boom")
        self.times -= 1
        return now + self.every if self.times > 0 else None


class HeartbeatsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.schedule = Heartbeats(self.clock)
        self.woken: list[tuple[str, float]] = []

    def sleeper(self, name: str, every: float, first: float, times: int = 1000) -> Sleeper:
        sleeper = Sleeper(name, every, self.woken, times)
        self.schedule.add(sleeper, first)
        return sleeper

    def test_sleepers_wake_in_time_order_with_one_timed_call(self) -> None:
        self.sleeper("a", 3, 3)
        self.sleeper("b", 2, 2)
        self.sleeper("c", 5, 5)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.pump([1] * 6)
        self.assertEqual(self.woken, [("b", 2), ("a", 3), ("b", 4), ("c", 5), ("a", 6), ("b", 6)])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_an_earlier_sleeper_brings_the_timed_call_forward(self) -> None:
        self.sleeper("late", 10, 10)
        self.clock.advance(1)
        self.sleeper("early", 10, 2)
        self.clock.advance(1)
        self.assertEqual(self.woken, [("early", 2)])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_removed_sleepers_are_not_woken(self) -> None:
        gone = self.sleeper("gone", 1, 1)
        self.sleeper("stays", 1, 1)
        self.schedule.remove(gone)
        self.schedule.remove(gone)  # twice is harmless
        self.clock.pump([1] * 3)
        self.assertEqual(self.woken, [("stays", 1), ("stays", 2), ("stays", 3)])
        self.assertEqual(len(self.schedule), 1)

    def test_removed_sleepers_are_swept_out_once_they_are_half(self) -> None:
        sleepers = [self.sleeper(f"s{i}", 100, 100) for i in range(200)]
        for sleeper in sleepers[:99]:
            self.schedule.remove(sleeper)
        self.assertEqual(len(self.schedule._heap), 200)  # under half: left in place
        self.schedule.remove(sleepers[99])
        self.assertEqual(len(self.schedule._heap), 100)
        for sleeper in sleepers[100:-1]:
            self.schedule.remove(sleeper)
        self.assertEqual(len(self.schedule), 1)
        self.assertLess(len(self.schedule._heap), 64)  # a few marked ones wait to come up
        self.schedule.remove(sleepers[-1])
        self.assertEqual(self.schedule._heap, [])  # the last one gone: nothing waits
        self.assertEqual(self.clock.getDelayedCalls(), [])  # a clean reactor
        self.clock.advance(100)
        self.assertEqual(self.woken, [])

    def test_a_sleeper_that_is_done_leaves(self) -> None:
        self.sleeper("twice", 1, 1, times=2)
        self.clock.pump([1] * 5)
        self.assertEqual(self.woken, [("twice", 1), ("twice", 2)])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.schedule), 0)

    def test_a_failing_sleeper_is_logged_and_the_others_go_on(self) -> None:
        broken = self.sleeper("broken", 1, 1)
        broken.fail = True
        self.sleeper("fine", 1, 1)
        with capturedLogs() as events:
            self.clock.pump([1] * 3)
        self.assertEqual([e.get("event") for e in events], ["broker-internal-error"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.woken, [("broken", 1), ("fine", 1), ("fine", 2), ("fine", 3)])
