"""The embedded STOMP broker as the composition root builds it.

``Broker`` wires the realm (routing), twisted.cred (who may connect) and the wire protocol
factory together; the root listens with ``strports.service(description, broker.factory())``
and gives the guest channel ``broker.attach_local(name)`` and ``broker.credentials``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.logger import Logger

from vmcloud.broker.auth import Credentials, make_portal
from vmcloud.broker.limits import DEFAULT_LIMITS, BrokerLimits
from vmcloud.broker.local import LocalSession
from vmcloud.broker.protocol import StompServerFactory
from vmcloud.broker.realm import BrokerStats, Realm
from vmcloud.words.destinations import IDENTITY_RE, guest_destination

log = Logger()

_NO_OPERATORS: Mapping[str, str] = MappingProxyType({})


class Broker:
    """A STOMP 1.0/1.1/1.2 broker living in the controller's process."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        controller_login: str,
        controller_passcode: str,
        operators: Mapping[str, str] = _NO_OPERATORS,
        anonymous_guests: bool = False,
        limits: BrokerLimits = DEFAULT_LIMITS,
    ) -> None:
        if not controller_login or not controller_passcode:
            raise ValueError("the controller needs a non-empty broker login and passcode")
        self.limits = limits
        self.realm = Realm(limits)
        #: Per-VM guest credentials: ``mint(vmid) -> (login, passcode)``, ``revoke(vmid)``.
        self.credentials = Credentials()
        self.credentials.on_revoke(self._revoked)
        self.portal = make_portal(
            controller_login=controller_login,
            controller_passcode=controller_passcode,
            operators=operators,
            minted=self.credentials,
            anonymous_guests=anonymous_guests,
        )
        self._factory = StompServerFactory(clock, self.realm, self.portal, limits)

    def factory(self) -> IProtocolFactory:
        """The factory to listen with (any number of listeners may share it)."""
        return self._factory

    def attach_local(self, name: str) -> LocalSession:
        """A full-access in-process session (an ``IStompSession``) named ``name`` in logs."""
        return LocalSession(self.realm, name)

    def stats(self) -> BrokerStats:
        """Connections, subscriptions, stored and un-acked messages, paused publishers, drops."""
        factory = self._factory
        return self.realm.stats(factory.connections, factory.opened, factory.refused)

    def _revoked(self, login: str) -> None:
        dropped = self._factory.drop_identity(login, "credentials revoked")
        purged = self.realm.purge(guest_destination(login)) if IDENTITY_RE.match(login) else 0
        log.info(
            "Credentials of {login} revoked: {connections} connections dropped, {purged} messages purged",
            login=login,
            connections=dropped,
            purged=purged,
            event="broker-credentials-revoked",
        )
