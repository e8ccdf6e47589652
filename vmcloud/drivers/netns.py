"""Host networking of the local driver: one network namespace per VM on an isolated bridge.

As root, the local driver gives every VM what a cloud gives a server: its own network stack, one
interface with a stable locally-administered MAC and an IP, reachable from the host but not from the
other VMs.  That keeps the guest agent identical on Nova and on a laptop (it identifies itself by
MAC).  The recipe, step by step::

    ip link add BR type bridge; ip addr add 10.251.0.1/24 dev BR; ip link set BR up
    ip netns add NS
    ip link add VETH type veth peer name eth0 address MAC netns NS
    ip link set VETH master BR up; bridge link set dev VETH isolated on
    ip -n NS addr add IP/24 dev eth0; ip -n NS link set eth0 up; ip -n NS link set lo up

This module has three parts: :class:`NetnsLayout`, the pure naming and addressing plan (which names
and addresses belong to which daemon, within the 15-character limit of Linux interface names);
:func:`choose_subnet`, the pure decision whether the bridge is ours to use and which subnet it gets,
from a :class:`HostView` of the host's interfaces and routes; and :class:`HostNetwork`, which runs
``ip``/``bridge`` through an injected :data:`CommandRunner` so that tests can record the commands
without root.  Namespaces get no default route: guests reach the host (and the broker on the
bridge address) and nothing else.

Two daemons on one host: every name carries a tag hashed from the daemon's resolved state
directory and pool prefix (the bridge ``vmcb<tag>``, veths ``v<tag>-<slot>``, namespaces
``<prefix>-<tag>-<vmid>``), the bridge's alias records which state directory made it, and an
automatic subnet is a free /24 of :data:`AUTO_SUBNETS`, probed from the tag onwards.  A daemon
only ever removes names carrying its own tag and a bridge whose alias names its own state dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import re
import shutil
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from vmcloud.drivers.claims import HostInUse

log = Logger()

#: Linux limits interface names to IFNAMSIZ - 1 characters.
IFNAME_MAX = 15

#: Where system tools are looked up; fixed so that the daemon's own PATH does not matter.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")


def find_tool(name: str) -> str:
    """The absolute path of a system tool (``ip``, ``bridge``, ``setsid``), or ``name`` itself."""
    return shutil.which(name, path=SYSTEM_PATH) or name


# --------------------------------------------------------------------------- naming plan


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


@attrs.frozen
class VmNetwork:
    """The network identity of one VM in netns mode; recorded so a restart can tear it down."""

    namespace: str
    veth: str  # host end of the veth pair, enslaved to the bridge
    ip: str
    mac: str
    prefixlen: int


def pool_tag(state_dir: str, prefix: str) -> str:
    """Eight hex digits naming one daemon's pool on this host: its resolved state dir and prefix.

    Two daemons run on one host only with different state directories (the state dir's lock
    refuses a second one on the same), so their tags differ but for a 2^-32 chance.
    """
    return _digest(f"{state_dir}\0{prefix}").hex()[:8]


def derived_bridge(tag: str) -> str:
    """The bridge of a daemon that names none (``[local] bridge`` empty): ``vmcb<tag>``, 12 characters."""
    return f"vmcb{tag}"


def check_bridge_name(name: str) -> str:
    """``name`` if Linux takes it as an interface name; ValueError with the reason otherwise."""
    if not name or len(name) > IFNAME_MAX or not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"bridge name {name!r} must be 1-{IFNAME_MAX} of [A-Za-z0-9_.-]")
    return name


def check_subnet(text: str) -> ipaddress.IPv4Network:
    """The subnet ``text`` names (host bits ignored); ValueError with the reason otherwise."""
    try:
        subnet = ipaddress.IPv4Network(text.strip(), strict=False)
    except ValueError as e:
        raise ValueError(f"subnet {text!r} is not an IPv4 network: {e}") from None
    if subnet.num_addresses < 4:
        raise ValueError(f"subnet {subnet} is too small for a bridge and a VM")
    return subnet


@attrs.frozen
class NetnsLayout:
    """Names and addresses of one daemon's VMs, derived from its state dir, pool prefix and subnet.

    Every name carries :func:`pool_tag`, so that two daemons on one host (or two pools whose
    prefixes are prefixes of each other) never mistake each other's namespaces and veths for stale
    ones.  Host-side veth names are numbered by the VM's address slot, which keeps them within 15
    characters whatever the vmid looks like.
    """

    prefix: str
    subnet: ipaddress.IPv4Network
    bridge: str
    state_dir: str = ""

    def __attrs_post_init__(self) -> None:
        check_bridge_name(self.bridge)
        if self.subnet.num_addresses < 4:
            raise ValueError(f"subnet {self.subnet} is too small for a bridge and a VM")

    @classmethod
    def from_strings(cls, prefix: str, subnet: str, bridge: str, state_dir: str = "") -> NetnsLayout:
        """Parse the configured subnet; raises ValueError with the reason on bad input."""
        return cls(prefix=prefix, subnet=check_subnet(subnet), bridge=bridge, state_dir=state_dir)

    @property
    def tag(self) -> str:
        """:func:`pool_tag` of this layout's state dir and prefix."""
        return pool_tag(self.state_dir, self.prefix)

    @property
    def namespace_prefix(self) -> str:
        """Every namespace of the pool starts with this (readable prefix, then the tag)."""
        readable = re.sub(r"[^A-Za-z0-9_.-]", "_", self.prefix).rstrip("-_.") or "vm"
        return f"{readable[:40]}-{self.tag}-"

    @property
    def bridge_ip(self) -> str:
        """The host's address on the bridge: the first host address of the subnet."""
        return str(self.subnet.network_address + 1)

    @property
    def bridge_mac(self) -> str:
        """The bridge's own, fixed MAC (locally administered, derived from its name)."""
        return self.mac("bridge:" + self.bridge)

    @property
    def max_slot(self) -> int:
        """The highest slot number: every host address but the bridge's."""
        return self.subnet.num_addresses - 3

    def namespace(self, vmid: str) -> str:
        """``<prefix-derived>-<tag>-<vmid>``; a vmid unfit for a file name is replaced by its hash."""
        part = (
            vmid if _SAFE_NAME.fullmatch(vmid) and vmid not in (".", "..") else "h" + _digest(vmid).hex()[:12]
        )
        return self.namespace_prefix + part

    def veth(self, slot: int) -> str:
        """Host end of a VM's veth pair, e.g. ``v1a2b3c4d-17`` (at most 15 characters up to slot 99999)."""
        return f"v{self.tag}-{slot}"

    def address(self, slot: int) -> str:
        """The VM's IPv4 address; slot 1 is the address after the bridge's."""
        if not 1 <= slot <= self.max_slot:
            raise ValueError(f"slot {slot} outside 1..{self.max_slot}")
        return str(self.subnet.network_address + 1 + slot)

    @staticmethod
    def mac(name: str) -> str:
        """A locally administered unicast MAC (02:…) derived from the server name."""
        return ":".join(f"{b:02x}" for b in b"\x02" + _digest(name)[:5])

    def vm_network(self, vmid: str, name: str, slot: int) -> VmNetwork:
        """Everything a VM in slot ``slot`` gets."""
        return VmNetwork(
            namespace=self.namespace(vmid),
            veth=self.veth(slot),
            ip=self.address(slot),
            mac=self.mac(name),
            prefixlen=self.subnet.prefixlen,
        )

    def is_pool_namespace(self, name: str) -> bool:
        return name.startswith(self.namespace_prefix)

    def is_pool_veth(self, name: str) -> bool:
        return re.fullmatch(rf"v{self.tag}-\d+", name) is not None


