"""The OpenStack Nova cloud driver: python-novaclient over keystoneauth1, off the reactor thread.

Every cloud call is one short blocking novaclient call run through the injected ``dispatch``
(production: a dedicated bounded thread pool).  Each worker thread keeps its own keystoneauth
session and novaclient client (``threading.local``), so tokens and HTTP connections are reused
but never shared across threads.  Inside the thread the result is copied into our own records and
every exception is translated into a :class:`~vmcloud.pool.interfaces.CloudError` subclass, so
nothing of novaclient ever reaches the reactor thread.

The driver never retries and never sleeps: keystoneauth re-authenticates once on a 401 by itself,
and everything else (5xx, timeouts, 413/429, quota) goes back to the pool, which backs off.  What
the driver saw last is kept for ``/all-status`` in :meth:`NovaDriver.health`.

The pool's whole state comes from one listing per poll: ``GET /servers/detail?name=^<prefix>``
with ``limit=-1``'s paging (``marker`` until an empty page, so more than Nova's ``max_limit`` of
1000 servers are seen; walked a page at a time), never a per-server ``GET /servers/{id}``.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from vmcloud.drivers.userdata import render_user_data
from vmcloud.pool.interfaces import (
    ACTIVE,
    BUILD,
    DELETING,
    ERROR,
    BadCloudRequest,
    BootRequest,
    CloudError,
    CloudUnavailable,
    ICloudDriver,
    QuotaExceeded,
    RateLimited,
    ServerStatus,
)
from vmcloud.threads import Dispatch
from vmcloud.timings import NO_TIMINGS, NOVA_CALL, OK, ITimings

log = Logger()

T = TypeVar("T")


class NovaConfigError(ValueError):
    """The ``[nova]`` settings cannot be used; the message names the key."""


_MICROVERSION_RE = re.compile(r"^2\.(0|[1-9]\d*)$")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})

#: Where ``from_sources`` looks when a key is empty, in order.
ENVIRONMENT: Mapping[str, tuple[str, ...]] = {
    "auth_url": ("OS_AUTH_URL",),
    "username": ("OS_USERNAME",),
    "password": ("OS_PASSWORD",),
    "project_name": ("OS_PROJECT_NAME", "OS_TENANT_NAME"),
    "user_domain_name": ("OS_USER_DOMAIN_NAME",),
    "project_domain_name": ("OS_PROJECT_DOMAIN_NAME",),
    "region_name": ("OS_REGION_NAME",),
    "application_credential_id": ("OS_APPLICATION_CREDENTIAL_ID",),
    "application_credential_secret": ("OS_APPLICATION_CREDENTIAL_SECRET",),
    "token": ("OS_TOKEN", "OS_AUTH_TOKEN"),
    "microversion": ("OS_COMPUTE_API_VERSION",),
    "insecure": ("OS_INSECURE",),
    "cacert": ("OS_CACERT",),
}


@attrs.frozen
class NovaConfig:
    """How to reach the cloud and what to boot; secrets are kept out of ``repr``.

    Authentication, first match wins: an application credential (``application_credential_id``
    and ``_secret``); a ``token`` with ``endpoint_override`` (no Keystone at all:
    ``token_endpoint.Token``); a ``token`` re-scoped at Keystone; else ``username``/``password``
    (user and project domains default to ``Default``).  ``image``, ``flavor`` and ``network`` are
    ids: novaclient sends them as given, and names would need Glance.
    """

    auth_url: str = ""
    username: str = ""
    password: str = attrs.field(default="", repr=False)
    project_name: str = ""
    user_domain_name: str = ""
    project_domain_name: str = ""
    region_name: str = ""
    application_credential_id: str = ""
    application_credential_secret: str = attrs.field(default="", repr=False)
    token: str = attrs.field(default="", repr=False)
    image: str = ""
    flavor: str = ""
    network: str = ""
    key_name: str = ""
    security_groups: tuple[str, ...] = ()
    microversion: str = "2.1"
    endpoint_override: str = ""
    timeout: float = 10.0
    floating_ip_pool: str = ""
    insecure: bool = False
    cacert: str = ""

    @classmethod
    def from_sources(cls, section: Mapping[str, str], environ: Mapping[str, str]) -> NovaConfig:
        """The ``[nova]`` section, its empty values filled from ``OS_*`` variables, checked.

        Raises :class:`NovaConfigError` naming the key for unknown keys, bad values, or
        credentials that are incomplete for every authentication method.
        """
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise NovaConfigError(f"[nova] {unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
        raw: dict[str, str] = {}
        for key in known:
            value = (section.get(key) or "").strip()
            for variable in ENVIRONMENT.get(key, ()) if not value else ():
                value = (environ.get(variable) or "").strip()
                if value:
                    break
            raw[key] = value
        try:
            timeout = float(raw["timeout"] or 10.0)
        except ValueError:
            raise NovaConfigError(f"[nova] timeout: expected seconds, got {raw['timeout']!r}") from None
        if not 0 < timeout <= 600:
            raise NovaConfigError(f"[nova] timeout: must be within (0, 600] seconds, got {timeout}")
        insecure = raw["insecure"].lower()
        if insecure not in _TRUE | _FALSE:
            raise NovaConfigError(f"[nova] insecure: expected true or false, got {raw['insecure']!r}")
        microversion = raw["microversion"] or "2.1"
        if not _MICROVERSION_RE.match(microversion):
            raise NovaConfigError(f"[nova] microversion: expected an explicit 2.N, got {microversion!r}")
        config = cls(
            **{
                k: v
                for k, v in raw.items()
                if k not in ("timeout", "insecure", "microversion", "security_groups")
            },
            security_groups=tuple(g.strip() for g in raw["security_groups"].split(",") if g.strip()),
            microversion=microversion,
            timeout=timeout,
            insecure=insecure in _TRUE,
        )
        config.check()
        return config

    def check(self) -> None:
        """Refuse settings no authentication method or boot can work with."""
        for key in ("image", "flavor"):
            if not getattr(self, key):
                raise NovaConfigError(f"[nova] {key}: required (an id)")
        if self.token and self.endpoint_override:
            return
        if not self.auth_url:
            raise NovaConfigError(
                "[nova] auth_url: required (or OS_AUTH_URL), unless token and endpoint_override"
            )
        if bool(self.application_credential_id) != bool(self.application_credential_secret):
            raise NovaConfigError("[nova] application_credential_id and _secret: give both or neither")
        if self.application_credential_id or self.token:
            return
        for key in ("username", "password", "project_name"):
            if not getattr(self, key):
                raise NovaConfigError(f"[nova] {key}: required for password authentication (or OS_*)")

    @property
    def auth_method(self) -> str:
        if self.application_credential_id:
            return "application-credential"
        if self.token:
            return "token-endpoint" if self.endpoint_override else "token"
        return "password"


class UnexpectedCloudError(CloudUnavailable):
    """An exception nobody foresaw (a bug here or in novaclient): retried like an outage, logged loudly.

    ``traceback`` is the formatted text from the worker thread, so the log can show where it
    happened without the exception itself leaving the thread.
    """

    def __init__(self, message: str, traceback: str) -> None:
        super().__init__(message)
        self.traceback = traceback


@attrs.frozen
class NovaHealth:
    """What the driver saw last, for ``/all-status`` (times on the injected clock)."""

    last_error: str | None = None
    last_error_kind: str | None = None  # the CloudError subclass name
    last_error_at: float | None = None
    backoff_until: float | None = None  # when the cloud's Retry-After ends
    quota_exceeded: bool = False  # the last boot was refused for quota or capacity
    consecutive_failures: int = 0
    last_success_at: float | None = None
    calls: int = 0
    failures: int = 0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


_STATUS_MAP = {
    "BUILD": BUILD,
    "REBUILD": BUILD,
    "ACTIVE": ACTIVE,
    "REBOOT": ACTIVE,
    "HARD_REBOOT": ACTIVE,
    "PASSWORD": ACTIVE,
    "MIGRATING": ACTIVE,
    "ERROR": ERROR,
    "DELETED": DELETING,
    "SOFT_DELETED": DELETING,
}


def server_status(info: Mapping[str, Any]) -> ServerStatus:
    """Our record of one server body from ``/servers/detail`` (plain data, safe on any thread).

    Nova statuses the pool cannot use (SHUTOFF, PAUSED, SUSPENDED, SHELVED, RESCUE, RESIZE,
    UNKNOWN, ...) map to ERROR, with a fault saying which, so the VM is replaced.
    """
    nova_status = str(info.get("status") or "UNKNOWN").upper()
    status = _STATUS_MAP.get(nova_status, ERROR)
    if info.get("OS-EXT-STS:task_state") == "deleting":
        status = DELETING
    fault: str | None = None
    if status == ERROR:
        raw_fault = info.get("fault")
        if isinstance(raw_fault, Mapping) and raw_fault.get("message"):
            fault = str(raw_fault["message"])
        else:
            fault = f"server status {nova_status}"
    macs: list[str] = []
    fixed: list[str] = []
    floating: list[str] = []
    addresses = info.get("addresses")
    if isinstance(addresses, Mapping):
        for entries in addresses.values():
            for entry in entries if isinstance(entries, list) else ():
                if not isinstance(entry, Mapping):
                    continue
                mac = entry.get("OS-EXT-IPS-MAC:mac_addr")
                if mac and str(mac).lower() not in macs:
                    macs.append(str(mac).lower())
                addr = entry.get("addr")
                if addr:
                    target = floating if entry.get("OS-EXT-IPS:type") == "floating" else fixed
                    if str(addr) not in target:
                        target.append(str(addr))
    metadata = info.get("metadata")
    metadata = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, Mapping) else {}
    return ServerStatus(
        server_id=str(info["id"]),
        name=str(info.get("name", "")),
        status=status,
        macs=tuple(macs),
        ips=tuple(fixed + floating),
        metadata=metadata,
        fault=fault,
        image=server_image(info, metadata),
    )


#: The metadata key holding the image a server was booted with, as the config names it.
META_IMAGE = "vmcloud-image"


def server_image(info: Mapping[str, Any], metadata: Mapping[str, str]) -> str | None:
    """The image a server was booted from, as ``[nova] image`` named it when it was booted.

    The driver tags every server with it (``vmcloud-image``), so that an image given as a URL, or
    whatever else Nova normalises, compares with the config as written; a server without the tag
    (booted by an older controller) gives Nova's ``image.id`` (empty for a boot from volume: None).
    Interned: thousands of VMs of one image hold one string.
    """
    image = metadata.get(META_IMAGE)
    if not image:
        body = info.get("image")
        image = str(body.get("id") or "") if isinstance(body, Mapping) else ""
    return sys.intern(image) if image else None


def translate(error: Exception) -> CloudError:
    """The pool's view of a novaclient or keystoneauth exception (called inside the worker thread)."""
    from keystoneauth1 import exceptions as ks
    from novaclient import exceptions as nova

    message = str(error) or type(error).__name__
    if isinstance(error, nova.ClientException):
        code = getattr(error, "code", None)
        text = str(getattr(error, "message", "") or message)
        if "quota exceeded" in text.lower() and code in (403, 413):
            return QuotaExceeded(f"quota exceeded: {text}")
        if isinstance(error, nova.RetryAfterException):
            return RateLimited(
                f"rate limited ({code}): {text}", retry_after=float(error.retry_after or 0) or None
            )
        if isinstance(code, int) and code >= 500:
            return CloudUnavailable(f"cloud error {code}: {text}")
        if isinstance(error, nova.Conflict):
            return CloudUnavailable(f"conflict: {text}")
        if isinstance(error, nova.Unauthorized):
            return BadCloudRequest(f"authentication refused: {text}")
        return BadCloudRequest(f"request refused ({code}): {text}")
    if isinstance(error, ks.RetriableConnectionFailure | ks.ConnectionError):
        return CloudUnavailable(f"cannot reach the cloud: {message}")
    if isinstance(error, ks.HttpError):
        status = getattr(error, "http_status", None) or 0
        if status in (413, 429):
            return RateLimited(
                f"identity rate limited ({status}): {message}",
                retry_after=float(error.retry_after or 0) or None,
            )
        if status >= 500:
            return CloudUnavailable(f"identity error {status}: {message}")
        if status == 401:
            return BadCloudRequest(f"authentication refused: {message}")
        return BadCloudRequest(f"identity refused ({status}): {message}")
    if isinstance(error, ks.ClientException):  # catalog, discovery, missing auth options
        return BadCloudRequest(f"cloud configuration: {message}")
    if isinstance(error, ValueError):  # novaclient's own argument checks
        return BadCloudRequest(f"bad request: {message}")
    return UnexpectedCloudError(f"unexpected {type(error).__name__}: {message}", traceback.format_exc())


