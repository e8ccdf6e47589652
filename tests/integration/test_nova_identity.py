"""How the pool knows which guest runs on which Nova server, end to end.

The real agent signs in with the per-VM login of its user-data (``test_nova_walkthrough.py``):
matched by login.  Here each server runs ``nova_mac_guest.py``, which uses no login and announces
the MAC and IP the simulator gave its server, so the only way to match it is the MAC the driver
read from ``addresses`` (``OS-EXT-IPS-MAC:mac_addr``) in the server listing.
"""

from __future__ import annotations

from tests.integration.test_nova_harness import NovaTestCase


class MacMatchTests(NovaTestCase):
    def test_guest_matched_by_the_mac_nova_reports(self) -> None:
        cloud, daemon = self.make(guest="mac")
        daemon.set_pool_size(2, 3)
        status = daemon.wait_vms(FREE=2)
        servers = {s["id"]: s for s in cloud.servers()}
        for vm in status["vms"]:
            server = servers[vm["serverId"]]
            self.assertTrue(server["mac"].startswith("fa:16:3e:"))
            self.assertEqual(vm["mac"], server["mac"])
            self.assertEqual(vm["ip"], server["ip"])
            self.assertEqual(vm["identity"], server["mac"].replace(":", "-"))
        daemon.wait_no_leak()
