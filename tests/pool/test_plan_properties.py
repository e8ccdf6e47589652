"""Properties of ``plan()`` over arbitrary pools (issue #3, acceptance 3).

* never above max or the hard cap (only VMs held by a handle, which are never killed for size, may
  keep the pool above it);
* never an OCCUPIED VM a handle holds killed for pool size (or linger);
* planning again on the state the first plan marked proposes nothing;
* every pending lock is eventually served when the pool may hold enough VMs.
"""

from __future__ import annotations

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from vmcloud.pool.config import PoolConfig
from vmcloud.pool.interfaces import BatchOptions, GuestInfo
from vmcloud.pool.model import STABLE, VM, CloudHealth, PoolSpec, Stray, VMState
from vmcloud.pool.plan import Assign, Boot, Cleanup, Delete, Prepare, apply, effective_size, plan
from vmcloud.pool.state import PoolState

NOW = 10_000.0
CONFIG = PoolConfig(
    max_pool_size=12,
    timeout_boot=100.0,
    timeout_update=20.0,
    timeout_operation=30.0,
    timeout_cloud=10.0,
    tick_interval=1.0,
)
#: Why an OCCUPIED VM may be terminated: it is dead, not in the way.
DEATHS = {"beacon silence", "no HELLO after the restart", "shutting down"}

AGES = st.sampled_from([0.0, 5.0, 15.0, 25.0, 45.0, 150.0])


@st.composite
def pools(draw: st.DrawFn) -> tuple[PoolConfig, PoolState]:
    """An arbitrary, internally consistent pool at ``NOW``."""
    config = attrs.evolve(CONFIG, max_pool_size=draw(st.integers(0, 12)))
    minimum = draw(st.integers(0, 10))
    spec = PoolSpec(minimum, draw(st.integers(minimum, 14)), draw(st.sampled_from([0, 1000, 30_000, 10**7])))
    state = PoolState("t", spec)
    for _ in range(draw(st.integers(0, 3))):
        batch = state.add_batch(draw(st.integers(0, 4)), "http://example.org/", BatchOptions(), NOW - 500)
        if draw(st.integers(0, 3)) == 0:
            state.cancel_batch(batch.id)
    batches = list(state.batches)
    tokens = 0
    for i in range(draw(st.integers(0, 14))):
        kind = draw(st.sampled_from(list(VMState)))
        if kind in (VMState.READY, VMState.OCCUPIED) and not batches:
            kind = VMState.FREE
        since = NOW - draw(AGES)
        has_guest = kind in (VMState.FREE, VMState.READY, VMState.OCCUPIED, VMState.WAIT)
        vm = VM(
            vmid=state.vmid_for(state.next_vmid),
            state=VMState.READY if kind is VMState.OCCUPIED else kind,
            created_at=since,
            version=1,
            since=since,
            server_id=None
            if kind is VMState.CREATING or (draw(st.integers(0, 5)) == 0 and not has_guest)
            else f"s{i}",
            identity=f"g{i}" if has_guest else None,
            batch=draw(st.sampled_from(batches)) if kind in (VMState.READY, VMState.OCCUPIED) else None,
            last_used=NOW - draw(AGES),
            recovering=kind in STABLE and draw(st.integers(0, 4)) == 0,
            reason="broken" if kind is VMState.ERROR else None,
        )
        if kind is VMState.WAIT and batches and draw(st.booleans()):
            vm = attrs.evolve(vm, batch=draw(st.sampled_from(batches)))
        state.next_vmid += 1
        state.put(vm)
        if has_guest:
            state.guests[f"g{i}"] = GuestInfo(f"g{i}", None, None, None, "1", (), NOW - draw(AGES))
        if kind is VMState.OCCUPIED:
            tokens += 1
            token = f"h{tokens}"
            state.add_handle(vm.batch, token, NOW - 100)  # type: ignore[arg-type]
            state.assign(token, vm.vmid, NOW - 100)
            if state.vms[vm.vmid].recovering != vm.recovering:
                state.put(attrs.evolve(state.vms[vm.vmid], recovering=vm.recovering))
            if draw(st.integers(0, 3)) == 0:
                state.release_handle(token)
    for _ in range(draw(st.integers(0, 4)) if batches else 0):
        tokens += 1
        state.add_handle(draw(st.sampled_from(batches)), f"h{tokens}", NOW - 50 + tokens)
    for token in list(state.handles):
        expiry = draw(st.sampled_from([None, None, NOW - 1, NOW + 10]))
        if expiry is not None:
            state.set_expiry(token, expiry)
    for i in range(draw(st.integers(0, 2))):
        state.strays[f"x{i}"] = Stray(f"x{i}", f"stray-{i}", seen=draw(st.integers(1, 3)))
    state.cloud = draw(
        st.sampled_from(
            [
                CloudHealth(),
                CloudHealth(),
                CloudHealth(failures=1, backoff_until=NOW + 5),
                CloudHealth(quota_failures=1, quota_until=NOW + 5),
                CloudHealth(failures=2),
            ]
        )
    )
    state.shutting_down = draw(st.integers(0, 9)) == 0
    return config, state


