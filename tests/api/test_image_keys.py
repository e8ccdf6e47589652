"""The image keys of ``/all-status`` and their gauge, on a real pool whose cloud lists two images."""

from __future__ import annotations

import attrs
from twisted.trial.unittest import SynchronousTestCase

from tests.api.test_metrics import samples, scrape
from tests.pool.fakes import CONFIG, World
from vmcloud.api.shapes import all_status_json


class ImageKeysTests(SynchronousTestCase):
    def test_outdated_vms_show_per_vm_in_the_cloud_section_and_as_a_gauge(self) -> None:
        w = World(image="B")
        w.pool.set_pool_size(2, 2, 0)
        w.settle()
        old = sorted(w.driver.servers)[0]
        w.driver.servers[old] = attrs.evolve(w.driver.servers[old], image="A")  # booted before the upgrade
        w.advance(CONFIG.poll_interval)
        w.driver.answer_lists()  # the listing; the pass that retires the VM of A runs at the next turn
        status = all_status_json(w.pool.all_status())
        self.assertEqual((status["cloud"]["image"], status["cloud"]["outdatedVMs"]), ("B", 1))
        self.assertEqual(
            sorted((vm["image"], vm["outdated"]) for vm in status["vms"]), [("A", True), ("B", False)]
        )
        self.assertEqual(samples(scrape(w.pool)[0])[("vmcloud_vms_outdated", ())], 1)
        w.turn()
        status = all_status_json(w.pool.all_status())
        self.assertEqual(status["cloud"]["outdatedVMs"], 0)  # KILLING: on its way out, not counted
        self.assertEqual(
            sorted((vm["state"], vm["outdated"]) for vm in status["vms"]),
            [("CREATING", False), ("FREE", False), ("KILLING", True)],
        )
