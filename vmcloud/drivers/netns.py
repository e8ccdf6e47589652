"""Host networking of the local driver: one network namespace per VM on an isolated bridge.

As root, the local driver gives every VM what a cloud gives a server: its own network stack, one
interface with a stable locally-administered MAC and an IP, reachable from the host but not from the
other VMs.  That keeps the guest agent identical on Nova and on a laptop (it identifies itself by
MAC).  The recipe is the one measured in GUEST-STACK.md section 5::

    ip link add BR type bridge; ip addr add 10.251.0.1/24 dev BR; ip link set BR up
    ip netns add NS
    ip link add VETH type veth peer name eth0 address MAC netns NS
    ip link set VETH master BR up; bridge link set dev VETH isolated on
    ip -n NS addr add IP/24 dev eth0; ip -n NS link set eth0 up; ip -n NS link set lo up

This module has two parts: :class:`NetnsLayout`, the pure naming and addressing plan (which names
and addresses belong to which pool, within the 15-character limit of Linux interface names), and
:class:`HostNetwork`, which runs ``ip``/``bridge`` through an injected :data:`CommandRunner` so that
tests can record the commands without root.  Namespaces get no default route: guests reach the
host (and the broker on the bridge address) and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import re
import shutil
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

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


@attrs.frozen
class NetnsLayout:
    """Names and addresses of one pool's VMs, derived from the pool prefix and the subnet.

    Every name carries a short tag hashed from the prefix, so that two pools on one host (or a
    pool whose prefix is a prefix of another's) never mistake each other's namespaces and veths
    for stale ones.  Host-side veth names are numbered by the VM's address slot, which keeps them
    within 15 characters whatever the vmid looks like.
    """

    prefix: str
    subnet: ipaddress.IPv4Network
    bridge: str

    def __attrs_post_init__(self) -> None:
        if not self.bridge or len(self.bridge) > IFNAME_MAX or not _SAFE_NAME.fullmatch(self.bridge):
            raise ValueError(f"bridge name {self.bridge!r} must be 1-{IFNAME_MAX} of [A-Za-z0-9_.-]")
        if self.subnet.num_addresses < 4:
            raise ValueError(f"subnet {self.subnet} is too small for a bridge and a VM")

    @classmethod
    def from_strings(cls, prefix: str, subnet: str, bridge: str) -> NetnsLayout:
        """Parse the configured subnet; raises ValueError with the reason on bad input."""
        return cls(prefix=prefix, subnet=ipaddress.IPv4Network(subnet, strict=False), bridge=bridge)

    @property
    def tag(self) -> str:
        """Six hex digits identifying the pool prefix in interface and namespace names."""
        return _digest(self.prefix).hex()[:6]

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
        """Host end of a VM's veth pair, e.g. ``vc1a2b3c-17`` (at most 15 characters)."""
        return f"vc{self.tag}-{slot}"

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
        return re.fullmatch(rf"vc{self.tag}-\d+", name) is not None


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

    def __init__(
        self, run: CommandRunner, layout: NetnsLayout, ip: str = "ip", bridge_tool: str = "bridge"
    ) -> None:
        self._run = run
        self.layout = layout
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

    async def ensure_bridge(self) -> None:
        """Create the bridge with the host address if missing, and bring it up."""
        layout = self.layout
        if layout.bridge not in await self.links():
            result = await self._run((self._ip, "link", "add", layout.bridge, "type", "bridge"))
            if not result.ok and "exists" not in result.err:
                raise NetworkCommandError(result)
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

    async def remove_bridge(self) -> None:
        if self.layout.bridge in await self.links():
            await self._run((self._ip, "link", "del", self.layout.bridge))

    async def create(self, net: VmNetwork) -> None:
        """Build the VM's namespace and veth; on any failure remove what was built and raise."""
        ns = net.namespace
        try:
            await self._must(self._ip, "netns", "add", ns)
            await self._must(
                self._ip, "link", "add", net.veth, "type", "veth",
                "peer", "name", "eth0", "address", net.mac, "netns", ns,
            )  # fmt: skip
            await self._must(self._ip, "link", "set", net.veth, "master", self.layout.bridge, "up")
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
