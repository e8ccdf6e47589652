"""How the controller's rooms are put together: one builder per room, in start order.

:func:`build_controller` makes the whole service tree of ``twistd vmcloud`` from a
:class:`Deployment` (the configuration, checked against this host's environment by
:func:`check_deployment`).  Nothing here reads the environment, a config file or the global
reactor: ``vmcloud/tap.py`` does, and hands them in, so a test builds the same tree on a
``MemoryReactorClock`` with :class:`~vmcloud.threads.SynchronousThreads` for the thread pools.

Start order (the root's children):

1. thread pools (cloud calls, checkpoint writes),
2. the broker (embedded listener, or a client session to an external one), then the guest channel,
3. the cloud driver (the local driver's start and stop steps; the Nova driver has none),
4. the pool (restores the checkpoint, reconciles),
5. the HTTP API listener.

They stop one at a time in reverse: the API closes first, then the pool drains, then the rest.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from twisted.web.resource import IResource

from vmcloud.api.accesslog import redacted_log_formatter
from vmcloud.api.metrics import Metrics
from vmcloud.api.site import ApiSite
from vmcloud.config import Config, ConfigError, listen_backlog, listens_on_loopback_only, with_backlog
from vmcloud.service import SequentialMultiService
from vmcloud.threads import ThreadPoolService, Threads, ThreadsFactory
from vmcloud.timings import NO_TIMINGS, ITimings

if TYPE_CHECKING:
    from vmcloud.broker import Broker
    from vmcloud.drivers.nova import NovaConfig
    from vmcloud.pool.interfaces import ICheckpointStore, ICloudDriver, IGuestChannel
    from vmcloud.pool.service import PoolService

log = Logger()


@attrs.frozen
class Deployment:
    """A configuration checked against the host it runs on: everything the service tree is built from."""

    config: Config
    #: The daemon's environment as it was at start (the local driver passes part of it to VMs).
    environ: Mapping[str, str]
    #: The broker address written into guests' user-data.
    guest_broker: str
    #: The ``[nova]`` section completed from ``OS_*`` and checked; None with the local driver.
    nova: NovaConfig | None = None


def check_deployment(config: Config, environ: Mapping[str, str]) -> Deployment:
    """Refuse, before anything starts, a configuration that would be unsafe or cannot work here."""
    if not config.api.token and not listens_on_loopback_only(config.api.listen):
        raise ConfigError(
            f"[api] listen = {config.api.listen} is reachable from other hosts but no [api] token is set; "
            "set a token or listen on 127.0.0.1"
        )
    nova = None
    if config.pool.driver == "nova":
        from vmcloud.drivers.nova import NovaConfig

        nova = NovaConfig.from_sources(config.nova, environ)
    if config.broker.external:
        guest_broker = config.broker.guest_broker or config.broker.external
    else:
        derived = guest_broker_address(config.broker.listen)  # refused even when guest_broker is set
        guest_broker = config.broker.guest_broker or derived
    return Deployment(config=config, environ=dict(environ), guest_broker=guest_broker, nova=nova)


def guest_broker_address(listen: str) -> str:
    """The client endpoint guests should use for a broker listening on ``listen``."""
    parts = listen.split(":")
    if parts[0] != "tcp" or len(parts) < 2:
        raise ConfigError(f"[broker] guest_broker: cannot derive it from listen = {listen}; set it")
    host = "127.0.0.1"
    for part in parts[2:]:
        if part.startswith("interface="):
            host = part.removeprefix("interface=")
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    return f"tcp:{host}:{parts[1]}"


class ControllerRoot(SequentialMultiService):
    """The tree's root: a port that cannot be bound ends the start with one line that says why.

    Twisted would print ``CannotListenError``'s traceback; an operator who started a second daemon
    on the same ``--api``/``--stomp`` port wants to read which port and what to do, and an exit
    status that is not 0.
    """

    def privilegedStartService(self) -> None:  # noqa: N802 - Twisted's name
        with _listen_refusal():
            super().privilegedStartService()

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        with _listen_refusal():
            super().startService()


@contextmanager
def _listen_refusal() -> Iterator[None]:
    try:
        yield
    except CannotListenError as e:
        log.critical(
            "Cannot listen on {interface}:{port} ({reason}): another process holds it (a second daemon?);"
            " stop it, or give this one another port (--api, --stomp, [api] listen, [broker] listen)",
            interface=e.interface or "*",
            port=e.port,
            reason=str(e.socketError),
            event="listen-failed",
        )
        raise SystemExit(1) from None


@attrs.frozen
class Room:
    """What every builder needs: where services go, the reactor, and the listeners' backlog."""

    root: MultiService
    reactor: Any
    backlog: int

    def listen(self, description: str, factory: Any, name: str) -> None:
        """A listener on ``description`` (with the pool-sized backlog unless it says its own)."""
        listener = strports.service(with_backlog(description, self.backlog), factory, self.reactor)
        listener.setName(name)
        listener.setServiceParent(self.root)


