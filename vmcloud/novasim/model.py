"""The simulated cloud's state: servers, their life cycle on an injected clock, quota and capacity.

Nothing here knows HTTP: the compute API layer parses requests into :class:`CreateSpec` and
renders :class:`SimServer` records, so the behaviour (timing, outcomes, paging order) can be
tested with a :class:`twisted.internet.task.Clock` alone.  Listing is built for thousands of
servers: the creation order is kept sorted once, a page walks only the servers it returns (plus
those its filters skip), and a marker is found by bisection, never by a scan.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import heapq
import random
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

#: Nova's fault message when the scheduler finds no host (the trailing space is Nova's).
NO_VALID_HOST = "No valid host was found. "

Outcome = Literal["error", "stuck", "no-valid-host"]


class ApiFault(Exception):
    """A refusal the compute API turns into Nova's error body ``{kind: {code, message}}``."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def bad_request(message: str) -> ApiFault:
    return ApiFault(400, "badRequest", message)


def not_found(message: str) -> ApiFault:
    return ApiFault(404, "itemNotFound", message)


# --------------------------------------------------------------------------- catalogue records


@attrs.frozen
class Flavor:
    """A flavor as Nova lists it; ``vcpus`` and ``ram`` (MB) count against the quota."""

    id: str
    name: str
    ram: int
    vcpus: int
    disk: int
    ephemeral: int = 0
    swap: int = 0
    extra_specs: Mapping[str, str] = attrs.field(factory=dict)
    no_valid_host: bool = False  # scheduling always fails (the captured ``sim.novalidhost``)


@attrs.frozen
class Image:
    id: str
    name: str
    size: int = 21430272


@attrs.frozen
class Network:
    """A tenant network; servers on it get a fixed IPv4 address and a MAC under ``fa:16:3e``."""

    id: str
    label: str


#: The catalogue of the captured nova-api (nova-golden.jsonl), so its ids work unchanged.
DEFAULT_FLAVORS: tuple[Flavor, ...] = (
    Flavor("1", "m1.tiny", ram=512, vcpus=1, disk=1),
    Flavor("2", "m1.small", ram=2048, vcpus=1, disk=20),
    Flavor("3", "m1.medium", ram=4096, vcpus=2, disk=40),
    Flavor("4", "m1.large", ram=8192, vcpus=4, disk=80),
    Flavor("5", "m1.xlarge", ram=16384, vcpus=8, disk=160),
    Flavor("6", "m1.tiny.specs", ram=512, vcpus=1, disk=1, extra_specs={"hw:mem_page_size": "small"}),
    Flavor("sim.novalidhost", "sim.novalidhost", ram=512, vcpus=1, disk=10000000, no_valid_host=True),
)
DEFAULT_IMAGES: tuple[Image, ...] = (
    Image("155d900f-4e14-4e4c-a73d-069cbf4541e6", "cirros-0.6.3-x86_64-disk"),
)
DEFAULT_NETWORKS: tuple[Network, ...] = (Network("3cb9bc59-5699-4588-a4b1-b87f96708bc6", "private"),)


@attrs.frozen
class BootRule:
    """How boots whose name matches ``pattern`` (``re.search``) end, with probability ``rate``.

    ``error``: the build is aborted at spawn time (``Build of instance <id> aborted: <message>``);
    ``no-valid-host``: scheduling fails; ``stuck``: the server stays in BUILD for ever.
    """

    pattern: str = ""
    outcome: Outcome = "error"
    rate: float = 1.0
    message: str = "Simulated spawn failure"

    def __attrs_post_init__(self) -> None:
        if self.outcome not in ("error", "stuck", "no-valid-host"):
            raise ValueError(f"boot rule outcome must be error, stuck or no-valid-host, not {self.outcome!r}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"boot rule rate must be within [0, 1], not {self.rate}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"boot rule pattern is not a regular expression: {e}") from None


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value}")


@attrs.frozen
class CloudSettings:
    """What a test or the control API tunes while the simulator runs (replaced whole, never mutated)."""

    build_seconds: float = attrs.field(default=2.0, validator=_non_negative)
    delete_seconds: float = attrs.field(default=1.0, validator=_non_negative)
    quota_instances: int = attrs.field(default=50, validator=_non_negative)
    quota_cores: int = attrs.field(default=100, validator=_non_negative)
    quota_ram: int = attrs.field(default=102400, validator=_non_negative)
    capacity: int | None = None  # servers the hosts can hold at once; None: unlimited
    max_limit: int = attrs.field(default=1000, validator=attrs.validators.ge(1))  # Nova's [api] max_limit
    boot_rules: tuple[BootRule, ...] = ()
    keypairs: tuple[str, ...] = ("vmcloud",)
    security_groups: tuple[str, ...] = ("default",)


