"""/metrics as Prometheus reads it: parsed with prometheus_client's own parsers, in seconds, exact."""

from __future__ import annotations

from typing import Any

import prometheus_client
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from tests.api.client import TOKEN, ApiTestCase
from tests.api.fake_pool import RecordingPool
from tests.pool.fakes import World
from vmcloud.api.metrics import CLOUD_FIELDS, CLOUD_TEXT_FIELDS, VM_STATES, exposition, pool_registry

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

STATUS: dict[str, Any] = {
    "poolSize": {
        "min": 1,
        "max": 5,
        "linger": 30001,
        "effectiveMin": 1,
        "effectiveMax": 4,
        "maxPoolSize": 30,
    },
    "vms": [{"state": "OCCUPIED"}, {"state": "OCCUPIED"}, {"state": "MYSTERY"}],
    "batches": [{}, {}],
    "preps": [{}],
    "handles": [{}, {}, {}],
    "pendingLocks": [{}],
    "cloud": {
        "driver": "nova",
        "backingOff": True,
        "backoffUntil": 1796410060500,
        "quotaExceeded": False,
        "quotaRetryAt": None,
        "failures": 3,
        "quotaRefusals": 0,
        "bootFailures": 1,
        "bootBackoffUntil": None,
        "lastError": "HTTP 503",
        "lastErrorAt": 1796410000001,
        "lastListingAt": 1796410000123,
        "strays": 2,
    },
    "shuttingDown": False,
    "reconciler": {"passes": 41, "lastPassMs": 12.345, "slowestPassMs": 250.001},
    "time": 1796410061000,
}


def scrape(pool: Any, accept: bytes | None = None) -> tuple[str, str]:
    body, content_type = exposition(pool_registry(pool), accept)
    return body.decode("utf-8"), content_type.decode("ascii")


def samples(text: str, parse: Any = text_string_to_metric_families) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in parse(text)
        for sample in family.samples
    }


def pool_with(status: Any) -> RecordingPool:
    pool = RecordingPool()
    pool.everything = status
    return pool


