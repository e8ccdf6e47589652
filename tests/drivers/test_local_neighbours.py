"""Two local drivers on one host with real processes (and, as root, real namespaces and bridges).

Issue #8 point 7: two daemons with default settings shared a bridge and namespace names, and the
one that stopped (or started) deleted the other's VMs and bridge.  Here two drivers with the same
pool prefix and *derived* names (no bridge, no subnet configured: what the defaults give) boot a
VM each; one stops, starts again and stops, and the other's VM, namespace, veth and bridge are
still there.  Then the refusals: a second driver on the same state dir, on another daemon's
bridge (running or stopped), on another daemon's subnet, on an interface vmcloud did not make;
each is refused with a message saying whose it is, and stopping the refused driver touches
nothing.  Everything a test makes is removed in cleanup, found by the names its state dirs derive.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from typing import Any, ClassVar

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from tests.drivers.test_local_processes import VM_SCRIPT, alive, ip_json, netns_usable
from vmcloud.drivers.claims import HostInUse
from vmcloud.drivers.local import LocalDriver
from vmcloud.drivers.localproc import process_start_time
from vmcloud.drivers.netns import NetnsLayout, bridge_alias, derived_bridge, pool_tag
from vmcloud.pool.interfaces import ACTIVE, BootRequest, GuestCredentials


class NeighboursMixin:
    """The tests both modes share; subclasses say whether namespaces are used."""

    netns: ClassVar[bool]
    timeout = 90

    def setUp(self) -> None:
        test: TestCase = self  # type: ignore[assignment]
        uniq = f"{os.getpid() % 1000}{id(self) % 1000}"
        self.prefix = f"n{uniq}-vm-"  # one prefix for every driver, as two daemons on the defaults
        self.uniq = uniq
        self.out = FilePath(test.mktemp())
        self.out.makedirs()
        self.script = self.out.child("vm.py")
        self.script.setContent(VM_SCRIPT.encode())
        self.drivers: list[LocalDriver] = []
        self.states: list[tuple[str, str | None]] = []  # resolved state dir, configured bridge
        self.pids: dict[int, int | None] = {}
        self.foreign: list[str] = []  # interfaces a test made that vmcloud must not touch
        test.addCleanup(self.scrub)

    def state_dir(self) -> FilePath[str]:
        test: TestCase = self  # type: ignore[assignment]
        state = FilePath(test.mktemp())
        state.makedirs()
        return state

    def make_driver(self, state: FilePath[str], **kw: Any) -> LocalDriver:
        def argv(request: BootRequest, broker: str) -> list[str]:
            return [
                sys.executable,
                self.script.path,
                self.info_path(state, request.vmid).path,
                "sleep",
                broker,
            ]

        driver = LocalDriver(
            reactor,
            prefix=self.prefix,
            state_dir=state,
            agent_argv=argv,
            netns=self.netns,
            broker_port=61999,
            kill_grace=2.0,
            **kw,
        )
        self.drivers.append(driver)
        self.states.append((os.path.realpath(state.path), kw.get("bridge")))
        return driver

    def info_path(self, state: FilePath[str], vmid: str) -> FilePath[str]:
        return self.out.child(f"{pool_tag(os.path.realpath(state.path), self.prefix)}-{vmid}.json")

    def names(self, state_dir: str, bridge: str | None) -> NetnsLayout:
        """The names a driver on ``state_dir`` derives (the subnet does not matter for names)."""
        tag = pool_tag(state_dir, self.prefix)
        return NetnsLayout.from_strings(self.prefix, "10.0.0.0/24", bridge or derived_bridge(tag), state_dir)

    async def scrub(self) -> None:
        """Remove what the test left: processes, the namespaces, veths and bridges of its state dirs."""
        for driver in self.drivers:
            with contextlib.suppress(Exception):
                await driver.stop(keep_vms=False)
        for pid, started in self.pids.items():
            if process_start_time(pid) == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        for name in self.foreign:
            subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=10)
        if not self.netns:
            return
        for state_dir, bridge in self.states:
            plan = self.names(state_dir, bridge)
            for entry in ip_json("netns", "list"):
                if plan.is_pool_namespace(entry["name"]):
                    subprocess.run(["ip", "netns", "del", entry["name"]], timeout=10)
            for entry in ip_json("-d", "link", "show"):
                ours_bridge = entry["ifname"] == plan.bridge and entry.get("ifalias") == bridge_alias(
                    state_dir
                )
                if plan.is_pool_veth(entry["ifname"]) or ours_bridge:
                    subprocess.run(["ip", "link", "del", entry["ifname"]], timeout=10)

    def request(self, vmid: str) -> BootRequest:
        return BootRequest(
            vmid=vmid,
            name=self.prefix + vmid,
            metadata={"vmid": vmid},
            credentials=GuestCredentials(broker="ignored", login=f"vm-{vmid}", passcode=f"secret-{vmid}"),
        )

    async def boot_and_wait(
        self, driver: LocalDriver, state: FilePath[str], vmid: str
    ) -> tuple[str, dict[str, Any]]:
        sid = await driver.boot(self.request(vmid))
        path = self.info_path(state, vmid)
        for _ in range(400):
            if path.exists():
                info: dict[str, Any] = json.loads(path.getContent())
                for pid in (info["pid"], info["grandchild"]):
                    self.pids[pid] = process_start_time(pid)
                return sid, info
            await deferLater(reactor, 0.05)
        raise AssertionError(f"VM {vmid} did not start")

    def link(self, name: str) -> dict[str, Any] | None:
        found = [e for e in ip_json("-d", "addr", "show") if e["ifname"] == name]
        return found[0] if found else None

    async def assert_intact(self, driver: LocalDriver, sid: str, info: dict[str, Any]) -> None:
        """The VM runs and is listed; in netns mode its namespace, veth and bridge (and address) are there."""
        test: TestCase = self  # type: ignore[assignment]
        test.assertTrue(alive(info["pid"]), "the neighbour's VM was killed")
        test.assertTrue(alive(info["grandchild"]), "the neighbour's VM lost a process")
        test.assertTrue(FilePath(info["cwd"]).exists(), "the neighbour's VM directory was removed")
        servers = {s.server_id: s for s in await driver.list_servers()}
        test.assertEqual(servers[sid].status, ACTIVE)
        if self.netns:
            plan = driver.layout
            vmid = dict(servers[sid].metadata)["vmid"]
            test.assertIn(plan.namespace(vmid), [e["name"] for e in ip_json("netns", "list")])
            bridge = self.link(plan.bridge)
            assert bridge is not None, f"the neighbour's bridge {plan.bridge} is gone"
            addresses = [(a["local"], a["prefixlen"]) for a in bridge["addr_info"] if a["family"] == "inet"]
            test.assertIn((plan.bridge_ip, plan.subnet.prefixlen), addresses)
            veths = [e["ifname"] for e in ip_json("link", "show") if e.get("master") == plan.bridge]
            test.assertEqual(len(veths), 1, f"the neighbour's veth is gone: {veths}")

    # ------------------------------------------------------------------ the tests

    async def test_two_daemons_side_by_side(self) -> None:
        """Same prefix, derived names: stopping or restarting one leaves the other's VM and network be."""
        test: TestCase = self  # type: ignore[assignment]
        state_a, state_b = self.state_dir(), self.state_dir()
        a, b = self.make_driver(state_a), self.make_driver(state_b)
        sid_a, info_a = await self.boot_and_wait(a, state_a, "1")
        sid_b, info_b = await self.boot_and_wait(b, state_b, "1")  # the same vmid in both pools
        test.assertNotEqual(info_a["cwd"], info_b["cwd"])
        if self.netns:
            test.assertNotEqual(a.bridge, b.bridge)
            test.assertFalse(a.layout.subnet.overlaps(b.layout.subnet))
            test.assertNotEqual(a.layout.namespace("1"), b.layout.namespace("1"))
            test.assertNotEqual(info_a["ifaces"]["eth0"]["ips"], info_b["ifaces"]["eth0"]["ips"])
            test.assertNotEqual(info_a["broker"], info_b["broker"])
        await a.stop(keep_vms=False)
        test.assertFalse(alive(info_a["pid"]))
        await self.assert_intact(b, sid_b, info_b)
        if self.netns:
            test.assertIsNone(self.link(a.bridge), "the stopped daemon's bridge is left")
        # a restarted A cleans up its own stale leftovers at start, and only those
        again = self.make_driver(state_a)
        await again.prepare()
        test.assertEqual(await again.list_servers(), [])
        await self.assert_intact(b, sid_b, info_b)
        await again.stop(keep_vms=False)
        await self.assert_intact(b, sid_b, info_b)
        test.assertNotIn(sid_a, [s.server_id for s in await b.list_servers()])

    async def test_second_daemon_on_one_state_dir_is_refused(self) -> None:
        test: TestCase = self  # type: ignore[assignment]
        state = self.state_dir()
        first = self.make_driver(state)
        sid, info = await self.boot_and_wait(first, state, "1")
        second = self.make_driver(state)
        with test.assertRaises(HostInUse) as caught:
            await second.prepare()
        expected = f"the state dir {os.path.realpath(state.path)} is in use by another vmcloud daemon"
        test.assertIn(f"{expected} (pid {os.getpid()}", str(caught.exception))
        await second.stop(keep_vms=False)  # a refused driver removes nothing
        await self.assert_intact(first, sid, info)