@attrs.frozen
class CreateSpec:
    """A validated ``POST /servers`` body."""

    name: str
    image_ref: str
    flavor_ref: str
    metadata: Mapping[str, str] = attrs.field(factory=dict)
    user_data: str | None = None  # base64, as sent
    networks: tuple[str, ...] | Literal["auto", "none"] = "auto"
    key_name: str | None = None
    security_groups: tuple[str, ...] = ("default",)
    min_count: int = 1
    max_count: int = 1


@attrs.frozen
class ServerView:
    """A copy of one server for hooks, tests and the control API: plain data, safe to keep."""

    id: str
    name: str
    status: str
    task_state: str | None
    metadata: Mapping[str, str]
    user_data: bytes | None  # decoded: exactly what the client put in user-data
    network: str | None  # label of the network the address is on
    mac: str | None
    ip: str | None
    fault: str | None
    created: float  # on the simulator's clock
    image: str = ""  # the id of the image it was booted from

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "task_state": self.task_state,
            "metadata": dict(self.metadata),
            "network": self.network,
            "mac": self.mac,
            "ip": self.ip,
            "fault": self.fault,
            "created": self.created,
            "image": self.image,
        }


@attrs.frozen
class Fault:
    code: int
    message: str
    created: float


@attrs.define(slots=True, eq=False)
class SimServer:
    """One server's mutable state; only :class:`NovaCloud` changes it."""

    id: str
    name: str
    project_id: str
    user_id: str
    flavor: Flavor
    image: Image
    metadata: dict[str, str]
    user_data: str | None
    key_name: str | None
    security_groups: tuple[str, ...]
    network: Network | None
    mac: str
    ip: str
    outcome: Outcome | None
    outcome_message: str
    created: float
    updated: float
    status: str = "BUILD"
    vm_state: str = "building"
    task_state: str | None = "scheduling"
    power_state: int = 0
    host: str | None = None
    networked: bool = False  # network allocated: addresses and security groups are visible
    launched_at: float | None = None
    fault: Fault | None = None
    announced: bool = False  # on_active was called
    pending: Deadline | None = None

    @property
    def sort_key(self) -> tuple[float, str]:
        return (self.created, self.id)

    @property
    def addresses(self) -> dict[str, list[dict[str, object]]]:
        if not self.networked or self.network is None:
            return {}
        return {
            self.network.label: [
                {
                    "version": 4,
                    "addr": self.ip,
                    "OS-EXT-IPS:type": "fixed",
                    "OS-EXT-IPS-MAC:mac_addr": self.mac,
                }
            ]
        }

    @property
    def host_id(self) -> str:
        """Nova's ``hostId``: a per-project hash of the host name, empty until scheduled."""
        if self.host is None:
            return ""
        return hashlib.sha224((self.project_id + self.host).encode()).hexdigest()

    def view(self) -> ServerView:
        decoded: bytes | None = None
        if self.user_data is not None:
            decoded = base64.b64decode(self.user_data)
        return ServerView(
            id=self.id,
            name=self.name,
            status=self.status,
            task_state=self.task_state,
            metadata=dict(self.metadata),
            user_data=decoded,
            network=self.network.label if self.network and self.networked else None,
            mac=self.mac if self.networked and self.network else None,
            ip=self.ip if self.networked and self.network else None,
            fault=self.fault.message if self.fault else None,
            created=self.created,
            image=self.image.id,
        )


@attrs.frozen
class ListFilter:
    """The ``GET /servers`` query filters the simulator honours."""

    name: re.Pattern[str] | None = None
    status: str | None = None
    changes_since: float | None = None

    def admits(self, server: SimServer) -> bool:
        if self.name is not None and self.name.search(server.name) is None:
            return False
        if self.status is not None and server.status != self.status:
            return False
        return self.changes_since is None or server.updated >= self.changes_since


