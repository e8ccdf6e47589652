"""The pool service end to end on a Clock: what the REST API's callers and the worker's page see."""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.pool.answers import all_status, handle_status, page_json
from tests.pool.fakes import CONFIG, PREFIX, World
from vmcloud.pool.interfaces import (
    BatchCancelled,
    BatchOptions,
    Cookie,
    IGuestListener,
    InvalidRequest,
    IPoolControl,
    ShuttingDown,
    UnknownBatch,
    UnknownHandle,
)
from vmcloud.pool.model import VMState

HOME = "https://example.org/task?x=1"


def ready_world(free: int = 2, batch_size: int = 2, maximum: int = 4) -> tuple[World, str]:
    """A pool with ``batch_size`` READY VMs of one batch (returned)."""
    w = World()
    w.pool.set_pool_size(free, maximum, 60_000)
    w.settle()
    batch = w.pool.prepare_batch(batch_size, HOME, BatchOptions())
    w.settle()
    return w, batch


class InterfaceTests(SynchronousTestCase):
    def test_provides_control_and_listener(self) -> None:
        w = World(start=False)
        self.assertTrue(verifyObject(IPoolControl, w.pool))
        self.assertTrue(verifyObject(IGuestListener, w.pool))
        self.assertEqual(w.channel.listeners, [w.pool])


