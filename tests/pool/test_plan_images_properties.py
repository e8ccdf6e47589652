"""Properties of the rolling replacement of an image in ``plan()``, over arbitrary pools.

* a VM a handle holds, a READY one and one being prepared or cleaned are never retired;
* planning again on the marked state proposes nothing (outdated VMs or not);
* a pool of outdated VMs in a healthy cloud ends up all up to date, never with fewer VMs up than
  its minimum on the way (one fewer at most when the minimum is also the maximum).
"""

from __future__ import annotations

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.pool.test_plan_properties import CONFIG, FAST, NOW, held_vms, pools, step_world
from vmcloud.pool.config import PoolConfig
from vmcloud.pool.model import VM, PoolSpec, VMState
from vmcloud.pool.plan import OUTDATED, Delete, apply, plan
from vmcloud.pool.state import PoolState

UP = (VMState.FREE, VMState.WAIT, VMState.READY, VMState.OCCUPIED)


@st.composite
def outdated_pools(draw: st.DrawFn) -> tuple[PoolConfig, PoolState, frozenset[str]]:
    config, state = draw(pools())
    outdated = frozenset(vmid for vmid in state.vms if draw(st.booleans()))
    return config, state, outdated


def up(state: PoolState) -> int:
    return sum(1 for vm in state.vms.values() if vm.state in UP)


class RetireProperties(SynchronousTestCase):
    @FAST
    @given(outdated_pools())
    def test_only_free_and_released_vms_are_retired(self, pool: tuple) -> None:
        config, state, outdated = pool
        held = held_vms(state)
        before = dict(state.vms)
        for action in plan(config, state, NOW, outdated):
            if isinstance(action, Delete) and action.reason == OUTDATED:
                vm = before[action.vmid]
                self.assertIn(action.vmid, outdated)
                self.assertNotIn(action.vmid, held)
                self.assertIn(vm.state, (VMState.FREE, VMState.OCCUPIED))

    @FAST
    @given(outdated_pools())
    def test_replanning_the_marked_state_proposes_nothing(self, pool: tuple) -> None:
        config, state, outdated = pool
        for action in plan(config, state, NOW, outdated):
            apply(state, action, NOW, config)
        self.assertEqual(plan(config, state, NOW, outdated), [])

    @FAST
    @given(st.integers(0, 6), st.integers(0, 4), st.integers(0, 6))
    def test_a_healthy_cloud_replaces_everything_keeping_the_minimum_up(
        self, minimum: int, room: int, extra: int
    ) -> None:
        maximum = minimum + room
        config = attrs.evolve(CONFIG, max_pool_size=maximum)
        state = PoolState("t", PoolSpec(minimum, maximum, 10**7))
        for _ in range(min(minimum + extra, maximum)):
            vmid = state.vmid_for(state.next_vmid)
            state.next_vmid += 1
            state.put(
                VM(vmid, VMState.FREE, NOW, version=1, since=NOW, server_id=f"s-{vmid}", identity=f"g-{vmid}")
            )
        old = frozenset(state.vms)
        floor = min(minimum, len(old)) - (1 if room == 0 else 0)
        now = NOW
        for _ in range(60):
            for action in plan(config, state, now, old):
                apply(state, action, now, config)
            self.assertGreaterEqual(up(state), floor, state)
            step_world(state, now)
            now += 1.0
            if not old & {vmid for vmid, vm in state.vms.items() if vm.alive}:
                break
        self.assertEqual(old & set(state.vms), set())
        self.assertGreaterEqual(up(state), minimum)
