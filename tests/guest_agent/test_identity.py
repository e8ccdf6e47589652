"""How a guest finds its identity (MAC, IP) and its default broker."""

from __future__ import annotations

from typing import Any

import netifaces
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from guest_agent.identity import HostIdentity, IdentityError, default_broker, discover

AF_INET, AF_LINK = 2, 17


def _ipv4(addresses: dict[int, list[dict[str, str]]]) -> str:
    return addresses[AF_INET][0]["addr"]


class FakeNet:
    """Just what ``discover`` reads from netifaces."""

    AF_INET = AF_INET
    AF_LINK = AF_LINK

    def __init__(
        self, gateways: dict[Any, Any], addresses: dict[str, dict[int, list[dict[str, str]]]]
    ) -> None:
        self._gateways = gateways
        self._addresses = addresses

    def gateways(self) -> dict[Any, Any]:
        return self._gateways

    def interfaces(self) -> list[str]:
        return list(self._addresses)

    def ifaddresses(self, name: str) -> dict[int, list[dict[str, str]]]:
        if name not in self._addresses:
            raise ValueError("You must specify a valid interface name.")
        return self._addresses[name]


LO = {AF_LINK: [{"addr": "00:00:00:00:00:00"}], AF_INET: [{"addr": "127.0.0.1", "netmask": "255.0.0.0"}]}
ETH0 = {AF_LINK: [{"addr": "FA:16:3E:00:00:01"}], AF_INET: [{"addr": "10.0.0.5", "netmask": "255.255.255.0"}]}
ETH1 = {AF_LINK: [{"addr": "fa:16:3e:00:00:02"}], AF_INET: [{"addr": "192.168.7.9"}]}


def captured_events(test: SynchronousTestCase) -> list[LogEvent]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    test.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


class DiscoverTests(SynchronousTestCase):
    def test_default_route_interface(self) -> None:
        net = FakeNet(
            {"default": {AF_INET: ("10.0.0.1", "eth0")}, AF_INET: [("10.0.0.1", "eth0", True)]},
            {"lo": LO, "eth0": ETH0, "eth1": ETH1},
        )
        identity = discover(net=net)
        self.assertEqual(
            identity,
            HostIdentity(mac="fa:16:3e:00:00:01", ip="10.0.0.5", interface="eth0", gateway="10.0.0.1"),
        )
        self.assertEqual(default_broker(identity), "tcp:10.0.0.1:61613")

    def test_named_interface(self) -> None:
        net = FakeNet(
            {
                "default": {AF_INET: ("10.0.0.1", "eth0")},
                AF_INET: [("10.0.0.1", "eth0", True), ("192.168.7.1", "eth1", False)],
            },
            {"lo": LO, "eth0": ETH0, "eth1": ETH1},
        )
        identity = discover("eth1", net=net)
        self.assertEqual(
            (identity.mac, identity.ip, identity.gateway), ("fa:16:3e:00:00:02", "192.168.7.9", "192.168.7.1")
        )
        self.assertRaises(IdentityError, discover, "wlan9", net=net)

    def test_named_interface_without_ipv4(self) -> None:
        net = FakeNet({}, {"lo": LO, "tun0": {AF_LINK: [{"addr": ""}]}})
        with self.assertRaises(IdentityError) as caught:
            discover("tun0", net=net)
        self.assertIn("no IPv4 address", str(caught.exception))

    def test_no_default_route_uses_the_addressed_interface(self) -> None:
        """An isolated VM network (the local driver's namespaces) has no default route: the VM's own
        interface is still its identity, as the driver knows it."""
        net = FakeNet({"default": {}}, {"lo": LO, "eth0": ETH0})
        identity = discover(net=net)
        self.assertEqual(identity.interface, "eth0")
        self.assertEqual(identity.ip, _ipv4(ETH0))
        self.assertEqual(identity.gateway, None)

    def test_no_default_route_falls_back_to_loopback_and_logs(self) -> None:
        events = captured_events(self)
        net = FakeNet({"default": {}}, {"lo": LO})
        identity = discover(net=net)
        self.assertEqual(
            identity, HostIdentity(mac="00:00:00:00:00:00", ip="127.0.0.1", interface="lo", gateway=None)
        )
        self.assertEqual(default_broker(identity), "tcp:127.0.0.1:61613")
        self.assertIn("identity-loopback-fallback", [e.get("event") for e in events])

    def test_default_interface_without_address_falls_back(self) -> None:
        net = FakeNet(
            {"default": {AF_INET: ("10.0.0.1", "eth0")}},
            {"lo": LO, "eth0": {AF_LINK: [{"addr": "aa:bb:cc:dd:ee:ff"}]}},
        )
        self.assertEqual(discover(net=net).interface, "lo")

    def test_nothing_at_all(self) -> None:
        identity = discover(net=FakeNet({}, {}))
        self.assertEqual((identity.ip, identity.gateway), ("127.0.0.1", None))

    def test_broken_routing_table(self) -> None:
        class Broken(FakeNet):
            def gateways(self) -> dict[Any, Any]:
                raise OSError("netlink says no")

        self.assertEqual(discover(net=Broken({}, {"lo": LO})).interface, "lo")

    def test_broker_port(self) -> None:
        identity = HostIdentity(mac="aa:bb:cc:dd:ee:ff", ip="10.1.1.2", interface="ens3", gateway="10.1.1.1")
        self.assertEqual(default_broker(identity, 61614), "tcp:10.1.1.1:61614")

    def test_this_machine(self) -> None:
        """On the real machine: the interface of the kernel's default route, with its real MAC and IPv4."""
        identity = discover()
        default = netifaces.gateways().get("default", {}).get(netifaces.AF_INET)
        if default is None:
            self.assertEqual(identity.gateway, None)
            self.assertTrue(identity.ip.startswith("127."))
            return
        self.assertEqual((identity.gateway, identity.interface), (default[0], default[1]))
        addresses = netifaces.ifaddresses(identity.interface)
        self.assertIn(identity.ip, [a["addr"] for a in addresses[netifaces.AF_INET]])
        self.assertEqual(identity.mac, addresses[netifaces.AF_LINK][0]["addr"].lower())
        self.assertEqual(default_broker(identity), f"tcp:{default[0]}:61613")
