"""The seams of the controller: what the pool needs from a cloud, a guest channel and a store.

The pool model sits at the centre; drivers, the guest channel and the checkpoint store implement
these interfaces and depend on this module, never the other way round.  Records that cross a seam
are frozen ``attrs`` classes holding plain data, so that nothing of a cloud client library or a
wire protocol leaks into the pool.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from zope.interface import Attribute, Interface

# Seam records that live elsewhere, named here too: the cookie is shared with the guest, so it
# lives with the words; the batch options are held by the model, which needs nothing of this module.
from vmcloud.pool.options import BatchOptions as BatchOptions
from vmcloud.pool.views import EventPage, HandleStatus, PoolStatus
from vmcloud.words.cookies import Cookie as Cookie

# --------------------------------------------------------------------------- cloud


@attrs.frozen
class GuestCredentials:
    """What a guest needs to reach the broker; minted per VM by the controller."""

    broker: str  # client endpoint description as the guest sees it, e.g. "tcp:10.0.0.1:61613"
    login: str
    passcode: str
    #: How often the guest should say STILL_ALIVE (the pool's beacon interval); None: its default.
    beacon_interval: float | None = None


@attrs.frozen
class BootRequest:
    """Everything a driver needs to boot one VM; the driver adds nothing of its own to the name."""

    vmid: str
    name: str  # prefix + vmid
    metadata: Mapping[str, str]  # tags naming the controller and the vmid
    credentials: GuestCredentials


# Server status strings, as Nova spells them; every driver maps its own states onto these.
BUILD = "BUILD"
ACTIVE = "ACTIVE"
ERROR = "ERROR"
DELETING = "DELETING"


@attrs.frozen
class ServerStatus:
    """One server as the cloud reports it in a listing."""

    server_id: str
    name: str
    status: str  # BUILD | ACTIVE | ERROR | DELETING
    macs: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    metadata: Mapping[str, str] = attrs.field(factory=dict)
    fault: str | None = None
    #: The image the server was booted from, as the driver's ``image`` names it (None: unknown,
    #: or a driver without images).
    image: str | None = None


class CloudError(Exception):
    """A cloud call failed; ``retry_after`` (seconds) says when trying again makes sense."""

    retry_after: float | None = None

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QuotaExceeded(CloudError):
    """The cloud refuses to grow the pool (quota or capacity); retry much later."""


class RateLimited(CloudError):
    """413/429: the cloud asked us to slow down for ``retry_after`` seconds."""


class CloudUnavailable(CloudError):
    """5xx, timeouts, refused connections: transient, retry with backoff."""


class BadCloudRequest(CloudError):
    """The cloud rejected the request itself (bad image, flavor, network): an operator must act."""


class ICloudDriver(Interface):
    """Boots, lists and deletes the servers of one pool; every method is async.

    A driver with images may also have an ``image`` attribute: the image it boots new servers
    from, in the same spelling as :attr:`ServerStatus.image`.  The pool retires VMs listed with
    another image (read with ``getattr(driver, "image", None)``: a driver without it has none).
    """

    name = Attribute("Short driver name for logs and /all-status, e.g. 'local' or 'nova'.")
    prefix = Attribute("Server name prefix; every server of the pool is named prefix + vmid.")

    async def boot(request: BootRequest) -> str:
        """Ask the cloud for one server; return its server id once the cloud accepted it.

        Raises a :class:`CloudError` subclass on failure.
        """

    async def delete(server_id: str) -> None:
        """Delete a server; a server that is already gone is a success."""

    async def list_servers() -> list[ServerStatus]:
        """Every server whose name starts with the prefix, in one call to the cloud."""


# --------------------------------------------------------------------------- guest channel


@attrs.frozen
class GuestInfo:
    """A guest as the channel knows it from its HELLO and beacons."""

    identity: str  # the name of its command destination (login, explicit identity, or MAC)
    login: str | None  # STOMP login it authenticated with (per-VM credentials), if any
    ip: str | None
    mac: str | None
    agent_version: str
    capabilities: tuple[str, ...]
    last_beacon: float  # seconds, on the controller's clock
    # what its HELLO said of the operator's view: the VNC port and the view-only password (a secret)
    vnc_port: int | None = None
    view_password: str | None = attrs.field(default=None, repr=False)


class GuestCallFailed(Exception):
    """A word said to a guest got no answer in time, or an error answer."""


class IGuestListener(Interface):
    """Told by the guest channel what guests do; the pool reconciler implements it."""

    def guest_hello(guest: GuestInfo) -> None:
        """A guest said HELLO (first time or again after a reconnect)."""

    def guest_gone(identity: str, reason: str) -> None:
        """A guest said BYE, or fell silent past the beacon timeout."""

    def guest_event(identity: str, event: Mapping[str, Any]) -> None:
        """A guest reported an event, e.g. ``{"action": "page-load", "url": ..., "title": ...}``."""


class IGuestChannel(Interface):
    """Says words to guests and awaits their answers; keeps the registry of guests."""

    def add_listener(listener: IGuestListener) -> None:
        """Register a listener for hello / gone / event notifications."""

    def guests() -> Mapping[str, GuestInfo]:
        """The guests currently known, by identity."""

    def mint_credentials(vmid: str) -> GuestCredentials:
        """Credentials for the VM about to be booted; valid until :meth:`revoke_credentials`."""

    def revoke_credentials(vmid: str) -> None:
        """Forget the VM's credentials; its connection, if any, is dropped."""

    async def call(identity: str, word: str, params: Mapping[str, Any], timeout: float) -> Mapping[str, Any]:
        """Say a request word (e.g. ``PREPARE``, ``CLEANUP``, ``CMD_RUN``) and await its answer.

        Raises :class:`GuestCallFailed` on timeout or an error answer.
        """