class WalkThroughTests(SynchronousTestCase):
    """The README's curl walk-through, at the level of the pool."""

    def test_set_pool_size_boots_min_vms_that_become_free(self) -> None:
        w = World()
        w.pool.set_pool_size(2, 4, 60_000)
        w.turn()
        requests = [r for r, _ in w.driver.boots]
        self.assertEqual(len(requests), 2)
        for request in requests:
            self.assertEqual(request.name, PREFIX + request.vmid)
            self.assertEqual(
                dict(request.metadata),
                {"vmcloud-controller": "test-controller", "vmcloud-vmid": request.vmid},
            )
            self.assertEqual(
                request.credentials,
                attrs.evolve(w.channel.minted[request.vmid], beacon_interval=w.pool.config.beacon_interval),
            )
        self.assertEqual(w.counts(), {"CREATING": 2})
        w.driver.answer_boots()
        w.turn()
        self.assertEqual(w.counts(), {"BOOTING": 2})
        w.hello_booting()
        w.turn()
        self.assertEqual(w.counts(), {"FREE": 2})

    def test_batch_prepares_free_vms_with_its_options(self) -> None:
        w = World()
        w.pool.set_pool_size(2, 4, 60_000)
        w.settle()
        options = BatchOptions(
            cookies=(Cookie("sid", "abc", domain="example.org", http_only=True),),
            window_width=1024,
            window_height=700,
            audio=True,
        )
        batch = w.pool.prepare_batch(2, HOME, options)
        w.turn()
        self.assertEqual([c.word for c in w.channel.calls], ["PREPARE", "PREPARE"])
        params = w.channel.calls[0].params
        self.assertEqual(params["homepage"], HOME)
        self.assertEqual(params["window"], {"width": 1024, "height": 700})
        self.assertTrue(params["audio"])
        self.assertEqual(params["cookies"][0]["name"], "sid")
        self.assertTrue(params["cookies"][0]["httpOnly"])
        self.assertLessEqual(len(params["vncPassword"]), 8)
        self.assertEqual(w.channel.calls[0].timeout, CONFIG.timeout_operation)
        self.assertEqual(w.counts(), {"WAIT": 2})
        w.channel.answer_calls()
        w.turn()
        self.assertEqual(w.counts(), {"READY": 2})
        self.assertEqual({vm.batch for vm in w.vms()}, {batch})

    def test_lock_assigns_a_ready_vm_at_once(self) -> None:
        w, batch = ready_world()
        handle = w.pool.lock(batch)
        self.assertGreaterEqual(len(handle), 32)
        status = handle_status(w.pool, handle)
        self.assertTrue(status["assigned"])
        vm = w.state.vms[status["vmid"]]
        self.assertEqual(vm.state, VMState.OCCUPIED)
        self.assertEqual(status["vm"]["state"], "OCCUPIED")
        self.assertEqual(status["vm"]["console"], f"/console/{handle}")
        self.assertIsNone(status["vm"]["audio"])  # the batch did not ask for audio
        self.assertEqual(status["vm"]["vncPassword"], vm.vnc_password)
        self.assertIsNotNone(vm.vnc_password)
        self.assertFalse(status["expires"])
        self.assertIsNone(status["expireTime"])

    def test_handles_are_unguessable_and_distinct(self) -> None:
        w, batch = ready_world(batch_size=0)
        handles = {w.pool.lock(batch) for _ in range(50)}
        self.assertEqual(len(handles), 50)
        for handle in handles:
            self.assertRegex(handle, r"^[A-Za-z0-9_-]{32}$")

    def test_a_locked_vm_leaves_its_batch_and_is_replaced(self) -> None:
        w, batch = ready_world()
        w.pool.lock(batch)
        w.settle()
        self.assertEqual(w.counts(), {"OCCUPIED": 1, "READY": 2})

    def test_lock_before_any_vm_exists_waits_then_is_assigned(self) -> None:
        w = World()
        w.pool.set_pool_size(0, 3, 60_000)
        batch = w.pool.prepare_batch(0, HOME, BatchOptions())
        handle = w.pool.lock(batch)
        self.assertEqual(handle_status(w.pool, handle)["assigned"], False)
        self.assertEqual(len(all_status(w.pool)["pendingLocks"]), 1)
        w.settle()
        status = handle_status(w.pool, handle)
        self.assertTrue(status["assigned"])
        self.assertEqual(w.counts(), {"OCCUPIED": 1})
        self.assertEqual(all_status(w.pool)["pendingLocks"], [])

    def test_locks_are_served_first_come_first_served(self) -> None:
        w = World()
        w.pool.set_pool_size(0, 3, 60_000)
        batch = w.pool.prepare_batch(0, HOME, BatchOptions())
        first, second = w.pool.lock(batch), w.pool.lock(batch)
        w.turn()
        w.driver.answer_boots()
        w.turn()
        vms = w.vms(VMState.BOOTING)
        w.channel.hello(vms[0].login, login=vms[0].login)
        w.turn()
        w.channel.answer_calls()
        w.turn()
        self.assertTrue(handle_status(w.pool, first)["assigned"])
        self.assertFalse(handle_status(w.pool, second)["assigned"])

    def test_release_cleans_the_vm_back_to_free_and_it_is_reused(self) -> None:
        w, batch = ready_world(free=1, batch_size=1, maximum=1)
        handle = w.pool.lock(batch)
        vmid = handle_status(w.pool, handle)["vmid"]
        w.pool.cancel_batch(batch)
        w.pool.release(handle)
        w.turn()
        self.assertEqual([c.word for c in w.channel.calls], ["CLEANUP"])
        self.assertEqual(w.state.vms[vmid].state, VMState.WAIT)
        w.channel.answer_calls()
        w.turn()
        self.assertEqual(w.state.vms[vmid].state, VMState.FREE)
        self.assertRaises(UnknownHandle, w.pool.handle_status, handle)
        second = w.pool.prepare_batch(1, "http://example.com/", BatchOptions())
        w.settle()
        self.assertEqual(w.state.vms[vmid].state, VMState.READY)
        self.assertEqual(w.state.vms[vmid].batch, second)
        self.assertEqual(len(w.state.vms), 1)

    def test_renew_expire_releases_the_handle_when_due(self) -> None:
        w, batch = ready_world()
        handle = w.pool.lock(batch)
        vmid = handle_status(w.pool, handle)["vmid"]
        w.pool.renew_expire(handle, 1000)
        status = handle_status(w.pool, handle)
        self.assertTrue(status["expires"])
        self.assertEqual(status["expireTime"], round((w.clock.seconds() + 1) * 1000))
        w.advance(0.5)
        w.pool.renew_expire(handle, 1000)  # resets the timer
        w.advance(0.9)
        self.assertTrue(handle_status(w.pool, handle)["assigned"])
        w.advance(0.1)
        self.assertRaises(UnknownHandle, w.pool.handle_status, handle)
        self.assertEqual(w.state.vms[vmid].state, VMState.WAIT)
        self.assertEqual([c.word for c in w.channel.calls], ["CLEANUP"])

    def test_cancel_batch_refuses_locks_keeps_locked_vms_and_goes_when_empty(self) -> None:
        w, batch = ready_world()
        handle = w.pool.lock(batch)
        w.settle()
        w.pool.cancel_batch(batch)
        self.assertRaises(BatchCancelled, w.pool.lock, batch)
        w.settle()
        self.assertEqual(w.counts(), {"OCCUPIED": 1, "FREE": 2})
        self.assertTrue(handle_status(w.pool, handle)["assigned"])
        # Not empty while a VM of it is locked: still there, still refusing locks with 409.
        self.assertEqual([b["id"] for b in all_status(w.pool)["batches"]], [batch])
        self.assertRaises(BatchCancelled, w.pool.lock, batch)
        w.pool.release(handle)
        w.settle()
        self.assertEqual(all_status(w.pool)["batches"], [])
        self.assertRaises(UnknownBatch, w.pool.lock, batch)

    def test_cancelled_batch_still_serves_locks_waiting_before_the_cancel(self) -> None:
        w = World()
        w.pool.set_pool_size(0, 2, 60_000)
        batch = w.pool.prepare_batch(2, HOME, BatchOptions())
        handle = w.pool.lock(batch)
        w.pool.cancel_batch(batch)
        w.settle()
        self.assertTrue(handle_status(w.pool, handle)["assigned"])
        self.assertEqual(all_status(w.pool)["batches"], [])

    def test_shutdown_releases_cancels_and_terminates_everything(self) -> None:
        w, batch = ready_world()
        handle = w.pool.lock(batch)
        w.settle()
        w.pool.shutdown()
        self.assertEqual(w.counts(), {"KILLING": 3})
        self.assertEqual(len(w.driver.deletes), 3)
        self.assertRaises(UnknownHandle, w.pool.handle_status, handle)
        self.assertRaises(UnknownBatch, w.pool.lock, batch)  # cancelled, emptied, gone
        self.assertRaises(ShuttingDown, w.pool.prepare_batch, 1, HOME, BatchOptions())
        w.settle()
        self.assertEqual(w.counts(), {})
        self.assertEqual(w.driver.servers, {})
        self.assertEqual(sorted(w.channel.revoked), sorted(w.channel.minted))
        self.assertTrue(all_status(w.pool)["shuttingDown"])
        w.pool.set_pool_size(1, 2, 0)
        w.settle()
        self.assertEqual(w.counts(), {"FREE": 1})


