"""Unit tests of the local driver's pure parts: names, addresses, records, ``ip`` command plans."""

from __future__ import annotations

import json
from collections.abc import Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass

from vmcloud.drivers.local import LocalDriver
from vmcloud.drivers.localfiles import VmRecord
from vmcloud.drivers.netns import (
    IFNAME_MAX,
    CommandResult,
    HostNetwork,
    NetnsLayout,
    NetworkCommandError,
)
from vmcloud.drivers.userdata import render_user_data
from vmcloud.pool.interfaces import (
    ACTIVE,
    DELETING,
    ERROR,
    BadCloudRequest,
    BootRequest,
    GuestCredentials,
    ICloudDriver,
)


def layout(
    prefix: str = "vmcloud-vm-",
    subnet: str = "10.251.0.0/24",
    bridge: str = "vmcbr0",
    state_dir: str = "/srv/a",
) -> NetnsLayout:
    return NetnsLayout.from_strings(prefix, subnet, bridge, state_dir)


class LayoutTests(SynchronousTestCase):
    def test_interface_names_fit_linux_limit(self) -> None:
        """Even the last slot of a /16 gives a veth name Linux accepts (15 characters)."""
        big = layout(subnet="10.251.0.0/16")
        self.assertEqual(big.max_slot, 65533)
        self.assertLessEqual(len(big.veth(big.max_slot)), IFNAME_MAX)
        self.assertTrue(big.is_pool_veth(big.veth(big.max_slot)))

    def test_bridge_name_checked(self) -> None:
        self.assertRaises(ValueError, layout, bridge="a-very-long-bridge0")
        self.assertRaises(ValueError, layout, bridge="bad/name")
        self.assertRaises(ValueError, layout, subnet="10.0.0.0/31")
        self.assertRaises(ValueError, layout, subnet="not-a-subnet")

    def test_addresses(self) -> None:
        plan = layout(subnet="10.252.7.0/24")
        self.assertEqual(plan.bridge_ip, "10.252.7.1")
        self.assertEqual(plan.address(1), "10.252.7.2")
        self.assertEqual(plan.address(plan.max_slot), "10.252.7.254")
        self.assertRaises(ValueError, plan.address, 0)
        self.assertRaises(ValueError, plan.address, 254)

    def test_mac_is_locally_administered_unicast_and_stable(self) -> None:
        mac = NetnsLayout.mac("vmcloud-vm-17")
        first = int(mac.split(":")[0], 16)
        self.assertEqual(first & 0b11, 0b10)  # locally administered, not multicast
        self.assertEqual(mac, NetnsLayout.mac("vmcloud-vm-17"))
        self.assertNotEqual(mac, NetnsLayout.mac("vmcloud-vm-18"))
        self.assertEqual(len(mac.split(":")), 6)

    def test_namespaces_of_other_pools_are_not_ours(self) -> None:
        """A pool never takes another pool's namespaces or veths for stale ones, even with a longer prefix."""
        ours, theirs = layout("vm-"), layout("vm-x-")
        self.assertTrue(ours.is_pool_namespace(ours.namespace("x-1")))
        self.assertFalse(ours.is_pool_namespace(theirs.namespace("1")))
        self.assertFalse(theirs.is_pool_namespace(ours.namespace("x-1")))
        self.assertFalse(ours.is_pool_veth(theirs.veth(1)))
        self.assertFalse(ours.is_pool_veth("eth0"))

    def test_namespace_name_readable_and_safe(self) -> None:
        plan = layout("vmcloud-vm-")
        self.assertTrue(plan.namespace("17").startswith("vmcloud-vm-"))
        self.assertTrue(plan.namespace("17").endswith("-17"))
        odd = plan.namespace("../../etc")
        self.assertNotIn("/", odd)
        self.assertTrue(plan.is_pool_namespace(odd))


class RecordingRunner:
    """A CommandRunner that records argv and fails the commands it is told to."""

    def __init__(self, fail_on: str | None = None, outputs: dict[str, str] | None = None) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail_on = fail_on
        self.outputs = outputs or {}

    async def __call__(self, argv: Sequence[str]) -> CommandResult:
        args = tuple(argv)
        self.calls.append(args)
        line = " ".join(args)
        if self.fail_on is not None and self.fail_on in line:
            return CommandResult(argv=args, code=2, out="", err="RTNETLINK answers: Operation not permitted")
        for key, out in self.outputs.items():
            if key in line:
                return CommandResult(argv=args, code=0, out=out, err="")
        return CommandResult(argv=args, code=0, out="", err="")


class HostNetworkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.plan = layout(subnet="10.252.3.0/24", bridge="tbr0")
        self.net = self.plan.vm_network("5", "vmcloud-vm-5", 1)

    def test_create_builds_an_isolated_port(self) -> None:
        runner = RecordingRunner()
        self.successResultOf(_defer(HostNetwork(runner).create(self.net, "tbr0")))
        lines = [" ".join(c) for c in runner.calls]
        ns = self.net.namespace
        self.assertIn(f"ip netns add {ns}", lines)
        self.assertIn(
            f"ip link add {self.net.veth} type veth peer name eth0 address {self.net.mac} netns {ns}", lines
        )
        self.assertIn(f"bridge link set dev {self.net.veth} isolated on", lines)
        self.assertIn(f"ip link set {self.net.veth} master tbr0 up", lines)
        self.assertIn(f"ip -n {ns} addr add 10.252.3.2/24 dev eth0", lines)

    def test_failed_create_removes_what_it_built(self) -> None:
        ns = self.net.namespace
        runner = RecordingRunner(
            fail_on="isolated",
            outputs={
                "netns list": json.dumps([{"name": ns}]),
                "link show": json.dumps([{"ifname": self.net.veth}]),
            },
        )
        failure = self.failureResultOf(
            _defer(HostNetwork(runner).create(self.net, "tbr0")), NetworkCommandError
        )
        self.assertIn("Operation not permitted", str(failure.value))
        lines = [" ".join(c) for c in runner.calls]
        self.assertIn(f"ip netns del {ns}", lines)
        self.assertIn(f"ip link del {self.net.veth}", lines)

    def test_destroy_of_missing_things_does_nothing(self) -> None:
        runner = RecordingRunner()
        self.successResultOf(_defer(HostNetwork(runner).destroy(self.net.namespace, self.net.veth)))
        self.assertFalse([c for c in runner.calls if "del" in c])


class RecordTests(SynchronousTestCase):
    def record(self) -> VmRecord:
        plan = layout()
        return VmRecord(
            server_id="abc",
            vmid="5",
            name="vmcloud-vm-5",
            metadata={"vmcloud": "ctl1", "vmid": "5"},
            pid=1234,
            pgid=1234,
            start_time=99,
            boot_id="b",
            created=12.5,
            slot=1,
            network=plan.vm_network("5", "vmcloud-vm-5", 1),
        )

    def test_round_trip(self) -> None:
        record = self.record()
        self.assertEqual(VmRecord.from_json(record.to_json()), record)

    def test_status(self) -> None:
        record = self.record()
        status = record.status()
        self.assertEqual(status.status, ACTIVE)
        self.assertEqual(status.ips, ("10.251.0.2",))
        self.assertEqual(status.macs, (NetnsLayout.mac("vmcloud-vm-5"),))
        self.assertEqual(dict(status.metadata), {"vmcloud": "ctl1", "vmid": "5"})
        died = attrs.evolve(record, state="died", fault="boom").status()
        self.assertEqual((died.status, died.fault), (ERROR, "boom"))
        self.assertEqual(attrs.evolve(record, state="deleting").status().status, DELETING)

    def test_bad_records_rejected_with_reason(self) -> None:
        good = json.loads(self.record().to_json())
        for bad in (
            b"not json",
            b"[]",
            json.dumps({**good, "version": 99}).encode(),
            json.dumps({**good, "pid": 1}).encode(),
            json.dumps({**good, "state": "weird"}).encode(),
            json.dumps({k: v for k, v in good.items() if k != "pid"}).encode(),
            json.dumps({**good, "surprise": 1}).encode(),
        ):
            self.assertRaises(ValueError, VmRecord.from_json, bad)


class InterfaceTests(SynchronousTestCase):
    def test_provides_cloud_driver(self) -> None:
        self.assertTrue(verifyClass(ICloudDriver, LocalDriver))
        self.assertEqual(LocalDriver.name, "local")


def _defer(coro):
    return Deferred.fromCoroutine(coro)


class UserDataTests(SynchronousTestCase):
    def test_guest_agent_reads_what_the_driver_writes(self) -> None:
        """The user-data file is the agent's own format: it yields the VM's broker and credentials."""
        from guest_agent.config import parse_guest_config

        request = BootRequest(
            vmid="9",
            name="vmcloud-vm-9",
            metadata={},
            credentials=GuestCredentials(broker="x", login="vm-9", passcode="p%w-d_1"),
        )
        raw = render_user_data(request.credentials, broker="tcp:10.251.0.1:61613", workdir="/srv/my vm/work")
        config = parse_guest_config({}, None, raw.encode())
        self.assertEqual(
            (config.broker, config.login, config.passcode, config.workdir, config.browser),
            ("tcp:10.251.0.1:61613", "vm-9", "p%w-d_1", "/srv/my vm/work", "auto"),
        )
        without = render_user_data(
            request.credentials, broker="tcp:10.251.0.1:61613", workdir="/w", browser="none"
        )
        self.assertEqual(
            parse_guest_config({}, None, without.encode()).browser, "none"
        )  # [local] browser = none

    def test_a_workdir_the_agent_would_read_otherwise_is_refused(self) -> None:
        """A state dir whose path holds " ;" or " #" would reach the agent cut at the comment."""
        credentials = GuestCredentials(broker="x", login="vm-9", passcode="pw")
        for workdir in ("/srv/a ;b/work", "/srv/a #b/work", "/srv/work "):
            with self.subTest(workdir), self.assertRaisesRegex(BadCloudRequest, "guest workdir"):
                render_user_data(credentials, broker="tcp:10.251.0.1:61613", workdir=workdir)