class LoopbackNeighboursTests(NeighboursMixin, TestCase):
    """``netns=False``: VMs share the loopback; only the state dirs keep the daemons apart."""

    netns = False


class NamespaceNeighboursTests(NeighboursMixin, TestCase):
    """``netns=True``: bridges, subnets and namespaces of two daemons on one host (needs root)."""

    netns = True
    if not netns_usable():
        skip = "network namespaces need root and a working `ip netns`"

    def own_bridge_name(self) -> str:
        return f"nb{self.uniq}"[:15]

    async def refused(self, driver: LocalDriver) -> str:
        test: TestCase = self  # type: ignore[assignment]
        with test.assertRaises(HostInUse) as caught:
            await driver.prepare()
        await driver.stop(keep_vms=False)  # removes nothing
        return str(caught.exception)

    async def test_bridge_of_a_running_daemon_is_refused(self) -> None:
        test: TestCase = self  # type: ignore[assignment]
        bridge = self.own_bridge_name()
        state_a = self.state_dir()
        a = self.make_driver(state_a, bridge=bridge)
        sid, info = await self.boot_and_wait(a, state_a, "1")
        message = await self.refused(self.make_driver(self.state_dir(), bridge=bridge))
        test.assertIn(
            f"bridge {bridge} belongs to the vmcloud daemon running as pid {os.getpid()} "
            f"with state dir {os.path.realpath(state_a.path)}; refusing to use or remove it",
            message,
        )
        await self.assert_intact(a, sid, info)

    async def test_bridge_of_a_stopped_daemon_is_refused(self) -> None:
        """A daemon stopped for a restart keeps its VMs on its bridge: nobody else may take it."""
        test: TestCase = self  # type: ignore[assignment]
        bridge = self.own_bridge_name()
        state_a = self.state_dir()
        a = self.make_driver(state_a, bridge=bridge)
        sid, info = await self.boot_and_wait(a, state_a, "1")
        await a.stop(keep_vms=True)
        message = await self.refused(self.make_driver(self.state_dir(), bridge=bridge))
        test.assertIn(
            f"state dir {os.path.realpath(state_a.path)}, which is not running (its VMs may be)", message
        )
        successor = self.make_driver(state_a, bridge=bridge)  # A's own next run adopts all of it
        await self.assert_intact(successor, sid, info)

    async def test_subnet_of_another_daemon_is_refused(self) -> None:
        test: TestCase = self  # type: ignore[assignment]
        subnet = f"10.252.{os.getpid() % 200 + 10}.0/24"
        state_a = self.state_dir()
        a = self.make_driver(state_a, subnet=subnet)
        sid, info = await self.boot_and_wait(a, state_a, "1")
        b = self.make_driver(self.state_dir(), subnet=subnet)
        message = await self.refused(b)
        test.assertIn(f"[local] subnet {subnet} overlaps {subnet} on {a.bridge}", message)
        test.assertIsNone(self.link(b.bridge), "the refused daemon made a bridge")
        await self.assert_intact(a, sid, info)

    async def test_interface_vmcloud_did_not_make_is_refused(self) -> None:
        test: TestCase = self  # type: ignore[assignment]
        name = self.own_bridge_name()
        subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True, timeout=10)
        self.foreign.append(name)
        message = await self.refused(self.make_driver(self.state_dir(), bridge=name))
        test.assertIn(f"interface {name} already exists and is not a bridge made by vmcloud", message)
        test.assertIsNotNone(self.link(name), "the foreign interface was removed")
