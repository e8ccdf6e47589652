"""Recording fakes of the pool's seams (cloud driver, guest channel, checkpoint store) and a harness.

Every cloud or guest call returns a Deferred the test fires (or an answer made at once in ``auto``
mode), so a test decides exactly when and how the world answers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from vmcloud.pool.config import PoolConfig
from vmcloud.pool.interfaces import (
    ACTIVE,
    BootRequest,
    GuestCallFailed,
    GuestCredentials,
    GuestInfo,
    ICheckpointStore,
    ICloudDriver,
    IGuestChannel,
    IGuestCredentialsRestore,
    IGuestListener,
    ServerStatus,
)
from vmcloud.pool.model import VMState
from vmcloud.pool.service import PoolService

PREFIX = "pool-"


@implementer(ICloudDriver)
class FakeDriver:
    """A cloud whose answers the test gives; ``servers`` is what a listing shows.

    ``image``: what new servers boot from (listed as theirs); None, like the local driver, by default.
    """

    name = "fake"
    prefix = PREFIX

    def __init__(self, image: str | None = None) -> None:
        self.image = image
        self.boots: list[tuple[BootRequest, Deferred[str]]] = []
        self.deletes: list[tuple[str, Deferred[None]]] = []
        self.lists: list[Deferred[list[ServerStatus]]] = []
        self.servers: dict[str, ServerStatus] = {}
        #: Errors raised by the next calls, in order, per method.
        self.errors: dict[str, list[BaseException]] = {"boot": [], "delete": [], "list": []}
        self.auto = False
        self._next = 0

    def _error(self, method: str) -> BaseException | None:
        queue = self.errors[method]
        return queue.pop(0) if queue else None

    async def boot(self, request: BootRequest) -> str:
        error = self._error("boot")
        if error is not None:
            raise error
        if self.auto:
            return self.accept(request)
        d: Deferred[str] = Deferred()
        self.boots.append((request, d))
        return await d

    def accept(self, request: BootRequest, macs: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> str:
        """Make the server of a boot request exist; returns its id."""
        self._next += 1
        server_id = f"srv-{self._next}"
        self.servers[server_id] = ServerStatus(
            server_id,
            request.name,
            ACTIVE,
            macs=macs,
            ips=ips,
            metadata=dict(request.metadata),
            image=self.image,
        )
        return server_id

    def answer_boots(self) -> list[str]:
        """Accept every boot waiting for an answer; returns their vmids."""
        answered = []
        while self.boots:
            request, d = self.boots.pop(0)
            d.callback(self.accept(request))
            answered.append(request.vmid)
        return answered

    async def delete(self, server_id: str) -> None:
        error = self._error("delete")
        if error is not None:
            raise error
        if self.auto:
            self.servers.pop(server_id, None)
            return
        d: Deferred[None] = Deferred()
        self.deletes.append((server_id, d))
        await d
        self.servers.pop(server_id, None)

    def answer_deletes(self) -> list[str]:
        done = []
        while self.deletes:
            server_id, d = self.deletes.pop(0)
            d.callback(None)
            done.append(server_id)
        return done

    async def list_servers(self) -> list[ServerStatus]:
        error = self._error("list")
        if error is not None:
            raise error
        if self.auto:
            return list(self.servers.values())
        d: Deferred[list[ServerStatus]] = Deferred()
        self.lists.append(d)
        return await d

    def answer_lists(self) -> int:
        n = 0
        while self.lists:
            self.lists.pop(0).callback(list(self.servers.values()))
            n += 1
        return n


@attrs.define
class Call:
    identity: str
    word: str
    params: Mapping[str, Any]
    timeout: float
    answer: Deferred[Mapping[str, Any]]


@implementer(IGuestChannel, IGuestCredentialsRestore)
class FakeChannel:
    """A guest channel whose guests the test makes say things."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.listeners: list[IGuestListener] = []
        self.known: dict[str, GuestInfo] = {}
        self.calls: list[Call] = []
        self.minted: dict[str, GuestCredentials] = {}
        self.revoked: list[str] = []
        self.restored: dict[str, GuestCredentials] = {}
        self.auto = False

    def add_listener(self, listener: IGuestListener) -> None:
        self.listeners.append(listener)

    def guests(self) -> Mapping[str, GuestInfo]:
        return dict(self.known)

    def mint_credentials(self, vmid: str) -> GuestCredentials:
        credentials = GuestCredentials("tcp:127.0.0.1:61613", f"vm-{vmid}", f"secret-{vmid}")
        self.minted[vmid] = credentials
        return credentials

    def revoke_credentials(self, vmid: str) -> None:
        self.revoked.append(vmid)

    def restore_credentials(self, vmid: str, credentials: GuestCredentials) -> None:
        self.restored[vmid] = credentials

    async def call(
        self, identity: str, word: str, params: Mapping[str, Any], timeout: float
    ) -> Mapping[str, Any]:
        if self.auto:
            return {}
        d: Deferred[Mapping[str, Any]] = Deferred()
        self.calls.append(Call(identity, word, params, timeout, d))
        return await d

    def answer_calls(self, word: str | None = None, answer: Mapping[str, Any] | None = None) -> list[Call]:
        """Answer (successfully) every call waiting, or those of ``word``."""
        done = [c for c in self.calls if word is None or c.word == word]
        self.calls = [c for c in self.calls if c not in done]
        for c in done:
            c.answer.callback(dict(answer or {}))
        return done

    def fail_calls(self, word: str | None = None, reason: str = "no answer") -> list[Call]:
        done = [c for c in self.calls if word is None or c.word == word]
        self.calls = [c for c in self.calls if c not in done]
        for c in done:
            c.answer.errback(GuestCallFailed(reason))
        return done

    def hello(
        self,
        identity: str,
        login: str | None = None,
        ip: str | None = None,
        mac: str | None = None,
    ) -> GuestInfo:
        guest = GuestInfo(identity, login, ip, mac, "1.0", ("browser",), self.clock.seconds())
        self.known[identity] = guest
        for listener in self.listeners:
            listener.guest_hello(guest)
        return guest

    def beacon(self, identity: str) -> None:
        self.known[identity] = attrs.evolve(self.known[identity], last_beacon=self.clock.seconds())

    def gone(self, identity: str, reason: str = "BYE") -> None:
        self.known.pop(identity, None)
        for listener in self.listeners:
            listener.guest_gone(identity, reason)

    def event(self, identity: str, data: Mapping[str, Any]) -> None:
        for listener in self.listeners:
            listener.guest_event(identity, data)


