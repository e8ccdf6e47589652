"""Prometheus exposition of the pool, read from the same snapshot as ``/all-status`` at scrape time.

``prometheus_client`` writes the text (full precision, escaping, the OpenMetrics variant when a
scraper asks for it); what it writes comes from one :class:`PoolCollector` that calls
``pool.all_status()`` once per scrape and counts, so the numbers can never disagree with what the
monitor page shows and nothing is kept between scrapes.  Each app builds its own
``CollectorRegistry`` (:func:`pool_registry`): two apps in one process (tests do that) never see
each other's pool, and nothing lands in the library's global registry.

``/all-status`` speaks milliseconds (the SPEC's unit); Prometheus wants base units, so durations
become ``*_seconds`` and instants ``*_timestamp_seconds`` (Unix seconds), converted here.  Every
state of the SPEC is always present (zero included), so a dashboard's series do not appear and
vanish; an instant that is not set (no error yet, not backing off) is left out rather than shown
as 1970.

Durations that no snapshot holds (a handle's wait for its VM, a VM's prepare, cleanup and boot, a
reconcile pass, a Nova call, a checkpoint write) are histograms: :class:`Metrics` takes them through
the :class:`~vmcloud.timings.ITimings` seam the composition root hands to those components, and its
registry also reads the pool and the embedded broker's counters at scrape time.  Each histogram's
buckets are chosen for the question it answers (see :data:`HISTOGRAMS`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from typing import Any, Literal, Protocol

import attrs
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from twisted.logger import Logger
from zope.interface import implementer

from vmcloud import timings
from vmcloud.api.shapes import all_status_json
from vmcloud.pool.interfaces import IPoolControl
from vmcloud.timings import ITimings

log = Logger()

VM_STATES = ("CREATING", "BOOTING", "FREE", "WAIT", "READY", "OCCUPIED", "ERROR", "KILLING")

# How an /all-status number becomes a sample: as it is, or milliseconds (a duration or a Unix
# instant) divided into seconds.
Unit = Literal["number", "ms"]

# (all-status key, metric name, help, unit) for poolSize.
_POOL_SIZE: tuple[tuple[str, str, str, Unit], ...] = (
    ("min", "vmcloud_pool_size_min", "Pool size floor set by set-pool-size.", "number"),
    ("max", "vmcloud_pool_size_max", "Pool size ceiling set by set-pool-size.", "number"),
    ("linger", "vmcloud_pool_size_linger_seconds", "How long a FREE VM above min may stay idle.", "ms"),
    ("effectiveMin", "vmcloud_pool_size_effective_min", "The floor the planner works to now.", "number"),
    ("effectiveMax", "vmcloud_pool_size_effective_max", "The ceiling the planner works to now.", "number"),
    ("maxPoolSize", "vmcloud_pool_size_limit", "The daemon's configured max_pool_size.", "number"),
)

# (all-status key, metric name, help, unit) for cloud health.  The text fields (driver,
# lastError) are not numbers: the driver is an info metric, the error text stays in /all-status.
_CLOUD: tuple[tuple[str, str, str, Unit], ...] = (
    ("backingOff", "vmcloud_cloud_backing_off", "1 while cloud calls back off after failures.", "number"),
    (
        "backoffUntil",
        "vmcloud_cloud_backoff_until_timestamp_seconds",
        "When the cloud back-off ends (only while backing off).",
        "ms",
    ),
    ("quotaExceeded", "vmcloud_cloud_quota_exceeded", "1 while the cloud refuses boots for quota.", "number"),
    (
        "quotaRetryAt",
        "vmcloud_cloud_quota_retry_timestamp_seconds",
        "When a boot is tried again after a quota refusal (only while refused).",
        "ms",
    ),
    ("failures", "vmcloud_cloud_failures", "Cloud call failures in a row (0 after a success).", "number"),
    ("quotaRefusals", "vmcloud_cloud_quota_refusals", "Quota refusals in a row.", "number"),
    ("bootFailures", "vmcloud_cloud_boot_failures", "Boots in a row that never became FREE.", "number"),
    (
        "bootBackoffUntil",
        "vmcloud_cloud_boot_backoff_until_timestamp_seconds",
        "When the boot back-off ends (only while it lasts).",
        "ms",
    ),
    (
        "lastErrorAt",
        "vmcloud_cloud_last_error_timestamp_seconds",
        "When the last cloud error happened (absent before the first).",
        "ms",
    ),
    (
        "lastListingAt",
        "vmcloud_cloud_last_listing_timestamp_seconds",
        "When the cloud's server list was last read (absent before the first).",
        "ms",
    ),
    ("strays", "vmcloud_cloud_strays", "Servers tagged ours that no VM record claims.", "number"),
    (
        "outdatedVMs",
        "vmcloud_vms_outdated",
        "VMs booted from another image than new VMs boot from, to be retired.",
        "number",
    ),
)

# Cloud health fields deliberately not turned into a number series.
CLOUD_TEXT_FIELDS = frozenset({"driver", "lastError", "image"})
CLOUD_FIELDS = frozenset(key for key, *_ in _CLOUD)

_COUNTS = (
    ("vmcloud_batches", "batches", "Batches, cancelled ones included until they empty."),
    ("vmcloud_preparations", "preps", "Preparations queued or in flight."),
    ("vmcloud_handles", "handles", "Live handles, assigned or waiting for a VM."),
    ("vmcloud_pending_locks", "pendingLocks", "Handles waiting for a READY VM."),
)


def _number(value: Any, unit: Unit = "number") -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        # Moving the decimal point of the number as /all-status writes it gives the float nearest
        # to the decimal value (250.001 ms -> 0.250001 s); value / 1000 can miss it by an ulp.
        return float(Decimal(repr(value)).scaleb(-3)) if unit == "ms" else float(value)
    return None


def _count(status: Mapping[str, Any], key: str) -> int:
    items = status.get(key)
    return len(items) if isinstance(items, list | tuple) else 0


def _gauge(name: str, help_text: str, value: float, unit: Unit) -> GaugeMetricFamily:
    # unit="seconds" adds OpenMetrics' "# UNIT" line; the name already ends in _seconds.
    return GaugeMetricFamily(name, help_text, value=value, unit="seconds" if unit == "ms" else "")


def _fields(section: Any, table: tuple[tuple[str, str, str, Unit], ...]) -> Iterator[GaugeMetricFamily]:
    if not isinstance(section, Mapping):
        return
    for key, name, help_text, unit in table:
        value = _number(section.get(key), unit)
        if value is not None:
            yield _gauge(name, help_text, value, unit)


def pool_metrics(status: Mapping[str, Any]) -> list[Metric]:
    """The metric families for one ``all_status()`` snapshot (pure: a dict in, families out).

    Odd shapes (a list where a dict belongs, text where a number does) leave the series out
    instead of failing the scrape.
    """
    families: list[Metric] = []

    vms = status.get("vms")
    vm_list = vms if isinstance(vms, list | tuple) else ()
    states: Counter[str] = Counter(str(vm.get("state")) for vm in vm_list if isinstance(vm, Mapping))
    by_state = GaugeMetricFamily("vmcloud_vms", "VMs in the pool by state.", labels=["state"])
    for state in list(VM_STATES) + sorted(set(states) - set(VM_STATES)):
        by_state.add_metric([state], states[state])
    families.append(by_state)

    families.extend(_fields(status.get("poolSize"), _POOL_SIZE))
    for name, key, help_text in _COUNTS:
        families.append(GaugeMetricFamily(name, help_text, value=_count(status, key)))
    shutting_down = _number(status.get("shuttingDown"))
    if shutting_down is not None:
        families.append(
            GaugeMetricFamily("vmcloud_shutting_down", "1 once shutdown was asked.", value=shutting_down)
        )

    cloud = status.get("cloud")
    if isinstance(cloud, Mapping) and isinstance(cloud.get("driver"), str):
        families.append(
            InfoMetricFamily("vmcloud_cloud_driver", "The cloud driver in use.", {"driver": cloud["driver"]})
        )
    families.extend(_fields(cloud, _CLOUD))

    reconciler = status.get("reconciler")
    if isinstance(reconciler, Mapping):
        passes = _number(reconciler.get("passes"))
        if passes is not None:
            families.append(
                CounterMetricFamily("vmcloud_reconciler_passes", "Reconcile passes run.", value=passes)
            )
        families.extend(
            _fields(
                reconciler,
                (
                    (
                        "lastPassMs",
                        "vmcloud_reconciler_last_pass_seconds",
                        "Wall time the last pass took.",
                        "ms",
                    ),
                    (
                        "slowestPassMs",
                        "vmcloud_reconciler_slowest_pass_seconds",
                        "Wall time of the slowest pass since start.",
                        "ms",
                    ),
                ),
            )
        )
    return families


class PoolCollector:
    """A ``prometheus_client`` collector reading the pool at scrape time, never between scrapes."""

    def __init__(self, pool: IPoolControl) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        yield from pool_metrics(all_status_json(self._pool.all_status()))


def pool_registry(pool: IPoolControl) -> CollectorRegistry:
    """A registry of its own for one app: only this pool's collector, no process-wide globals."""
    registry = CollectorRegistry()
    registry.register(PoolCollector(pool))
    return registry


