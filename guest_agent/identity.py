"""Who this guest is on the network, and where its broker is by default (seed 001).

A guest identifies itself by the MAC address of the interface that holds its default IPv4 route:
the cloud reports the same MAC for the server, so the controller can match a HELLO with the VM it
booted.  The broker defaults to the default gateway on port 61613 (the controller's host, as
seen from the VM) unless configuration or user-data says otherwise.

``discover`` reads the kernel's view through ``netifaces`` (the ``netifaces-plus`` package); the
module is a parameter so tests pass a fake.  With no default route (an isolated VM, a laptop
offline) it falls back to the loopback interface and says so in the log, rather than failing:
the agent can still run against a broker given explicitly.
"""

from __future__ import annotations

from typing import Any

import attrs
import netifaces
from twisted.logger import Logger

#: The STOMP port the controller's broker listens on.
STOMP_PORT = 61613

#: The MAC reported when an interface has none (loopback, some tunnels).
NO_MAC = "00:00:00:00:00:00"

log = Logger()


class IdentityError(Exception):
    """The interface asked for does not exist or has no IPv4 address."""


@attrs.frozen
class HostIdentity:
    """The guest's network identity: what it says in HELLO (``mac``, ``ip``) and its way out."""

    mac: str  # lower case, colon separated
    ip: str
    interface: str
    gateway: str | None  # None: no default route (loopback fallback)


def discover(interface: str | None = None, *, net: Any = netifaces) -> HostIdentity:
    """The identity of this host: the interface with the default IPv4 route, or ``interface``.

    ``net`` is anything with netifaces' ``gateways()``, ``interfaces()`` and ``ifaddresses()``.
    Raises :class:`IdentityError` only when an explicitly named interface is unusable.
    """
    af_inet: int = net.AF_INET
    try:
        gateways = net.gateways()
    except (OSError, ValueError) as e:
        log.warn("Cannot read the routing table: {error}", error=e, event="identity-no-routes")
        gateways = {}
    default = (gateways.get("default") or {}).get(af_inet)
    default_gateway, default_interface = (default[0], default[1]) if default else (None, None)

    if interface is not None:
        if interface not in net.interfaces():
            raise IdentityError(f"no network interface called {interface!r}")
        gateway = (
            default_gateway if interface == default_interface else _gateway_of(gateways, af_inet, interface)
        )
        ip = _ipv4_of(net, interface)
        if ip is None:
            raise IdentityError(f"network interface {interface!r} has no IPv4 address")
        return HostIdentity(mac=_mac_of(net, interface), ip=ip, interface=interface, gateway=gateway)

    if default_interface is not None:
        ip = _ipv4_of(net, default_interface)
        if ip is not None:
            identity = HostIdentity(
                mac=_mac_of(net, default_interface),
                ip=ip,
                interface=default_interface,
                gateway=default_gateway,
            )
            log.info(
                "Identity: {interface} mac {mac} ip {ip}, default gateway {gateway}",
                interface=identity.interface,
                mac=identity.mac,
                ip=identity.ip,
                gateway=identity.gateway,
                event="identity-discovered",
            )
            return identity
        log.warn(
            "The default route's interface {interface} has no IPv4 address",
            interface=default_interface,
            event="identity-no-address",
        )
    # No default route (an isolated VM network, like the local driver's namespaces, where only the
    # host is reachable): the first interface with an IPv4 address that is not loopback is still the
    # VM's identity, as the cloud (or driver) knows it.
    for name in sorted(net.interfaces()):
        ip = _ipv4_of(net, name)
        if ip is None or ip.startswith("127."):
            continue
        mac = _mac_of(net, name)
        if mac == NO_MAC:
            continue
        identity = HostIdentity(mac=mac, ip=ip, interface=name, gateway=_gateway_of(gateways, af_inet, name))
        log.info(
            "Identity: {interface} mac {mac} ip {ip} (no default route)",
            interface=name,
            mac=mac,
            ip=ip,
            event="identity-discovered",
        )
        return identity
    loopback = _loopback(net)
    log.warn(
        "No usable default IPv4 route: using the loopback interface {interface} ({ip});"
        " the broker must be configured explicitly unless it runs on this host",
        interface=loopback.interface,
        ip=loopback.ip,
        event="identity-loopback-fallback",
    )
    return loopback


def default_broker(identity: HostIdentity, port: int = STOMP_PORT) -> str:
    """The broker's client endpoint description when nothing else names one: the gateway's port 61613."""
    host = identity.gateway or "127.0.0.1"
    return f"tcp:{host}:{port}"


def _gateway_of(gateways: Any, af_inet: int, interface: str) -> str | None:
    for entry in gateways.get(af_inet) or ():
        if len(entry) >= 2 and entry[1] == interface:
            return str(entry[0])
    return None


def _addresses(net: Any, interface: str) -> Any:
    try:
        return net.ifaddresses(interface)
    except (OSError, ValueError):
        return {}


def _ipv4_of(net: Any, interface: str) -> str | None:
    for entry in _addresses(net, interface).get(net.AF_INET) or ():
        addr = entry.get("addr")
        if addr:
            return str(addr)
    return None


def _mac_of(net: Any, interface: str) -> str:
    for entry in _addresses(net, interface).get(net.AF_LINK) or ():
        addr = entry.get("addr")
        if addr:
            return str(addr).lower()
    return NO_MAC


def _loopback(net: Any) -> HostIdentity:
    """The loopback interface (whatever it is called), or a synthetic one if none shows."""
    for name in net.interfaces():
        ip = _ipv4_of(net, name)
        if ip is not None and ip.startswith("127."):
            return HostIdentity(mac=_mac_of(net, name), ip=ip, interface=name, gateway=None)
    return HostIdentity(mac=NO_MAC, ip="127.0.0.1", interface="lo", gateway=None)
