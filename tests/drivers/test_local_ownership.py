"""Two local-driver daemons on one host, the pure parts: derived names, whose bridge, which subnet, the locks.

Issue #8 point 7: two daemons on the defaults shared a bridge and namespace names and deleted each
other's VMs.  These tests pin the rules that keep them apart, with recorded commands and host
views written by hand, no root needed; ``test_local_neighbours.py`` runs them for real.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from tests.drivers.test_local_layout import RecordingRunner
from vmcloud.config import ConfigError, parse_config
from vmcloud.drivers.claims import (
    STATE_LOCK_FILE,
    HostInUse,
    HostLock,
    OwnerRecord,
    StateDirClaim,
    claim_held,
    describe_owner,
    read_owner,
    try_lock,
)
from vmcloud.drivers.local import PASSED_ENVIRONMENT, LocalDriver, vm_environment
from vmcloud.drivers.localproc import process_start_time
from vmcloud.drivers.netns import (
    AUTO_SUBNETS,
    IFNAME_MAX,
    CommandResult,
    HostLink,
    HostNetwork,
    HostView,
    NetnsLayout,
    NetworkCommandError,
    alias_owner,
    bridge_alias,
    choose_subnet,
    derived_bridge,
    parse_host_view,
    pool_tag,
)
from vmcloud.pool.interfaces import BadCloudRequest

Net = ipaddress.IPv4Network
Iface = ipaddress.IPv4Interface


def _defer(coro):  # type: ignore[no-untyped-def]
    return Deferred.fromCoroutine(coro)


def never_running(state_dir: str) -> str:
    return f"the vmcloud daemon with state dir {state_dir}, which is not running (its VMs may be)"


def view(*links: HostLink, routes: tuple[tuple[str, Net], ...] = ()) -> HostView:
    return HostView(links={link.name: link for link in links}, routes=routes)


def eth0(*addresses: str) -> HostLink:
    return HostLink("eth0", None, None, tuple(Iface(a) for a in addresses))


class DerivedNamesTests(SynchronousTestCase):
    def test_different_state_dirs_never_share_a_name(self) -> None:
        """Same prefix, other state dir: every name differs, and none passes for the other's own."""
        a, b = pool_tag("/srv/a/state", "vmcloud-vm-"), pool_tag("/srv/b/state", "vmcloud-vm-")
        self.assertNotEqual(a, b)
        self.assertNotEqual(derived_bridge(a), derived_bridge(b))
        plan_a = NetnsLayout.from_strings("vmcloud-vm-", "10.200.0.0/24", derived_bridge(a), "/srv/a/state")
        plan_b = NetnsLayout.from_strings("vmcloud-vm-", "10.200.1.0/24", derived_bridge(b), "/srv/b/state")
        self.assertNotEqual(plan_a.namespace("1"), plan_b.namespace("1"))
        self.assertNotEqual(plan_a.veth(1), plan_b.veth(1))
        self.assertFalse(plan_a.is_pool_namespace(plan_b.namespace("1")))
        self.assertFalse(plan_a.is_pool_veth(plan_b.veth(1)))
        self.assertFalse(plan_b.is_pool_namespace(plan_a.namespace("1")))
        self.assertTrue(plan_a.is_pool_namespace(plan_a.namespace("1")))

    def test_derived_names_fit_linux(self) -> None:
        tag = pool_tag("/a/very/long/" + "x" * 300, "p-")
        self.assertLessEqual(len(derived_bridge(tag)), IFNAME_MAX)
        plan = NetnsLayout.from_strings("p-", "10.200.0.0/16", derived_bridge(tag), "/s")
        self.assertLessEqual(len(plan.veth(99999)), IFNAME_MAX)

    def test_alias_names_the_state_dir(self) -> None:
        self.assertEqual(alias_owner(bridge_alias("/srv/a state")), "/srv/a state")
        self.assertIsNone(alias_owner(None))
        self.assertIsNone(alias_owner("uplink to the lab"))
        long = "/" + "d" * 300
        alias = bridge_alias(long)
        self.assertLessEqual(len(alias.encode()), 255)
        self.assertEqual(alias_owner(alias), "")  # vmcloud's, but the path is only hashed
        self.assertNotEqual(alias, bridge_alias(long + "x"))