@attrs.define(eq=False)
class Deadline:
    """A step of one server's life cycle, due at ``due`` on the clock; cancelling is lazy."""

    due: float
    seq: int
    action: Callable[[SimServer, float], None]
    server: SimServer
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: Deadline) -> bool:
        return (self.due, self.seq) < (other.due, other.seq)


class Agenda:
    """Every server's next step in one heap, driven by a single delayed call on the clock.

    Thousands of servers cost one timer, not thousands (``task.Clock`` re-sorts all its calls on
    every ``callLater``).  A step runs with the time it was due, so ``Clock.advance(n)`` in one
    go gives the same states and timestamps as many small advances.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._heap: list[Deadline] = []
        self._seq = 0
        self._call: IDelayedCall | None = None

    def at(self, due: float, action: Callable[[SimServer, float], None], server: SimServer) -> Deadline:
        self._seq += 1
        deadline = Deadline(due, self._seq, action, server)
        heapq.heappush(self._heap, deadline)
        self._arm()
        return deadline

    def _arm(self) -> None:
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
        if not self._heap:
            return
        earliest = self._heap[0].due
        if self._call is not None and self._call.active():
            if self._call.getTime() <= earliest:
                return
            self._call.cancel()
        self._call = self._clock.callLater(max(0.0, earliest - self._clock.seconds()), self._run)

    def _run(self) -> None:
        self._call = None
        now = self._clock.seconds()
        while self._heap and self._heap[0].due <= now:
            deadline = heapq.heappop(self._heap)
            if deadline.cancelled:
                continue
            try:
                deadline.action(deadline.server, deadline.due)
            except Exception:
                log.failure("novasim: life-cycle step of {name} failed", name=deadline.server.name)
        self._arm()


ServerHook = Callable[[ServerView], object]  # what a hook returns is ignored

_TOMBSTONES = 100_000  # deleted ids still accepted as a marker (Nova reads deleted rows for markers)


class NovaCloud:
    """Servers of one simulated project, with Nova's life cycle, quota, capacity and paging.

    ``on_active(view)`` runs when a server becomes ACTIVE (e.g. to start a guest agent with the
    view's ``user_data``, ``mac`` and ``ip``); ``on_deleted(view)`` when a DELETE of such a server is
    accepted.  Both run on the clock's thread and must be cheap; an exception in them is logged.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        settings: CloudSettings | None = None,
        rng: random.Random | None = None,
        flavors: Sequence[Flavor] = DEFAULT_FLAVORS,
        images: Sequence[Image] = DEFAULT_IMAGES,
        networks: Sequence[Network] = DEFAULT_NETWORKS,
        on_active: ServerHook | None = None,
        on_deleted: ServerHook | None = None,
    ) -> None:
        self.clock = clock
        self.settings = settings or CloudSettings()
        self.rng = rng or random.Random()
        self.flavors = {f.id: f for f in flavors}
        self.images = {i.id: i for i in images}
        self.networks = {n.id: n for n in networks}
        self.on_active = on_active
        self.on_deleted = on_deleted
        self._servers: dict[str, SimServer] = {}
        self._order: list[tuple[float, str]] = []  # ascending (created, id) of live servers
        self._tombstones: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._agenda = Agenda(clock)
        self._serial = 0  # addresses are derived from it, so they are deterministic
        self._hosted = 0  # servers holding a host (for capacity)
        self.used_instances = 0
        self.used_cores = 0
        self.used_ram = 0

    # ------------------------------------------------------------------ settings

    def configure(self, **changes: object) -> CloudSettings:
        """Replace some settings (validated); running life cycles keep their timers."""
        self.settings = attrs.evolve(self.settings, **changes)  # type: ignore[arg-type]
        return self.settings

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._servers)

    def get(self, server_id: str) -> SimServer:
        server = self._servers.get(server_id)
        if server is None:
            raise not_found(f"Instance {server_id} could not be found.")
        return server

    def views(self) -> list[ServerView]:
        """Every server, oldest first."""
        return [self._servers[sid].view() for _, sid in self._order]

    def page(self, filters: ListFilter, marker: str | None, limit: int) -> list[SimServer]:
        """Up to ``limit`` servers after ``marker``, newest first (created desc, then id desc)."""
        if marker is None:
            start = len(self._order)
        else:
            server = self._servers.get(marker)
            key = server.sort_key if server is not None else self._tombstones.get(marker)
            if key is None:
                raise bad_request(f"marker [{marker}] not found")
            start = bisect.bisect_left(self._order, key)
        found: list[SimServer] = []
        index = start - 1
        while index >= 0 and len(found) < limit:
            server = self._servers[self._order[index][1]]
            if filters.admits(server):
                found.append(server)
            index -= 1
        return found

    # ------------------------------------------------------------------ create

    def create(self, spec: CreateSpec, *, project_id: str, user_id: str) -> list[SimServer]:
        """Validate references and quota, then start the life cycle of ``max_count`` servers at most."""
        flavor = self.flavors.get(spec.flavor_ref)
        if flavor is None:
            raise bad_request(f"Flavor {spec.flavor_ref} could not be found.")
        image = self.images.get(spec.image_ref)
        if image is None:
            raise bad_request("Can not find requested image")
        network = self._network_for(spec.networks)
        if spec.key_name is not None and spec.key_name not in self.settings.keypairs:
            raise bad_request("Invalid key_name provided.")
        for group in spec.security_groups:
            if group not in self.settings.security_groups:
                raise bad_request(f"Security group {group} not found for project {project_id}.")
        count = self._quota_allows(flavor, spec.min_count, spec.max_count)
        now = self.clock.seconds()
        created = []
        for index in range(count):
            name = spec.name if count == 1 else f"{spec.name}-{index + 1}"
            created.append(self._add(spec, name, flavor, image, network, project_id, user_id, now))
        return created

    def _network_for(self, networks: tuple[str, ...] | Literal["auto", "none"]) -> Network | None:
        if networks == "none":
            return None
        if networks == "auto":
            return next(iter(self.networks.values()), None)
        for net_id in networks:
            if net_id not in self.networks:
                raise bad_request(f"Network {net_id} could not be found.")
        return self.networks[networks[0]] if networks else None

    def _quota_allows(self, flavor: Flavor, min_count: int, max_count: int) -> int:
        """How many of ``max_count`` fit, or Nova's 403 when fewer than ``min_count`` do."""
        s = self.settings
        room = [
            ("cores", flavor.vcpus, self.used_cores, s.quota_cores),
            ("instances", 1, self.used_instances, s.quota_instances),
            ("ram", flavor.ram, self.used_ram, s.quota_ram),
        ]
        fits = max_count
        for _, each, used, limit in room:
            if each > 0:
                fits = min(fits, max(0, (limit - used) // each))
        if fits >= min_count:
            return fits
        over = [(name, each * min_count, used, limit) for name, each, used, limit in room]
        over = [item for item in over if item[2] + item[1] > item[3]]
        names = ", ".join(item[0] for item in over)

        def column(position: int) -> str:
            return ", ".join(str(item[position]) for item in over)

        raise ApiFault(
            403,
            "forbidden",
            f"Quota exceeded for {names}: Requested {column(1)}, but already used {column(2)} "
            f"of {column(3)} {names}",
        )

    def _add(
        self,
        spec: CreateSpec,
        name: str,
        flavor: Flavor,
        image: Image,
        network: Network | None,
        project_id: str,
        user_id: str,
        now: float,
    ) -> SimServer:
        self._serial += 1
        serial = self._serial
        outcome, message = self._decide_outcome(name, flavor)
        server = SimServer(
            id=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            name=name,
            project_id=project_id,
            user_id=user_id,
            flavor=flavor,
            image=image,
            metadata=dict(spec.metadata),
            user_data=spec.user_data,
            key_name=spec.key_name,
            security_groups=spec.security_groups,
            network=network,
            mac=f"fa:16:3e:{(serial >> 16) & 255:02x}:{(serial >> 8) & 255:02x}:{serial & 255:02x}",
            ip=f"10.{((serial + 1) >> 16) & 255}.{((serial + 1) >> 8) & 255}.{(serial + 1) & 255}",
            outcome=outcome,
            outcome_message=message,
            created=now,
            updated=now,
        )
        self._servers[server.id] = server
        bisect.insort(self._order, server.sort_key)
        self.used_instances += 1
        self.used_cores += flavor.vcpus
        self.used_ram += flavor.ram
        server.pending = self._agenda.at(now + self.settings.build_seconds / 2, self._schedule, server)
        return server

    def _decide_outcome(self, name: str, flavor: Flavor) -> tuple[Outcome | None, str]:
        """Drawn at creation, so a rule changed later does not affect servers already building."""
        if flavor.no_valid_host:
            return "no-valid-host", NO_VALID_HOST
        for rule in self.settings.boot_rules:
            if re.search(rule.pattern, name) and self.rng.random() < rule.rate:
                return rule.outcome, rule.message
        return None, ""

    # ------------------------------------------------------------------ life cycle

    def _schedule(self, server: SimServer, now: float) -> None:
        """Half-way through the build: a host is chosen (or not) and the network allocated."""
        server.pending = None
        capacity = self.settings.capacity
        if server.outcome == "no-valid-host" or (capacity is not None and self._hosted >= capacity):
            self._fail(server, NO_VALID_HOST, now)
            return
        server.host = f"sim-host-{self._hosted % 8}"
        self._hosted += 1
        server.task_state = "spawning"
        server.networked = True
        server.updated = now
        if server.outcome != "stuck":
            server.pending = self._agenda.at(
                server.created + self.settings.build_seconds, self._spawned, server
            )

    def _spawned(self, server: SimServer, now: float) -> None:
        server.pending = None
        if server.outcome == "error":
            self._unhost(server)
            server.networked = False
            self._fail(server, f"Build of instance {server.id} aborted: {server.outcome_message}", now)
            return
        server.status = "ACTIVE"
        server.vm_state = "active"
        server.task_state = None
        server.power_state = 1
        server.launched_at = now
        server.updated = now
        server.announced = self.on_active is not None
        self._run_hook(self.on_active, server, "on_active")

    def _fail(self, server: SimServer, message: str, now: float) -> None:
        server.status = "ERROR"
        server.vm_state = "error"
        server.task_state = None
        server.fault = Fault(500, message, now)
        server.updated = now
        log.info(
            "novasim: server {name} ({id}) failed: {message}", name=server.name, id=server.id, message=message
        )

    def _unhost(self, server: SimServer) -> None:
        if server.host is not None:
            server.host = None
            self._hosted -= 1

    # ------------------------------------------------------------------ delete

    def delete(self, server_id: str) -> None:
        """Nova's DELETE: the server shows ``task_state: deleting`` for a while, then is gone."""
        server = self.get(server_id)
        if server.task_state == "deleting":
            return
        if server.pending is not None:
            server.pending.cancel()
        server.task_state = "deleting"
        server.updated = self.clock.seconds()
        server.pending = self._agenda.at(server.updated + self.settings.delete_seconds, self._remove, server)
        if server.announced:
            server.announced = False
            self._run_hook(self.on_deleted, server, "on_deleted")

    def _remove(self, server: SimServer, now: float) -> None:
        server.pending = None
        del self._servers[server.id]
        index = bisect.bisect_left(self._order, server.sort_key)
        del self._order[index]
        self._tombstones[server.id] = server.sort_key
        if len(self._tombstones) > _TOMBSTONES:
            self._tombstones.popitem(last=False)
        self._unhost(server)
        self.used_instances -= 1
        self.used_cores -= server.flavor.vcpus
        self.used_ram -= server.flavor.ram

    def _run_hook(self, hook: ServerHook | None, server: SimServer, which: str) -> None:
        if hook is None:
            return
        try:
            hook(server.view())
        except Exception:
            log.failure("novasim: {which} hook failed for server {name}", which=which, name=server.name)

    # ------------------------------------------------------------------ metadata

    def set_metadata(self, server_id: str, metadata: Mapping[str, str], *, replace: bool) -> dict[str, str]:
        server = self.get(server_id)
        merged = dict(metadata) if replace else {**server.metadata, **metadata}
        _check_metadata_count(merged)
        server.metadata = merged
        server.updated = self.clock.seconds()
        return dict(merged)

    def delete_metadata_item(self, server_id: str, key: str) -> None:
        server = self.get(server_id)
        if key not in server.metadata:
            raise not_found("Metadata item was not found")
        del server.metadata[key]
        server.updated = self.clock.seconds()


MAX_METADATA_ITEMS = 128


def _check_metadata_count(metadata: Mapping[str, str]) -> None:
    if len(metadata) > MAX_METADATA_ITEMS:
        raise ApiFault(
            403, "forbidden", f"Quota exceeded for metadata_items: maximum is {MAX_METADATA_ITEMS}"
        )


def is_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True
