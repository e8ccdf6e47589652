"""The daemon's memory habits: the allocator settings take, and collection pauses nest and end."""

from __future__ import annotations

import gc
import threading

from twisted.trial.unittest import SynchronousTestCase

from vmcloud import memory


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
