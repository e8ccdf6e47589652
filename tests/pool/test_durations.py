"""The durations the pool tells its ITimings, on a Clock: a VM's boot, prepare and cleanup, a lock's
wait for its VM, each reconcile pass; what /metrics turns into histograms."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.pool.answers import handle_status
from tests.pool.fakes import CONFIG, World
from tests.timings import RecordingTimings
from vmcloud.pool.interfaces import BatchOptions
from vmcloud.pool.model import VMState
from vmcloud.pool.service import PoolService
from vmcloud.timings import (
    BOOT,
    CLEANUP,
    LOCK_ASSIGNED,
    NO_TIMINGS,
    PREPARE,
    RECONCILE_PASS,
    ITimings,
)

HOME = "https://example.org/"


def timed_world() -> tuple[World, RecordingTimings]:
    """A started World whose pool tells a recorder its durations."""
    timings = RecordingTimings()
    w = World(start=False)
    w.channel.listeners.clear()
    w.pool = PoolService(w.clock, w.driver, w.channel, w.store, CONFIG, epoch="e", timings=timings)
    w.start()
    return w, timings


def boot_one(w: World, accepted_after: float, hello_after: float) -> str:
    """Ask for one VM, the cloud accepts it after ``accepted_after`` s, its guest says HELLO after
    ``hello_after`` more; returns its vmid."""
    w.pool.set_pool_size(1, 1, 60_000)
    w.turn()
    w.advance(accepted_after)
    [vmid] = w.driver.answer_boots()
    w.turn()
    w.advance(hello_after)
    w.hello_booting()
    w.turn()
    return vmid


class PhaseTests(SynchronousTestCase):
    def test_no_timings_is_an_itimings_and_the_default(self) -> None:
        self.assertTrue(verifyObject(ITimings, NO_TIMINGS))
        self.assertTrue(verifyObject(ITimings, RecordingTimings()))
        World().settle()  # a pool built without timings still runs its phases

    def test_a_boot_is_timed_from_asking_the_cloud_to_the_guests_hello(self) -> None:
        w, timings = timed_world()
        vmid = boot_one(w, accepted_after=3.0, hello_after=40.5)
        self.assertEqual(w.state.vms[vmid].state, VMState.FREE)
        self.assertEqual(timings.of(BOOT), [(43.5, {"outcome": "ok"})])

    def test_prepare_lock_and_cleanup_each_take_what_the_guest_and_the_wait_took(self) -> None:
        w, timings = timed_world()
        vmid = boot_one(w, 1.0, 1.0)
        batch = w.pool.prepare_batch(1, HOME, BatchOptions())
        w.turn()
        w.advance(0.25)
        self.assertEqual([c.word for c in w.channel.answer_calls()], ["PREPARE"])
        w.turn()
        self.assertEqual(timings.of(PREPARE), [(0.25, {"outcome": "ok"})])

        warm = w.pool.lock(batch)  # a READY VM is there: no wait
        self.assertEqual(timings.of(LOCK_ASSIGNED), [(0.0, {})])
        w.pool.release(warm)
        w.turn()
        w.advance(0.125)
        self.assertEqual([c.word for c in w.channel.answer_calls()], ["CLEANUP"])
        w.turn()
        self.assertEqual(timings.of(CLEANUP), [(0.125, {"outcome": "ok"})])

        # FREE again, the VM is being prepared for the batch once more: a lock now waits for it
        self.assertTrue(w.state.vms[vmid].preparing)
        cold = w.pool.lock(batch)
        w.turn()
        self.assertFalse(handle_status(w.pool, cold)["assigned"])
        w.advance(2.0)
        w.channel.answer_calls("PREPARE")
        w.turn()
        self.assertTrue(handle_status(w.pool, cold)["assigned"])
        self.assertEqual(timings.of(LOCK_ASSIGNED), [(0.0, {}), (2.0, {})])
        self.assertEqual(timings.of(PREPARE)[-1], (2.0, {"outcome": "ok"}))

    def test_a_failed_prepare_and_a_boot_that_never_says_hello_are_failed(self) -> None:
        w, timings = timed_world()
        boot_one(w, 1.0, 1.0)
        w.pool.prepare_batch(1, HOME, BatchOptions())
        w.turn()
        w.advance(0.5)
        w.channel.fail_calls("PREPARE", "the browser did not start")
        w.turn()
        self.assertEqual(timings.of(PREPARE), [(0.5, {"outcome": "failed"})])

        # its replacement's guest never comes: the boot ends at timeout_boot, failed
        w.turn()
        w.driver.answer_boots()
        w.turn()
        w.advance(CONFIG.timeout_boot)
        booted = [s for s, labels in timings.of(BOOT) if labels == {"outcome": "failed"}]
        self.assertEqual(booted, [CONFIG.timeout_boot])

    def test_a_vm_leaving_no_phase_says_nothing(self) -> None:
        w, timings = timed_world()
        boot_one(w, 1.0, 1.0)
        w.pool.set_pool_size(0, 0, 0)  # a FREE VM terminated: no phase of it ended
        w.settle()
        self.assertEqual([name for name, _, _ in timings.seen if name != RECONCILE_PASS], [BOOT])


class PassTests(SynchronousTestCase):
    def test_every_pass_tells_its_wall_time(self) -> None:
        w, timings = timed_world()
        before = len(timings.of(RECONCILE_PASS))
        passes = w.pool.reconciler.passes
        w.pool.set_pool_size(2, 2, 0)
        w.settle()
        seen = timings.of(RECONCILE_PASS)[before:]
        self.assertEqual(len(seen), w.pool.reconciler.passes - passes)
        self.assertGreater(len(seen), 1)
        self.assertEqual(seen[-1], (w.pool.reconciler.last_pass_seconds, {}))
        self.assertEqual(
            max(s for s, _ in timings.of(RECONCILE_PASS)), w.pool.reconciler.slowest_pass_seconds
        )
