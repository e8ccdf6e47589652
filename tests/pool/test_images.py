"""Upgrading the guest image: a restart on a new image replaces the pool VM by VM (service level).

The real procedure is a controller restart with a new ``[nova] image``: the checkpoint keeps the
pool (OCCUPIED VMs with their handles), the first listing says which image each VM was booted
from, and the pool retires the outdated ones as their replacements come up.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.pool.answers import all_status, handle_status
from tests.pool.fakes import CONFIG, World
from vmcloud.pool.interfaces import BatchOptions
from vmcloud.pool.model import VMState
from vmcloud.pool.plan import OUTDATED

HOME = "http://example.org/"
N = 4


def listed(w: World) -> None:
    """One listing of the cloud's servers, as the tick asks for every poll interval (the guests
    beacon meanwhile)."""
    for identity in list(w.channel.known):
        w.channel.beacon(identity)
    w.advance(CONFIG.poll_interval)
    w.driver.answer_lists()
    w.turn()


def pool_on_image_a() -> tuple[World, str, str]:
    """A pool of N on image A: one VM lent to a handle, the rest FREE; returns it, the handle, the VM."""
    w = World(image="A")
    w.pool.set_pool_size(N, 2 * N, 600_000)
    w.settle()
    batch = w.pool.prepare_batch(0, HOME, BatchOptions())
    handle = w.pool.lock(batch)
    w.settle()
    listed(w)
    lent = handle_status(w.pool, handle)["vmid"]
    return w, handle, lent


def restart_on(w: World, image: str) -> World:
    """The controller restarted with another image on the same cloud; its guests say HELLO again."""
    w.clock.advance(CONFIG.checkpoint_interval)
    again = World(checkpoint=w.store.checkpoint, start=False, now=w.clock.seconds() + 5, image=image)
    again.driver.servers = dict(w.driver.servers)
    again.driver._next = w.driver._next + 100  # server ids of its own
    again.start()
    for vm in again.vms():
        again.channel.hello(vm.login, login=vm.login)
    again.turn()
    return again


class RollingReplacementTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logged if e.get("event") == name]

    def step(self, w: World, lent: str, handle: str) -> bool:
        """Let the world answer one thing of each kind, checking the pool after each turn."""
        moved = False
        for act in (w.driver.answer_boots, w.hello_booting, w.channel.answer_calls, w.driver.answer_deletes):
            moved |= bool(act())
            w.turn()
            self.check(w, lent, handle)
        return moved

    def check(self, w: World, lent: str, handle: str) -> None:
        """Never fewer FREE VMs than before the switch; the lent VM and its handle untouched."""
        self.assertGreaterEqual(len(w.vms(VMState.FREE)), N - 1, w.state)
        if handle in w.state.handles:
            vm = w.state.vms[lent]
            self.assertEqual((vm.state, vm.handle), (VMState.OCCUPIED, handle))

    def test_a_restart_on_image_b_replaces_every_vm_and_spares_the_lent_one(self) -> None:
        w, handle, lent = pool_on_image_a()
        self.assertEqual({vm.image for vm in w.vms()}, {"A"})
        self.assertEqual(all_status(w.pool)["cloud"]["outdatedVMs"], 0)
        before = {vm.vmid for vm in w.vms()}

        b = restart_on(w, "B")
        kept = {vm.vmid: (vm.state, vm.image) for vm in b.vms() if vm.vmid in before}
        self.assertEqual(len(kept), N)  # the checkpoint kept them all, the listing said their image
        self.assertEqual(set(kept.values()), {(VMState.FREE, "A"), (VMState.OCCUPIED, "A")})
        self.assertEqual(len(b.vms(VMState.CREATING)), N - 1)  # replacements for the FREE ones
        status = all_status(b.pool)
        self.assertEqual((status["cloud"]["image"], status["cloud"]["outdatedVMs"]), ("B", N))
        shown = {v["vmid"]: (v["image"], v["outdated"]) for v in status["vms"]}
        self.assertEqual({shown[vmid] for vmid in before}, {("A", True)})
        self.assertEqual({shown[vm.vmid] for vm in b.vms(VMState.CREATING)}, {(None, False)})
        [found] = self.events("vm-outdated")
        self.assertEqual(found["count"], N)

        for _ in range(3 * N):
            if not self.step(b, lent, handle):
                listed(b)
                self.check(b, lent, handle)
        listed(b)
        free = b.vms(VMState.FREE)
        self.assertEqual((len(free), {vm.image for vm in free}), (N - 1, {"B"}))
        self.assertEqual(b.state.vms[lent].state, VMState.OCCUPIED)
        self.assertEqual(handle_status(b.pool, handle)["vmid"], lent)
        self.assertEqual(len(self.events("retire")), N - 1)
        self.assertEqual(all_status(b.pool)["cloud"]["outdatedVMs"], 1)

        b.pool.release(handle)
        b.turn()
        self.assertEqual((b.state.vms[lent].state, b.state.vms[lent].reason), (VMState.KILLING, OUTDATED))
        self.assertEqual([c.word for c in b.channel.calls], [])  # no CLEANUP for it
        b.settle()
        listed(b)
        self.assertNotIn(lent, b.state.vms)
        self.assertEqual([(vm.state, vm.image) for vm in b.vms()], [(VMState.FREE, "B")] * N)
        status = all_status(b.pool)
        self.assertEqual(status["cloud"]["outdatedVMs"], 0)
        self.assertFalse(any(v["outdated"] for v in status["vms"]))

    def test_rolling_back_is_the_same_with_the_old_image(self) -> None:
        w, _, lent = pool_on_image_a()
        b = restart_on(w, "B")
        b.settle()
        listed(b)
        self.assertEqual({vm.image for vm in b.vms(VMState.FREE)}, {"B"})
        back = restart_on(b, "A")
        self.assertEqual(all_status(back.pool)["cloud"]["outdatedVMs"], N - 1)  # the lent VM is A's
        back.settle()
        listed(back)
        self.assertEqual({vm.image for vm in back.vms(VMState.FREE)}, {"A"})
        self.assertEqual(back.state.vms[lent].state, VMState.OCCUPIED)

    def test_a_broken_new_image_keeps_the_old_vms(self) -> None:
        w, _, _ = pool_on_image_a()
        b = restart_on(w, "B")
        for _ in range(3):
            b.driver.answer_boots()
            for _ in range(int(CONFIG.timeout_boot // 5) + 1):  # no new guest ever says HELLO
                for identity in list(b.channel.known):
                    b.channel.beacon(identity)
                b.advance(5)
                b.driver.answer_deletes()
                b.driver.answer_lists()
            b.turn()
        self.assertEqual({vm.image for vm in b.vms(VMState.FREE)}, {"A"})
        self.assertEqual(len(b.vms(VMState.FREE)), N - 1)
        self.assertGreater(b.state.cloud.boot_failures, 0)
        self.assertEqual(self.events("retire"), [])

    def test_without_images_nothing_is_outdated(self) -> None:
        w = World()
        w.pool.set_pool_size(2, 2, 0)
        w.settle()
        listed(w)
        status = all_status(w.pool)
        self.assertEqual(status["cloud"]["image"], None)
        self.assertEqual({(v["image"], v["outdated"]) for v in status["vms"]}, {(None, False)})
