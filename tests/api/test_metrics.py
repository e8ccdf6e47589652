"""/metrics as Prometheus reads it: parsed with prometheus_client's own parsers, in seconds, exact."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import attrs
import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.api.client import TOKEN, ApiTestCase
from tests.api.fake_pool import RecordingPool, sample_status, sample_vm
from tests.broker.support import Client, make_broker
from tests.pool.fakes import World
from vmcloud import timings
from vmcloud.api.metrics import (
    CLOUD_FIELDS,
    CLOUD_TEXT_FIELDS,
    HISTOGRAMS,
    VM_STATES,
    Metrics,
    exposition,
    pool_metrics,
    pool_registry,
)
from vmcloud.api.shapes import all_status_json
from vmcloud.pool.model import VMState
from vmcloud.pool.views import PoolStatus
from vmcloud.timings import ITimings

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


class Document:
    """A collector of one /all-status document taken as it is, odd shapes included."""

    def __init__(self, status: Any) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        yield from pool_metrics(self.status)


def scrape(source: Any, accept: bytes | None = None) -> tuple[str, str]:
    """The exposition of a pool (an IPoolControl), or of a :class:`Document`."""
    if isinstance(source, Document):
        registry = CollectorRegistry()
        registry.register(source)
    else:
        registry = pool_registry(source)
    body, content_type = exposition(registry, accept)
    return body.decode("utf-8"), content_type.decode("ascii")


def samples(text: str, parse: Any = text_string_to_metric_families) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in parse(text)
        for sample in family.samples
    }


def pool_with(status: Any) -> Document:
    return Document(status)


def pool_answering(status: PoolStatus) -> RecordingPool:
    pool = RecordingPool()
    pool.everything = status
    return pool


#: A pool's answer as a RecordingPool gives it: a VM OCCUPIED, one in WAIT, two batches.
RECORD = attrs.evolve(sample_status(), batches=sample_status().batches * 2)


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
        pool = pool_answering(sample_status())
        registry = pool_registry(pool)
        self.assertEqual(pool.calls, [], "building the registry reads nothing")
        first = samples(exposition(registry, None)[0].decode())
        pool.everything = attrs.evolve(sample_status(), vms=(sample_vm("a"), sample_vm("b")))
        second = samples(exposition(registry, None)[0].decode())
        key = ("vmcloud_vms", (("state", "OCCUPIED"),))
        self.assertEqual((first[key], second[key]), (1, 2))
        self.assertEqual([name for name, _ in pool.calls], ["all_status", "all_status"])

    def test_each_app_has_its_own_registry_and_the_global_one_is_untouched(self) -> None:
        one = pool_answering(attrs.evolve(sample_status(), vms=(sample_vm(state=VMState.READY),)))
        two = pool_answering(attrs.evolve(sample_status(), vms=()))
        key = ("vmcloud_vms", (("state", "READY"),))
        self.assertEqual(samples(scrape(one)[0])[key], 1)
        self.assertEqual(samples(scrape(two)[0])[key], 0)
        global_text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
        self.assertNotIn("vmcloud_", global_text)

    def test_every_cloud_health_field_of_the_real_pool_is_mapped(self) -> None:
        """A new number in the cloud health of /all-status must get a name and a unit here, not vanish."""
        world = World()
        status = all_status_json(world.pool.all_status())
        self.assertEqual(set(status["cloud"]), CLOUD_FIELDS | CLOUD_TEXT_FIELDS)
        found = samples(scrape(world.pool)[0])
        self.assertEqual(found[("vmcloud_cloud_last_listing_timestamp_seconds", ())], world.clock.seconds())
        self.assertEqual(found[("vmcloud_reconciler_passes_total", ())], status["reconciler"]["passes"])


class MetricsRouteTests(ApiTestCase):
    token = TOKEN

    def test_route_serves_the_library_format(self) -> None:
        self.pool.everything = RECORD
        answer = self.call("GET", "/metrics", headers=self.admin())
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.header("content-type"), prometheus_client.exposition.CONTENT_TYPE_PLAIN_0_0_4)
        pool_samples = samples(scrape(pool_with(all_status_json(RECORD)))[0])
        served = samples(answer.body.decode())
        self.assertEqual({key: served[key] for key in pool_samples}, pool_samples)

    def test_route_negotiates_openmetrics(self) -> None:
        answer = self.call(
            "GET",
            "/metrics",
            headers={**self.admin(), "Accept": "application/openmetrics-text;version=1.0.0"},
        )
        self.assertEqual(answer.status, 200)
        self.assertTrue((answer.header("content-type") or "").startswith("application/openmetrics-text"))
        self.assertTrue(answer.body.endswith(b"# EOF\n"))


def families(text: str, parse: Any = text_string_to_metric_families) -> dict[str, Any]:
    return {family.name: family for family in parse(text)}


def buckets(family: Any, **labels: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts by upper bound, for one set of labels."""
    return {
        float(sample.labels["le"]): sample.value
        for sample in family.samples
        if sample.name.endswith("_bucket") and {k: v for k, v in sample.labels.items() if k != "le"} == labels
    }