def exposition(registry: CollectorRegistry, accept: bytes | None) -> tuple[bytes, bytes]:
    """The scrape body and its content type, in the format the scraper's Accept header asks for.

    The library chooses: OpenMetrics when asked for it (Prometheus asks first), else the classic
    text format with the library's content type.
    """
    encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
    return encoder(registry), content_type.encode("ascii")


# ---------------------------------------------------------------------- the embedded broker


class BrokerFigures(Protocol):
    """What the broker collector reads (``vmcloud.broker.realm.BrokerStats`` has it)."""

    @property
    def connections(self) -> int: ...
    @property
    def subscriptions(self) -> int: ...
    @property
    def queues(self) -> int: ...
    @property
    def queued_messages(self) -> int: ...
    @property
    def queued_bytes(self) -> int: ...
    @property
    def unacked_messages(self) -> int: ...
    @property
    def paused_publishers(self) -> int: ...
    @property
    def published_messages(self) -> int: ...
    @property
    def delivered_messages(self) -> int: ...
    @property
    def dropped_messages(self) -> int: ...
    @property
    def opened_connections(self) -> int: ...
    @property
    def refused_connections(self) -> int: ...


# (BrokerFigures attribute, metric name, help, counter or gauge)
_BROKER: tuple[tuple[str, str, str, Literal["counter", "gauge"]], ...] = (
    ("connections", "vmcloud_broker_connections", "Open STOMP connections (guests and clients).", "gauge"),
    ("subscriptions", "vmcloud_broker_subscriptions", "Subscriptions of every connection.", "gauge"),
    ("queues", "vmcloud_broker_queues", "Queues holding messages or subscribers.", "gauge"),
    ("queued_messages", "vmcloud_broker_queued_messages", "Messages stored for a consumer.", "gauge"),
    ("queued_bytes", "vmcloud_broker_queued_bytes", "Bytes of the messages stored.", "gauge"),
    ("unacked_messages", "vmcloud_broker_unacked_messages", "Messages delivered, not acked yet.", "gauge"),
    (
        "paused_publishers",
        "vmcloud_broker_paused_publishers",
        "Connections not read until a consumer catches up.",
        "gauge",
    ),
    ("published_messages", "vmcloud_broker_messages_published", "Messages sent to the broker.", "counter"),
    ("delivered_messages", "vmcloud_broker_messages_delivered", "Messages handed to subscribers.", "counter"),
    (
        "dropped_messages",
        "vmcloud_broker_messages_dropped",
        "Messages dropped: the store full, or a queue over its cap.",
        "counter",
    ),
    ("opened_connections", "vmcloud_broker_connections_opened", "STOMP connections accepted.", "counter"),
    (
        "refused_connections",
        "vmcloud_broker_connections_refused",
        "STOMP connections refused for the connection limit.",
        "counter",
    ),
)