class IGuestCredentialsRestore(Interface):
    """Optional for a guest channel: accept again the credentials minted before a restart.

    The pool keeps each VM's login and passcode in its checkpoint; after a restart it hands those
    of the VMs it recovers back to the channel, so that their guests can log in and say HELLO
    again.  A channel without this (e.g. one whose guests share a login) need not provide it.
    """

    def restore_credentials(vmid: str, credentials: GuestCredentials) -> None:
        """Make ``credentials`` valid again for ``vmid`` (until :meth:`revoke_credentials`)."""


# --------------------------------------------------------------------------- checkpoint


class ICheckpointStore(Interface):
    """Keeps the last checkpoint of the pool; writes are atomic and coalesced."""

    def load() -> Mapping[str, Any] | None:
        """The last good checkpoint, or None (none yet, or corrupt and moved aside)."""

    def save(snapshot: Mapping[str, Any]) -> None:
        """Schedule a write; at most one write is in flight and one pending (the newest)."""

    async def flush() -> None:
        """Wait until every scheduled write is on disk."""


# --------------------------------------------------------------------------- control (the API's view)


class PoolError(Exception):
    """A request the pool refuses; ``code`` is the stable error code the API puts in its JSON."""

    status = 400
    code = "bad-request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(PoolError):
    """Bad input: out of range, min > max, unknown scheme, oversized."""

    status = 400
    code = "bad-request"


class UnknownBatch(PoolError):
    status = 404
    code = "unknown-batch"


class UnknownHandle(PoolError):
    status = 404
    code = "unknown-handle"


class UnknownVM(PoolError):
    status = 404
    code = "unknown-vm"


class BatchCancelled(PoolError):
    status = 409
    code = "batch-cancelled"


class ShuttingDown(PoolError):
    status = 409
    code = "shutting-down"


class IPoolControl(Interface):
    """The operations of the REST API, on the pool; the API is a thin HTTP skin over this.

    Every method validates its arguments and raises a :class:`PoolError` subclass on bad input.
    Answers are records of :mod:`vmcloud.pool.views` (times in seconds on the pool's clock); the
    API shapes them into its JSON.  Arguments are milliseconds where the REST API speaks them.
    """

    def set_pool_size(minimum: int, maximum: int, linger_ms: int) -> None:
        """Keep between min and max VMs; FREE VMs above min linger at most linger_ms."""

    def prepare_batch(size: int, homepage: str, options: BatchOptions) -> str:
        """Start a batch; return its id."""

    def lock(batch: str) -> str:
        """Lock a VM of the batch; return a new handle (maybe not yet assigned)."""

    def release(handle: str) -> None:
        """Give the handle's VM back: it is cleaned and reused."""

    def handle_status(handle: str) -> HandleStatus:
        """The handle, the VM it holds (if any) and whether its batch has sound."""

    def renew_expire(handle: str, expire_ms: int) -> None:
        """Release the handle expire_ms from now (resets any earlier timer)."""

    def last_event_id(handle: str) -> int:
        """The id to pass to the first fetch_events."""

    async def fetch_events(handle: str, last_id: int, wait: float) -> EventPage:
        """Events after last_id; waits up to ``wait`` seconds when there are none."""

    def cancel_batch(batch: str) -> None:
        """No new locks from the batch."""

    def terminate_vm(vmid: str) -> None:
        """The operator terminates one VM, whatever its state; a handle holding it loses it."""

    def shutdown() -> None:
        """Release every handle, cancel every batch, terminate every VM (under way on return)."""

    def all_status() -> PoolStatus:
        """Everything the monitor shows."""

    async def status_after(since: int, wait: float) -> PoolStatus:
        """The status once its version is not ``since``: at once when it already differs, else
        when it changes, or after ``wait`` seconds (or at stop) whatever it is then."""
