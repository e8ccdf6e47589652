"""The pool's answers as the REST API's JSON: camelCase keys, milliseconds, the worker's URLs.

The pool answers with records (:mod:`vmcloud.pool.views`) in its own terms; what they look like on
the wire is decided here, once, for the routes, ``/metrics`` and the tests alike:

* times are integer milliseconds since the epoch (``since``, ``createdAt``, ``expireTime``, ...),
  reconciler durations milliseconds with three decimals, as the SPEC speaks;
* states travel as their names;
* a worker reaches its VM's screen and sound only through the controller's proxies, so the URLs
  a worker's page gets are ``/console/{handle}`` and ``/audio/{handle}`` (the latter only when its
  batch asked for sound), never a VM's address.

Each function is pure: a record in, plain JSON-ready data out, keys in the order the API has
always written them.
"""

from __future__ import annotations

from typing import Any

from vmcloud.pool.model import VM, CloudHealth, Event, Handle, PendingLock
from vmcloud.pool.views import (
    BatchView,
    CloudView,
    EventPage,
    HandleStatus,
    HandleView,
    PoolSize,
    PoolStatus,
    Preparation,
    ReconcilerView,
)


def ms(seconds: float) -> int:
    """Seconds on the pool's clock as the integer milliseconds the API speaks."""
    return round(seconds * 1000)


def _ms_or_none(seconds: float | None) -> int | None:
    return None if seconds is None else ms(seconds)


# ---------------------------------------------------------------------- a handle's routes


def worker_view(handle: Handle, vm: VM, audio: bool) -> dict[str, Any]:
    """What a worker's page needs of its VM; the screen and the sound go through the controller."""
    return {
        "vmid": vm.vmid,
        "state": vm.state.value,
        "since": ms(vm.since),
        "recovering": vm.recovering,
        "console": f"/console/{handle.token}",
        "audio": f"/audio/{handle.token}" if audio else None,
        "vncPassword": vm.vnc_password,
    }


def handle_status_json(status: HandleStatus) -> dict[str, Any]:
    """``GET /handle-status/{handle}``: assigned or not, expiry, the VM, and the VM it lost."""
    handle = status.handle
    answer: dict[str, Any] = {
        "assigned": handle.vmid is not None,
        "batch": handle.batch,
        "expires": handle.expire_at is not None,
        "expireTime": _ms_or_none(handle.expire_at),
    }
    vm = status.vm
    if vm is not None:
        answer["vmid"] = vm.vmid
        answer["vm"] = worker_view(handle, vm, status.audio)
    if handle.lost is not None:
        answer["lost"] = {
            "vmid": handle.lost.vmid,
            "reason": handle.lost.reason,
            "time": ms(handle.lost.at),
        }
    return answer


def event_json(event: Event) -> dict[str, Any]:
    return {"id": event.id, "time": ms(event.time), "data": dict(event.data)}


def events_json(page: EventPage) -> dict[str, Any]:
    """``GET /fetch-events/{handle}/{lastId}``: the events after the client's id."""
    return {
        "lastId": page.last_id,
        "newEvents": [event_json(e) for e in page.events],
        "dropped": page.dropped,
    }


# ---------------------------------------------------------------------- /all-status


def pool_size_json(size: PoolSize) -> dict[str, Any]:
    spec = size.spec
    return {
        "min": spec.minimum,
        "max": spec.maximum,
        "linger": spec.linger_ms,
        "effectiveMin": size.effective_min,
        "effectiveMax": size.effective_max,
        "maxPoolSize": size.max_pool_size,
    }


def vm_json(vm: VM, image: str | None = None) -> dict[str, Any]:
    """A VM as the monitor lists it; ``ip`` and ``mac`` are the guest's, else the cloud's first.

    ``image`` is the image new VMs boot from: a VM booted from another one is ``outdated``.
    """
    return {
        "vmid": vm.vmid,
        "state": vm.state.value,
        "version": vm.version,
        "since": ms(vm.since),
        "serverId": vm.server_id,
        "identity": vm.identity,
        "ip": vm.ip or (vm.ips[0] if vm.ips else None),
        "mac": vm.mac or (vm.macs[0] if vm.macs else None),
        "batch": vm.batch,
        "handle": vm.handle,
        "lastUsed": ms(vm.last_used),
        "recovering": vm.recovering,
        "reason": vm.reason,
        "capabilities": list(vm.capabilities),
        "image": vm.image,
        "outdated": vm.outdated(image),
    }