def only(family: Any, suffix: str, **labels: str) -> float:
    [value] = [s.value for s in family.samples if s.name == family.name + suffix and s.labels == labels]
    return float(value)


class HistogramTests(SynchronousTestCase):
    def scrape(self, metrics: Metrics, accept: bytes | None = None) -> dict[str, Any]:
        body, _ = exposition(metrics.registry, accept)
        return families(
            body.decode(), text_string_to_metric_families if accept is None else openmetrics_families
        )

    def test_it_is_an_itimings_and_knows_every_name_of_the_vocabulary(self) -> None:
        self.assertTrue(verifyObject(ITimings, Metrics()))
        names = {
            v
            for k, v in vars(timings).items()
            if k.isupper() and isinstance(v, str) and v not in ("ok", "failed")
        }
        self.assertEqual({timed.name for timed in HISTOGRAMS}, names)
        for timed in HISTOGRAMS:
            self.assertTrue(timed.metric.startswith("vmcloud_") and timed.metric.endswith("_seconds"), timed)
            self.assertEqual(list(timed.buckets), sorted(set(timed.buckets)), timed)

    def test_an_observation_lands_in_its_histogram_and_bucket(self) -> None:
        metrics = Metrics()
        metrics.observe(timings.BOOT, 44.0, outcome="ok")
        metrics.observe(timings.BOOT, 250.0, outcome="failed")
        metrics.observe(timings.NOVA_CALL, 0.3, call="boot", outcome="quota")
        metrics.observe(timings.RECONCILE_PASS, 0.003)
        found = self.scrape(metrics)
        boot = found["vmcloud_boot_seconds"]
        self.assertEqual(only(boot, "_count", outcome="ok"), 1)
        self.assertEqual(only(boot, "_sum", outcome="ok"), 44.0)
        ok = buckets(boot, outcome="ok")
        self.assertEqual((ok[30.0], ok[45.0], ok[math.inf]), (0, 1, 1))
        failed = buckets(boot, outcome="failed")
        self.assertEqual((failed[240.0], failed[300.0]), (0, 1))
        nova = found["vmcloud_nova_call_seconds"]
        self.assertEqual(buckets(nova, call="boot", outcome="quota")[0.5], 1)
        self.assertEqual(only(nova, "_count", call="boot", outcome="ok"), 0)
        passes = found["vmcloud_reconcile_pass_seconds"]
        self.assertEqual((buckets(passes)[0.0025], buckets(passes)[0.005]), (0, 1))
        self.assertEqual(only(found["vmcloud_prepare_seconds"], "_count", outcome="ok"), 0)

    def test_a_clock_set_back_counts_zero_not_a_negative_duration(self) -> None:
        metrics = Metrics()
        metrics.observe(timings.LOCK_ASSIGNED, -3.0)
        found = self.scrape(metrics)["vmcloud_lock_assigned_seconds"]
        self.assertEqual((only(found, "_count"), only(found, "_sum")), (1, 0))

    def test_a_name_or_labels_that_fit_no_histogram_are_logged_once_and_dropped(self) -> None:
        metrics = Metrics()
        with capturedLogs() as logged:
            for _ in range(3):
                metrics.observe("lunch", 1.0)
                metrics.observe(timings.PREPARE, 1.0)  # its outcome is missing
                metrics.observe(timings.CHECKPOINT_WRITE, 1.0, disk="sda")
        said = [e for e in logged if e.get("event") == "metrics-unknown-timing"]
        self.assertEqual(sorted(e["name"] for e in said), ["checkpoint_write", "lunch", "prepare"])
        found = self.scrape(metrics)
        self.assertEqual(only(found["vmcloud_checkpoint_write_seconds"], "_count"), 0)
        self.assertEqual(only(found["vmcloud_prepare_seconds"], "_count", outcome="ok"), 0)

    def test_openmetrics_declares_the_unit(self) -> None:
        found = self.scrape(Metrics(), b"application/openmetrics-text;version=1.0.0")
        for timed in HISTOGRAMS:
            family = found[timed.metric]
            self.assertEqual((family.type, family.unit), ("histogram", "seconds"))


