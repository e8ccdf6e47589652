"""Issue #11: upgrading the guest image on the Nova path, as an operator does it.

A real daemon on the Nova driver against the simulator (real guests, one per ACTIVE server): a pool
of 3 on image A with one VM lent to a handle; the operator uploads image B, puts its id in
``[nova] image`` and restarts the daemon (SIGTERM, start).  The checkpoint keeps the pool, the
first listing says each VM runs A; the FREE ones are replaced by VMs of B one by one, the FREE
count never below 2 (what it was) once the guests are back, the lent VM untouched until released
and then terminated instead of cleaned.
"""

from __future__ import annotations

from typing import Any

from tests.integration.test_nova_harness import IMAGE, NovaTestCase

NEW_IMAGE = "7a4d3b0e-95c4-4d0b-9a57-3c2f1e0d9b11"


def free(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [vm for vm in status["vms"] if vm["state"] == "FREE"]


class ImageUpgradeTests(NovaTestCase):
    def test_a_restart_on_a_new_image_replaces_the_pool_and_spares_the_lent_vm(self) -> None:
        cloud, daemon = self.make("--image", f"{NEW_IMAGE}=vmcloud-guest-new", pool_timeout_update=15)
        daemon.set_pool_size(3, 6)
        batch = daemon.prepare_batch(1)
        handle = daemon.lock(batch)
        lent = daemon.wait_assigned(handle)["vmid"]
        daemon.ok("POST", f"/cancel-batch/{batch}", 204)  # its next READY VM goes back to FREE
        daemon.wait_pool(
            lambda s: (
                s
                if len(free(s)) == 2 and len(s["vms"]) == 3 and {vm["image"] for vm in s["vms"]} == {IMAGE}
                else None
            ),
            "two FREE VMs and the lent one, listed with image A",
        )

        daemon.stop()
        daemon.config.write_text(daemon.config.read_text().replace(IMAGE, NEW_IMAGE))
        daemon.start()
        watch = self.watch(daemon)
        status = daemon.wait_pool(
            lambda s: s if s["vms"] and not any(vm["recovering"] for vm in s["vms"]) else None,
            "every guest back after the restart",
        )
        self.assertEqual(status["cloud"]["image"], NEW_IMAGE)
        low = []

        def replaced(s: dict[str, Any]) -> dict[str, Any] | None:
            vms = {vm["vmid"]: vm for vm in s["vms"]}
            low.append(len(free(s)))
            done = {vm["image"] for vm in free(s)} == {NEW_IMAGE} and len(free(s)) == 2
            return s if done and vms[lent]["state"] == "OCCUPIED" and len(vms) == 3 else None

        status = daemon.wait_pool(replaced, "the FREE VMs replaced by VMs of image B", 60)
        self.assertGreaterEqual(min(low), 2, "the FREE count never dropped")
        lent_vm = next(vm for vm in status["vms"] if vm["vmid"] == lent)
        self.assertEqual((lent_vm["image"], lent_vm["outdated"]), (IMAGE, True))
        self.assertEqual(status["cloud"]["outdatedVMs"], 1)
        answer = daemon.handle_status(handle)
        self.assertEqual((answer["vmid"], answer["vm"]["state"]), (lent, "OCCUPIED"))
        self.assertEqual(len(daemon.logged(event="retire")), 2)
        self.assertTrue(daemon.logged(event="vm-outdated"))

        daemon.ok("POST", f"/release/{handle}", 204)
        status = daemon.wait_pool(
            lambda s: s if len(free(s)) == 3 and {vm["image"] for vm in s["vms"]} == {NEW_IMAGE} else None,
            "the released VM retired and replaced: three FREE VMs of image B",
        )
        self.assertEqual(status["cloud"]["outdatedVMs"], 0)
        self.assertEqual(len(daemon.logged(event="retire")), 3)
        servers = daemon.wait_no_leak()
        self.assertEqual({s["image"] for s in cloud.servers() if s["id"] in servers}, {NEW_IMAGE})
        self.assert_answered(watch)