class ChooseSubnetTests(SynchronousTestCase):
    def choose(
        self, host: HostView, subnet: str | None = None, bridge: str = "vmcbA", state: str = "/a"
    ) -> Net:
        return choose_subnet(
            host,
            bridge=bridge,
            state_dir=state,
            tag=pool_tag(state, "p-"),
            subnet=Net(subnet) if subnet else None,
            describe_owner=never_running,
        )

    def refused(self, host: HostView, subnet: str | None = None, bridge: str = "vmcbA", **kw: object) -> str:
        describe: Callable[[str], str] = kw.get("describe", never_running)  # type: ignore[assignment]
        with self.assertRaises(HostInUse) as caught:
            choose_subnet(
                host,
                bridge=bridge,
                state_dir="/a",
                tag=pool_tag("/a", "p-"),
                subnet=Net(subnet) if subnet else None,
                describe_owner=describe,
            )
        self.assertIsInstance(caught.exception, BadCloudRequest)  # an operator must act; retrying won't help
        return str(caught.exception)

    def test_automatic_subnet_is_free_and_stable(self) -> None:
        host = view(eth0("192.0.2.2/24"))
        first = self.choose(host)
        self.assertTrue(first.subnet_of(AUTO_SUBNETS))
        self.assertEqual(first.prefixlen, 24)
        self.assertEqual(self.choose(host), first)  # the same state dir starts from the same place

    def test_second_daemon_never_picks_the_first_ones_subnet(self) -> None:
        """Even when both hash to the same start: the first daemon's bridge address is seen and skipped."""
        first = self.choose(view(eth0("192.0.2.2/24")))
        theirs = HostLink("vmcbA", "bridge", bridge_alias("/a"), (Iface(f"{first.network_address + 1}/24"),))
        second = self.choose(view(eth0("192.0.2.2/24"), theirs), bridge="vmcbB", state="/a-twin")
        self.assertFalse(second.overlaps(first))
        # a route covering the candidate counts as taken too; the default route does not
        routes = (("eth0", Net("0.0.0.0/0")), ("tun0", Net(f"{first.network_address}/23", strict=False)))
        third = self.choose(view(eth0("192.0.2.2/24"), routes=routes))
        self.assertFalse(third.overlaps(routes[1][1]))

    def test_own_bridge_keeps_its_subnet(self) -> None:
        """VMs of the last run live in the bridge's subnet: a restart keeps it, whatever a probe says."""
        ours = HostLink("vmcbA", "bridge", bridge_alias("/a"), (Iface("10.201.7.1/24"),))
        self.assertEqual(self.choose(view(eth0("192.0.2.2/24"), ours)), Net("10.201.7.0/24"))
        # its own addresses and routes never count as taken
        host = view(ours, routes=(("vmcbA", Net("10.201.7.0/24")),))
        self.assertEqual(self.choose(host, "10.201.7.0/24"), Net("10.201.7.0/24"))

    def test_configured_subnet_used_elsewhere_is_refused(self) -> None:
        other = HostLink("vmcbB", "bridge", bridge_alias("/b"), (Iface("10.251.0.1/24"),))
        message = self.refused(view(eth0("192.0.2.2/24"), other), "10.251.0.0/24")
        self.assertIn("[local] subnet 10.251.0.0/24 overlaps 10.251.0.0/24 on vmcbB", message)
        self.assertEqual(self.choose(view(other), "10.251.1.0/24"), Net("10.251.1.0/24"))

    def test_bridge_of_another_daemon_is_refused(self) -> None:
        theirs = HostLink("vmcbA", "bridge", bridge_alias("/srv/b"), (Iface("10.200.0.1/24"),))
        message = self.refused(
            view(theirs), describe=lambda d: f"the vmcloud daemon running as pid 4242 with state dir {d}"
        )
        self.assertIn(
            "bridge vmcbA belongs to the vmcloud daemon running as pid 4242 with state dir /srv/b", message
        )
        self.assertIn("refusing to use or remove it", message)
        message = self.refused(view(theirs))
        self.assertIn("which is not running (its VMs may be)", message)

    def test_interface_not_made_by_vmcloud_is_refused(self) -> None:
        for link in (
            HostLink("vmcbA", "bridge", None),
            HostLink("vmcbA", "dummy", "lab uplink"),
            HostLink("vmcbA", "veth", bridge_alias("/a")),  # our alias, but not a bridge
        ):
            message = self.refused(view(link))
            self.assertIn(
                "interface vmcbA already exists and is not a bridge made by vmcloud for state dir /a", message
            )

    def test_no_free_subnet_left(self) -> None:
        message = self.refused(view(HostLink("big0", None, None, (Iface("10.192.0.1/10"),))))
        self.assertIn("no free /24 left in 10.200.0.0/13; set [local] subnet", message)


