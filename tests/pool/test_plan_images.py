"""The rolling replacement of an image in ``plan()``: outdated VMs go as replacements come up."""

from __future__ import annotations

import attrs
from twisted.trial.unittest import SynchronousTestCase

from tests.pool.test_plan import CONFIG, NOW, add, batch, pool
from vmcloud.pool.model import VM, CloudHealth, VMState
from vmcloud.pool.plan import OUTDATED, Boot, Cleanup, Delete, Prepare, apply, plan
from vmcloud.pool.state import PoolState

OLD, NEW = "image-a", "image-b"


def old(state: PoolState, kind: VMState, **kw: object) -> str:
    """A VM booted from the old image."""
    return add(state, kind, image=OLD, **kw)


def outdated(state: PoolState) -> frozenset[str]:
    """What the reconciler finds at a listing: the VMs booted from another image than NEW."""
    return frozenset(vmid for vmid, vm in state.vms.items() if vm.outdated(NEW))


def retired(actions: list[object]) -> list[str]:
    return [a.vmid for a in actions if isinstance(a, Delete) and a.reason == OUTDATED]


def run(state: PoolState, now: float = NOW) -> list[object]:
    """Plan with the VMs found outdated, and apply the marks, as a pass does."""
    actions = plan(CONFIG, state, now, outdated(state))
    for action in actions:
        apply(state, action, now, CONFIG)
    return list(actions)


def up(state: PoolState) -> int:
    """VMs that serve or can serve now (neither booting nor on their way out)."""
    return sum(1 for vm in state.vms.values() if vm.state in (VMState.FREE, VMState.READY, VMState.OCCUPIED))


class OutdatedTests(SynchronousTestCase):
    def test_a_vm_is_outdated_when_its_image_is_known_and_another(self) -> None:
        vm = VM("v", VMState.FREE, 0.0, image=OLD)
        self.assertTrue(vm.outdated(NEW))
        self.assertFalse(vm.outdated(OLD))
        self.assertFalse(vm.outdated(None))  # a driver without images
        self.assertFalse(attrs.evolve(vm, image=None).outdated(NEW))  # not listed yet

    def test_nothing_outdated_plans_as_before(self) -> None:
        state = pool(minimum=3)
        add(state, VMState.FREE, image=NEW)
        self.assertEqual(plan(CONFIG, state, NOW, outdated(state)), plan(CONFIG, state, NOW))

    def test_ids_of_vms_gone_are_ignored(self) -> None:
        state = pool(minimum=1)
        add(state, VMState.FREE, image=NEW)
        self.assertEqual(plan(CONFIG, state, NOW, {"p-99"}), [])


class ReleasedTests(SynchronousTestCase):
    def test_a_released_outdated_vm_is_terminated_not_cleaned(self) -> None:
        state = pool(minimum=2)
        b = batch(state, 0)
        stale = old(state, VMState.OCCUPIED, batch=b)
        fresh = add(state, VMState.OCCUPIED, batch=b, image=NEW)
        actions = run(state)
        self.assertEqual(retired(actions), [stale])
        self.assertIn(Cleanup(fresh, "released"), actions)
        self.assertNotIn(Cleanup(stale, "released"), actions)
        self.assertIn(Boot("p-3"), actions)  # its replacement, in the same pass
        self.assertEqual(state.vms[stale].state, VMState.KILLING)

    def test_a_held_vm_stays_until_released_then_goes(self) -> None:
        state = pool(minimum=1)
        b = batch(state, 0)
        stale = old(state, VMState.READY, batch=b)
        state.add_handle(b, "h", NOW)
        self.assertEqual(retired(run(state)), [])
        self.assertEqual((state.vms[stale].state, state.vms[stale].handle), (VMState.OCCUPIED, "h"))
        self.assertEqual(retired(run(state)), [])
        state.release_handle("h")
        self.assertEqual(retired(run(state)), [stale])

    def test_an_expired_handle_lets_its_outdated_vm_go(self) -> None:
        state = pool(minimum=0)
        b = batch(state, 0)
        stale = old(state, VMState.READY, batch=b)
        state.add_handle(b, "h", NOW)
        state.assign("h", stale, NOW)
        state.set_expiry("h", NOW)
        actions = run(state)
        self.assertEqual(retired(actions), [stale])
        self.assertNotIn("h", state.handles)

    def test_without_a_delete_to_spend_a_released_outdated_vm_waits_uncleaned(self) -> None:
        state = pool(minimum=0)
        b = batch(state, 0)
        stale = old(state, VMState.OCCUPIED, batch=b)
        tight = attrs.evolve(CONFIG, max_deletes_in_flight=1)
        add(state, VMState.KILLING)  # the one delete under way
        actions = plan(tight, state, NOW, outdated(state))
        self.assertEqual(actions, [])
        self.assertEqual(state.vms[stale].state, VMState.OCCUPIED)

    def test_ready_and_preparing_vms_are_never_touched(self) -> None:
        state = pool(minimum=0, maximum=10)
        b = batch(state, 2)
        ready = old(state, VMState.READY, batch=b)
        preparing = old(state, VMState.WAIT, batch=b, reason="prepare")
        add(state, VMState.FREE, image=NEW)
        add(state, VMState.FREE, image=NEW)
        self.assertEqual(retired(run(state)), [])
        self.assertEqual(state.vms[ready].state, VMState.READY)
        self.assertEqual(state.vms[preparing].state, VMState.WAIT)