def build_controller(reactor: Any, deployment: Deployment, threads: ThreadsFactory | None = None) -> IService:
    """The whole controller's service tree for ``deployment``; nothing is started yet.

    ``threads`` makes the thread pools (``(name, size)`` to a service); default: real ones.
    """
    config = deployment.config
    make_threads = threads or partial(ThreadPoolService, reactor)
    state_dir = FilePath(os.path.abspath(config.pool.state_dir))
    state_dir.makedirs(ignoreExistingDirectory=True)
    controller_name = config.pool.controller_name or socket.gethostname()
    # every listener queues a whole pool's reconnects (a restarted broker), see listen_backlog
    room = Room(ControllerRoot(), reactor, listen_backlog(config.pool.max_pool_size))
    metrics = Metrics()  # /metrics: the rooms below tell it their durations, the broker is read

    cloud_threads = add_threads(room, make_threads("vmcloud-cloud", config.pool.cloud_threads))
    store_threads = add_threads(room, make_threads("vmcloud-checkpoint", 1))
    store = build_store(reactor, state_dir, store_threads, timings=metrics)
    channel, broker = add_broker_and_channel(room, deployment)
    if broker is not None:
        metrics.watch_broker(broker.stats)
    driver = add_driver(
        room,
        deployment,
        state_dir=state_dir,
        controller_name=controller_name,
        cloud_threads=cloud_threads,
        broker=broker,
        # the pool is built below; the driver asks at stop whether VMs are left to keep
        vms_left=lambda: bool(pool.state.vms),
        timings=metrics,
    )
    pool = add_pool(room, config, driver, channel, store, controller_name, timings=metrics)
    add_api(room, config, pool, state_dir, metrics=metrics)
    return room.root


def add_threads(room: Room, threads: Threads) -> Threads:
    """A thread pool of the daemon's own, started first and stopped last."""
    threads.setServiceParent(room.root)
    return threads


def build_store(
    clock: IReactorTime, state_dir: FilePath[str], threads: Threads, *, timings: ITimings = NO_TIMINGS
) -> ICheckpointStore:
    """The pool's checkpoint in ``state_dir``, written on ``threads``."""
    from vmcloud.store.checkpoint import CheckpointStore

    return CheckpointStore(state_dir, dispatch=threads.dispatch, clock=clock, timings=timings)


