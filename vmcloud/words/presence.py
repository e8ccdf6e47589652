"""HELLO, BYE and STILL_ALIVE: how a guest tells the controller it is there, alive, or leaving.

All three carry the same headers (``identity``, ``ip``, ``mac``, ``agent-version``,
``capabilities``), so that a beacon from a guest the controller does not know yet (the controller
restarted while the guest stayed connected to an external broker) is enough to register it.

HELLO may also carry ``vnc-port`` and ``vnc-view-password``: the port of the VM's VNC server and
the operator's view-only password, which the controller logs in with to show the monitor the VM's
screen in every state (a worker's session password dies at CLEANUP; this one lives as long as the
agent).  Both are optional, so old agents and old controllers understand each other; the password
is a secret, never shown in a log line or a refusal.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import ClassVar

from vmcloud.stomp.frame import Frame
from vmcloud.words.contexts import Announcement, IControllerContext
from vmcloud.words.destinations import CONTROLLER, LOGIN_HEADER
from vmcloud.words.grammar import IDENTITY, MalformedWord, Said, body_of, optional_identity, printable

IP = "ip"
MAC = "mac"
AGENT_VERSION = "agent-version"
CAPABILITIES = "capabilities"
VNC_PORT = "vnc-port"
VNC_VIEW_PASSWORD = "vnc-view-password"

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")
_MAX_CAPABILITIES = 64
#: A VncAuth password as a VNC server reads it: 1 to 8 printable ASCII characters (no NUL, no space).
_VNC_PASSWORD_RE = re.compile(r"^[!-~]{1,8}$")


def _presence(
    word: str,
    identity: str,
    ip: str | None,
    mac: str | None,
    agent_version: str,
    capabilities: Iterable[str],
    vnc_view: tuple[int, str] | None = None,
) -> Said:
    headers = {IDENTITY: identity, AGENT_VERSION: agent_version, CAPABILITIES: ",".join(capabilities)}
    if ip:
        headers[IP] = ip
    if mac:
        headers[MAC] = mac
    if vnc_view is not None:
        headers[VNC_PORT] = str(vnc_view[0])
        headers[VNC_VIEW_PASSWORD] = vnc_view[1]
    return Said(CONTROLLER, headers, body_of(word))


def _vnc_view(frame: Frame) -> tuple[int | None, str | None]:
    """The optional ``vnc-port`` and ``vnc-view-password``, checked (the password never echoed)."""
    port_text = frame.get(VNC_PORT)
    port = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise MalformedWord(f"bad {VNC_PORT} {printable(port_text)!r}")
        port = int(port_text)
    password = frame.get(VNC_VIEW_PASSWORD) or None
    if password is not None and not _VNC_PASSWORD_RE.match(password):
        raise MalformedWord(f"bad {VNC_VIEW_PASSWORD} (1 to 8 printable ASCII characters; not shown)")
    return port, password


def read_announcement(frame: Frame, *, hello: bool = False) -> Announcement:
    """The guest's description of itself, every field checked (guests are not trusted); the
    operator's view (``vnc-port``, ``vnc-view-password``) is read from a HELLO only."""
    identity = optional_identity(frame)
    login = optional_identity(frame, LOGIN_HEADER)
    ip = frame.get(IP) or None
    if ip is not None:
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            raise MalformedWord(f"bad {IP} {printable(ip)!r}") from None
    mac = frame.get(MAC) or None
    if mac is not None:
        if not _MAC_RE.match(mac):
            raise MalformedWord(f"bad {MAC} {printable(mac)!r}")
        mac = mac.lower().replace("-", ":")
    version = frame.get(AGENT_VERSION) or "unknown"
    if not _TOKEN_RE.match(version):
        raise MalformedWord(f"bad {AGENT_VERSION} {printable(version)!r}")
    capabilities = tuple(c.strip() for c in (frame.get(CAPABILITIES) or "").split(",") if c.strip())
    if len(capabilities) > _MAX_CAPABILITIES:
        raise MalformedWord(f"more than {_MAX_CAPABILITIES} capabilities")
    for capability in capabilities:
        if not _TOKEN_RE.match(capability):
            raise MalformedWord(f"bad capability {printable(capability)!r}")
    if identity is None and login is None and mac is None:
        raise MalformedWord("names no identity, login or mac")
    if not hello:
        return Announcement(identity, login, ip, mac, version, capabilities)
    vnc_port, view_password = _vnc_view(frame)
    return Announcement(identity, login, ip, mac, version, capabilities, vnc_port, view_password)


class _Presence:
    """What the three presence words share: they all say who the guest is, the same way."""

    name: ClassVar[str]

    @classmethod
    def how_to_say(
        cls,
        *,
        identity: str,
        ip: str | None,
        mac: str | None,
        agent_version: str,
        capabilities: Iterable[str] = (),
        vnc_view: tuple[int, str] | None = None,
    ) -> Said:
        """The word; ``vnc_view`` (VNC port, operator's view-only password) is for HELLO alone: the
        other presence words never read it."""
        return _presence(cls.name, identity, ip, mac, agent_version, capabilities, vnc_view)


class Hello(_Presence):
    """A guest connected (or reconnected) and is ready for requests."""

    name: ClassVar[str] = "HELLO"

    async def listen_and_act(self, frame: Frame, context: IControllerContext) -> None:
        context.heard_hello(read_announcement(frame, hello=True))


class Bye(_Presence):
    """A guest is stopping cleanly: the controller need not wait for its beacons to stop."""

    name: ClassVar[str] = "BYE"

    async def listen_and_act(self, frame: Frame, context: IControllerContext) -> None:
        context.heard_bye(read_announcement(frame))


class StillAlive(_Presence):
    """The beacon, said every beacon interval; silence past the beacon timeout means gone."""

    name: ClassVar[str] = "STILL_ALIVE"

    async def listen_and_act(self, frame: Frame, context: IControllerContext) -> None:
        context.heard_beacon(read_announcement(frame))