# --------------------------------------------------------------------------- whose bridge, which subnet

#: Where automatic subnets come from: 2,048 /24s, away from the ranges Docker and Kubernetes use.
AUTO_SUBNETS = ipaddress.IPv4Network("10.200.0.0/13")
#: The size of an automatic subnet: 253 VMs and the bridge.
AUTO_PREFIXLEN = 24

#: How a bridge's alias (``ip link set BR alias ...``, kept by the kernel as long as the bridge
#: exists) says which daemon made it: this, then the resolved state dir.
ALIAS_PREFIX = "vmcloud-local "
#: The kernel keeps at most this many bytes of an interface alias.
IFALIAS_MAX = 255


def bridge_alias(state_dir: str) -> str:
    """The alias marking a bridge as made by the daemon of ``state_dir``.

    A state dir too long for an alias is recorded as ``#`` and its hash: still unique, but a
    neighbour's refusal then cannot name the directory.
    """
    alias = ALIAS_PREFIX + state_dir
    if len(alias.encode("utf-8")) > IFALIAS_MAX or "\n" in state_dir:
        alias = ALIAS_PREFIX + "#" + _digest(state_dir).hex()
    return alias


def alias_owner(alias: str | None) -> str | None:
    """The state dir a vmcloud bridge alias names ("" when only its hash is recorded); None: not vmcloud's."""
    if alias is None or not alias.startswith(ALIAS_PREFIX):
        return None
    owner = alias.removeprefix(ALIAS_PREFIX)
    return "" if owner.startswith("#") else owner