def add_broker_and_channel(room: Room, deployment: Deployment) -> tuple[IGuestChannel, Broker | None]:
    """The STOMP side: the embedded broker's listener (or a session to an external broker), then
    the guest channel over it.  The embedded broker is returned too (None for an external one)."""
    from vmcloud.words.channel import GuestChannel, SharedGuestLogin

    config = deployment.config
    session: Any
    credentials: Any
    broker = None
    if config.broker.external:
        from vmcloud.stomp.client import ReconnectingSession

        session = ReconnectingSession(
            room.reactor,
            config.broker.external,
            login=config.broker.login,
            passcode=config.broker.passcode,
        )
        session.setServiceParent(room.root)
        credentials = SharedGuestLogin(config.broker.guest_login, config.broker.guest_passcode)
    else:
        from vmcloud.broker import Broker

        # Anonymous guests are decided per connection (loopback only, see broker.auth), so "auto"
        # and "yes" both allow them there; "no" refuses them everywhere.
        anonymous = config.broker.anonymous_guests != "no"
        broker = Broker(
            room.reactor,
            controller_login=config.broker.login or "vmcloud-controller",
            controller_passcode=config.broker.passcode or secrets.token_urlsafe(24),
            operators=config.broker.users,
            anonymous_guests=anonymous,
        )
        room.listen(config.broker.listen, broker.factory(), "broker-listener")
        session = broker.attach_local("controller")
        credentials = broker.credentials
        log.info(
            "embedded STOMP broker on {listen}; anonymous guests {anonymous}",
            listen=config.broker.listen,
            anonymous="allowed on loopback connections only" if anonymous else "refused",
        )
    channel = GuestChannel(
        room.reactor,
        session,
        credentials=credentials,
        guest_broker=deployment.guest_broker,
        beacon_timeout=config.pool.timeout_update,
    )
    if IService.providedBy(channel):
        channel.setServiceParent(room.root)
    return channel, broker


def add_driver(
    room: Room,
    deployment: Deployment,
    *,
    state_dir: FilePath[str],
    controller_name: str,
    cloud_threads: Threads,
    broker: Broker | None,
    vms_left: Callable[[], bool],
    timings: ITimings = NO_TIMINGS,
) -> ICloudDriver:
    """The cloud driver of ``[pool] driver``."""
    config = deployment.config
    if config.pool.driver == "nova":
        from vmcloud.drivers.nova import NovaDriver

        assert deployment.nova is not None, "check_deployment completes [nova]"
        return NovaDriver(
            deployment.nova,
            prefix=config.pool.prefix,
            dispatch=cloud_threads.dispatch,
            clock=room.reactor,
            controller_name=controller_name,
            timings=timings,
        )
    return add_local_driver(room, deployment, state_dir=state_dir, broker=broker, vms_left=vms_left)


def add_local_driver(
    room: Room,
    deployment: Deployment,
    *,
    state_dir: FilePath[str],
    broker: Broker | None,
    vms_left: Callable[[], bool],
) -> ICloudDriver:
    """VMs as processes on this machine; it claims the state dir now, and prepares at start (a
    second broker listener on the bridge, in network-namespace mode)."""
    from vmcloud.drivers.claims import HostInUse
    from vmcloud.drivers.local import LocalDriver, guest_agent_argv, vm_environment

    config = deployment.config
    reactor = room.reactor
    broker_port = _port_of(config.broker.listen)
    driver = LocalDriver(
        reactor,
        prefix=config.pool.prefix,
        state_dir=state_dir,
        max_vms=config.local.max_vms,
        netns={"yes": True, "no": False, "auto": None}[config.local.netns],
        agent_argv=guest_agent_argv(),
        broker_port=broker_port,
        subnet=config.local.subnet or None,  # empty: derived from the state dir
        bridge=config.local.bridge or None,
        environ=vm_environment(deployment.environ),
        browser=config.local.browser,
    )
    # before anything reads the state dir: a second daemon on it stops here (HostInUse)
    driver.claim_state_dir()

    async def prepare() -> None:
        try:
            await driver.prepare()
        except HostInUse as e:  # a bridge or subnet of another daemon: never touch it, stop
            log.critical("Stopping: {reason}", reason=str(e), event="daemon-refused")
            reactor.stop()
            return
        interface = driver.broker_listen_interface()
        if interface is not None and broker is not None:
            room.listen(
                f"tcp:{broker_port}:interface={interface}", broker.factory(), "broker-bridge-listener"
            )
            log.info(
                "guests in namespaces reach the broker on {interface}:{port}",
                interface=interface,
                port=broker_port,
            )

    async def stop() -> None:
        # VMs stay up across a restart (the checkpoint recovers them); after /shutdown there are
        # none, and then the bridge goes too, so nothing is left behind.
        await driver.stop(keep_vms=vms_left())

    _Lifecycle("local-driver", prepare, stop).setServiceParent(room.root)
    return driver