class PoolSizeTests(SynchronousTestCase):
    def test_hard_cap_clamps_max(self) -> None:
        w = World()
        w.pool.set_pool_size(50, 100, 0)
        w.turn()
        self.assertEqual(len(w.state.vms), CONFIG.max_pool_size)
        size = all_status(w.pool)["poolSize"]
        self.assertEqual((size["min"], size["max"]), (50, 100))
        self.assertEqual((size["effectiveMin"], size["effectiveMax"]), (10, 10))

    def test_free_vm_idle_past_linger_is_terminated_above_min(self) -> None:
        w = World()
        w.pool.set_pool_size(3, 3, 10_000)
        w.settle()
        w.pool.set_pool_size(1, 3, 10_000)
        w.advance(9)
        self.assertEqual(w.counts(), {"FREE": 3})
        w.advance(1)
        self.assertEqual(w.counts(), {"FREE": 1, "KILLING": 2})
        w.settle()
        w.advance(CONFIG.timeout_update - 11)  # long past linger, but min holds
        self.assertEqual(w.counts(), {"FREE": 1})

    def test_above_max_booting_vms_go_first_then_free_never_occupied(self) -> None:
        w, batch = ready_world(free=0, batch_size=1, maximum=3)
        handle = w.pool.lock(batch)  # OCCUPIED; the batch boots a replacement
        w.settle()
        w.pool.set_pool_size(3, 3, 60_000)
        w.turn()  # one more VM CREATING
        self.assertEqual(w.counts(), {"OCCUPIED": 1, "READY": 1, "CREATING": 1})
        w.pool.set_pool_size(0, 1, 60_000)
        w.turn()
        self.assertEqual(w.counts(), {"OCCUPIED": 1, "KILLING": 2})
        self.assertTrue(handle_status(w.pool, handle)["assigned"])
        w.pool.set_pool_size(0, 0, 60_000)
        w.turn()
        self.assertEqual(w.counts()["OCCUPIED"], 1)

    def test_above_max_free_goes_before_ready(self) -> None:
        w, _batch = ready_world(free=3, batch_size=1, maximum=3)
        self.assertEqual(w.counts(), {"FREE": 2, "READY": 1})
        w.pool.set_pool_size(0, 1, 60_000)
        w.turn()
        self.assertEqual(w.counts(), {"READY": 1, "KILLING": 2})