@implementer(ICheckpointStore)
class FakeStore:
    def __init__(self, checkpoint: Mapping[str, Any] | None = None) -> None:
        self.checkpoint = checkpoint
        self.saves: list[Mapping[str, Any]] = []
        self.flushes = 0

    def load(self) -> Mapping[str, Any] | None:
        return self.checkpoint

    def save(self, snapshot: Mapping[str, Any]) -> None:
        self.saves.append(snapshot)
        self.checkpoint = snapshot

    async def flush(self) -> None:
        self.flushes += 1


CONFIG = PoolConfig(
    prefix=PREFIX,
    controller_name="test-controller",
    max_pool_size=10,
    timeout_boot=60.0,
    timeout_update=20.0,
    timeout_operation=30.0,
    timeout_cloud=10.0,
    poll_interval=10.0,
    events_per_handle=5,
    long_poll_default=5.0,
    tick_interval=1.0,
)


class World:
    """A pool service on a Clock with recording fakes around it."""

    def __init__(
        self,
        config: PoolConfig = CONFIG,
        checkpoint: Mapping[str, Any] | None = None,
        start: bool = True,
        now: float = 1_000_000.0,
        store: Any = None,
        image: str | None = None,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(now)
        self.driver = FakeDriver(image)
        self.channel = FakeChannel(self.clock)
        self.store = FakeStore(checkpoint) if store is None else store
        self.config = config
        self.pool = PoolService(self.clock, self.driver, self.channel, self.store, config, epoch="e")
        if start:
            self.start()

    def start(self) -> None:
        self.pool.startService()
        self.driver.answer_lists()
        self.turn()

    def turn(self) -> None:
        """Let the reactor turn once: scheduled passes run."""
        self.clock.advance(0)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.turn()

    @property
    def state(self) -> Any:
        return self.pool.state

    def vms(self, state: VMState | None = None) -> list[Any]:
        return [vm for vm in self.state.vms.values() if state is None or vm.state is state]

    def counts(self) -> Counter[str]:
        return Counter(vm.state.value for vm in self.state.vms.values())

    def hello_booting(self) -> list[str]:
        """Every BOOTING VM's guest says HELLO (by its login)."""
        said = []
        for vm in self.vms(VMState.BOOTING):
            self.channel.hello(vm.login, login=vm.login)
            said.append(vm.vmid)
        return said

    def settle(self, rounds: int = 10) -> None:
        """Let the world answer everything (boots, HELLOs, words, deletes) until nothing moves."""
        for _ in range(rounds):
            self.turn()
            moved = bool(self.driver.answer_boots())
            self.turn()
            moved |= bool(self.hello_booting())
            self.turn()
            moved |= bool(self.channel.answer_calls())
            moved |= bool(self.driver.answer_deletes())
            self.turn()
            if not moved:
                return


def two_listed_vms(addresses_a: tuple, addresses_b: tuple) -> tuple:  # type: ignore[type-arg]
    """A pool of two booted VMs whose servers the cloud listed with these (MACs, IPs)."""
    w = World()
    w.pool.set_pool_size(2, 2, 0)
    w.turn()
    (req_a, d_a), (req_b, d_b) = w.driver.boots
    w.driver.boots.clear()
    d_a.callback(w.driver.accept(req_a, *addresses_a))
    d_b.callback(w.driver.accept(req_b, *addresses_b))
    w.advance(CONFIG.poll_interval)
    w.driver.answer_lists()
    w.turn()
    return w, req_a, req_b
