"""Each checkpoint write that reached the disk is told to the store's ITimings (the
``vmcloud_checkpoint_write_seconds`` histogram); a failed or coalesced one is not."""

from __future__ import annotations

from tests.store.fakes import FailingFileOps, ManualDispatch
from tests.store.test_checkpoint import StoreTestCase, pool_state
from tests.timings import RecordingTimings
from vmcloud.timings import CHECKPOINT_WRITE


class WriteTimingTests(StoreTestCase):
    def test_each_good_write_is_timed_as_its_stats_say(self) -> None:
        timings = RecordingTimings()
        dispatch = ManualDispatch()
        store = self.store(timings=timings, dispatch=dispatch)
        for generation in range(1, 5):  # one in flight, the rest coalesce into one pending
            store.save(pool_state(generation))
        dispatch.run_next()
        [(first, labels)] = timings.of(CHECKPOINT_WRITE)
        self.assertEqual((first, labels), (store.stats().last_write_seconds, {}))
        self.assertGreater(first, 0.0)
        dispatch.run_next()
        self.assertEqual(len(timings.of(CHECKPOINT_WRITE)), store.stats().writes)
        self.assertEqual(store.stats().writes, 2)
        self.assertEqual(timings.of(CHECKPOINT_WRITE)[-1][0], store.stats().last_write_seconds)

    def test_a_failed_write_is_not_timed(self) -> None:
        timings = RecordingTimings()
        files = FailingFileOps("fsync")
        store = self.store(timings=timings, files=files, retry_delay=5.0)
        store.save(pool_state(1))
        self.assertEqual((store.stats().failures, timings.seen), (1, []))
        files.failing = False
        self.clock.advance(5.0)
        self.assertEqual(store.stats().writes, 1)
        self.assertEqual(len(timings.of(CHECKPOINT_WRITE)), 1)