def broker_metrics(figures: BrokerFigures) -> list[Metric]:
    """The metric families of one reading of the broker's counters (pure)."""
    families: list[Metric] = []
    for attribute, name, help_text, kind in _BROKER:
        value = getattr(figures, attribute)
        if kind == "counter":
            families.append(CounterMetricFamily(name, help_text, value=value))
        else:
            families.append(GaugeMetricFamily(name, help_text, value=value))
    return families


class BrokerCollector:
    """Reads the embedded broker's counters at scrape time: the broker does nothing per message for it."""

    def __init__(self, stats: Callable[[], BrokerFigures]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        yield from broker_metrics(self._stats())


# ---------------------------------------------------------------------- histograms


@attrs.frozen
class Timed:
    """One histogram: the :mod:`vmcloud.timings` name it is fed by, and how it shows."""

    name: str
    metric: str
    help: str
    buckets: tuple[float, ...]
    labels: tuple[str, ...] = ()
    #: label values present from the start (zero counts), so a dashboard's series never appear late
    initial: tuple[tuple[str, ...], ...] = ()


_PHASE_OUTCOMES = ((timings.OK,), (timings.FAILED,))
# A VM's guest work: p50 of 50-70 ms and p99 near 110 ms measured (README, bench/browser.py), up to
# the 30 s timeout_operation.
_GUEST_WORK = (0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Every histogram of ``/metrics``, in seconds, buckets chosen for the question each answers.
HISTOGRAMS: tuple[Timed, ...] = (
    Timed(
        timings.LOCK_ASSIGNED,
        "vmcloud_lock_assigned_seconds",
        "How long a handle waited from /lock until a VM was assigned (0: a READY VM was there).",
        # 0 on a warm pool; a cold pool waits for a boot and a prepare (minutes on a cloud)
        (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
    ),
    Timed(
        timings.PREPARE,
        "vmcloud_prepare_seconds",
        "A VM's PREPARE, WAIT to READY (outcome failed: ERROR or terminated instead).",
        _GUEST_WORK,
        ("outcome",),
        _PHASE_OUTCOMES,
    ),
    Timed(
        timings.CLEANUP,
        "vmcloud_cleanup_seconds",
        "A VM's CLEANUP, WAIT to FREE (outcome failed: ERROR or terminated instead).",
        _GUEST_WORK,
        ("outcome",),
        _PHASE_OUTCOMES,
    ),
    Timed(
        timings.BOOT,
        "vmcloud_boot_seconds",
        "A VM's boot, from asking the cloud for it to FREE (outcome failed: ERROR or terminated first).",
        # seconds on the local driver, one to a few minutes on Nova, 240 s timeout_boot by default
        (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 240.0, 300.0, 600.0),
        ("outcome",),
        _PHASE_OUTCOMES,
    ),
    Timed(
        timings.RECONCILE_PASS,
        "vmcloud_reconcile_pass_seconds",
        "Wall time of one reconcile pass (plan, apply, start the effects) on the reactor thread.",
        # 2.5 ms p50 and below 20 ms at 5,000 VMs measured (README); a second is a stalled reactor
        (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
    ),
    Timed(
        timings.NOVA_CALL,
        "vmcloud_nova_call_seconds",
        "One Nova call in its thread, by call (boot, delete, list) and outcome.",
        # keystoneauth's timeout is [nova] timeout, 10 s by default (at most 600)
        (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0),
        ("call", "outcome"),
        tuple((call, timings.OK) for call in ("boot", "delete", "list")),
    ),
    Timed(
        timings.CHECKPOINT_WRITE,
        "vmcloud_checkpoint_write_seconds",
        "One checkpoint write that reached the disk: encoding, write, fsync, rename.",
        # 10 ms p50 for 2.6 MB at 5,000 VMs measured (README); seconds mean a struggling disk
        (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    ),
)


@implementer(ITimings)
class Metrics:
    """``/metrics`` of one daemon: its own registry, the histograms fed through :class:`ITimings`,
    and collectors that read their figures at scrape time (:meth:`watch_pool`, :meth:`watch_broker`).

    The composition root makes one and hands it to every component that times something and to
    the API app, which serves :attr:`registry`.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._histograms: dict[str, tuple[Histogram, tuple[str, ...]]] = {}
        # (name, labels) -> the child observations go to, or None for a name or labels that fit no
        # histogram (said once in the log, then dropped)
        self._children: dict[tuple[str, tuple[tuple[str, str], ...]], Histogram | None] = {}
        for timed in HISTOGRAMS:
            histogram = Histogram(
                timed.metric,
                timed.help,
                labelnames=timed.labels,
                buckets=timed.buckets,
                unit="seconds",
                registry=self.registry,
            )
            self._histograms[timed.name] = (histogram, timed.labels)
            for values in timed.initial:
                histogram.labels(*values)

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = (name, tuple(labels.items()))
        child = self._children.get(key)
        if child is None:
            if key in self._children:
                return
            child = self._children[key] = self._child(name, labels)
            if child is None:
                return
        # a clock set back between two instants must not take from the sum
        child.observe(seconds if seconds > 0 else 0.0)

    def _child(self, name: str, labels: Mapping[str, str]) -> Histogram | None:
        try:
            if name not in self._histograms:
                raise ValueError(f"no histogram is called {name!r}")
            histogram, names = self._histograms[name]
            if not names and not labels:
                return histogram
            return histogram.labels(**labels)  # raises ValueError unless they are its labels
        except ValueError as e:
            log.error(
                "Durations of {name} {labels} are not kept: {reason}",
                name=name,
                labels=dict(labels),
                reason=str(e),
                event="metrics-unknown-timing",
            )
            return None

    def watch_pool(self, pool: IPoolControl) -> None:
        """Read ``pool.all_status()`` at each scrape (:class:`PoolCollector`)."""
        self.registry.register(PoolCollector(pool))

    def watch_broker(self, stats: Callable[[], BrokerFigures]) -> None:
        """Read the embedded broker's counters at each scrape (:class:`BrokerCollector`)."""
        self.registry.register(BrokerCollector(stats))
