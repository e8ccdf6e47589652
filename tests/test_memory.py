"""The daemon's memory habits: the allocator settings take, and collection pauses nest and end."""

from __future__ import annotations

import gc
import threading

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from vmcloud import memory
from vmcloud.memory import FreezeSurvivors


class CollectionPausedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.addCleanup(gc.enable if gc.isenabled() else gc.disable)
        gc.enable()

    def test_nested_pauses_end_with_the_outermost(self) -> None:
        with memory.collection_paused():
            self.assertFalse(gc.isenabled())
            with memory.collection_paused():
                self.assertFalse(gc.isenabled())
            self.assertFalse(gc.isenabled())
        self.assertTrue(gc.isenabled())

    def test_pauses_in_two_threads_overlap(self) -> None:
        inside, leave = threading.Event(), threading.Event()

        def other() -> None:
            with memory.collection_paused():
                inside.set()
                leave.wait(10)

        thread = threading.Thread(target=other)
        with memory.collection_paused():
            thread.start()
            inside.wait(10)
        self.assertFalse(gc.isenabled())  # the other thread is still inside its block
        leave.set()
        thread.join(10)
        self.assertTrue(gc.isenabled())

    def test_a_collector_that_was_off_stays_off(self) -> None:
        gc.disable()
        with memory.collection_paused():
            pass
        self.assertFalse(gc.isenabled())

    def test_an_exception_ends_the_pause(self) -> None:
        with self.assertRaises(ValueError), memory.collection_paused():
            raise ValueError("boom")
        self.assertTrue(gc.isenabled())


class AllocatorTests(SynchronousTestCase):
    def test_glibc_takes_the_settings_and_trims(self) -> None:
        if memory._LIBC is None:
            raise self.skipTest("not glibc")
        self.assertTrue(memory.tune_allocator())
        self.assertIsInstance(memory.trim(), bool)


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
        kept = [[] for _ in range(100)]
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