def batch_json(view: BatchView) -> dict[str, Any]:
    batch = view.batch
    return {
        "id": batch.id,
        "size": batch.size,
        "homepage": batch.homepage,
        "cancelled": batch.cancelled,
        "createdAt": ms(batch.created_at),
        "ready": view.ready,
        "preparing": view.preparing,
        "occupied": view.occupied,
        "pendingLocks": view.pending_locks,
    }


def preparation_json(prep: Preparation) -> dict[str, Any]:
    """A preparation in flight (with its VM and start) or queued (no VM yet, no start)."""
    if prep.vmid is None or prep.since is None:
        return {"batch": prep.batch, "vmid": None, "state": "queued"}
    return {"batch": prep.batch, "vmid": prep.vmid, "state": "preparing", "since": ms(prep.since)}


def handle_summary_json(view: HandleView) -> dict[str, Any]:
    handle = view.handle
    return {
        "handle": handle.token,
        "batch": handle.batch,
        "vmid": handle.vmid,
        "createdAt": ms(handle.created_at),
        "expireTime": _ms_or_none(handle.expire_at),
        "lost": None if handle.lost is None else handle.lost.reason,
        "lastEventId": view.last_event_id,
        "events": view.events,
        "droppedEvents": view.dropped_events,
    }


def pending_lock_json(lock: PendingLock) -> dict[str, Any]:
    return {"handle": lock.handle, "batch": lock.batch, "since": ms(lock.since)}


def cloud_json(cloud: CloudView, now: float, outdated: int = 0) -> dict[str, Any]:
    """Cloud health at ``now``: a pause that has ended shows as none (null, false); the image new
    VMs boot from and how many VMs of the pool (dying ones aside) were booted from another."""
    health: CloudHealth = cloud.health
    backing_off = health.backing_off(now)
    quota = now < health.quota_until
    return {
        "driver": cloud.driver,
        "backingOff": backing_off,
        "backoffUntil": ms(health.backoff_until) if backing_off else None,
        "quotaExceeded": quota,
        "quotaRetryAt": ms(health.quota_until) if quota else None,
        "failures": health.failures,
        "quotaRefusals": health.quota_failures,
        "bootFailures": health.boot_failures,
        "bootBackoffUntil": ms(health.boot_backoff_until) if now < health.boot_backoff_until else None,
        "lastError": health.last_error,
        "lastErrorAt": _ms_or_none(health.last_error_at),
        "lastListingAt": _ms_or_none(cloud.last_listing_at),
        "strays": cloud.strays,
        "image": cloud.image,
        "outdatedVMs": outdated,
    }


def reconciler_json(figures: ReconcilerView) -> dict[str, Any]:
    return {
        "passes": figures.passes,
        "lastPassMs": round(figures.last_pass_seconds * 1000, 3),
        "slowestPassMs": round(figures.slowest_pass_seconds * 1000, 3),
    }


def all_status_json(status: PoolStatus) -> dict[str, Any]:
    """``GET /all-status``: everything the monitor shows, and the version it shows."""
    image = status.cloud.image
    return {
        "poolSize": pool_size_json(status.size),
        "vms": [vm_json(vm, image) for vm in status.vms],
        "batches": [batch_json(b) for b in status.batches],
        "preps": [preparation_json(p) for p in status.preps],
        "handles": [handle_summary_json(h) for h in status.handles],
        "pendingLocks": [pending_lock_json(p) for p in status.pending_locks],
        "cloud": cloud_json(
            status.cloud, status.time, sum(1 for vm in status.vms if vm.alive and vm.outdated(image))
        ),
        "shuttingDown": status.shutting_down,
        "reconciler": reconciler_json(status.reconciler),
        "time": ms(status.time),
        "version": status.version,
    }
