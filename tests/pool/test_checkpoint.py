"""The pool side of the checkpoint: what is saved, and what a restarted controller recovers."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from tests.pool.answers import all_status, handle_status, page_json
from tests.pool.fakes import CONFIG, World
from vmcloud.pool.interfaces import BatchOptions, Cookie
from vmcloud.pool.model import VMState
from vmcloud.pool.service import PoolService
from vmcloud.pool.snapshot import POOL_SCHEMA, SnapshotError, restore, snapshot
from vmcloud.store.checkpoint import (
    CheckpointStore,
    CheckpointUnreadableError,
    decode_checkpoint,
    encode_checkpoint,
)
from vmcloud.threads import synchronous_dispatch

HOME = "http://example.org/"


def busy_world() -> tuple[World, dict[str, str]]:
    """A pool with VMs FREE, READY, OCCUPIED (with events) and WAIT (a PREPARE for a pending lock)."""
    w = World()
    w.pool.set_pool_size(4, 4, 600_000)
    w.settle()
    options = BatchOptions(cookies=(Cookie("a", "b", expires=12.5),), audio=True)
    batch = w.pool.prepare_batch(1, HOME, options)
    w.settle()
    handle = w.pool.lock(batch)
    occupied = handle_status(w.pool, handle)["vmid"]
    w.channel.event(w.state.vms[occupied].identity, {"action": "page-load", "url": HOME, "title": "t"})
    w.settle()  # the batch's replacement is prepared from a FREE VM
    empty = w.pool.prepare_batch(0, HOME, BatchOptions())
    waiting = w.pool.lock(empty)
    w.turn()  # a FREE VM is being prepared for the waiting lock; the answer never comes
    names = {"batch": batch, "empty": empty, "handle": handle, "occupied": occupied, "waiting": waiting}
    return w, names


def restarted(w: World, damage: Callable[[dict], dict | None] | None = None) -> World:
    """A new controller on the same cloud, started from ``w``'s checkpoint (``damage``d first)."""
    w.clock.advance(CONFIG.checkpoint_interval)  # the last checkpoint is written
    checkpoint = w.store.checkpoint if damage is None else damage(dict(w.store.checkpoint or {}))
    again = World(checkpoint=checkpoint, start=False, now=w.clock.seconds() + 5)
    again.driver.servers = dict(w.driver.servers)
    again.driver._next = 100
    again.start()
    return again


class SnapshotTests(SynchronousTestCase):
    def test_every_change_is_checkpointed_once_per_turn(self) -> None:
        w = World()
        w.advance(1)
        saves = len(w.store.saves)
        batch = w.pool.prepare_batch(0, HOME, BatchOptions())
        w.pool.lock(batch)
        w.pool.lock(batch)
        w.turn()
        self.assertEqual(len(w.store.saves), saves + 1)
        saved = w.store.saves[-1]
        self.assertEqual(saved["schema"], POOL_SCHEMA)
        self.assertEqual(len(saved["pending"]), 2)
        w.pool.lock(batch)
        w.turn()
        self.assertEqual(len(w.store.saves), saves + 1)  # not again within checkpoint_interval...
        w.advance(CONFIG.checkpoint_interval)
        self.assertEqual(len(w.store.saves), saves + 2)  # ...but then, with every change
        self.assertEqual(len(w.store.saves[-1]["pending"]), 3)
        w.advance(1)
        self.assertEqual(len(w.store.saves), saves + 2)  # nothing changed, nothing written

    def test_snapshot_is_json_and_round_trips(self) -> None:
        w, _ = busy_world()
        data = decode_checkpoint(encode_checkpoint(w.pool.snapshot(), 0.0))[1]
        state = restore(data, w.clock.seconds(), CONFIG)
        again = snapshot(state)
        self.assertEqual(again["batches"], data["batches"])
        self.assertEqual(again["pending"], data["pending"])
        self.assertEqual(again["spec"], data["spec"])
        self.assertEqual([h["events"] for h in again["handles"]], [h["events"] for h in data["handles"]])

    def test_unreadable_snapshots_are_refused_whole(self) -> None:
        w, _ = busy_world()
        good = w.pool.snapshot()
        for broken in [
            {**good, "schema": 99},
            {**good, "vms": [{"vmid": "x"}]},
            {**good, "vms": [{**good["vms"][0], "state": "DANCING"}]},
            {**good, "handles": "nope"},
            {**good, "spec": {"min": "1", "max": 2, "linger": 0}},
            {k: v for k, v in good.items() if k != "epoch"},
            [],
        ]:
            with self.subTest(broken=str(broken)[:60]):
                self.assertRaises(SnapshotError, restore, broken, 0.0, CONFIG)

    def test_cached_records_make_the_same_snapshot(self) -> None:
        w, _ = busy_world()
        first = w.pool.snapshot()
        w.channel.event("nobody", {"action": "x"})
        self.assertEqual(w.pool.snapshot(), first)


