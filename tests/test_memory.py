"""The daemon's memory policy: the allocator settings take, survivors freeze and thaw, one switch."""

from __future__ import annotations

import gc

from twisted.application.service import MultiService
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from vmcloud import memory
from vmcloud.memory import FreezeSurvivors


class AllocatorTests(SynchronousTestCase):
    def test_glibc_takes_the_settings(self) -> None:
        if memory._libc() is None:
            raise self.skipTest("not glibc")
        self.assertTrue(memory.tune_allocator())


class _Reactor(Clock):
    """A Clock that also runs calls "from threads" at once."""

    def callFromThread(self, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        f(*args, **kwargs)


class FreezeSurvivorsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.addCleanup(gc.unfreeze)
        self.reactor = _Reactor()
        self.service = FreezeSurvivors(self.reactor, thaw_interval=60.0)
        self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())

    def test_survivors_of_a_full_collection_are_frozen(self) -> None:
        kept: list[list[int]] = [[] for _ in range(100)]
        gc.collect(1)
        self.assertEqual(self.service.freezes, 0)  # young collections freeze nothing
        gc.collect()
        self.assertEqual(self.service.freezes, 1)
        self.assertGreaterEqual(gc.get_freeze_count(), len(kept))

    def test_everything_is_thawed_every_interval(self) -> None:
        gc.collect()
        self.assertGreater(gc.get_freeze_count(), 0)
        self.reactor.advance(60)
        self.assertEqual(self.service.thaws, 1)
        self.assertEqual(gc.get_freeze_count(), 0)

    def test_a_thawed_garbage_cycle_is_collected(self) -> None:
        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        gc.collect()  # a and b survive (we hold them) and are frozen
        del a, b  # now a frozen garbage cycle
        self.assertEqual(sum(isinstance(o, Node) for o in gc.get_objects()), 0)  # out of reach
        self.reactor.advance(60)
        gc.collect()
        self.assertFalse([o for o in gc.get_objects() if isinstance(o, Node)])

    def test_stopping_removes_the_callback(self) -> None:
        self.service.stopService()
        gc.collect()
        self.assertEqual(self.service.freezes, 0)

    def test_full_collections_come_more_often_while_it_runs(self) -> None:
        self.assertEqual(gc.get_threshold()[2], 2)
        self.service.stopService()
        self.assertEqual(gc.get_threshold()[2], 10)


class ApplyPolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.addCleanup(gc.unfreeze)
        self.daemon = MultiService()
        memory.apply_policy(_Reactor(), self.daemon)
        self.addCleanup(lambda: self.daemon.running and self.daemon.stopService())

    def test_one_switch_puts_the_policy_under_the_daemon(self) -> None:
        [policy] = list(self.daemon)
        self.assertIsInstance(policy, FreezeSurvivors)
        gc.unfreeze()
        self.daemon.startService()
        self.assertGreater(gc.get_freeze_count(), 0)  # what was built before the start
        self.assertEqual(gc.get_threshold()[2], 2)
        self.daemon.stopService()
        self.assertEqual(gc.get_threshold()[2], 10)
