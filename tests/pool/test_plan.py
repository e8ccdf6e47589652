"""Single rules of ``plan()`` on small hand-made pools."""

from __future__ import annotations

import attrs
from twisted.trial.unittest import SynchronousTestCase

from vmcloud.pool.config import PoolConfig
from vmcloud.pool.interfaces import BatchOptions
from vmcloud.pool.model import VM, CloudHealth, PoolSpec, Stray, VMState
from vmcloud.pool.plan import (
    Assign,
    Boot,
    Cleanup,
    Delete,
    DeleteServer,
    DropBatch,
    Prepare,
    ReleaseHandle,
    apply,
    plan,
    preparation_queue,
)
from vmcloud.pool.state import PoolState

NOW = 5_000.0
CONFIG = PoolConfig(max_pool_size=10, timeout_cloud=10.0, timeout_boot=100.0, timeout_update=20.0)


def pool(minimum: int = 0, maximum: int = 10, linger_ms: int = 60_000) -> PoolState:
    return PoolState("p", PoolSpec(minimum, maximum, linger_ms))


def add(state: PoolState, kind: VMState, batch: str | None = None, age: float = 0.0, **kw: object) -> str:
    vmid = state.vmid_for(state.next_vmid)
    state.next_vmid += 1
    fields: dict[str, object] = {"since": NOW - age, "last_used": NOW - age}
    if kind is not VMState.CREATING:
        fields["server_id"] = f"srv-{vmid}"
    if kind in (VMState.FREE, VMState.READY, VMState.WAIT, VMState.OCCUPIED):
        fields["identity"] = f"g-{vmid}"
    fields.update(kw)
    state.put(VM(vmid=vmid, state=kind, created_at=NOW - age, version=1, batch=batch, **fields))  # type: ignore[arg-type]
    return vmid


def batch(state: PoolState, size: int, cancelled: bool = False) -> str:
    found = state.add_batch(size, "http://example.org/", BatchOptions(), NOW)
    if cancelled:
        state.cancel_batch(found.id)
    return found.id


class GrowTests(SynchronousTestCase):
    def test_boots_up_to_min(self) -> None:
        state = pool(minimum=3)
        add(state, VMState.FREE)
        self.assertEqual(plan(CONFIG, state, NOW), [Boot("p-2"), Boot("p-3")])

    def test_boots_for_the_queue_beyond_what_is_booting(self) -> None:
        state = pool()
        b = batch(state, 3)
        add(state, VMState.BOOTING)
        add(state, VMState.FREE)
        actions = plan(CONFIG, state, NOW)
        self.assertEqual(actions, [Prepare("p-2", b), Boot("p-3")])

    def test_no_boot_while_the_cloud_backs_off_or_the_quota_is_out(self) -> None:
        state = pool(minimum=2)
        for health in (CloudHealth(failures=1, backoff_until=NOW + 1), CloudHealth(quota_until=NOW + 1)):
            state.cloud = health
            self.assertEqual(plan(CONFIG, state, NOW), [])

    def test_one_probe_at_a_time_after_a_failure(self) -> None:
        state = pool(minimum=4)
        state.cloud = CloudHealth(failures=3)
        self.assertEqual(plan(CONFIG, state, NOW), [Boot("p-1")])
        add(state, VMState.CREATING)
        self.assertEqual(plan(CONFIG, state, NOW), [])

    def test_the_cap_clamps_everything(self) -> None:
        state = pool(minimum=20, maximum=30)
        self.assertEqual(len(plan(attrs.evolve(CONFIG, max_pool_size=4), state, NOW)), 4)