class RecoveryTests(SynchronousTestCase):
    def test_stable_vms_wait_for_hello_and_the_rest_is_terminated(self) -> None:
        w, names = busy_world()
        before = {vm.vmid: vm.state for vm in w.vms()}
        self.assertEqual(sorted(s.value for s in before.values()), ["FREE", "OCCUPIED", "READY", "WAIT"])
        b = restarted(w)
        stable = {vmid for vmid, s in before.items() if s in (VMState.FREE, VMState.READY, VMState.OCCUPIED)}
        for vmid in stable:
            self.assertTrue(b.state.vms[vmid].recovering, vmid)
            self.assertEqual(b.state.vms[vmid].state, before[vmid])
            self.assertEqual(b.channel.restored[vmid].login, f"vm-{vmid}")
        preparing = next(vmid for vmid, s in before.items() if s is VMState.WAIT)
        self.assertEqual(b.state.vms[preparing].state, VMState.KILLING)  # mid-operation: terminated
        # handles, batches, pending locks and events survived
        status = handle_status(b.pool, names["handle"])
        self.assertTrue(status["assigned"])
        self.assertTrue(status["vm"]["recovering"])
        self.assertIsNotNone(status["vm"]["audio"])
        self.assertFalse(handle_status(b.pool, names["waiting"])["assigned"])
        events = page_json(
            self.successResultOf(Deferred.fromCoroutine(b.pool.fetch_events(names["handle"], 0, 0)))
        )
        self.assertEqual(events["newEvents"][-1]["data"]["action"], "page-load")
        self.assertEqual([p["handle"] for p in all_status(b.pool)["pendingLocks"]], [names["waiting"]])
        # no new work for recovering VMs: the waiting lock gets no READY VM of another batch
        self.assertEqual(b.channel.calls, [])

    def test_guests_saying_hello_again_are_back_in_service(self) -> None:
        w, names = busy_world()
        b = restarted(w)
        for vm in b.vms():
            b.channel.hello(vm.login, login=vm.login)
        b.turn()
        self.assertFalse(any(vm.recovering for vm in b.vms()))
        b.settle()
        self.assertTrue(handle_status(b.pool, names["waiting"])["assigned"])
        self.assertTrue(handle_status(b.pool, names["handle"])["assigned"])

    def test_a_guest_silent_after_the_restart_is_terminated_and_its_handle_told(self) -> None:
        w, names = busy_world()
        b = restarted(w)
        for vm in b.vms():
            if vm.vmid != names["occupied"]:
                b.channel.hello(vm.login, login=vm.login)
        b.advance(CONFIG.timeout_update - 1)
        self.assertTrue(handle_status(b.pool, names["handle"])["assigned"])
        b.advance(1)
        self.assertEqual(b.state.vms[names["occupied"]].state, VMState.KILLING)
        status = handle_status(b.pool, names["handle"])
        self.assertFalse(status["assigned"])
        self.assertEqual(status["lost"]["reason"], "no HELLO after the restart")

    def test_a_vm_whose_server_is_gone_is_not_recovered(self) -> None:
        w, names = busy_world()
        server = w.state.vms[names["occupied"]].server_id
        del w.driver.servers[server]
        b = restarted(w)
        self.assertEqual(b.state.vms[names["occupied"]].reason, "server gone from the cloud")
        b.driver.answer_deletes()
        b.turn()
        self.assertNotIn(names["occupied"], b.state.vms)
        events = page_json(
            self.successResultOf(Deferred.fromCoroutine(b.pool.fetch_events(names["handle"], 0, 0)))
        )
        self.assertEqual(events["newEvents"][-1]["data"]["action"], "vm-died")

    def test_vms_mid_operation_are_terminated(self) -> None:
        w = World()
        w.pool.set_pool_size(2, 3, 0)
        w.settle()
        w.pool.prepare_batch(3, HOME, BatchOptions())
        w.turn()  # two FREE VMs are prepared, a third VM boots
        first, second = w.channel.calls
        w.channel.calls = [second]
        first.answer.callback({})  # one READY; the other PREPARE stays in flight
        w.driver.answer_boots()  # and the third VM is BOOTING
        w.turn()
        (preparing,) = w.vms(VMState.WAIT)
        (booting,) = w.vms(VMState.BOOTING)
        (ready,) = w.vms(VMState.READY)
        b = restarted(w)
        self.assertEqual(b.state.vms[preparing.vmid].state, VMState.KILLING)
        self.assertEqual(b.state.vms[booting.vmid].state, VMState.KILLING)
        self.assertTrue(b.state.vms[ready.vmid].recovering)
        self.assertEqual(
            sorted(s for s, _ in b.driver.deletes), sorted([preparing.server_id, booting.server_id])
        )

    def test_a_corrupt_checkpoint_starts_clean_and_reaps_the_servers(self) -> None:
        w, _ = busy_world()
        b = restarted(w, lambda data: {**data, "schema": 99})
        self.assertEqual(b.counts(), {})
        self.assertEqual(all_status(b.pool)["batches"], [])
        b.advance(CONFIG.poll_interval)
        b.driver.answer_lists()
        b.turn()
        self.assertEqual(sorted(s for s, _ in b.driver.deletes), sorted(w.driver.servers))

    def test_no_checkpoint_means_a_clean_start_that_reaps_every_server(self) -> None:
        w, _ = busy_world()
        b = restarted(w, lambda data: None)
        self.assertEqual(b.counts(), {})
        b.advance(CONFIG.poll_interval)
        b.driver.answer_lists()
        b.turn()
        self.assertEqual(sorted(s for s, _ in b.driver.deletes), sorted(w.driver.servers))


