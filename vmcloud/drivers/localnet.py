"""One local-driver daemon's network: its bridge, and a namespace on it for each VM.

:mod:`vmcloud.drivers.netns` knows the names (:class:`~vmcloud.drivers.netns.NetnsLayout`), the
choice of a subnet and the ``ip`` commands; :class:`PoolNetwork` applies them for one daemon:
whether namespaces can be had here, the bridge set up once under the host-wide lock, a free slot
(address) and a namespace per VM, and the removal of this daemon's leftovers.
"""

from __future__ import annotations

import ipaddress
import os
import signal
from collections.abc import Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from vmcloud.drivers.claims import HostLock, describe_owner
from vmcloud.drivers.localproc import signal_pid
from vmcloud.drivers.netns import (
    HostNetwork,
    NetnsLayout,
    NetworkCommandError,
    VmNetwork,
    bridge_alias,
    choose_subnet,
)
from vmcloud.pool.interfaces import CloudUnavailable, QuotaExceeded

log = Logger()


class PoolNetwork:
    """The bridge of one daemon (named after its state dir ``owner``) and its VMs' namespaces.

    ``subnet`` None picks a free one when the bridge is set up; ``host_lock`` is the path of the
    host-wide lock around that choice; ``ip`` the path of ``ip(8)``, which enters a namespace.
    """

    def __init__(
        self,
        host: HostNetwork,
        clock: IReactorTime,
        *,
        ip: str,
        prefix: str,
        owner: str,
        tag: str,
        bridge: str,
        subnet: ipaddress.IPv4Network | None,
        host_lock: str,
        proc: str = "/proc",
    ) -> None:
        self.host = host
        self.bridge = bridge
        self._clock = clock
        self._ip = ip
        self._prefix = prefix
        self._owner = owner
        self._tag = tag
        self._subnet = subnet
        self._host_lock = host_lock
        self._proc = proc
        #: The names and addresses, once :meth:`set_up` chose the subnet.
        self.layout: NetnsLayout | None = None

    async def usable(self) -> bool:
        """Whether VMs can get namespaces here: as root, where ``ip netns`` works."""
        return os.geteuid() == 0 and await self.host.available()

    async def set_up(self) -> NetnsLayout:
        """Choose the subnet and make the bridge ready, under the host-wide lock.

        Raises :class:`~vmcloud.drivers.claims.HostInUse` when the bridge or the subnet belongs to
        another daemon, :class:`~vmcloud.pool.interfaces.CloudUnavailable` when a command or the
        lock fails.
        """
        try:
            async with HostLock(self._host_lock, self._clock):
                subnet = choose_subnet(
                    await self.host.view(self.bridge),
                    bridge=self.bridge,
                    state_dir=self._owner,
                    tag=self._tag,
                    subnet=self._subnet,
                    describe_owner=lambda owner: describe_owner(owner, self._proc),
                )
                layout = NetnsLayout(
                    prefix=self._prefix, subnet=subnet, bridge=self.bridge, state_dir=self._owner
                )
                await self.host.ensure_bridge(layout, bridge_alias(self._owner))
        except NetworkCommandError as e:
            raise CloudUnavailable(f"cannot set up bridge {self.bridge}: {e}") from e
        except OSError as e:  # the host lock's directory or file
            raise CloudUnavailable(f"cannot lock {self._host_lock}: {e}") from e
        self.layout = layout
        log.info(
            "Local driver bridge {bridge} at {address}/{prefixlen}; names tagged {tag}",
            bridge=self.bridge,
            address=layout.bridge_ip,
            prefixlen=subnet.prefixlen,
            tag=self._tag,
            event="local-driver-bridge",
        )
        return layout

    def free_slot(self, layout: NetnsLayout, used: Iterable[int | None]) -> int:
        """The lowest slot (address) of ``layout`` not in ``used``; QuotaExceeded when none is left."""
        taken = set(used)
        for slot in range(1, layout.max_slot + 1):
            if slot not in taken:
                return slot
        raise QuotaExceeded(f"no free address left in {layout.subnet}", retry_after=30.0)

    def inside(self, net: VmNetwork, argv: list[str]) -> list[str]:
        """``argv`` run in the VM's namespace."""
        return [self._ip, "netns", "exec", net.namespace, *argv]

    async def create(self, net: VmNetwork) -> None:
        """The VM's namespace and veth on the bridge (nothing of them left when it fails)."""
        await self.host.create(net, self.bridge)

    async def destroy(self, net: VmNetwork) -> None:
        await self.host.destroy(net.namespace, net.veth)

    async def pids(self, net: VmNetwork) -> list[int]:
        """The processes in the VM's namespace (those that left its process group too)."""
        return await self.host.namespace_pids(net.namespace)

    async def remove_stale(self, live: Iterable[VmNetwork | None]) -> None:
        """Remove this daemon's namespaces (killing what runs there) and veths that no live VM owns."""
        layout = self.layout
        if layout is None:
            return
        nets = [net for net in live if net is not None]
        live_ns = {n.namespace for n in nets}
        live_veths = {n.veth for n in nets}
        for ns in await self.host.namespaces():
            if layout.is_pool_namespace(ns) and ns not in live_ns:
                pids = await self.host.namespace_pids(ns)
                log.warn(
                    "Removing stale namespace {netns} (killing {count} processes in it)",
                    netns=ns,
                    count=len(pids),
                    event="vm-stale-netns",
                )
                for pid in pids:
                    signal_pid(pid, signal.SIGKILL)
                await self.host.destroy(ns, None)
        for link in await self.host.links():
            if layout.is_pool_veth(link) and link not in live_veths:
                log.warn("Removing stale veth {veth}", veth=link, event="vm-stale-veth")
                await self.host.destroy(None, link)

    async def remove_bridge(self) -> None:
        """Remove the bridge, if this daemon set it up."""
        if self.layout is not None:
            await self.host.remove_bridge(self.layout.bridge)
