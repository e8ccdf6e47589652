"""Unit tests of the parts ``PoolState`` composes: the state index, the guest directory, strays, observers."""

from __future__ import annotations

import attrs
from twisted.trial.unittest import SynchronousTestCase

from vmcloud.pool import model
from vmcloud.pool.guests import GuestDirectory, GuestRefused, normalize_mac
from vmcloud.pool.indexes import StateIndex, reindex
from vmcloud.pool.interfaces import GuestInfo, ServerStatus
from vmcloud.pool.model import VM, Event, PoolSpec, Stray, VMState
from vmcloud.pool.observers import PoolObservers
from vmcloud.pool.state import PoolState
from vmcloud.pool.strays import Strays

NOW = 1000.0


def vm(vmid: str = "e-1", state: VMState = VMState.FREE, **kw: object) -> VM:
    return attrs.evolve(model.new_vm(vmid, NOW), state=state, **kw)


def guest(
    identity: str, login: str | None = None, ip: str | None = None, mac: str | None = None
) -> GuestInfo:
    return GuestInfo(identity, login, ip, mac, "1", ("vnc",), NOW)


class StateIndexTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.index = StateIndex()

    def test_vms_by_state_in_the_order_they_entered_it(self) -> None:
        a, b = vm("a"), vm("b")
        self.index.move(None, a)
        self.index.move(None, b)
        self.index.move(a, attrs.evolve(a, state=VMState.BOOTING))
        self.index.move(attrs.evolve(a, state=VMState.BOOTING), a)
        self.assertEqual(list(self.index.ids(VMState.FREE)), ["b", "a"])
        self.assertEqual((self.index.count(VMState.FREE), self.index.count(VMState.BOOTING)), (2, 0))

    def test_ready_wait_and_occupied_vms_by_batch(self) -> None:
        free = vm("a")
        ready = attrs.evolve(free, state=VMState.READY, batch="1")
        self.index.move(None, free)
        self.index.move(free, ready)
        cleaning = vm("b", VMState.WAIT)
        self.index.move(None, cleaning)
        self.assertEqual(list(self.index.members(VMState.READY, "1")), ["a"])
        self.assertEqual(list(self.index.members(VMState.WAIT, None)), ["b"])
        self.assertEqual(self.index.members(VMState.FREE, None), {})  # FREE VMs have no batch slot
        self.index.drop(ready)
        self.assertEqual(self.index.members(VMState.READY, "1"), {})
        self.assertEqual(self.index.count(VMState.READY), 0)

    def test_released_vms(self) -> None:
        held = vm("a", VMState.OCCUPIED, batch="1", handle="t")
        let_go = attrs.evolve(held, handle=None)
        self.assertTrue(let_go.released)
        self.index.move(None, held)
        self.assertEqual(self.index.released(), {})
        self.index.move(held, let_go)
        self.assertEqual(list(self.index.released()), ["a"])
        self.index.move(let_go, attrs.evolve(let_go, state=VMState.WAIT, batch=None))
        self.assertEqual(self.index.released(), {})


class ReindexTests(SynchronousTestCase):
    def test_keys_move_with_the_vm_and_a_taken_key_stays_with_its_new_owner(self) -> None:
        index: dict[str, str] = {}
        a = vm("a", server_id="s1")
        reindex(index, None, a, lambda v: (v.server_id,))
        moved = attrs.evolve(a, server_id="s2")
        reindex(index, a, moved, lambda v: (v.server_id,))
        self.assertEqual(index, {"s2": "a"})
        index["s3"] = "b"  # another VM holds s3 now
        reindex(index, attrs.evolve(a, server_id="s3"), None, lambda v: (v.server_id,))
        self.assertEqual(index, {"s2": "a", "s3": "b"})


class GuestDirectoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = GuestDirectory()
        self.vms: dict[str, VM] = {}

    def add(self, record: VM) -> None:
        self.directory.move(self.vms.get(record.vmid), record)
        self.vms[record.vmid] = record

    def test_a_minted_login_always_gets_its_vm(self) -> None:
        self.add(vm("a", login="vm-a", macs=("FA-16-3E-00-00-01",)))
        self.assertEqual(self.directory.match(guest("x", login="vm-a"), self.vms), "a")
        self.assertEqual(self.directory.match(guest("y", mac="fa:16:3e:00:00:01"), self.vms), "a")
        self.assertIsNone(self.directory.match(guest("z", mac="fa:16:3e:00:00:02"), self.vms))

    def test_a_claim_on_a_bound_vm_is_refused(self) -> None:
        self.add(vm("a", ips=("10.0.0.5",), identity="owner"))
        with self.assertRaisesRegex(GuestRefused, "ip 10.0.0.5 names VM a, already bound to guest owner"):
            self.directory.match(guest("intruder", ip="10.0.0.5"), self.vms)
        self.assertEqual(self.directory.match(guest("owner", ip="10.0.0.9"), self.vms), "a")
        self.assertEqual(self.directory.vmid_of("owner"), "a")

    def test_forgotten_vms_match_nobody(self) -> None:
        record = vm("a", login="vm-a", identity="vm-a", macs=("fa:16:3e:00:00:01",), ips=("10.0.0.5",))
        self.add(record)
        self.directory.move(record, None)
        for g in (
            guest("vm-a", login="vm-a"),
            guest("m", mac="fa:16:3e:00:00:01"),
            guest("i", ip="10.0.0.5"),
        ):
            self.assertIsNone(self.directory.match(g, {}))

    def test_capability_sets_are_shared_up_to_a_bound(self) -> None:
        first = self.directory.shared_capabilities(["vnc", "audio"])
        self.assertIs(self.directory.shared_capabilities(("vnc", "audio")), first)
        for n in range(100):
            self.directory.shared_capabilities([f"odd-{n}"])
        late = self.directory.shared_capabilities(["late"])
        self.assertIsNot(self.directory.shared_capabilities(["late"]), late)  # not kept: the cache is full
        self.assertIs(self.directory.shared_capabilities(["vnc", "audio"]), first)

    def test_normalize_mac(self) -> None:
        self.assertEqual(normalize_mac(" FA-16-3E-00-00-01 "), "fa:16:3e:00:00:01")


def server(server_id: str, name: str = "p-x") -> ServerStatus:
    return ServerStatus(server_id, name, "ACTIVE", (), (), {}, None)


class StraysTests(SynchronousTestCase):
    def test_seen_in_listings_in_a_row_and_forgotten_when_gone(self) -> None:
        strays = Strays()
        self.assertTrue(strays.count([server("a"), server("b")]))
        self.assertTrue(strays.count([server("a")]))
        self.assertEqual(strays.seen, {"a": Stray("a", "p-x", seen=2)})
        strays.deleting("a", NOW)
        strays.deleting("gone", NOW)
        self.assertEqual(strays.seen["a"].deleting_since, NOW)
        strays.deleted("a")
        self.assertFalse(strays.count([]))  # nothing left, nothing changed

    def test_pool_state_counts_only_servers_no_vm_tracks(self) -> None:
        state = PoolState("e", PoolSpec(0, 2, 10))
        state.add_vm("e-1", NOW)
        state.boot_done("e-1", state.vms["e-1"].version, "tracked", NOW)
        state.add_vm("e-2", NOW)  # its boot answer is on its way
        listing = [server("tracked", "p-e-1"), server("late", "p-e-2"), server("stray", "p-old")]
        changes = state.changes
        state.observe_servers(listing, NOW, NOW, "p-")
        self.assertEqual(list(state.strays), ["stray"])
        self.assertEqual(state.changes, changes + 1)


class ObserverTests(SynchronousTestCase):
    def test_unset_hooks_are_silent_and_set_ones_hear(self) -> None:
        observers = PoolObservers()
        observers.transition(None, vm())
        observers.handle_event("t", Event(1, NOW, {}))
        observers.handle_gone("t")
        heard: list[object] = []
        observers.on_transition = lambda old, new: heard.append((old, new))
        observers.on_handle_event = lambda token, event: heard.append((token, event.id))
        observers.on_handle_gone = heard.append
        record = vm()
        observers.transition(None, record)
        observers.handle_event("t", Event(1, NOW, {}))
        observers.handle_gone("t")
        self.assertEqual(heard, [(None, record), ("t", 1), "t"])

    def test_pool_state_tells_its_observers(self) -> None:
        state = PoolState("e", PoolSpec(0, 1, 10))
        heard: list[tuple[object, object]] = []
        state.observers.on_transition = lambda old, new: heard.append(
            (old and old.state.value, new and new.state.value)
        )
        state.add_vm("e-1", NOW)
        state.remove_vm("e-1")
        self.assertEqual(heard, [(None, "CREATING"), ("CREATING", None)])
        self.assertIsNotNone(state.observers.on_transition)