@attrs.frozen
class HostLink:
    """One interface of the host's namespace, as ``ip -j -d addr show`` describes it."""

    name: str
    kind: str | None  # "bridge", "veth", ... (None for a plain device)
    alias: str | None
    ipv4: tuple[ipaddress.IPv4Interface, ...] = ()


@attrs.frozen
class HostView:
    """The host's interfaces and IPv4 routes: what is taken before a bridge and a subnet are chosen."""

    links: Mapping[str, HostLink]
    routes: tuple[tuple[str, ipaddress.IPv4Network], ...] = ()  # (device, destination)

    def used_networks(self, except_dev: str) -> list[tuple[str, ipaddress.IPv4Network]]:
        """Every IPv4 network an address or a route of another device covers (the default route aside)."""
        used = [
            (link.name, address.network)
            for link in self.links.values()
            if link.name != except_dev
            for address in link.ipv4
        ]
        used += [(dev, net) for dev, net in self.routes if dev != except_dev and net.prefixlen > 0]
        return used


def parse_host_view(addresses: str, routes: str, details: str = "") -> HostView:
    """A :class:`HostView` from ``ip -j -4 addr show``, ``ip -j -4 route show table all``, ``ip -j -d link``.

    ``details`` (kind and alias) is asked for the bridge alone: for every interface it costs
    1.2 KB each, and a host with many VMs would overflow what a command may print.  Raises
    ValueError on output that is not ``ip``'s JSON.
    """
    links: dict[str, HostLink] = {}
    for entry in _json_list(addresses) + _json_list(details):
        if "ifname" not in entry:
            continue
        info = entry.get("linkinfo")
        kind = info.get("info_kind") if isinstance(info, dict) else None
        ipv4 = []
        for address in entry.get("addr_info", []):
            if isinstance(address, dict) and address.get("family") == "inet":
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    ipv4.append(ipaddress.IPv4Interface(f"{address['local']}/{address['prefixlen']}"))
        alias = entry.get("ifalias")
        known = links.get(str(entry["ifname"]))
        links[str(entry["ifname"])] = HostLink(
            name=str(entry["ifname"]),
            kind=str(kind) if kind is not None else None,
            alias=str(alias) if alias is not None else None,
            ipv4=tuple(ipv4) or (known.ipv4 if known is not None else ()),
        )
    found = []
    for route in _json_list(routes):
        destination = route.get("dst")
        if destination in (None, "default"):
            continue
        with contextlib.suppress(ValueError, TypeError):
            found.append((str(route.get("dev", "")), ipaddress.IPv4Network(destination, strict=False)))
    return HostView(links=links, routes=tuple(found))