class FreeTests(SynchronousTestCase):
    def test_at_the_minimum_replacements_boot_first(self) -> None:
        state = pool(minimum=3)
        stale = [old(state, VMState.FREE) for _ in range(3)]
        actions = run(state)
        self.assertEqual(retired(actions), [])
        self.assertEqual([a for a in actions if isinstance(a, Boot)], [Boot("p-4"), Boot("p-5"), Boot("p-6")])
        self.assertEqual(run(state), [])  # they are booting: nothing more to do
        self.assertEqual([state.vms[v].state for v in stale], [VMState.FREE] * 3)

    def test_one_goes_per_replacement_that_comes_up_the_longest_idle_first(self) -> None:
        state = pool(minimum=3)
        stale = [old(state, VMState.FREE, age=30 - i) for i in range(3)]
        run(state)
        booting = [vmid for vmid, vm in state.vms.items() if vm.state is VMState.CREATING]
        for n, vmid in enumerate(booting):
            state.put(
                attrs.evolve(state.vms[vmid], state=VMState.FREE, server_id=f"s-{vmid}", identity=f"g-{vmid}")
            )
            self.assertEqual(retired(run(state)), [stale[n]])
            self.assertEqual(up(state), 3)
        self.assertEqual(run(state), [])
        self.assertEqual(
            sorted(v for v, vm in state.vms.items() if vm.state is VMState.FREE), sorted(booting)
        )

    def test_above_the_minimum_they_go_at_once_down_to_it(self) -> None:
        state = pool(minimum=2, linger_ms=10**9)
        stale = [old(state, VMState.FREE, age=10 - i) for i in range(5)]
        actions = run(state)
        self.assertEqual(retired(actions), stale[:3])
        self.assertEqual([a for a in actions if isinstance(a, Boot)], [Boot("p-6"), Boot("p-7")])

    def test_held_vms_count_towards_the_minimum(self) -> None:
        # a pool of 3: one lent, two FREE, all of the old image: two replacements, not three
        state = pool(minimum=3)
        b = batch(state, 0)
        lent = old(state, VMState.READY, batch=b)
        state.add_handle(b, "h", NOW)
        state.assign("h", lent, NOW)
        old(state, VMState.FREE)
        old(state, VMState.FREE)
        actions = run(state)
        self.assertEqual(retired(actions), [])
        self.assertEqual(len([a for a in actions if isinstance(a, Boot)]), 2)

    def test_up_to_date_vms_are_prepared_first(self) -> None:
        state = pool(minimum=2, maximum=10)
        stale = old(state, VMState.FREE, age=50)
        fresh = add(state, VMState.FREE, image=NEW, age=1)
        b = batch(state, 1)
        self.assertIn(Prepare(fresh, b), run(state))
        self.assertEqual(state.vms[stale].state, VMState.FREE)

    def test_an_outdated_vm_serves_a_batch_when_no_other_is_free(self) -> None:
        state = pool(minimum=1, maximum=10)
        stale = old(state, VMState.FREE)
        b = batch(state, 1)
        actions = run(state)
        self.assertIn(Prepare(stale, b), actions)
        self.assertEqual(retired(actions), [])

    def test_linger_leaves_the_old_vms_while_their_replacements_boot(self) -> None:
        state = pool(minimum=2, linger_ms=1_000)
        stale = [old(state, VMState.FREE, age=100) for _ in range(2)]
        run(state)
        self.assertEqual(run(state, NOW + 5), [])  # linger (1 s) is long past for both
        self.assertEqual([state.vms[v].state for v in stale], [VMState.FREE] * 2)

    def test_a_recovering_vm_is_left_alone(self) -> None:
        state = pool(minimum=0)
        stale = old(state, VMState.FREE, recovering=True)
        add(state, VMState.FREE, image=NEW)
        self.assertEqual(retired(run(state)), [])
        self.assertEqual(state.vms[stale].state, VMState.FREE)


class AtTheMaximumTests(SynchronousTestCase):
    def test_one_at_a_time_when_no_replacement_can_boot_first(self) -> None:
        state = pool(minimum=3, maximum=3)
        stale = [old(state, VMState.FREE, age=30 - i) for i in range(3)]
        actions = run(state)
        self.assertEqual(retired(actions), [stale[0]])
        self.assertIn(Boot("p-4"), actions)
        self.assertEqual(run(state), [])  # its replacement boots: the others wait
        state.put(attrs.evolve(state.vms["p-4"], state=VMState.FREE, server_id="s-4", identity="g-4"))
        self.assertEqual(retired(run(state)), [stale[1]])

    def test_never_while_boots_fail(self) -> None:
        # a broken new image: its VMs die before HELLO; the old ones keep the pool
        state = pool(minimum=2, maximum=2)
        old(state, VMState.FREE)
        old(state, VMState.FREE)
        for health in (
            CloudHealth(boot_failures=1),
            CloudHealth(boot_failures=1, boot_backoff_until=NOW + 5),
            CloudHealth(quota_failures=1, quota_until=NOW + 5),
        ):
            state.cloud = health
            self.assertEqual(retired(plan(CONFIG, state, NOW, outdated(state))), [])

    def test_never_below_the_minimum_when_replacements_cannot_come(self) -> None:
        state = pool(minimum=2, maximum=5)
        old(state, VMState.FREE)
        old(state, VMState.FREE)
        state.cloud = CloudHealth(quota_failures=1, quota_until=NOW + 60)
        self.assertEqual(run(state), [])
