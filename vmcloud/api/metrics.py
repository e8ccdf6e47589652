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
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any, Literal

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from vmcloud.pool.interfaces import IPoolControl

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
)

# Cloud health fields deliberately not turned into a number series.
CLOUD_TEXT_FIELDS = frozenset({"driver", "lastError"})
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
        yield from pool_metrics(self._pool.all_status())


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