def choose_subnet(
    view: HostView,
    *,
    bridge: str,
    state_dir: str,
    tag: str,
    subnet: ipaddress.IPv4Network | None,
    describe_owner: Callable[[str], str],
) -> ipaddress.IPv4Network:
    """Whether ``bridge`` is ours to use, and the subnet it gets; :class:`HostInUse` when not.

    - An interface of that name that this state dir's daemon did not make (its alias says so)
      is never used nor removed: another daemon's bridge, running or not (its VMs may be), or
      something that is not vmcloud's at all.
    - A configured ``subnet`` must not overlap any address or route of another device.
    - Otherwise the subnet our bridge already has (VMs of a previous run live in it), or the first
      /24 of :data:`AUTO_SUBNETS` that nothing on the host uses, probing from ``tag`` onwards so
      that daemons starting together look at different candidates first.

    ``describe_owner(state_dir)`` says who owns another daemon's bridge, for the refusal.
    """
    link = view.links.get(bridge)
    ours = bridge_alias(state_dir)
    if link is not None and (link.alias != ours or link.kind != "bridge"):
        owner = alias_owner(link.alias)
        if owner and owner != state_dir:
            whose = describe_owner(owner)
        elif owner == "":
            whose = "another vmcloud daemon (its state dir is too long to be recorded on the bridge)"
        else:
            raise HostInUse(
                f"interface {bridge} already exists and is not a bridge made by vmcloud for state dir "
                f"{state_dir} (alias {link.alias!r}); refusing to use or remove it. Set another [local] "
                "bridge, or leave it empty for one derived from the state dir"
            )
        raise HostInUse(
            f"bridge {bridge} belongs to {whose}; refusing to use or remove it. Set another [local] "
            "bridge for this daemon, or leave it empty for one derived from the state dir"
        )
    used = view.used_networks(except_dev=bridge)

    def overlap(candidate: ipaddress.IPv4Network) -> tuple[str, ipaddress.IPv4Network] | None:
        return next(((dev, net) for dev, net in used if candidate.overlaps(net)), None)

    if subnet is not None:
        clash = overlap(subnet)
        if clash is not None:
            raise HostInUse(
                f"[local] subnet {subnet} overlaps {clash[1]} on {clash[0] or 'a route'}; set another "
                "[local] subnet, or leave it empty to pick a free one"
            )
        return subnet
    for address in link.ipv4 if link is not None else ():
        kept = address.network
        if address.ip == kept.network_address + 1 and kept.num_addresses >= 4:
            clash = overlap(kept)
            if clash is not None:
                raise HostInUse(
                    f"bridge {bridge} keeps subnet {kept} from its last run, but {clash[0] or 'a route'} "
                    f"now uses {clash[1]} too; remove one of them"
                )
            return kept
    count = 1 << (AUTO_PREFIXLEN - AUTO_SUBNETS.prefixlen)
    size = 1 << (32 - AUTO_PREFIXLEN)
    start = int(tag, 16) % count
    base = int(AUTO_SUBNETS.network_address)
    for step in range(count):
        candidate = ipaddress.IPv4Network((base + ((start + step) % count) * size, AUTO_PREFIXLEN))
        if overlap(candidate) is None:
            return candidate
    raise HostInUse(f"no free /{AUTO_PREFIXLEN} left in {AUTO_SUBNETS}; set [local] subnet")


# --------------------------------------------------------------------------- running commands


@attrs.frozen
class CommandResult:
    """What a finished command did; ``code`` is the exit status, or minus the signal number."""

    argv: tuple[str, ...]
    code: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.code == 0


#: Runs one command (argv, no shell) to completion.  Production: :func:`process_runner`.
CommandRunner = Callable[[Sequence[str]], Awaitable[CommandResult]]


class NetworkCommandError(Exception):
    """An ``ip``/``bridge`` command failed; the message holds the command and its stderr."""

    def __init__(self, result: CommandResult) -> None:
        detail = result.err.strip() or result.out.strip() or f"exit status {result.code}"
        super().__init__(f"{' '.join(result.argv)}: {detail}")
        self.result = result