class BrokerMetricsTests(SynchronousTestCase):
    def test_the_brokers_counters_are_read_at_each_scrape(self) -> None:
        broker = make_broker()
        metrics = Metrics()
        metrics.watch_broker(broker.stats)
        consumer = Client(broker)
        consumer.connect()
        consumer.subscribe("/queue/work")
        controller = broker.attach_local("controller")
        for payload in (b"1", b"2"):
            controller.send("/queue/work", payload)
        controller.send("/queue/nobody", b"3")
        first = samples(exposition(metrics.registry, None)[0].decode())
        self.assertEqual(first[("vmcloud_broker_connections", ())], 1)
        self.assertEqual(first[("vmcloud_broker_subscriptions", ())], 1)
        self.assertEqual(first[("vmcloud_broker_messages_published_total", ())], 3)
        self.assertEqual(first[("vmcloud_broker_messages_delivered_total", ())], 2)
        self.assertEqual(first[("vmcloud_broker_queued_messages", ())], 1)
        self.assertEqual(first[("vmcloud_broker_messages_dropped_total", ())], 0)
        self.assertEqual(first[("vmcloud_broker_connections_opened_total", ())], 1)
        self.assertEqual(first[("vmcloud_broker_connections_refused_total", ())], 0)
        consumer.lose()
        second = samples(exposition(metrics.registry, None)[0].decode())
        self.assertEqual(second[("vmcloud_broker_connections", ())], 0)
        self.assertEqual(second[("vmcloud_broker_messages_published_total", ())], 3)
        self.assertEqual(second[("vmcloud_broker_connections_opened_total", ())], 1)


class ServedHistogramTests(ApiTestCase):
    """/metrics of a real app, built as the composition root builds it, through the library's parser."""

    token = TOKEN

    def test_every_histogram_is_served_with_its_buckets(self) -> None:
        metrics = Metrics()
        self.make(metrics=metrics)
        self.pool.everything = RECORD
        metrics.observe(timings.PREPARE, 0.06, outcome="ok")
        answer = self.call("GET", "/metrics", headers=self.admin())
        self.assertEqual(answer.status, 200)
        found = families(answer.body.decode())
        for timed in HISTOGRAMS:
            family = found[timed.metric]
            self.assertEqual(family.type, "histogram", timed.metric)
            for values in timed.initial or ((),):
                labels = dict(zip(timed.labels, values, strict=True))
                self.assertEqual(
                    sorted(buckets(family, **labels)), [*timed.buckets, math.inf], (timed.metric, labels)
                )
                only(family, "_count", **labels)
                only(family, "_sum", **labels)
        prepared = buckets(found["vmcloud_prepare_seconds"], outcome="ok")
        self.assertEqual((prepared[0.05], prepared[0.075]), (0, 1))
        self.assertEqual(found["vmcloud_vms"].type, "gauge", "the pool is read at the scrape as before")
        self.assertEqual(samples(answer.body.decode())[("vmcloud_batches", ())], 2)

    def test_an_app_without_metrics_serves_the_histograms_empty(self) -> None:
        answer = self.call("GET", "/metrics", headers=self.admin())
        found = families(answer.body.decode())
        self.assertEqual(only(found["vmcloud_lock_assigned_seconds"], "_count"), 0)