class RealStoreTests(SynchronousTestCase):
    """The pool's snapshots through the real checkpoint store, to disk and back."""

    def store(self, directory: FilePath[str], clock: object) -> CheckpointStore:
        return CheckpointStore(directory, dispatch=synchronous_dispatch, clock=clock)  # type: ignore[arg-type]

    def test_a_restart_from_the_file_recovers_the_pool(self) -> None:
        directory = FilePath(self.mktemp())
        directory.makedirs()
        w = World(start=False)
        w.store = w.pool._store = self.store(directory, w.clock)  # type: ignore[attr-defined]
        w.pool._reconciler.store = w.store
        w.start()
        w.pool.set_pool_size(1, 2, 0)
        w.settle()
        batch = w.pool.prepare_batch(1, HOME, BatchOptions())
        w.settle()
        handle = w.pool.lock(batch)
        self.successResultOf(w.pool.stopService())
        self.assertTrue(directory.child("checkpoint.json").exists())

        b = World(start=False, now=w.clock.seconds() + 1)
        b.driver.servers = dict(w.driver.servers)
        b.store = self.store(directory, b.clock)
        b.pool = PoolService(b.clock, b.driver, b.channel, b.store, CONFIG, epoch="other")
        b.start()
        self.assertTrue(handle_status(b.pool, handle)["assigned"])
        (kept,) = w.vms()
        self.assertTrue(b.state.vms[kept.vmid].recovering)
        self.assertEqual(b.vms(VMState.CREATING)[0].vmid, "e-2")  # vmids go on from the first life

    def test_an_unreadable_checkpoint_stops_the_start_rather_than_reaping(self) -> None:
        directory = FilePath(self.mktemp())
        directory.makedirs()
        directory.child("checkpoint.json").makedirs()  # exists, cannot be read as a file
        w = World(start=False)
        w.pool = PoolService(w.clock, w.driver, w.channel, self.store(directory, w.clock), CONFIG)
        self.assertRaises(CheckpointUnreadableError, w.pool.startService)
        self.assertEqual(w.driver.deletes, [])