class _Collect(ProcessProtocol):
    """Collects a short command's output (bounded) and fires a CommandResult when it ends."""

    limit = 1 << 20

    def __init__(self, argv: tuple[str, ...], done: Deferred[CommandResult]) -> None:
        self.argv = argv
        self.done = done
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.size = 0

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self._keep(self.out, data)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self._keep(self.err, data)

    def _keep(self, into: list[bytes], data: bytes) -> None:
        if self.size < self.limit:
            into.append(data[: self.limit - self.size])
            self.size += len(data)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        code = 0
        if reason.check(ProcessTerminated):
            value = reason.value
            assert isinstance(value, ProcessTerminated)
            code = value.exitCode if value.exitCode is not None else -(value.signal or 0)
        elif not reason.check(ProcessDone):
            code = -1
        if not self.done.called:
            self.done.callback(
                CommandResult(
                    argv=self.argv,
                    code=code,
                    out=b"".join(self.out).decode("utf-8", "replace"),
                    err=b"".join(self.err).decode("utf-8", "replace"),
                )
            )


def process_runner(reactor: IReactorProcess, timeout: float = 20.0) -> CommandRunner:
    """A :data:`CommandRunner` spawning real processes; a command past ``timeout`` s is killed."""
    clock = IReactorTime(reactor)

    async def run(argv: Sequence[str]) -> CommandResult:
        args = tuple(argv)
        done: Deferred[CommandResult] = Deferred()
        protocol = _Collect(args, done)
        try:
            transport = reactor.spawnProcess(protocol, args[0], args, env={"PATH": SYSTEM_PATH})
        except OSError as e:
            return CommandResult(argv=args, code=-1, out="", err=f"cannot run: {e}")

        def kill() -> None:
            log.warn("Command {argv} timed out after {timeout} s; killing it", argv=args, timeout=timeout)
            with contextlib.suppress(Exception):  # already gone
                transport.signalProcess("KILL")

        timer = clock.callLater(timeout, kill)
        try:
            return await done
        finally:
            if timer.active():
                timer.cancel()

    return run


# --------------------------------------------------------------------------- the host side