class QueueTests(SynchronousTestCase):
    def test_pending_locks_come_before_batch_sizes(self) -> None:
        state = pool(maximum=0)
        first = batch(state, 2)
        second = batch(state, 0)
        state.add_handle(second, "h1", NOW)
        # the second batch (size 0) wants one VM for its lock, and comes first; the first its 2
        self.assertEqual(preparation_queue(state, NOW), [second, first, first])

    def test_ready_vms_serve_locks_first_come_first_served(self) -> None:
        state = pool()
        b = batch(state, 0)
        ready = add(state, VMState.READY, batch=b)
        state.add_handle(b, "h1", NOW)
        state.add_handle(b, "h2", NOW)
        actions = plan(CONFIG, state, NOW)
        self.assertEqual(actions[0], Assign("h1", ready))
        self.assertIn(Boot("p-2"), actions)

    def test_a_lock_nobody_can_boot_for_takes_an_idle_ready_vm(self) -> None:
        state = pool(maximum=2)
        full = batch(state, 2)
        a, b_ = add(state, VMState.READY, batch=full), add(state, VMState.READY, batch=full)
        other = batch(state, 0)
        state.add_handle(other, "h1", NOW)
        actions = plan(CONFIG, state, NOW)
        self.assertEqual(actions, [Cleanup(a, "taken for a pending lock")])
        for action in actions:
            apply(state, action, NOW, CONFIG)
        self.assertEqual(plan(CONFIG, state, NOW), [])
        state.cleanup_done(a, state.vms[a].version, NOW)
        self.assertEqual(plan(CONFIG, state, NOW), [Prepare(a, other)])
        self.assertEqual(state.vms[b_].state, VMState.READY)

    def test_cancelled_batch_cleans_its_ready_vms_and_goes(self) -> None:
        state = pool()
        b = batch(state, 2, cancelled=True)
        vm = add(state, VMState.READY, batch=b)
        actions = plan(CONFIG, state, NOW)
        self.assertEqual(actions, [Cleanup(vm, "batch cancelled"), DropBatch(b)])

    def test_cancelled_batch_waits_for_its_preparations(self) -> None:
        state = pool()
        b = batch(state, 2, cancelled=True)
        add(state, VMState.WAIT, batch=b)
        self.assertEqual(plan(CONFIG, state, NOW), [])


class ShrinkTests(SynchronousTestCase):
    def test_kill_order_booting_then_free_then_ready(self) -> None:
        state = pool(maximum=1)
        b = batch(state, 1)
        ready = add(state, VMState.READY, batch=b)
        free = add(state, VMState.FREE)
        booting = add(state, VMState.BOOTING)
        creating = add(state, VMState.CREATING)
        kills = [a.vmid for a in plan(CONFIG, state, NOW) if isinstance(a, Delete)]
        self.assertEqual(kills, [creating, booting, free])
        self.assertEqual(state.vms[ready].state, VMState.READY)

    def test_linger_kills_the_longest_idle_above_min(self) -> None:
        state = pool(minimum=1, linger_ms=10_000)
        old = add(state, VMState.FREE, age=30)
        add(state, VMState.FREE, age=20)
        add(state, VMState.FREE, age=5)
        actions = plan(CONFIG, state, NOW)
        self.assertEqual(
            actions, [Delete(old, "idle longer than linger"), Delete("p-2", "idle longer than linger")]
        )

    def test_a_held_vm_is_never_killed_for_size(self) -> None:
        state = pool(maximum=0)
        b = batch(state, 0)
        vm = add(state, VMState.READY, batch=b)
        state.add_handle(b, "h", NOW)
        state.assign("h", vm, NOW)
        self.assertEqual(plan(CONFIG, state, NOW), [])


