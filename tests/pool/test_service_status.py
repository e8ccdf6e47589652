"""The status version and its long poll (what the monitor follows), and the operator's terminate."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tests.pool.answers import all_status, handle_status, page_json
from tests.pool.fakes import CONFIG, World
from vmcloud.pool.interfaces import (
    BatchOptions,
    CloudUnavailable,
    InvalidRequest,
    ShuttingDown,
    UnknownVM,
)
from vmcloud.pool.model import VMState
from vmcloud.pool.service import MAX_STATUS_WAITERS
from vmcloud.pool.views import PoolStatus

HOME = "https://example.org/"


def steady(free: int = 1) -> World:
    """A pool of ``free`` FREE VMs at its minimum: nothing left to do."""
    w = World()
    w.pool.set_pool_size(free, free, 60_000)
    w.settle()
    return w


class VersionTests(SynchronousTestCase):
    def test_the_status_carries_its_version(self) -> None:
        w = steady()
        status = all_status(w.pool)
        self.assertIsInstance(status["version"], int)
        self.assertEqual(list(status)[-1], "version")
        self.assertEqual(all_status(w.pool)["version"], status["version"], "nothing changed")

    def test_time_alone_changes_nothing(self) -> None:
        """Ticks, passes and a cloud listing move time, passes and lastListingAt: not the version."""
        w = steady()
        before = all_status(w.pool)
        w.advance(CONFIG.poll_interval + 1)
        self.assertEqual(w.driver.answer_lists(), 1)
        w.turn()
        after = all_status(w.pool)
        self.assertGreater(after["reconciler"]["passes"], before["reconciler"]["passes"])
        self.assertNotEqual(after["cloud"]["lastListingAt"], before["cloud"]["lastListingAt"])
        self.assertEqual(after["version"], before["version"])

    def test_every_kind_of_change_moves_it(self) -> None:
        w = steady(free=2)
        seen = [all_status(w.pool)["version"]]

        def changed(what: str) -> None:
            version = all_status(w.pool)["version"]
            self.assertNotIn(version, seen, what)
            seen.append(version)

        batch = w.pool.prepare_batch(1, HOME, BatchOptions())
        changed("a batch")
        w.settle()
        changed("a VM prepared")
        handle = w.pool.lock(batch)
        changed("a lock")
        w.pool.renew_expire(handle, 60_000)
        changed("an expiry")
        vm = w.pool.handle_status(handle).vm
        assert vm is not None and vm.identity is not None
        w.channel.event(vm.identity, {"action": "page-load", "url": HOME, "title": "t"})
        changed("an event on a handle")
        w.pool.set_pool_size(2, 3, 60_000)
        changed("the pool size")
        w.pool.cancel_batch(batch)
        changed("a cancelled batch")
        w.driver.errors["list"].append(CloudUnavailable("503"))
        w.advance(CONFIG.poll_interval)
        changed("cloud health")
        w.advance(all_status(w.pool)["cloud"]["backoffUntil"] / 1000 - w.clock.seconds())
        changed("the back-off over")
        w.pool.release(handle)
        changed("a release")
        w.pool.shutdown()
        changed("shutdown")


class StatusAfterTests(SynchronousTestCase):
    def status_after(self, w: World, since: int, wait: float) -> Deferred[PoolStatus]:
        return Deferred.fromCoroutine(w.pool.status_after(since, wait))

    def test_answers_at_once_when_the_version_differs(self) -> None:
        w = steady()
        version = w.pool.all_status().version
        answer = self.successResultOf(self.status_after(w, version - 1, 30))
        self.assertEqual(answer.version, version)

    def test_waits_for_a_change_and_is_woken_by_it(self) -> None:
        w = steady()
        version = w.pool.all_status().version
        d = self.status_after(w, version, 30)
        w.clock.advance(3)
        self.assertNoResult(d)
        w.pool.prepare_batch(1, HOME, BatchOptions())
        self.assertNoResult(d)  # woken at the next reactor turn, once for every change of this one
        w.clock.advance(0)
        answer = self.successResultOf(d)
        self.assertNotEqual(answer.version, version)
        self.assertEqual(len(answer.batches), 1)

    def test_a_change_the_pool_makes_on_its_own_wakes_it(self) -> None:
        w = World()
        w.pool.set_pool_size(1, 1, 60_000)
        w.turn()
        d = self.status_after(w, w.pool.all_status().version, 30)
        w.clock.advance(1)
        self.assertNoResult(d)
        w.driver.answer_boots()  # the cloud answers: CREATING -> BOOTING, in a pass
        w.turn()
        self.assertEqual([vm.state for vm in self.successResultOf(d).vms], [VMState.BOOTING])

    def test_an_event_on_a_handle_wakes_it(self) -> None:
        w = steady()
        batch = w.pool.prepare_batch(1, HOME, BatchOptions())
        w.settle()
        handle = w.pool.lock(batch)
        w.turn()
        vm = w.pool.handle_status(handle).vm
        assert vm is not None and vm.identity is not None
        d = self.status_after(w, w.pool.all_status().version, 30)
        w.channel.event(vm.identity, {"action": "page-load", "url": HOME, "title": "t"})
        w.clock.advance(0)  # no tick, no pass: the event alone
        (view,) = self.successResultOf(d).handles
        self.assertEqual(view.events, 2)

    def test_gives_up_after_wait_seconds_with_the_same_version(self) -> None:
        w = steady()
        version = w.pool.all_status().version
        d = self.status_after(w, version, 4)
        w.clock.advance(3.99)
        self.assertNoResult(d)
        w.clock.advance(0.01)
        self.assertEqual(self.successResultOf(d).version, version)

    def test_wait_zero_and_the_long_poll_cap(self) -> None:
        w = steady()
        version = w.pool.all_status().version
        self.assertEqual(self.successResultOf(self.status_after(w, version, 0)).version, version)
        d = self.status_after(w, version, 10**6)
        w.clock.advance(CONFIG.long_poll_max)
        self.successResultOf(d)

    def test_a_waiter_going_away_leaves_nothing_behind(self) -> None:
        w = steady()
        timers = len(w.clock.getDelayedCalls())
        d = self.status_after(w, w.pool.all_status().version, 30)
        self.assertEqual(len(w.clock.getDelayedCalls()), timers + 1)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(len(w.clock.getDelayedCalls()), timers)
        w.pool.prepare_batch(1, HOME, BatchOptions())  # a change with nobody waiting: no wake-up call
        self.assertEqual(len(w.clock.getDelayedCalls()), timers + 1)  # the pass, only
        w.turn()

    def test_stop_wakes_every_waiter(self) -> None:
        w = steady()
        version = w.pool.all_status().version
        waiting = [self.status_after(w, version, 30) for _ in range(3)]
        self.successResultOf(w.pool.stopService())
        for d in waiting:
            self.successResultOf(d)
        self.successResultOf(self.status_after(w, version, 30))  # stopped: never waits

    def test_shutdown_wakes_them(self) -> None:
        w = steady()
        d = self.status_after(w, w.pool.all_status().version, 30)
        w.pool.shutdown()
        w.turn()
        self.assertTrue(self.successResultOf(d).shutting_down)

    def test_too_many_waiters_answer_the_oldest(self) -> None:
        w = steady()
        version = w.pool.all_status().version
        waiting = [self.status_after(w, version, 30) for _ in range(MAX_STATUS_WAITERS)]
        self.assertNoResult(waiting[0])
        self.status_after(w, version, 30)
        self.assertEqual(self.successResultOf(waiting[0]).version, version)
        self.assertNoResult(waiting[1])

    def test_bad_arguments(self) -> None:
        w = steady()
        for since, wait in [(-1, 0), ("1", 0), (True, 0), (1, -1.0), (1, float("nan")), (1, "5")]:
            with self.subTest(since=since, wait=wait):
                self.failureResultOf(self.status_after(w, since, wait)).trap(InvalidRequest)  # type: ignore[arg-type]


class TerminateTests(SynchronousTestCase):
    def test_a_free_vm_is_terminated_and_replaced(self) -> None:
        w = steady()
        (vm,) = w.vms()
        with capturedLogs() as events:
            w.pool.terminate_vm(vm.vmid)
        self.assertEqual([e["vmid"] for e in events if e.get("event") == "vm-terminate"], [vm.vmid])
        self.assertEqual(w.state.vms[vm.vmid].reason, "terminated by the operator")
        w.turn()
        self.assertEqual(w.state.vms[vm.vmid].state, VMState.KILLING)
        self.assertEqual([server for server, _ in w.driver.deletes], [vm.server_id])
        w.settle()
        self.assertNotIn(vm.vmid, w.state.vms)
        self.assertEqual(w.counts(), {"FREE": 1})

    def test_an_occupied_vms_handle_loses_it(self) -> None:
        w = steady()
        batch = w.pool.prepare_batch(1, HOME, BatchOptions())
        w.settle()
        handle = w.pool.lock(batch)
        vmid = handle_status(w.pool, handle)["vmid"]
        ended: list[tuple[str, str]] = []
        w.pool.watch_access(lambda token, why: ended.append((token, why)), lambda vmid, why: None)
        before = w.pool.last_event_id(handle)
        w.pool.terminate_vm(vmid)
        status = handle_status(w.pool, handle)
        self.assertFalse(status["assigned"])
        self.assertEqual(
            (status["lost"]["vmid"], status["lost"]["reason"]), (vmid, "terminated by the operator")
        )
        events = page_json(
            self.successResultOf(Deferred.fromCoroutine(w.pool.fetch_events(handle, before, 0)))
        )
        self.assertEqual(
            [e["data"] for e in events["newEvents"]],
            [{"action": "vm-died", "vmid": vmid, "reason": "terminated by the operator"}],
        )
        self.assertEqual([token for token, _ in ended], [handle])
        w.settle()
        self.assertNotIn(vmid, w.state.vms)

    def test_a_booting_vm_does_not_slow_booting_down(self) -> None:
        """Terminated before its HELLO, by choice: not a broken image."""
        w = World()
        w.pool.set_pool_size(1, 1, 60_000)
        w.turn()
        w.driver.answer_boots()
        w.turn()
        (vm,) = w.vms(VMState.BOOTING)
        w.pool.terminate_vm(vm.vmid)
        w.settle()
        self.assertEqual(w.state.cloud.boot_failures, 0)
        self.assertEqual(w.counts(), {"FREE": 1})

    def test_a_dying_vm_is_left_to_its_termination(self) -> None:
        w = steady()
        (vm,) = w.vms()
        w.pool.terminate_vm(vm.vmid)
        w.turn()
        killing = w.state.vms[vm.vmid]
        w.pool.terminate_vm(vm.vmid)
        self.assertIs(w.state.vms[vm.vmid], killing)

    def test_refusals(self) -> None:
        w = steady()
        (vm,) = w.vms()
        for unknown in ("nope", "", 7):
            with self.subTest(vmid=unknown):
                self.assertRaises(UnknownVM, w.pool.terminate_vm, unknown)  # type: ignore[arg-type]
        w.pool.shutdown()
        self.assertRaises(ShuttingDown, w.pool.terminate_vm, vm.vmid)
        w.pool.set_pool_size(1, 1, 0)
        self.successResultOf(w.pool.stopService())
        self.assertRaises(ShuttingDown, w.pool.terminate_vm, vm.vmid)
