"""Issue #4, acceptance 3: stray reaping on the Nova path.

Servers made behind the pool's back with its prefix are deleted once two listings have shown
them (never after one), whatever their metadata says; servers without the prefix -- even one that
holds it further into its name, which Nova's unanchored name regex would match -- are never
touched.
"""

from __future__ import annotations

from tests.integration.test_nova_harness import BOOT, NovaTestCase, Request


class StrayTests(NovaTestCase):
    def test_strays_deleted_after_two_sightings_others_survive(self) -> None:
        cloud, daemon = self.make(guest=None)
        watch = self.watch(daemon)
        daemon.set_pool_size(0, 2)
        prefix = daemon.prefix
        strays = {
            cloud.create_server(prefix + "stray-1", {"vmcloud-controller": "another-controller"}): "stray-1",
            cloud.create_server(prefix + "stray-2"): "stray-2",
        }
        others = {
            cloud.create_server("other-1"): "other-1",
            cloud.create_server("x-" + prefix + "1"): "x-prefix",
        }

        daemon.wait_for(lambda: not set(strays) & set(cloud.live_servers()), "the strays deleted", 30)
        requests = cloud.requests()
        # the pool boots nothing (min 0): the POSTs are ours, in order; a listing the simulator took
        # after a POST shows that server
        posts = [r for r in requests if r.is_(BOOT)]
        self.assertEqual(len(posts), 4)
        for created, (server_id, label) in zip(posts, strays.items(), strict=False):
            deleted = _delete(requests, server_id)
            sightings = [r for r in requests if r.listing and r.status == 200 and created.t < r.t < deleted.t]
            self.assertGreaterEqual(len(sightings), 2, f"{label} deleted after {len(sightings)} sighting(s)")
        noticed = [e for e in daemon.logged(event="stray") if "is not ours" in e["log_format"]]
        self.assertEqual({e["server_id"] for e in noticed}, set(strays))
        reaped = [e for e in daemon.logged(event="stray") if "seen twice" in e["log_format"]]
        self.assertEqual({e["server_id"] for e in reaped}, set(strays))

        # the others stay, listing after listing
        seen = len([r for r in cloud.requests() if r.listing])
        daemon.wait_for(
            lambda: len([r for r in cloud.requests() if r.listing]) >= seen + 3, "three more listings"
        )
        self.assertEqual(set(others), set(cloud.live_servers()))
        deletes = [r for r in cloud.requests() if r.method == "DELETE"]
        self.assertEqual(len(deletes), len(strays))
        self.assertEqual(daemon.status()["cloud"]["strays"], 0)
        self.assert_answered(watch)


def _delete(requests: list[Request], server_id: str) -> Request:
    return next(r for r in requests if r.method == "DELETE" and r.path.endswith("/" + server_id))
