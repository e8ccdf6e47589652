"""Prometheus text exposition of the pool, derived from the same snapshot as ``/all-status``.

No metrics library and no counters of our own: a scrape reads ``pool.all_status()`` once and
counts, so the numbers can never disagree with what the monitor page shows.  Every state of the
SPEC is always present (zero included), so a dashboard's series do not appear and vanish.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

VM_STATES = ("CREATING", "BOOTING", "FREE", "WAIT", "READY", "OCCUPIED", "ERROR", "KILLING")

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]")
_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    return None


def _snake(key: str) -> str:
    return _NOT_NAME.sub("_", _CAMEL.sub(r"_\1", key)).lower()


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _count(status: Mapping[str, Any], key: str) -> int:
    items = status.get(key)
    return len(items) if isinstance(items, list | tuple) else 0


def render_metrics(status: Mapping[str, Any]) -> bytes:
    """The text format (version 0.0.4) for one ``all_status()`` snapshot."""
    lines: list[str] = []

    def gauge(name: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} gauge")
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    vms = status.get("vms")
    vm_list = vms if isinstance(vms, list | tuple) else ()
    states: Counter[str] = Counter(str(vm.get("state")) for vm in vm_list if isinstance(vm, Mapping))
    known = list(VM_STATES) + sorted(set(states) - set(VM_STATES))
    by_state = [(f'{{state="{_label(s)}"}}', float(states[s])) for s in known]
    gauge("vmcloud_vms", "VMs in the pool by state.", by_state)

    pool_size = status.get("poolSize")
    if isinstance(pool_size, Mapping):
        for key, help_text in (
            ("min", "Pool size floor set by set-pool-size."),
            ("max", "Pool size ceiling set by set-pool-size."),
            ("linger", "Milliseconds a FREE VM above min may stay idle."),
        ):
            value = _number(pool_size.get(key))
            if value is not None:
                gauge(f"vmcloud_pool_size_{key}", help_text, [("", value)])

    for name, key, help_text in (
        ("vmcloud_batches", "batches", "Batches, cancelled ones included until they empty."),
        ("vmcloud_preparations", "preps", "Preparations queued or in flight."),
        ("vmcloud_handles", "handles", "Live handles, assigned or waiting for a VM."),
        ("vmcloud_pending_locks", "pendingLocks", "Handles waiting for a READY VM."),
    ):
        gauge(name, help_text, [("", float(_count(status, key)))])

    cloud = status.get("cloud")
    if isinstance(cloud, Mapping):
        for key in sorted(cloud):
            value = _number(cloud[key])
            if value is not None:
                name = f"vmcloud_cloud_{_snake(str(key))}"
                gauge(name, f"Cloud health: {key} from /all-status.", [("", value)])

    return ("\n".join(lines) + "\n").encode("utf-8")