class HostNetwork:
    """Creates and removes the bridge and the VMs' namespaces and veths with ``ip``/``bridge``.

    Every removal is idempotent (a missing object is success), so teardown after a crash, a
    half-done boot or a second ``delete`` is always safe.
    """

    def __init__(self, run: CommandRunner, ip: str = "ip", bridge_tool: str = "bridge") -> None:
        self._run = run
        self._ip = ip
        self._bridge_tool = bridge_tool

    async def _must(self, *argv: str) -> CommandResult:
        result = await self._run(argv)
        if not result.ok:
            raise NetworkCommandError(result)
        return result

    async def available(self) -> bool:
        """Whether ``ip netns`` works here (the caller checks for root)."""
        return (await self._run((self._ip, "netns", "list"))).ok

    async def view(self, bridge: str) -> HostView:
        """The host's IPv4 addresses and routes (all tables), and ``bridge``'s kind and alias if it exists."""
        addresses = await self._must(self._ip, "-j", "-4", "addr", "show")
        routes = await self._must(self._ip, "-j", "-4", "route", "show", "table", "all")
        details = await self._run((self._ip, "-j", "-d", "link", "show", "dev", bridge))
        if not details.ok and "does not exist" not in details.err:
            raise NetworkCommandError(details)
        try:
            return parse_host_view(addresses.out, routes.out, details.out if details.ok else "")
        except ValueError as e:
            raise NetworkCommandError(attrs.evolve(addresses, code=-1, err=f"unreadable output: {e}")) from e

    async def ensure_bridge(self, layout: NetnsLayout, alias: str) -> None:
        """Create the bridge (marked with ``alias``) if missing, give it its address, bring it up.

        The caller decided with :func:`choose_subnet` that the bridge, if it exists, is ours; an
        interface of that name appearing since is an error here, never adopted.
        """
        if layout.bridge not in await self.links():
            await self._must(self._ip, "link", "add", layout.bridge, "type", "bridge")
        await self._must(self._ip, "link", "set", "dev", layout.bridge, "alias", alias)
        shown = await self._must(self._ip, "-j", "addr", "show", "dev", layout.bridge)
        present = {
            (info.get("local"), info.get("prefixlen"))
            for entry in _json_list(shown.out)
            for info in entry.get("addr_info", [])
        }
        if (layout.bridge_ip, layout.subnet.prefixlen) not in present:
            cidr = f"{layout.bridge_ip}/{layout.subnet.prefixlen}"
            await self._must(self._ip, "addr", "add", cidr, "dev", layout.bridge)
        # A bridge without an address of its own takes the lowest MAC of its ports, so it changes
        # whenever a VM's veth comes or goes, and every guest's ARP entry for the broker goes stale:
        # their packets are dropped until ARP gives up on the old MAC (tens of seconds).
        await self._must(self._ip, "link", "set", layout.bridge, "address", layout.bridge_mac)
        await self._must(self._ip, "link", "set", layout.bridge, "up")

    async def remove_bridge(self, bridge: str) -> None:
        if bridge in await self.links():
            await self._run((self._ip, "link", "del", bridge))

    async def create(self, net: VmNetwork, bridge: str) -> None:
        """Build the VM's namespace and veth on ``bridge``; on any failure remove what was built and raise."""
        ns = net.namespace
        try:
            await self._must(self._ip, "netns", "add", ns)
            await self._must(
                self._ip, "link", "add", net.veth, "type", "veth",
                "peer", "name", "eth0", "address", net.mac, "netns", ns,
            )  # fmt: skip
            await self._must(self._ip, "link", "set", net.veth, "master", bridge, "up")
            await self._must(self._bridge_tool, "link", "set", "dev", net.veth, "isolated", "on")
            await self._must(self._ip, "-n", ns, "addr", "add", f"{net.ip}/{net.prefixlen}", "dev", "eth0")
            await self._must(self._ip, "-n", ns, "link", "set", "eth0", "up")
            await self._must(self._ip, "-n", ns, "link", "set", "lo", "up")
        except BaseException:
            await self.destroy(ns, net.veth)
            raise

    async def destroy(self, namespace: str | None, veth: str | None) -> None:
        """Remove a VM's namespace (which takes its end of the veth along) and the host end."""
        if namespace is not None and namespace in await self.namespaces():
            result = await self._run((self._ip, "netns", "del", namespace))
            if not result.ok:
                log.warn(
                    "Could not delete namespace {netns}: {error}", netns=namespace, error=result.err.strip()
                )
        if veth is not None and veth in await self.links():
            await self._run((self._ip, "link", "del", veth))

    async def namespaces(self) -> list[str]:
        """Names of every network namespace on the host (``ip netns list``)."""
        result = await self._must(self._ip, "-j", "netns", "list")
        return [str(entry["name"]) for entry in _json_list(result.out) if "name" in entry]

    async def links(self) -> list[str]:
        """Names of every interface in the host's namespace."""
        result = await self._must(self._ip, "-j", "link", "show")
        return [str(entry["ifname"]) for entry in _json_list(result.out) if "ifname" in entry]

    async def namespace_pids(self, namespace: str) -> list[int]:
        """Processes running in a namespace (empty when the namespace is gone)."""
        result = await self._run((self._ip, "netns", "pids", namespace))
        if not result.ok:
            return []
        return [int(word) for word in result.out.split() if word.isdigit()]


def _json_list(text: str) -> list[dict[str, Any]]:
    """``ip -j`` output; it prints nothing at all (not ``[]``) when a list is empty."""
    if not text.strip():
        return []
    value = json.loads(text)
    return [entry for entry in value if isinstance(entry, dict)] if isinstance(value, list) else []