def call_outcome(error: CloudError) -> str:
    """A failed call's ``outcome`` in the Nova call histogram (one of ``timings.CLOUD_OUTCOMES``)."""
    if isinstance(error, QuotaExceeded):
        return "quota"
    if isinstance(error, RateLimited):
        return "ratelimit"
    if isinstance(error, UnexpectedCloudError):
        return "error"
    if isinstance(error, CloudUnavailable):
        return "unavailable"
    if isinstance(error, BadCloudRequest):
        return "refused"
    return "error"


@implementer(ICloudDriver)
class NovaDriver:
    """:class:`~vmcloud.pool.interfaces.ICloudDriver` for OpenStack Nova.

    ``dispatch`` runs one blocking callable per cloud call off the reactor thread (production:
    :meth:`vmcloud.threads.ThreadPoolService.dispatch`); ``clock`` stamps :meth:`health`;
    ``controller_name`` is written into every server's metadata (``vmcloud-controller``) so a
    reaped stray says who made it.
    """

    name = "nova"

    def __init__(
        self,
        config: NovaConfig,
        *,
        prefix: str,
        dispatch: Dispatch,
        clock: IReactorTime,
        controller_name: str,
        timings: ITimings = NO_TIMINGS,
    ) -> None:
        if not prefix:
            raise NovaConfigError("the server name prefix must not be empty (it scopes every listing)")
        config.check()
        self.config = config
        self.prefix = prefix
        #: The image new servers boot from; the pool retires VMs listed with another.
        self.image = config.image
        self.controller_name = controller_name
        self._dispatch = dispatch
        self._clock = clock
        self._timings = timings
        self._local = threading.local()
        self._health = NovaHealth()
        if config.floating_ip_pool:
            log.warn(
                "[nova] floating_ip_pool = {pool} is ignored: guests reach the controller, not the reverse",
                pool=config.floating_ip_pool,
            )
        log.info(
            "Nova driver: {auth} authentication at {where}, microversion {mv}, prefix {prefix}",
            auth=config.auth_method,
            where=config.endpoint_override or config.auth_url,
            mv=config.microversion,
            prefix=prefix,
        )

    # ------------------------------------------------------------------ ICloudDriver

    async def boot(self, request: BootRequest) -> str:
        if not request.name.startswith(self.prefix):
            raise BadCloudRequest(f"server name {request.name!r} lacks the pool prefix {self.prefix!r}")
        user_data = render_user_data(request.credentials)
        metadata = {
            "vmcloud-controller": self.controller_name,
            "vmcloud-vmid": request.vmid,
            META_IMAGE: self.config.image,
            **request.metadata,
        }
        config = self.config
        nics: Any = None
        if config.network:
            nics = [{"net-id": config.network}]
        elif _minor(config.microversion) >= 37:
            nics = "auto"

        def create() -> str:
            client = self._client()
            server = client.servers.create(
                request.name,
                config.image,
                config.flavor,
                meta=metadata,
                userdata=user_data,
                nics=nics,
                key_name=config.key_name or None,
                security_groups=list(config.security_groups) or None,
            )
            # Only the id: any other attribute of the 202 answer would make novaclient GET the server.
            return str(server.to_dict()["id"])

        # the pool's state line says which server it got: no second line per boot
        return await self._call("boot", create, quota_call=True)

    async def delete(self, server_id: str) -> None:
        def delete() -> None:
            from novaclient import exceptions as nova

            with contextlib.suppress(nova.NotFound):  # already gone: that is what we wanted
                self._client().servers.delete(server_id)

        await self._call("delete", delete)

    async def list_servers(self) -> list[ServerStatus]:
        prefix = self.prefix

        def listing() -> list[ServerStatus]:
            # novaclient's limit=-1 walk, made page by page: the very same requests (no limit, then
            # marker = the last id, until an empty page), but one page of its Server objects alive
            # at a time instead of all of them (at 5,000 servers the whole walk held 40 MB at once,
            # and the daemon's RSS kept that high-water mark).  Unlike novaclient it stops, with an
            # error, when a page brings nothing new (a cloud ignoring the marker would loop forever).
            servers = self._client().servers
            search = {"name": "^" + re.escape(prefix)}
            found: list[ServerStatus] = []
            seen: set[str] = set()
            marker: str | None = None
            while True:
                page = servers.list(search_opts=search, marker=marker, limit=None)
                # _info is the body as parsed; to_dict() would deep-copy all of it first
                statuses = [server_status(server._info) for server in page]
                del page
                if not statuses:
                    break
                if all(status.server_id in seen for status in statuses):
                    raise CloudUnavailable(f"Nova listed the same servers again after marker {marker}")
                seen.update(status.server_id for status in statuses)
                found.extend(statuses)
                marker = statuses[-1].server_id
            # Nova's name filter is a database regex; never trust it alone with what we delete.
            return [status for status in found if status.name.startswith(prefix)]

        return await self._call("list", listing)

    # ------------------------------------------------------------------ health

    def health(self) -> NovaHealth:
        return self._health

    # ------------------------------------------------------------------ plumbing

    async def _call(self, operation: str, fn: Callable[[], T], *, quota_call: bool = False) -> T:
        took = 0.0  # the call itself, in its thread (not its wait for a free thread)

        def guarded() -> T:
            nonlocal took
            started = time.perf_counter()
            try:
                return fn()
            except CloudError:
                raise
            except Exception as e:
                translated = translate(e)
            finally:
                took = time.perf_counter() - started
            # Raised outside the except block, so not even __context__ carries novaclient's exception.
            raise translated

        try:
            result = await self._dispatch(guarded)
        except CloudError as e:
            self._timings.observe(NOVA_CALL, took, call=operation, outcome=call_outcome(e))
            self._record_failure(operation, e, quota_call)
            raise
        self._timings.observe(NOVA_CALL, took, call=operation, outcome=OK)
        now = self._clock.seconds()
        self._health = attrs.evolve(
            self._health,
            calls=self._health.calls + 1,
            consecutive_failures=0,
            last_success_at=now,
            quota_exceeded=False if quota_call else self._health.quota_exceeded,
        )
        return result

    def _record_failure(self, operation: str, error: CloudError, quota_call: bool) -> None:
        now = self._clock.seconds()
        h = self._health
        self._health = attrs.evolve(
            h,
            last_error=f"{operation}: {error}",
            last_error_kind=type(error).__name__,
            last_error_at=now,
            backoff_until=now + error.retry_after if error.retry_after else h.backoff_until,
            quota_exceeded=isinstance(error, QuotaExceeded) if quota_call else h.quota_exceeded,
            consecutive_failures=h.consecutive_failures + 1,
            calls=h.calls + 1,
            failures=h.failures + 1,
        )
        if isinstance(error, UnexpectedCloudError):
            log.error(
                "Nova {operation} failed unexpectedly: {reason}\n{traceback}",
                operation=operation,
                reason=str(error),
                traceback=error.traceback,
                event="nova-call-failed",
            )
            return
        log.warn(
            "Nova {operation} failed ({kind}): {reason}",
            operation=operation,
            kind=type(error).__name__,
            reason=str(error),
            retry_after=error.retry_after,
            event="nova-call-failed",
        )

    def _client(self) -> Any:
        """This thread's novaclient client (built on first use, then reused)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._build_client()
        return client

    def _build_client(self) -> Any:
        from keystoneauth1 import session as ks_session
        from keystoneauth1 import token_endpoint
        from keystoneauth1.identity import v3
        from novaclient import client as nova_client

        c = self.config
        auth: Any
        if c.application_credential_id:
            auth = v3.ApplicationCredential(
                auth_url=c.auth_url,
                application_credential_id=c.application_credential_id,
                application_credential_secret=c.application_credential_secret,
            )
        elif c.token and c.endpoint_override:
            auth = token_endpoint.Token(c.endpoint_override, c.token)
        elif c.token:
            auth = v3.Token(
                auth_url=c.auth_url,
                token=c.token,
                project_name=c.project_name or None,
                project_domain_name=c.project_domain_name or "Default",
            )
        else:
            auth = v3.Password(
                auth_url=c.auth_url,
                username=c.username,
                password=c.password,
                project_name=c.project_name,
                user_domain_name=c.user_domain_name or "Default",
                project_domain_name=c.project_domain_name or "Default",
            )
        verify: bool | str = c.cacert or True
        if c.insecure:
            verify = False
        session = ks_session.Session(auth=auth, timeout=c.timeout, verify=verify)
        return nova_client.Client(
            c.microversion,
            session=session,
            region_name=c.region_name or None,
            endpoint_override=c.endpoint_override or None,
        )


def _minor(microversion: str) -> int:
    return int(microversion.split(".")[1])