class FailureTests(SynchronousTestCase):
    def test_guest_gone_while_ready_is_replaced(self) -> None:
        w, _batch = ready_world()
        victim = w.vms(VMState.READY)[0]
        w.channel.gone(victim.identity, "beacon silence")
        w.turn()
        self.assertEqual(w.state.vms[victim.vmid].state, VMState.KILLING)
        self.assertIn(victim.vmid, w.channel.revoked)
        w.settle()
        self.assertNotIn(victim.vmid, w.state.vms)
        self.assertEqual(w.counts(), {"READY": 2})

    def test_occupied_vm_dying_puts_an_event_on_its_handle(self) -> None:
        w, batch = ready_world()
        handle = w.pool.lock(batch)
        vmid = handle_status(w.pool, handle)["vmid"]
        before = w.pool.last_event_id(handle)
        w.channel.gone(w.state.vms[vmid].identity, "BYE")
        w.turn()
        answer = page_json(
            self.successResultOf(Deferred.fromCoroutine(w.pool.fetch_events(handle, before, 0)))
        )
        self.assertEqual(
            [e["data"] for e in answer["newEvents"]],
            [{"action": "vm-died", "vmid": vmid, "reason": "guest gone: BYE"}],
        )
        status = handle_status(w.pool, handle)
        self.assertFalse(status["assigned"])
        self.assertEqual(status["lost"]["vmid"], vmid)
        w.settle()
        self.assertNotIn(vmid, w.state.vms)
        self.assertEqual(w.counts(), {"READY": 2})
        self.assertFalse(handle_status(w.pool, handle)["assigned"])  # not given another VM
        w.pool.release(handle)
        self.assertRaises(UnknownHandle, w.pool.handle_status, handle)

    def test_beacon_silence_is_noticed_even_without_the_channel_saying_so(self) -> None:
        w, _batch = ready_world()
        victim, other = w.vms(VMState.READY)
        for _ in range(int(CONFIG.timeout_update) + 1):
            w.channel.beacon(other.identity)
            w.advance(1)
        self.assertEqual(w.state.vms[victim.vmid].state, VMState.KILLING)
        self.assertEqual(w.state.vms[other.vmid].state, VMState.READY)

    def test_prepare_failure_terminates_and_replaces(self) -> None:
        w = World()
        w.pool.set_pool_size(1, 2, 60_000)
        w.settle()
        w.pool.prepare_batch(1, HOME, BatchOptions())
        w.turn()
        first = w.vms(VMState.WAIT)[0].vmid
        w.channel.fail_calls("PREPARE", "browser would not start")
        w.turn()
        self.assertEqual(w.state.vms[first].state, VMState.KILLING)
        self.assertIn("browser would not start", w.state.vms[first].reason)
        w.settle()
        self.assertEqual(w.counts(), {"READY": 1})

    def test_boot_timeout_terminates_and_replaces(self) -> None:
        w = World()
        w.pool.set_pool_size(1, 1, 60_000)
        w.turn()
        w.driver.answer_boots()
        w.turn()
        (vm,) = w.vms(VMState.BOOTING)
        w.advance(CONFIG.timeout_boot)
        self.assertEqual(w.state.vms[vm.vmid].state, VMState.KILLING)
        w.driver.answer_deletes()
        w.turn()
        self.assertEqual(w.counts(), {})  # a VM that never came up: booting pauses a little
        w.advance(CONFIG.backoff_base)
        self.assertEqual(w.counts(), {"CREATING": 1})

    def test_late_boot_answer_gets_its_server_deleted(self) -> None:
        w = World()
        w.pool.set_pool_size(1, 1, 60_000)
        w.turn()
        w.advance(CONFIG.timeout_cloud)  # the boot call hangs: the VM is given up
        ((request, answer),) = w.driver.boots[:1]
        self.assertEqual(w.state.vms[request.vmid].state, VMState.KILLING)
        w.driver.boots.pop(0)
        answer.callback(w.driver.accept(request))
        w.turn()
        self.assertEqual([server for server, _ in w.driver.deletes], ["srv-1"])
        w.driver.answer_deletes()
        w.turn()
        self.assertNotIn("srv-1", w.driver.servers)

    def test_late_prepare_answer_is_dropped(self) -> None:
        w = World()
        w.pool.set_pool_size(1, 1, 60_000)
        w.settle()
        w.pool.prepare_batch(1, HOME, BatchOptions())
        w.turn()
        (_call,) = w.channel.calls
        (vm,) = w.vms(VMState.WAIT)
        w.channel.gone(vm.identity)
        w.turn()
        w.channel.answer_calls()
        w.turn()
        self.assertEqual(w.state.vms[vm.vmid].state, VMState.KILLING)

    def test_operation_that_never_answers_is_given_up(self) -> None:
        w = World()
        w.pool.set_pool_size(1, 1, 60_000)
        w.settle()
        w.pool.prepare_batch(1, HOME, BatchOptions())
        w.turn()
        (vm,) = w.vms(VMState.WAIT)
        w.advance(CONFIG.timeout_operation + CONFIG.tick_interval)
        self.assertEqual(w.state.vms[vm.vmid].state, VMState.KILLING)

    def test_a_broken_driver_never_stops_the_tick(self) -> None:
        w = World()
        w.driver.errors["list"].append(TypeError("driver bug"))
        w.advance(CONFIG.poll_interval)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        w.pool.set_pool_size(1, 1, 0)
        w.advance(all_status(w.pool)["cloud"]["backoffUntil"] / 1000 - w.clock.seconds())
        self.assertEqual(w.counts(), {"CREATING": 1})


class ValidationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.w, self.batch = ready_world(batch_size=1)
        self.pool = self.w.pool

    def test_pool_size(self) -> None:
        for args in [
            (-1, 2, 0),
            (3, 2, 0),
            (0, -1, 0),
            (0, 2, -5),
            ("1", 2, 0),
            (True, 2, 0),
            (0, 2, 10**15),
        ]:
            with self.subTest(args=args):
                self.assertRaises(InvalidRequest, self.pool.set_pool_size, *args)

    def test_prepare_batch(self) -> None:
        bad = [
            (-1, HOME),
            (CONFIG.max_pool_size + 1, HOME),
            (1, "ftp://example.org/"),
            (1, "javascript:alert(1)"),
            (1, "file:///etc/passwd"),
            (1, "http://"),
            (1, "http://example.org/" + "a" * 9000),
            (1, "http://exa mple.org/"),
            (1, ""),
        ]
        for size, homepage in bad:
            with self.subTest(size=size, homepage=homepage[:40]):
                self.assertRaises(InvalidRequest, self.pool.prepare_batch, size, homepage, BatchOptions())
        self.assertRaises(
            InvalidRequest, self.pool.prepare_batch, 1, HOME, BatchOptions(window_width=10, window_height=10)
        )
        self.assertRaises(
            InvalidRequest, self.pool.prepare_batch, 1, HOME, BatchOptions(cookies=(Cookie("", "v"),))
        )

    def test_unknown_and_cancelled(self) -> None:
        self.assertRaises(UnknownBatch, self.pool.lock, "nope")
        self.assertRaises(UnknownBatch, self.pool.cancel_batch, "nope")
        for method in (self.pool.release, self.pool.handle_status, self.pool.last_event_id):
            self.assertRaises(UnknownHandle, method, "nope")
        self.assertRaises(UnknownHandle, self.pool.renew_expire, "nope", 5)
        failure = self.failureResultOf(Deferred.fromCoroutine(self.pool.fetch_events("nope", 0, 0)))
        failure.trap(UnknownHandle)
        self.pool.cancel_batch(self.batch)
        self.pool.cancel_batch(self.batch)  # cancelling twice is fine
        self.assertRaises(BatchCancelled, self.pool.lock, self.batch)

    def test_handle_arguments(self) -> None:
        batch = self.pool.prepare_batch(1, HOME, BatchOptions())
        handle = self.pool.lock(batch)
        self.assertRaises(InvalidRequest, self.pool.renew_expire, handle, -1)
        for last_id, wait in [(-1, 0), (5, 0), (0, -1.0), (0, float("nan"))]:
            with self.subTest(last_id=last_id, wait=wait):
                failure = self.failureResultOf(
                    Deferred.fromCoroutine(self.pool.fetch_events(handle, last_id, wait))
                )
                failure.trap(InvalidRequest)

    def test_too_many_pending_locks(self) -> None:
        from vmcloud.pool.config import PoolConfig

        w = World(config=PoolConfig(prefix=PREFIX, max_pending_locks=2))
        batch = w.pool.prepare_batch(0, HOME, BatchOptions())
        w.pool.set_pool_size(0, 0, 0)
        w.pool.lock(batch)
        w.pool.lock(batch)
        self.assertRaises(InvalidRequest, w.pool.lock, batch)

    def test_stopped_service_refuses(self) -> None:
        self.successResultOf(self.pool.stopService())
        self.assertEqual(self.w.store.flushes, 1)
        self.assertRaises(ShuttingDown, self.pool.set_pool_size, 1, 1, 1)
        self.assertRaises(ShuttingDown, self.pool.lock, self.batch)
