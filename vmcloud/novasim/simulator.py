"""The in-process handle on a simulated Keystone + Nova + Glance: build it, listen, steer it.

Typical test use::

    clock = Clock()
    sim = Simulator(clock, settings=CloudSettings(build_seconds=2), seed=1,
                    on_active=lambda server: ...)
    port = sim.listen(reactor)                  # 127.0.0.1, a free port
    ...point novaclient at sim.auth_url with sim.identity's credentials...
    clock.advance(2)                            # servers become ACTIVE
    sim.count("GET /v2.1/servers/{id}")         # how often that route was asked for
    sim.inject_next(FaultRule(status=503), 3)   # the next three requests fail
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.web.server import Site

from vmcloud.novasim.compute import ComputeApi
from vmcloud.novasim.control import ControlApi
from vmcloud.novasim.exchange import Match, SimRequest
from vmcloud.novasim.faults import FaultInjector, FaultRule
from vmcloud.novasim.glance import ImageApi
from vmcloud.novasim.identity import Identity, IdentityApi, TokenStore
from vmcloud.novasim.model import (
    DEFAULT_FLAVORS,
    DEFAULT_IMAGES,
    DEFAULT_NETWORKS,
    CloudSettings,
    Flavor,
    Image,
    Network,
    NovaCloud,
    ServerHook,
    ServerView,
)
from vmcloud.novasim.views import Calendar
from vmcloud.novasim.web import SimResource


class Simulator:
    """One simulated cloud (one user, one project), its HTTP face and its knobs."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        settings: CloudSettings | None = None,
        identity: Identity | None = None,
        seed: int | None = None,
        flavors: Sequence[Flavor] = DEFAULT_FLAVORS,
        images: Sequence[Image] = DEFAULT_IMAGES,
        networks: Sequence[Network] = DEFAULT_NETWORKS,
        on_active: ServerHook | None = None,
        on_deleted: ServerHook | None = None,
        base_url: str | None = None,
    ) -> None:
        self.clock = clock
        self.base_url = base_url
        self._listening: list[IListeningPort] = []
        self._connections: WrappingFactory | None = None
        self._reactor: Any = None
        rng = random.Random(seed)
        self.calendar = Calendar(clock, offset=time.time() - clock.seconds())
        self.cloud = NovaCloud(
            clock,
            settings=settings,
            rng=rng,
            flavors=flavors,
            images=images,
            networks=networks,
            on_active=on_active,
            on_deleted=on_deleted,
        )
        self.tokens = TokenStore(identity or Identity(), self.calendar)
        self.faults = FaultInjector(rng)
        self.counters: Counter[str] = Counter()
        self._identity_api = IdentityApi(self.tokens)
        self._compute_api = ComputeApi(self.cloud, self.tokens, self.calendar)
        self._image_api = ImageApi(self.cloud.images, self.tokens)
        self._control = ControlApi(self)
        self.resource = SimResource(
            route=self._route,
            control=self._control.handle,
            faults=self.faults,
            counters=self.counters,
            clock=clock,
            base_url=lambda: self.base_url,
        )

    # ------------------------------------------------------------------ serving

    def site(self) -> Site:
        site = Site(self.resource)
        site.displayTracebacks = False
        site.noisy = False
        return site

    def listen(self, reactor: Any, port: int = 0, interface: str = "127.0.0.1") -> IListeningPort:
        """Listen on ``interface:port`` (0: any free port) and set :attr:`base_url` from it.

        ``reactor`` provides IReactorTCP and IReactorTime (the simulator's own clock may be a
        test Clock; closing connections in :meth:`stop` needs real time).
        """
        self._reactor = reactor
        self._connections = WrappingFactory(self.site())
        listening: IListeningPort = reactor.listenTCP(port, self._connections, interface=interface)
        self._listening.append(listening)
        address = listening.getHost()
        self.base_url = f"http://{address.host}:{address.port}"  # type: ignore[attr-defined]
        return listening

    async def stop(self) -> None:
        """Stop listening and close every open connection (clients keep connections alive)."""
        for listening in self._listening:
            await maybeDeferred(listening.stopListening)
        self._listening.clear()
        if self._connections is None:
            return
        for proto in list(self._connections.protocols):
            proto.transport.abortConnection()
        while self._connections.protocols:
            await deferLater(self._reactor, 0.01)

    def _route(self, request: SimRequest) -> Match:
        path = request.path
        if path == "/identity" or path.startswith("/identity/"):
            return Match(
                f"{request.method} {path.rstrip('/') or '/'}", lambda r, _: self._identity_api.handle(r), {}
            )
        if path == "/image" or path.startswith("/image/"):
            return self._image_api.route(request)
        return self._compute_api.route(request)

    # ------------------------------------------------------------------ where to point clients

    @property
    def identity(self) -> Identity:
        return self.tokens.identity

    @property
    def auth_url(self) -> str:
        """The Keystone v3 URL for ``keystoneauth1.identity.v3`` plugins."""
        return f"{self.base_url}/identity/v3"

    @property
    def compute_url(self) -> str:
        """The compute endpoint (what the catalog says; use it as ``endpoint_override``)."""
        return f"{self.base_url}/v2.1"

    # ------------------------------------------------------------------ observing

    def servers(self) -> list[ServerView]:
        """Every server that still exists (deleting ones included), oldest first."""
        return self.cloud.views()

    def count(self, label: str) -> int:
        """Requests seen for a route label, e.g. ``"GET /v2.1/servers/{id}"``."""
        return self.counters[label]

    def counts(self) -> dict[str, int]:
        return dict(self.counters)

    def reset_counters(self) -> None:
        self.counters.clear()

    # ------------------------------------------------------------------ steering

    def configure(self, **changes: object) -> CloudSettings:
        """Change settings (build/delete durations, quota, capacity, max_limit, boot rules)."""
        return self.cloud.configure(**changes)

    def inject_next(self, rule: FaultRule, count: int = 1) -> None:
        self.faults.inject_next(rule, count)

    def set_fault_rate(self, rule: FaultRule, rate: float) -> None:
        self.faults.set_rate(rule, rate)

    def clear_faults(self) -> None:
        self.faults.clear()

    def revoke_tokens(self) -> int:
        """Revoke every issued token: the next Nova call of every client gets 401 and re-authenticates."""
        return self.tokens.revoke_all()