class HostViewTests(SynchronousTestCase):
    ADDRESSES = json.dumps(
        [
            {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]},
            {"ifname": "vmcb1", "addr_info": [{"family": "inet", "local": "10.200.3.1", "prefixlen": 24}]},
        ]
    )
    ROUTES = json.dumps(
        [
            {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"},
            {"dst": "192.0.2.0/24", "dev": "eth0"},
            {"type": "unreachable", "dst": "10.9.0.0/16"},
            {"type": "local", "dst": "10.200.3.1", "dev": "vmcb1", "table": "local"},
        ]
    )
    DETAILS = json.dumps(
        [{"ifname": "vmcb1", "ifalias": "vmcloud-local /srv/a", "linkinfo": {"info_kind": "bridge"}}]
    )

    def test_parses_ip_json(self) -> None:
        host = parse_host_view(self.ADDRESSES, self.ROUTES, self.DETAILS)
        self.assertEqual(
            host.links["vmcb1"],
            HostLink("vmcb1", "bridge", "vmcloud-local /srv/a", (Iface("10.200.3.1/24"),)),
        )
        self.assertIsNone(host.links["lo"].alias)
        used = host.used_networks(except_dev="vmcb1")
        self.assertIn(("", Net("10.9.0.0/16")), used)
        self.assertIn(("lo", Net("127.0.0.0/8")), used)
        self.assertIn(("eth0", Net("192.0.2.0/24")), used)
        self.assertNotIn(Net("10.200.3.0/24"), [net for _, net in used])
        self.assertNotIn(Net("0.0.0.0/0"), [net for _, net in used])
        self.assertEqual(parse_host_view("", ""), HostView(links={}))
        self.assertRaises(ValueError, parse_host_view, "[{", "")

    def test_view_asks_the_bridge_alone_for_details(self) -> None:
        """Details cost 1.2 KB per interface: only the bridge's are asked for; a missing one is no error."""

        async def run(argv: Sequence[str]) -> CommandResult:
            line = " ".join(argv)
            if "-d link show dev vmcb1" in line:
                return CommandResult(tuple(argv), 0, self.DETAILS, "")
            if "-d link show dev" in line:
                return CommandResult(tuple(argv), 1, "", 'Device "vmcb9" does not exist.')
            out = self.ADDRESSES if "addr show" in line else self.ROUTES
            return CommandResult(tuple(argv), 0, out, "")

        host = self.successResultOf(_defer(HostNetwork(run).view("vmcb1")))
        self.assertEqual(host.links["vmcb1"].alias, "vmcloud-local /srv/a")
        host = self.successResultOf(_defer(HostNetwork(run).view("vmcb9")))
        self.assertNotIn("vmcb9", host.links)

    def test_unreadable_ip_output_is_a_command_error(self) -> None:
        async def run(argv: Sequence[str]) -> CommandResult:
            return CommandResult(tuple(argv), 0, "[{", "")

        failure = self.failureResultOf(_defer(HostNetwork(run).view("vmcb1")), NetworkCommandError)
        self.assertIn("unreadable output", str(failure.value))

    def test_ensure_bridge_marks_it_and_adds_only_its_own_address(self) -> None:
        plan = NetnsLayout.from_strings("p-", "10.200.3.0/24", "vmcbX", "/srv/a")
        runner = RecordingRunner()
        self.successResultOf(_defer(HostNetwork(runner).ensure_bridge(plan, bridge_alias("/srv/a"))))
        lines = [" ".join(c) for c in runner.calls]
        self.assertIn("ip link add vmcbX type bridge", lines)
        self.assertIn("ip link set dev vmcbX alias vmcloud-local /srv/a", lines)
        self.assertIn("ip addr add 10.200.3.1/24 dev vmcbX", lines)
        self.assertFalse([line for line in lines if " del " in f" {line} "])


class StateDirClaimTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = os.path.realpath(self.mktemp())
        os.makedirs(self.state)

    def test_second_claim_on_one_state_dir_is_refused_with_the_holder(self) -> None:
        first = StateDirClaim(self.state)
        first.acquire()
        self.addCleanup(first.release)
        owner = read_owner(self.state)
        assert owner is not None
        self.assertEqual((owner.pid, owner.state_dir), (os.getpid(), self.state))
        self.assertTrue(owner.running())
        self.assertTrue(claim_held(self.state))
        self.assertEqual(
            describe_owner(self.state),
            f"the vmcloud daemon running as pid {os.getpid()} with state dir {self.state}",
        )
        with self.assertRaises(HostInUse) as caught:
            StateDirClaim(self.state).acquire()
        message = str(caught.exception)
        self.assertIn(
            f"the state dir {self.state} is in use by another vmcloud daemon (pid {os.getpid()}", message
        )
        self.assertIn("give this one a --state-dir of its own", message)
        first.acquire()  # again by its holder: fine
        first.release()
        self.assertFalse(claim_held(self.state))  # the same pid lives on, but the claim is gone
        self.assertIn("which is not running", describe_owner(self.state))
        second = StateDirClaim(self.state)
        second.acquire()  # once let go
        second.release()
        self.assertTrue(os.path.exists(os.path.join(self.state, STATE_LOCK_FILE)))

    def test_a_dead_holder_is_not_running(self) -> None:
        dead = OwnerRecord(pid=os.getpid(), start_time=-1, boot_id="x", state_dir=self.state)
        self.assertFalse(dead.running())
        with open(os.path.join(self.state, STATE_LOCK_FILE), "wb") as f:
            f.write(dead.to_json())
        self.assertIn("which is not running (its VMs may be)", describe_owner(self.state))
        alive = OwnerRecord(os.getpid(), process_start_time(os.getpid()), dead.boot_id, self.state)
        self.assertFalse(alive.running())  # another boot's pid means nothing
        self.assertIsNone(OwnerRecord.from_json(b"{half"))
        self.assertIsNone(read_owner(self.mktemp()))

    def test_lock_taken_on_a_file_removed_meanwhile_is_retried(self) -> None:
        """The holder removes the file as it lets go: a late opener must not keep a lock on the orphan."""
        path = os.path.join(self.state, "l")
        fd = try_lock(path)
        assert fd is not None
        self.assertIsNone(try_lock(path))
        os.unlink(path)  # the holder lets go ...
        fresh = try_lock(path)  # ... and a new file is locked, not the unlinked one
        assert fresh is not None
        self.assertEqual(os.fstat(fresh).st_ino, os.stat(path).st_ino)
        os.close(fd)
        os.close(fresh)


class HostLockTests(SynchronousTestCase):
    def test_waits_for_the_holder_then_gives_up_clearly(self) -> None:
        clock = Clock()
        path = os.path.join(self.mktemp(), "net.lock")
        first = HostLock(path, clock, timeout=1.0)
        self.successResultOf(_defer(first.__aenter__()))
        waiting = _defer(HostLock(path, clock, timeout=1.0).__aenter__())
        self.assertNoResult(waiting)
        clock.advance(0.5)
        self.assertNoResult(waiting)
        clock.pump([0.05] * 20)
        failure = self.failureResultOf(waiting, HostInUse)
        self.assertIn("stayed locked for 1 s", str(failure.value))
        self.successResultOf(_defer(first.__aexit__(None, None, None)))
        self.assertFalse(os.path.exists(path))  # nothing left behind in /run

    def test_second_gets_it_when_the_first_lets_go(self) -> None:
        clock = Clock()
        path = os.path.join(self.mktemp(), "net.lock")
        first = HostLock(path, clock)
        self.successResultOf(_defer(first.__aenter__()))
        second = HostLock(path, clock)
        waiting = _defer(second.__aenter__())
        self.successResultOf(_defer(first.__aexit__(None, None, None)))
        clock.advance(0.05)
        self.assertIs(self.successResultOf(waiting), second)
        self.successResultOf(_defer(second.__aexit__(None, None, None)))


class DriverClaimTests(SynchronousTestCase):
    """Loopback mode needs no root: the claim, the refusal and what a refused driver leaves alone."""

    def driver(self, state: FilePath[str], **kw: object) -> LocalDriver:
        return LocalDriver(
            MemoryReactorClock(),
            prefix="p-",
            state_dir=state,
            agent_argv=lambda request, broker: ["true"],
            netns=False,
            **kw,  # type: ignore[arg-type]
        )

    def test_one_driver_per_state_dir(self) -> None:
        state = FilePath(self.mktemp())
        first = self.driver(state)
        self.successResultOf(_defer(first.prepare()))
        keep = state.child("local").child("some-vm")
        keep.makedirs()  # a VM directory the first driver does not know: its own business
        second = self.driver(state)
        failure = self.failureResultOf(_defer(second.prepare()), HostInUse)
        self.assertIn("is in use by another vmcloud daemon", str(failure.value))
        # refused for good, and stopping it touches nothing of the first's
        self.failureResultOf(_defer(second.list_servers()), HostInUse)
        self.successResultOf(_defer(second.stop(keep_vms=False)))
        self.assertTrue(os.path.isdir(keep.path))
        self.successResultOf(_defer(first.stop(keep_vms=True)))
        third = self.driver(state)
        self.successResultOf(_defer(third.prepare()))
        self.assertFalse(os.path.isdir(keep.path))  # now it is the stale directory of this state dir's daemon
        self.successResultOf(_defer(third.stop(keep_vms=False)))

    def test_a_symlinked_state_dir_is_the_same_daemon(self) -> None:
        state = FilePath(self.mktemp())
        state.makedirs()
        link = FilePath(self.mktemp())
        os.symlink(state.path, link.path)
        first = self.driver(state)
        first.claim_state_dir()
        self.addCleanup(first._claim.release)
        self.assertRaises(HostInUse, self.driver(link).claim_state_dir)
        self.assertEqual(self.driver(link).bridge, first.bridge)

    def test_derived_and_configured_names(self) -> None:
        a, b = self.driver(FilePath(self.mktemp())), self.driver(FilePath(self.mktemp()))
        self.assertNotEqual(a.bridge, b.bridge)
        self.assertTrue(a.bridge.startswith("vmcb"))
        self.assertEqual(self.driver(FilePath(self.mktemp()), bridge="mybr0").bridge, "mybr0")
        self.assertRaises(ValueError, self.driver, FilePath(self.mktemp()), bridge="a-very-long-bridge0")
        self.assertRaises(ValueError, self.driver, FilePath(self.mktemp()), subnet="10.0.0.0/31")

    def test_vm_environment_is_passed_in_not_read(self) -> None:
        daemon = {"PATH": "/opt/bin", "LANG": "C.UTF-8", "OS_PASSWORD": "s3cret", "HOME": "/root"}
        self.assertEqual(vm_environment(daemon), {"PATH": "/opt/bin", "LANG": "C.UTF-8"})
        self.assertLessEqual(
            set(vm_environment(dict.fromkeys(PASSED_ENVIRONMENT, "x"))), set(PASSED_ENVIRONMENT)
        )
        self.assertIn("PATH", vm_environment({}))


class LocalSettingsTests(SynchronousTestCase):
    def test_empty_means_derived(self) -> None:
        config = parse_config(None)
        self.assertEqual((config.local.subnet, config.local.bridge), ("", ""))

    def test_bad_values_name_the_key(self) -> None:
        with self.assertRaisesRegex(ConfigError, r"\[local\] subnet: subnet 'ten' is not an IPv4 network"):
            parse_config("[local]\nsubnet = ten\n")
        with self.assertRaisesRegex(ConfigError, r"\[local\] bridge: bridge name 'waytoolongbridge0'"):
            parse_config("[local]\nbridge = waytoolongbridge0\n")
        config = parse_config("[local]\nsubnet = 10.9.8.0/24\nbridge = br-lab\n")
        self.assertEqual((config.local.subnet, config.local.bridge), ("10.9.8.0/24", "br-lab"))
