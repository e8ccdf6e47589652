"""Issue #4, acceptance 1: the README's control-plane walk-through, unchanged, on the Nova path.

A real ``twistd vmcloud`` with ``[pool] driver = nova`` talks to ``python -m vmcloud.novasim`` over
TCP through python-novaclient; every ACTIVE server runs a real ``vmcloud-guest`` configured by the
user-data the driver wrote.  The simulator's request log then shows what the daemon asked of the
cloud: one server listing per poll interval, never a ``GET /servers/{id}``.
"""

from __future__ import annotations

from urllib.parse import quote

from tests.integration.test_nova_harness import BOOT, IMAGE, LIST, NovaTestCase

POLL = 2.0  # seconds between listings; the tick is 1 s, so a listing is due every 2 ticks


class WalkthroughTests(NovaTestCase):
    def test_walkthrough_on_nova(self) -> None:
        cloud, daemon = self.make(pool_poll_interval=POLL)
        watch = self.watch(daemon)

        daemon.set_pool_size(2, 4)
        status = daemon.wait_vms(FREE=2)
        for vm in status["vms"]:
            # the guest announced itself with the per-VM login the driver put into its user-data
            self.assertEqual(vm["identity"], f"vm-{vm['vmid']}")
            self.assertIn("cmd", vm["capabilities"])
        servers = daemon.wait_no_leak()
        self.assertEqual(sorted(servers.values()), sorted(daemon.prefix + vm["vmid"] for vm in status["vms"]))
        for server in cloud.servers():
            vmid = server["name"].removeprefix(daemon.prefix)
            self.assertEqual(
                server["metadata"],
                {"vmcloud-controller": "nova-e2e", "vmcloud-vmid": vmid, "vmcloud-image": IMAGE},
            )

        batch = daemon.ok("POST", "/prepare-batch/1/" + quote("https://example.org/", safe="")).text
        daemon.wait_pool(
            lambda s: [vm for vm in s["vms"] if vm["state"] == "READY" and vm["batch"] == batch],
            "a READY VM in the batch",
        )
        handle = daemon.ok("POST", f"/lock/{batch}").text
        assigned = daemon.wait_assigned(handle)
        vmid = assigned["vmid"]
        self.assertEqual(assigned["vm"]["state"], "OCCUPIED")

        daemon.ok("POST", f"/release/{handle}", 204)
        self.assertEqual(daemon.call("GET", f"/handle-status/{handle}").status, 404)
        daemon.wait_pool(
            lambda s: any(vm["vmid"] == vmid and vm["state"] == "FREE" for vm in s["vms"]),
            "the released VM cleaned and FREE again",
        )
        daemon.ok("POST", f"/cancel-batch/{batch}", 204)
        daemon.wait_pool(
            lambda s: (
                not s["batches"] and all(vm["state"] == "FREE" for vm in s["vms"]) and len(s["vms"]) >= 2
            ),
            "the cancelled batch gone, every VM FREE",
        )
        daemon.wait_no_leak()

        # what the cloud saw: one listing per poll interval for the whole pool, never a per-VM GET;
        # the walk-through takes seconds, so let a few more poll intervals pass on the steady pool
        daemon.wait_for(lambda: len([r for r in cloud.requests() if r.listing]) >= 6, "six listings", 30)
        requests = cloud.requests()
        self.assertEqual([r for r in requests if r.per_server_get], [], "no GET /servers/{id}")
        lists = [r for r in requests if r.listing]
        # each listing of fewer servers than a page is two requests: the page and an empty one
        pages = [r for r in requests if r.is_(LIST)]
        self.assertLessEqual(len(pages), 2 * len(lists) + 1)
        span = lists[-1].t - lists[0].t
        per_poll = (len(lists) - 1) * POLL / span
        # due every POLL seconds and noticed on a 1 s tick: one per POLL to POLL + 1 seconds
        explain = f"{len(lists)} listings in {span:.1f} s, poll interval {POLL} s"
        self.assertGreaterEqual(per_poll, 0.5, explain)  # a loaded machine may delay a tick
        self.assertLessEqual(per_poll, 1.05, explain)
        self.assertEqual(cloud.counters().get("GET /v2.1/servers/{id}", 0), 0)
        self.assertEqual({r.status for r in requests if r.is_(BOOT)}, {202})

        daemon.ok("POST", "/shutdown", 202)
        daemon.wait_pool(lambda s: not s["vms"], "every VM gone from the pool")
        wait_empty = daemon.wait_no_leak()
        self.assertEqual(wait_empty, {})
        self.assertEqual(cloud.servers(), [], "the simulator has no server left")
        # the simulator stopped each guest when its server was deleted
        self.assertTrue(cloud.guest_pids())
        daemon.wait_for(
            lambda: not [pid for pid in cloud.guest_pids() if _running(pid)], "every guest process ended"
        )
        self.assert_answered(watch)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")
