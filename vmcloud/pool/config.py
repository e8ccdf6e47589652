"""The pool's configuration: limits, timeouts and intervals, fixed for the life of the service.

Kept apart from the pool size (``PoolSpec``), which an operator changes at run time through the API;
this record comes from the config file once, at start (:func:`pool_config`).  Times are seconds.
The file's record (:mod:`vmcloud.config`) is the source: every field here is a key there
(``[pool]``, and ``[api] long_poll_*``), and the defaults here are the file's defaults.
"""

from __future__ import annotations

import attrs

from vmcloud.config import ApiConfig, Config, PoolSettings

#: The file's defaults, which are this record's.
_POOL = PoolSettings()
_API = ApiConfig()

_positive = attrs.validators.gt(0.0)
_non_negative = attrs.validators.ge(0.0)
_positive_count = attrs.validators.gt(0)
_count = attrs.validators.ge(0)


@attrs.frozen
class PoolConfig:
    """What the pool reconciler needs from the ``[pool]`` section of the configuration."""

    #: Server name prefix; every server of the pool is named prefix + vmid.
    prefix: str = _POOL.prefix
    #: Put in every server's metadata (``vmcloud-controller``) so an operator sees who owns it.
    controller_name: str = "vmcloud"
    #: Hard cap: clamps the ``max`` of set-pool-size, and a batch may not be larger.
    max_pool_size: int = attrs.field(default=_POOL.max_pool_size, validator=_count)
    #: How often guests say STILL_ALIVE.
    beacon_interval: float = attrs.field(default=_POOL.beacon_interval, validator=_positive)
    #: From the cloud accepting a server to the guest's HELLO.
    timeout_boot: float = attrs.field(default=_POOL.timeout_boot, validator=_positive)
    #: Beacon silence after which a guest is considered dead; also how long a VM recovered from a
    #: checkpoint has to say HELLO again.
    timeout_update: float = attrs.field(default=_POOL.timeout_update, validator=_positive)
    #: A PREPARE or CLEANUP word to a guest.
    timeout_operation: float = attrs.field(default=_POOL.timeout_operation, validator=_positive)
    #: One cloud call (boot, delete); also the pause before a failed delete is tried again.
    timeout_cloud: float = attrs.field(default=_POOL.timeout_cloud, validator=_positive)
    #: One ``list_servers`` call for the whole pool per interval.
    poll_interval: float = attrs.field(default=_POOL.poll_interval, validator=_positive)
    #: Events kept per handle; beyond, the oldest are dropped and counted.
    events_per_handle: int = attrs.field(default=_POOL.events_per_handle, validator=_positive_count)
    #: How long fetch-events waits for an event when the caller does not say.
    long_poll_default: float = attrs.field(default=_API.long_poll_default, validator=_non_negative)
    #: The longest wait a caller may ask of fetch-events.
    long_poll_max: float = attrs.field(default=_API.long_poll_max, validator=_non_negative)
    #: The reconciler's tick: timeouts, linger and expiries are noticed within one tick.
    tick_interval: float = attrs.field(default=_POOL.tick_interval, validator=_positive)
    #: First pause after a failed cloud call; doubles per consecutive failure up to backoff_max.
    backoff_base: float = attrs.field(default=_POOL.backoff_base, validator=_positive)
    backoff_max: float = attrs.field(default=_POOL.backoff_max, validator=_positive)
    #: First pause before booting again after the cloud said its quota is exhausted.
    quota_retry: float = attrs.field(default=_POOL.quota_retry, validator=_positive)
    #: Shortest pause between two checkpoints: a burst of changes makes one snapshot, not hundreds.
    checkpoint_interval: float = attrs.field(default=_POOL.checkpoint_interval, validator=_non_negative)
    #: Boot requests in flight to the cloud at once (VMs in CREATING); the rest wait for a later pass.
    max_boots_in_flight: int = attrs.field(default=_POOL.max_boots_in_flight, validator=_positive_count)
    #: Terminations under way at once (VMs in KILLING, strays being deleted); the rest wait.
    max_deletes_in_flight: int = attrs.field(default=_POOL.max_deletes_in_flight, validator=_positive_count)
    #: Unassigned handles waiting for a VM, over all batches; a lock beyond is refused.
    max_pending_locks: int = attrs.field(default=_POOL.max_pending_locks, validator=_count)
    #: Pool size before any set-pool-size call (the cap when None) and linger in milliseconds.
    initial_min: int = attrs.field(default=_POOL.initial_min, validator=_count)
    initial_max: int | None = _POOL.initial_max
    initial_linger_ms: int = attrs.field(default=_POOL.initial_linger_ms, validator=_count)


def pool_config(config: Config, controller_name: str) -> PoolConfig:
    """The pool's record from the file's: every field is the key of the same name (``[pool]``, or
    ``[api]`` for the long poll's); ``controller_name`` is resolved by the caller (the host name)."""
    keys = {field.name for field in attrs.fields(PoolConfig)} - {"controller_name"}
    values = {key: getattr(config.api if key.startswith("long_poll_") else config.pool, key) for key in keys}
    return PoolConfig(controller_name=controller_name, **values)
