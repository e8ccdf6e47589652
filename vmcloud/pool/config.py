"""The pool's configuration: limits, timeouts and intervals, fixed for the life of the service.

Kept apart from the pool size (``PoolSpec``), which an operator changes at run time through the API;
this record comes from the config file once, at start.  Times are seconds.
"""

from __future__ import annotations

import attrs

_positive = attrs.validators.gt(0.0)
_non_negative = attrs.validators.ge(0.0)
_positive_count = attrs.validators.gt(0)
_count = attrs.validators.ge(0)


@attrs.frozen
class PoolConfig:
    """What the pool reconciler needs from the ``[pool]`` section of the configuration."""

    #: Server name prefix; every server of the pool is named prefix + vmid.
    prefix: str = "vmcloud-vm-"
    #: Put in every server's metadata (``vmcloud-controller``) so an operator sees who owns it.
    controller_name: str = "vmcloud"
    #: Hard cap: clamps the ``max`` of set-pool-size, and a batch may not be larger.
    max_pool_size: int = attrs.field(default=30, validator=_count)
    #: How often guests say STILL_ALIVE.
    beacon_interval: float = attrs.field(default=5.0, validator=_positive)
    #: From the cloud accepting a server to the guest's HELLO.
    timeout_boot: float = attrs.field(default=240.0, validator=_positive)
    #: Beacon silence after which a guest is considered dead; also how long a VM recovered from a
    #: checkpoint has to say HELLO again.
    timeout_update: float = attrs.field(default=20.0, validator=_positive)
    #: A PREPARE or CLEANUP word to a guest.
    timeout_operation: float = attrs.field(default=30.0, validator=_positive)
    #: One cloud call (boot, delete); also the pause before a failed delete is tried again.
    timeout_cloud: float = attrs.field(default=10.0, validator=_positive)
    #: One ``list_servers`` call for the whole pool per interval.
    poll_interval: float = attrs.field(default=10.0, validator=_positive)
    #: Events kept per handle; beyond, the oldest are dropped and counted.
    events_per_handle: int = attrs.field(default=1000, validator=_positive_count)
    #: How long fetch-events waits for an event when the caller does not say.
    long_poll_default: float = attrs.field(default=5.0, validator=_non_negative)
    #: The longest wait a caller may ask of fetch-events.
    long_poll_max: float = attrs.field(default=60.0, validator=_non_negative)
    #: The reconciler's tick: timeouts, linger and expiries are noticed within one tick.
    tick_interval: float = attrs.field(default=1.0, validator=_positive)
    #: First pause after a failed cloud call; doubles per consecutive failure up to backoff_max.
    backoff_base: float = attrs.field(default=1.0, validator=_positive)
    backoff_max: float = attrs.field(default=300.0, validator=_positive)
    #: First pause before booting again after the cloud said its quota is exhausted.
    quota_retry: float = attrs.field(default=60.0, validator=_positive)
    #: Shortest pause between two checkpoints: a burst of changes makes one snapshot, not hundreds.
    checkpoint_interval: float = attrs.field(default=0.05, validator=_non_negative)
    #: Boot requests in flight to the cloud at once (VMs in CREATING); the rest wait for a later pass.
    max_boots_in_flight: int = attrs.field(default=16, validator=_positive_count)
    #: Terminations under way at once (VMs in KILLING, strays being deleted); the rest wait.
    max_deletes_in_flight: int = attrs.field(default=16, validator=_positive_count)
    #: Unassigned handles waiting for a VM, over all batches; a lock beyond is refused.
    max_pending_locks: int = attrs.field(default=10_000, validator=_count)
    #: Pool size before any set-pool-size call (the cap when None) and linger in milliseconds.
    initial_min: int = attrs.field(default=0, validator=_count)
    initial_max: int | None = None
    initial_linger_ms: int = attrs.field(default=60_000, validator=_count)
