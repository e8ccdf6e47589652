"""Who may connect to the embedded broker, and what each kind of user may do, via twisted.cred.

Four kinds of login, checked in this order:

* the controller's own login/passcode (given at construction): full access;
* operator users ``{name: password}`` from ``[broker] users``: full access;
* per-VM credentials minted by the controller (:class:`Credentials`): a guest;
* when anonymous guests are allowed, any other login that is a valid guest identity, with no or
  an empty passcode, on a connection that came over loopback: a guest.  Whether a connection is
  anonymous-worthy is decided per connection, not per configured listener: a broker listening on
  every address (or also on the local driver's bridge) still takes anonymous guests from its own
  host only, never from a VM or another host.

A guest's identity is its login.  It may subscribe only to its own command destination and the
broadcast topic, and send only to the controller's queue (:mod:`vmcloud.words.destinations`).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import sys
from collections.abc import Callable, Mapping

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import Attribute, Interface, implementer

from vmcloud.words.destinations import BROADCAST, CONTROLLER, IDENTITY_RE, guest_destination

#: Prefix of the login minted for a VM: ``vm-<vmid>``.
VM_LOGIN_PREFIX = "vm-"

_FULL = "full:"
_GUEST = "guest:"


class IStompAvatar(Interface):
    """An authenticated STOMP user: its identity and what it may do."""

    identity = Attribute("The login; for guests also the name of their command destination.")
    full_access = Attribute("True for the controller and operators; False for guests.")

    def may_subscribe(destination: str) -> bool:  # noqa: N805
        """Whether this user may SUBSCRIBE to ``destination``."""

    def may_send(destination: str) -> bool:  # noqa: N805
        """Whether this user may SEND to ``destination``."""


@implementer(IStompAvatar)
@attrs.frozen
class FullAccess:
    """The controller or an operator: everything is allowed."""

    identity: str
    full_access: bool = True

    def may_subscribe(self, destination: str) -> bool:
        return True

    def may_send(self, destination: str) -> bool:
        return True


@implementer(IStompAvatar)
@attrs.frozen
class Guest:
    """A VM's agent: its own command destination, the broadcast topic, the controller's queues.

    One lives as long as each guest's connection: it keeps its identity and nothing it can work
    out when asked (its destination is asked for twice, at SUBSCRIBE).
    """

    identity: str
    full_access: bool = False

    def may_subscribe(self, destination: str) -> bool:
        return destination == BROADCAST or destination == guest_destination(self.identity)

    def may_send(self, destination: str) -> bool:
        # The controller's queue, and no name beneath it: that is the one destination the
        # controller reads.  ``/queue/vmcloud.controller.<anything>`` would be a queue nobody
        # consumes, where a guest could have the broker store messages up to its whole store
        # limit (256 MiB), kept until the broker restarts, and then refuse everyone's commands
        # waiting for a guest (the attack suite found it).
        return destination == CONTROLLER


class Credentials:
    """Per-VM logins minted by the controller when it boots a VM, forgotten when it goes."""

    def __init__(self) -> None:
        self._passcodes: dict[str, str] = {}
        self._on_revoke: list[Callable[[str], None]] = []

    def mint(self, vmid: str) -> tuple[str, str]:
        """New credentials for ``vmid``: login ``vm-<vmid>`` and a 192-bit random passcode.

        Minting again for the same VM replaces the passcode (the old one stops working).
        """
        login = _one_copy(VM_LOGIN_PREFIX + vmid)
        if not IDENTITY_RE.match(login):
            raise ValueError(f"vmid {vmid!r} does not make a valid guest identity")
        passcode = secrets.token_urlsafe(24)
        self._passcodes[login] = passcode
        return login, passcode

    def restore(self, vmid: str, login: str, passcode: str) -> None:
        """Accept again credentials minted before a controller restart (kept in the checkpoint),
        so that a recovered VM's guest can log in and say HELLO again."""
        if login != VM_LOGIN_PREFIX + vmid or not IDENTITY_RE.match(login):
            raise ValueError(f"login {login!r} was not minted for vmid {vmid!r}")
        if not passcode:
            raise ValueError("an empty passcode cannot be restored")
        self._passcodes[_one_copy(login)] = passcode

    def revoke(self, vmid: str) -> None:
        """Forget the VM's credentials and drop its connections (and stored commands)."""
        login = VM_LOGIN_PREFIX + vmid
        self._passcodes.pop(login, None)
        for callback in list(self._on_revoke):
            callback(login)

    def on_revoke(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(login)`` whenever credentials are revoked (the broker drops the guest)."""
        self._on_revoke.append(callback)

    def passcode(self, login: str) -> str | None:
        """The minted passcode of ``login``, if any."""
        return self._passcodes.get(login)


def _one_copy(login: str) -> str:
    """The one string object for ``login`` held by the credentials, the guest's avatar and
    everything that keeps what the avatar says (the messages it sends, the guest channel's
    registry, the pool's VM record) -- a copy each at 5,000 VMs is a few hundred kilobytes."""
    return sys.intern(login)


def is_loopback(address: object) -> bool:
    """Whether a transport address is on this host only: a UNIX socket or a loopback IP.

    Linux drops packets from the wire that claim a loopback source, so a connection whose two ends
    are loopback addresses came from a process on this host (not from a VM's namespace).
    """
    if getattr(address, "type", None) not in ("TCP", "UDP"):
        return getattr(address, "name", None) is not None  # a UNIXAddress
    try:
        return ipaddress.ip_address(str(getattr(address, "host", ""))).is_loopback
    except ValueError:
        return False


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


@implementer(IUsernamePassword)
@attrs.frozen
class StompLogin:
    """The login and passcode of a CONNECT frame (text, as the frame carries them)."""

    login: str
    passcode: str
    on_loopback: bool = False  # both ends of the connection are loopback addresses (or a UNIX socket)

    @property
    def username(self) -> bytes:
        return self.login.encode("utf-8")

    @property
    def password(self) -> bytes:
        return self.passcode.encode("utf-8")

    def checkPassword(self, password: bytes) -> bool:  # noqa: N802 (twisted.cred's name)
        return hmac.compare_digest(self.password, password)


@implementer(ICredentialsChecker)
@attrs.define
class BrokerChecker:
    """Maps a CONNECT's login/passcode to an avatar id ``full:<name>`` or ``guest:<identity>``."""

    credentialInterfaces = (IUsernamePassword,)

    controller_login: str
    controller_passcode: str
    operators: Mapping[str, str]
    minted: Credentials
    anonymous_guests: bool

    def requestAvatarId(self, credentials: StompLogin) -> Deferred[bytes | tuple[()]]:  # noqa: N802
        login, passcode = credentials.login, credentials.passcode
        if not login:
            return fail(UnauthorizedLogin("no login"))
        if login == self.controller_login:
            return self._verdict(_same(passcode, self.controller_passcode), _FULL + login)
        operator_password = self.operators.get(login)
        if operator_password is not None:
            return self._verdict(_same(passcode, operator_password), _FULL + login)
        minted = self.minted.passcode(login)
        if minted is not None:
            return self._verdict(_same(passcode, minted), _GUEST + login)
        if self.anonymous_guests and not passcode and IDENTITY_RE.match(login):
            if not credentials.on_loopback:
                return fail(UnauthorizedLogin("anonymous guests are only taken over loopback"))
            return succeed((_GUEST + login).encode("utf-8"))
        return fail(UnauthorizedLogin("unknown login"))

    @staticmethod
    def _verdict(good: bool, avatar_id: str) -> Deferred[bytes | tuple[()]]:
        if not good:
            return fail(UnauthorizedLogin("wrong passcode"))
        return succeed(avatar_id.encode("utf-8"))


@implementer(IRealm)
class AvatarRealm:
    """Turns avatar ids from :class:`BrokerChecker` into :class:`IStompAvatar` objects."""

    def requestAvatar(  # noqa: N802 (twisted.cred's name)
        self,
        avatarId: bytes | tuple[()],  # noqa: N803 (twisted.cred's name)
        mind: object,
        *interfaces: type[Interface],
    ) -> tuple[type[Interface], IStompAvatar, Callable[[], None]]:
        if IStompAvatar not in interfaces:
            raise NotImplementedError("only IStompAvatar is provided")
        if not isinstance(avatarId, bytes):
            raise NotImplementedError("anonymous logins are not supported")
        kind_and_name = avatarId.decode("utf-8")
        avatar: IStompAvatar
        if kind_and_name.startswith(_FULL):
            avatar = FullAccess(kind_and_name[len(_FULL) :])
        else:
            avatar = Guest(_one_copy(kind_and_name[len(_GUEST) :]))
        return IStompAvatar, avatar, lambda: None


def make_portal(
    *,
    controller_login: str,
    controller_passcode: str,
    operators: Mapping[str, str],
    minted: Credentials,
    anonymous_guests: bool,
) -> Portal:
    """The portal the wire protocol logs in through."""
    checker = BrokerChecker(controller_login, controller_passcode, dict(operators), minted, anonymous_guests)
    return Portal(AvatarRealm(), [checker])