class TimeoutTests(SynchronousTestCase):
    def test_each_state_has_its_timeout(self) -> None:
        state = pool(minimum=0, maximum=0)
        state.spec = PoolSpec(0, 10, 60_000)
        creating = add(state, VMState.CREATING, age=10)
        booting = add(state, VMState.BOOTING, age=100)
        waiting = add(
            state, VMState.WAIT, age=CONFIG.timeout_operation + CONFIG.tick_interval, reason="prepare"
        )
        fresh = add(state, VMState.BOOTING, age=99)
        kills = {a.vmid: a.reason for a in plan(CONFIG, state, NOW) if isinstance(a, Delete)}
        self.assertEqual(set(kills), {creating, booting, waiting})
        self.assertNotIn(fresh, kills)
        self.assertEqual(kills[waiting], "prepare timed out")

    def test_failed_delete_is_retried_and_an_unanswered_boot_forgotten(self) -> None:
        state = pool()
        killing = add(state, VMState.KILLING, age=10)
        ghost = add(state, VMState.KILLING, age=10, server_id=None)
        recent = add(state, VMState.KILLING, age=9)
        actions = plan(CONFIG, state, NOW)
        self.assertEqual({a.vmid for a in actions if isinstance(a, Delete)}, {killing, ghost})
        for action in actions:
            apply(state, action, NOW, CONFIG)
        self.assertNotIn(ghost, state.vms)
        self.assertEqual(state.vms[killing].since, NOW)
        self.assertIn(recent, state.vms)

    def test_expired_handles_are_released_and_their_vm_cleaned(self) -> None:
        state = pool()
        b = batch(state, 0)
        vm = add(state, VMState.READY, batch=b)
        state.add_handle(b, "h", NOW)
        state.assign("h", vm, NOW)
        state.set_expiry("h", NOW)
        actions = plan(CONFIG, state, NOW)
        self.assertEqual(actions, [ReleaseHandle("h", "expired"), Cleanup(vm, "released")])


class StrayTests(SynchronousTestCase):
    def test_strays_seen_twice_are_deleted_unless_the_cloud_backs_off(self) -> None:
        state = pool()
        state.strays = {"a": Stray("a", "pool-x", seen=1), "b": Stray("b", "pool-y", seen=2)}
        self.assertEqual(plan(CONFIG, state, NOW), [DeleteServer("b", "pool-y")])
        state.cloud = CloudHealth(failures=1, backoff_until=NOW + 1)
        self.assertEqual(plan(CONFIG, state, NOW), [])


class DeleteBudgetTests(SynchronousTestCase):
    """At most ``max_deletes_in_flight`` terminations under way: thousands go by in short passes."""

    config = attrs.evolve(CONFIG, max_pool_size=100, max_deletes_in_flight=4)

    def apply_all(self, state: PoolState, actions: list) -> None:  # type: ignore[type-arg]
        for action in actions:
            apply(state, action, NOW, self.config)

    def test_a_shutdown_starts_a_budget_of_deletes_per_round(self) -> None:
        state = pool(maximum=100)
        vms = [add(state, VMState.FREE) for _ in range(10)]
        state.shutting_down = True
        first = plan(self.config, state, NOW)
        self.assertEqual([a.vmid for a in first], vms[:4])  # type: ignore[union-attr]
        self.apply_all(state, first)
        self.assertEqual(plan(self.config, state, NOW), [])  # the marks use the budget up
        for vmid in vms[:3]:  # three deletes answered: three more may start
            state.delete_done(vmid, state.vms[vmid].server_id)
        self.assertEqual([a.vmid for a in plan(self.config, state, NOW)], vms[4:7])  # type: ignore[union-attr]

    def test_dead_vms_come_before_size_and_strays_count_too(self) -> None:
        state = pool(maximum=0)
        free = [add(state, VMState.FREE) for _ in range(3)]
        dead = add(state, VMState.ERROR, reason="broken", identity="g-dead")
        state.strays = {"s": Stray("s", "pool-s", seen=2)}
        actions = plan(self.config, state, NOW)
        self.assertEqual(
            actions,
            [
                Delete(dead, "broken"),
                DeleteServer("s", "pool-s"),
                *(Delete(v, "above the maximum pool size") for v in free[:2]),
            ],
        )

    def test_a_delete_older_than_the_cloud_timeout_no_longer_holds_a_place(self) -> None:
        state = pool(maximum=0)
        for _ in range(4):
            add(state, VMState.KILLING, age=1.0)
        free = add(state, VMState.FREE)
        self.assertEqual(plan(self.config, state, NOW), [])  # four in flight: the FREE VM waits
        later = NOW + self.config.timeout_cloud
        kills = [a.vmid for a in plan(self.config, state, later) if isinstance(a, Delete)]
        self.assertEqual(len(kills), 4)  # four retries take the four places; the FREE VM still waits
        self.assertNotIn(free, kills)