def held_vms(state: PoolState) -> set[str]:
    """VMs a handle holds and goes on holding (its expiry, if any, is not due)."""
    held = set()
    for vmid in state.ids(VMState.OCCUPIED):
        token = state.vms[vmid].handle
        if token is not None:
            expiry = state.handles[token].expire_at
            if expiry is None or expiry > NOW:
                held.add(vmid)
    return held


def run(config: PoolConfig, state: PoolState) -> list:
    actions = plan(config, state, NOW)
    for action in actions:
        apply(state, action, NOW, config)
    return actions


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class PlanPropertyTests(SynchronousTestCase):
    @FAST
    @given(pools())
    def test_never_above_max_or_the_cap(self, pool: tuple[PoolConfig, PoolState]) -> None:
        config, state = pool
        _, maximum = effective_size(config, state)
        self.assertLessEqual(maximum, config.max_pool_size)
        held = held_vms(state)
        actions = run(config, state)
        killed = {a.vmid for a in actions if isinstance(a, Delete)}
        keep = len(held - killed)
        self.assertLessEqual(state.alive_count(), max(maximum, keep))
        if any(isinstance(a, Boot) for a in actions):
            self.assertLessEqual(state.alive_count(), maximum)

    @FAST
    @given(pools())
    def test_no_occupied_vm_is_killed_for_pool_size(self, pool: tuple[PoolConfig, PoolState]) -> None:
        config, state = pool
        held = held_vms(state)
        for action in plan(config, state, NOW):
            if isinstance(action, Delete) and action.vmid in held:
                self.assertIn(action.reason, DEATHS)

    @FAST
    @given(pools())
    def test_actions_fit_the_vms_they_name(self, pool: tuple[PoolConfig, PoolState]) -> None:
        config, state = pool
        before = dict(state.vms)
        pending = {p.handle: p.batch for p in state.pending.values()}
        for action in plan(config, state, NOW):
            if isinstance(action, Prepare):
                self.assertIs(before[action.vmid].state, VMState.FREE)
                self.assertFalse(before[action.vmid].recovering)
            elif isinstance(action, Assign):
                vm = before[action.vmid]
                self.assertIs(vm.state, VMState.READY)
                self.assertEqual(vm.batch, pending[action.handle])
            elif isinstance(action, Cleanup):
                self.assertIn(before[action.vmid].state, (VMState.READY, VMState.OCCUPIED))

    @FAST
    @given(pools())
    def test_replanning_the_marked_state_proposes_nothing(self, pool: tuple[PoolConfig, PoolState]) -> None:
        config, state = pool
        run(config, state)
        self.assertEqual(plan(config, state, NOW), [])


# --------------------------------------------------------------------------- liveness