class ExpositionTests(SynchronousTestCase):
    def test_every_state_is_always_present(self) -> None:
        """Series never vanish: an empty pool still reports 0 for each state."""
        found = samples(scrape(pool_with({"vms": []}))[0])
        by_state = {labels[0][1]: v for (name, labels), v in found.items() if name == "vmcloud_vms"}
        self.assertEqual(by_state, dict.fromkeys(VM_STATES, 0.0))

    def test_counts_and_cloud_health_in_seconds_at_full_precision(self) -> None:
        """Instants come back as exact Unix seconds, durations as seconds, not %g-rounded milliseconds."""
        text, content_type = scrape(pool_with(STATUS))
        self.assertEqual(content_type, prometheus_client.exposition.CONTENT_TYPE_PLAIN_0_0_4)
        found = samples(text)
        self.assertEqual(found[("vmcloud_vms", (("state", "OCCUPIED"),))], 2)
        self.assertEqual(
            found[("vmcloud_vms", (("state", "MYSTERY"),))], 1, "an unknown state is still counted"
        )
        self.assertEqual(found[("vmcloud_cloud_last_listing_timestamp_seconds", ())], 1796410000.123)
        self.assertEqual(found[("vmcloud_cloud_last_error_timestamp_seconds", ())], 1796410000.001)
        self.assertEqual(found[("vmcloud_cloud_backoff_until_timestamp_seconds", ())], 1796410060.5)
        self.assertEqual(found[("vmcloud_pool_size_linger_seconds", ())], 30.001)
        self.assertEqual(found[("vmcloud_reconciler_last_pass_seconds", ())], 0.012345)
        self.assertEqual(found[("vmcloud_reconciler_slowest_pass_seconds", ())], 0.250001)
        self.assertEqual(found[("vmcloud_reconciler_passes_total", ())], 41)
        self.assertEqual(
            [
                found[(name, ())]
                for name in (
                    "vmcloud_batches",
                    "vmcloud_preparations",
                    "vmcloud_handles",
                    "vmcloud_pending_locks",
                    "vmcloud_pool_size_min",
                    "vmcloud_pool_size_max",
                    "vmcloud_pool_size_effective_max",
                    "vmcloud_pool_size_limit",
                    "vmcloud_cloud_failures",
                    "vmcloud_cloud_backing_off",
                    "vmcloud_cloud_quota_exceeded",
                    "vmcloud_cloud_boot_failures",
                    "vmcloud_cloud_strays",
                    "vmcloud_shutting_down",
                )
            ],
            [2, 1, 3, 1, 1, 5, 4, 30, 3, 1, 0, 1, 2, 0],
        )
        self.assertEqual(found[("vmcloud_cloud_driver_info", (("driver", "nova"),))], 1)
        names = {name for name, _ in found}
        self.assertNotIn("vmcloud_cloud_quota_retry_timestamp_seconds", names, "an unset instant is left out")
        self.assertFalse(
            [n for n in names if "last_error" in n and "timestamp" not in n], "text is not a number"
        )
        self.assertFalse([n for n in names if n.endswith("_ms") or n.endswith("_at")], "no milliseconds left")

    def test_openmetrics_when_the_scraper_asks_for_it(self) -> None:
        """Prometheus asks for OpenMetrics first; the library answers it, with units declared."""
        text, content_type = scrape(
            pool_with(STATUS), b"application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )
        self.assertTrue(content_type.startswith("application/openmetrics-text"), content_type)
        families = {family.name: family for family in openmetrics_families(text)}
        self.assertEqual(families["vmcloud_cloud_last_listing_timestamp_seconds"].unit, "seconds")
        self.assertEqual(
            families["vmcloud_cloud_last_listing_timestamp_seconds"].samples[0].value, 1796410000.123
        )
        self.assertEqual(families["vmcloud_reconciler_passes"].type, "counter")
        self.assertEqual(samples(text, openmetrics_families), samples(scrape(pool_with(STATUS))[0]))

    def test_odd_shapes_do_not_break_a_scrape(self) -> None:
        odd: dict[str, Any] = {
            "vms": "nope",
            "batches": None,
            "cloud": [],
            "poolSize": 3,
            "reconciler": {"passes": "x"},
        }
        found = samples(scrape(pool_with(odd))[0])
        self.assertEqual(found[("vmcloud_batches", ())], 0)
        self.assertNotIn(("vmcloud_reconciler_passes_total", ()), found)

    def test_label_values_are_escaped(self) -> None:
        text, _ = scrape(pool_with({"vms": [{"state": 'a"b\\c\nd'}]}))
        self.assertEqual(samples(text)[("vmcloud_vms", (("state", 'a"b\\c\nd'),))], 1)


class CollectorTests(SynchronousTestCase):
    def test_the_pool_is_read_at_each_scrape(self) -> None:
        pool = pool_with({"vms": [{"state": "FREE"}]})
        registry = pool_registry(pool)
        self.assertEqual(pool.calls, [], "building the registry reads nothing")
        first = samples(exposition(registry, None)[0].decode())
        pool.everything = {"vms": [{"state": "FREE"}, {"state": "FREE"}]}
        second = samples(exposition(registry, None)[0].decode())
        key = ("vmcloud_vms", (("state", "FREE"),))
        self.assertEqual((first[key], second[key]), (1, 2))
        self.assertEqual([name for name, _ in pool.calls], ["all_status", "all_status"])

    def test_each_app_has_its_own_registry_and_the_global_one_is_untouched(self) -> None:
        one, two = pool_with({"vms": [{"state": "READY"}]}), pool_with({"vms": []})
        key = ("vmcloud_vms", (("state", "READY"),))
        self.assertEqual(samples(scrape(one)[0])[key], 1)
        self.assertEqual(samples(scrape(two)[0])[key], 0)
        global_text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
        self.assertNotIn("vmcloud_", global_text)

    def test_every_cloud_health_field_of_the_real_pool_is_mapped(self) -> None:
        """A new number in the reconciler's health() must get a name and a unit here, not vanish."""
        world = World()
        status = world.pool.all_status()
        self.assertEqual(set(status["cloud"]), CLOUD_FIELDS | CLOUD_TEXT_FIELDS)
        found = samples(scrape(world.pool)[0])
        self.assertEqual(found[("vmcloud_cloud_last_listing_timestamp_seconds", ())], world.clock.seconds())
        self.assertEqual(found[("vmcloud_reconciler_passes_total", ())], status["reconciler"]["passes"])


class MetricsRouteTests(ApiTestCase):
    token = TOKEN

    def test_route_serves_the_library_format(self) -> None:
        self.pool.everything = STATUS
        answer = self.call("GET", "/metrics", headers=self.admin())
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.header("content-type"), prometheus_client.exposition.CONTENT_TYPE_PLAIN_0_0_4)
        self.assertEqual(samples(answer.body.decode()), samples(scrape(pool_with(STATUS))[0]))

    def test_route_negotiates_openmetrics(self) -> None:
        answer = self.call(
            "GET",
            "/metrics",
            headers={**self.admin(), "Accept": "application/openmetrics-text;version=1.0.0"},
        )
        self.assertEqual(answer.status, 200)
        self.assertTrue(answer.header("content-type") or "".startswith("application/openmetrics-text"))
        self.assertTrue(answer.body.endswith(b"# EOF\n"))