def add_pool(
    room: Room,
    config: Config,
    driver: ICloudDriver,
    channel: IGuestChannel,
    store: ICheckpointStore,
    controller_name: str,
    *,
    timings: ITimings = NO_TIMINGS,
) -> PoolService:
    """The pool: restores the checkpoint at start, reconciles, drains at stop."""
    from vmcloud.pool.config import pool_config
    from vmcloud.pool.service import PoolService

    pool = PoolService(
        room.reactor, driver, channel, store, pool_config(config, controller_name), timings=timings
    )
    pool.setServiceParent(room.root)
    return pool


def add_api(
    room: Room, config: Config, pool: PoolService, state_dir: FilePath[str], *, metrics: Metrics | None = None
) -> None:
    """The HTTP API (with the console and audio proxies mounted), listening last, closing first."""
    from vmcloud.api.app import make_api
    from vmcloud.console.proxies import build_proxies

    token = config.api.token or None
    if token is None:
        log.warn(
            "no API token configured: the API is open to local users only ({listen})",
            listen=config.api.listen,
        )
    static_dir = FilePath(config.api.static_dir) if config.api.static_dir else shipped_static()
    proxies = build_proxies(room.reactor, pool, token=token, cors_origins=config.api.cors_origins)
    app = make_api(
        pool,
        token=token,
        cors_origins=config.api.cors_origins,
        static_dir=static_dir,
        long_poll_default=config.api.long_poll_default,
        max_long_poll=config.api.long_poll_max,
        mounts=proxies.mounts,
        metrics=metrics,
    )
    room.listen(
        config.api.listen, make_site(app.resource(), config.api.access_log, state_dir), "api-listener"
    )


def make_site(resource: IResource, access_log: str, state_dir: FilePath[str]) -> ApiSite:
    """The HTTP site, with its access log (handles shortened) in a file of its own by default.

    A file written directly costs a fraction of a line through the daemon's log system, which
    was the largest single cost of a request.  An ``ApiSite``: request limits, and every refusal
    in the API's JSON shape.
    """
    if access_log == "-":
        return ApiSite(resource, logFormatter=redacted_log_formatter)
    if access_log == "none":
        site = ApiSite(resource, logPath=None, logFormatter=redacted_log_formatter)
        site.log = lambda request: None  # type: ignore[method-assign]
        return site
    path = access_log if os.path.isabs(access_log) else state_dir.child(access_log).path
    return ApiSite(resource, logPath=path, logFormatter=redacted_log_formatter)


def shipped_static() -> FilePath[str]:
    """The ``static/`` folder shipped with vmcloud: in the checkout, or installed under ``sys.prefix``."""
    here = FilePath(__file__).parent().parent()
    for candidate in (here.child("static"), FilePath(sys.prefix).descendant(["share", "vmcloud", "static"])):
        if candidate.isdir():
            return candidate
    return here.child("static")


class _Lifecycle(Service):
    """Runs an async step at start (without holding up the services after it) and another at stop."""

    def __init__(
        self,
        name: str,
        start: Callable[[], Coroutine[Any, Any, None]],
        stop: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        self.setName(name)
        self._start = start
        self._stop = stop

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        d = Deferred.fromCoroutine(self._start())
        d.addErrback(lambda f: log.failure("start-up step {name} failed", f, name=self.name))

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        super().stopService()
        return Deferred.fromCoroutine(self._stop())


def _port_of(description: str) -> int:
    try:
        return int(description.split(":")[1])
    except (IndexError, ValueError):
        raise ConfigError(f"cannot find a port in {description!r}") from None