def step_world(state: PoolState, now: float) -> None:
    """Everything in flight completes, as a healthy cloud and healthy guests would."""
    for vmid in list(state.ids(VMState.CREATING)):
        vm = state.vms[vmid]
        state.boot_done(vmid, vm.version, f"srv-{vmid}", now)
    for vmid in list(state.ids(VMState.BOOTING)):
        guest = GuestInfo(f"g-{vmid}", f"vm-{vmid}", None, None, "1", (), now)
        state.put(attrs.evolve(state.vms[vmid], login=f"vm-{vmid}"))
        state.guest_hello(guest, now)
    for vmid in list(state.ids(VMState.WAIT)):
        vm = state.vms[vmid]
        if vm.batch is not None:
            state.prepare_done(vmid, vm.version, {}, now)
        else:
            state.cleanup_done(vmid, vm.version, now)
    for vmid in list(state.ids(VMState.KILLING)):
        vm = state.vms[vmid]
        if vm.server_id is not None:
            state.delete_done(vmid, vm.server_id)
    for identity in list(state.guests):
        state.guests[identity] = attrs.evolve(state.guests[identity], last_beacon=now)


@st.composite
def workloads(draw: st.DrawFn) -> tuple[PoolConfig, PoolSpec, list[int], list[list[tuple[int, bool]]]]:
    """Batches, then per step the locks taken (batch index, cancel the batch after?)."""
    sizes = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3))
    steps = draw(
        st.lists(
            st.lists(st.tuples(st.integers(0, len(sizes) - 1), st.booleans()), max_size=3),
            min_size=1,
            max_size=4,
        )
    )
    locks = sum(len(s) for s in steps)
    cap = draw(st.integers(max(locks, 1), 12))
    maximum = draw(st.integers(max(locks, 1), 14))
    minimum = draw(st.integers(0, maximum))
    config = attrs.evolve(CONFIG, max_pool_size=cap)
    return config, PoolSpec(minimum, maximum, draw(st.sampled_from([0, 5000]))), sizes, steps


class LivenessTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(workloads())
    def test_every_pending_lock_is_eventually_served(self, workload: tuple) -> None:
        config, spec, sizes, steps = workload
        state = PoolState("t", spec)
        now = NOW
        batches = [state.add_batch(size, "http://example.org/", BatchOptions(), now).id for size in sizes]
        handles = []
        for i in range(40):
            if i < len(steps):
                for index, cancel in steps[i]:
                    batch = batches[index]
                    if batch in state.batches and not state.batches[batch].cancelled:
                        handles.append(f"h{len(handles)}")
                        state.add_handle(batch, handles[-1], now)
                        if cancel:
                            state.cancel_batch(batch)
            for action in plan(config, state, now):
                apply(state, action, now, config)
            step_world(state, now)
            now += 1.0
            if i >= len(steps) and not state.pending:
                break
        self.assertEqual(state.pending, {})
        for token in handles:
            vmid = state.handles[token].vmid
            self.assertIsNotNone(vmid)
            self.assertIs(state.vms[vmid].state, VMState.OCCUPIED)  # type: ignore[index]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(pools())
    def test_pending_locks_of_any_pool_are_served_once_it_may_grow(self, pool: tuple) -> None:
        config, state = pool
        state.shutting_down = False
        needed = len(held_vms(state)) + len(state.pending) + 1
        config = attrs.evolve(config, max_pool_size=max(config.max_pool_size, needed))
        state.spec = attrs.evolve(state.spec, maximum=max(state.spec.maximum, needed))
        waiting = set(state.pending)
        now = NOW
        for _ in range(60):
            for action in plan(config, state, now):
                apply(state, action, now, config)
            if not state.pending:
                break
            step_world(state, now)
            now += 1.0
        self.assertEqual(state.pending, {})
        for token in waiting:
            if token in state.handles:  # not expired meanwhile
                self.assertIsNotNone(state.handles[token].vmid)
