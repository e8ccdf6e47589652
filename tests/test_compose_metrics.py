"""The daemon's /metrics as the composition root wires it: what the pool, the checkpoint store, the
Nova driver and the embedded broker measure reaches the histograms and counters its API serves."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from vmcloud.api.site import ApiSite
from vmcloud.compose import build_controller, check_deployment
from vmcloud.config import parse_config
from vmcloud.threads import SynchronousThreads

SECTIONS = {
    "api": "listen = tcp:18080:interface=127.0.0.1\naccess_log = none\n",
    "broker": "listen = tcp:16613:interface=127.0.0.1\n",
    "local": "netns = no\nbrowser = none\n",
}


class ServedMetricsTests(SynchronousTestCase):
    def scrape(self, pool: str = "", **sections: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Start the daemon's tree in memory (thread work runs on the spot), then GET /metrics."""
        text = {**SECTIONS, "pool": f"state_dir = {self.mktemp()}\n{pool}", **sections}
        config = parse_config("".join(f"[{name}]\n{body}" for name, body in text.items()))
        reactor = MemoryReactorClock()
        root = build_controller(reactor, check_deployment(config, {"PATH": "/usr/bin"}), SynchronousThreads)
        assert isinstance(root, MultiService)
        root.startService()
        self.addCleanup(lambda: self.successResultOf(root.stopService()))
        reactor.advance(0)  # the first pass's checkpoint is written on the next turn
        [site] = [factory for _, factory, _, _ in reactor.tcpServers if isinstance(factory, ApiSite)]
        treq = StubTreq(site.resource)
        response: Any = self.successResultOf(treq.get("http://127.0.0.1:18080/metrics"))
        self.assertEqual(response.code, 200)
        body: bytes = self.successResultOf(response.content())
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    def test_the_pool_the_store_and_the_broker_feed_the_served_metrics(self) -> None:
        found = self.scrape()
        self.assertGreaterEqual(found[("vmcloud_reconcile_pass_seconds_count", ())], 1)
        self.assertGreaterEqual(found[("vmcloud_checkpoint_write_seconds_count", ())], 1)
        self.assertEqual(found[("vmcloud_broker_connections", ())], 0)
        self.assertIn(("vmcloud_broker_messages_published_total", ()), found)
        self.assertEqual(found[("vmcloud_vms", (("state", "FREE"),))], 0)

    def test_the_nova_driver_feeds_them_too(self) -> None:
        # nothing listens on port 1: the start-up listing fails at once, and says so in /metrics
        nova = "auth_url = http://127.0.0.1:1/v3\nusername = u\npassword = p\nproject_name = demo\n"
        found = self.scrape("driver = nova\n", nova=nova + "image = i\nflavor = f\n")
        failed = ("vmcloud_nova_call_seconds_count", (("call", "list"), ("outcome", "unavailable")))
        self.assertEqual(found[failed], 1)
