"""The composition root of ``twistd vmcloud``: the only place that reads files, the environment, the reactor.

Everything below receives its collaborators (clock, driver, store, dispatcher) as arguments; this
module builds the service tree from a :class:`~vmcloud.config.Config` in start order:

1. thread pools (cloud calls, checkpoint writes),
2. the broker (embedded, or a client session to an external one) and the guest channel,
3. the cloud driver,
4. the pool (restores the checkpoint, reconciles),
5. the HTTP API listener.

They stop in reverse: the API closes first, then the pool drains, then the rest.
"""

from __future__ import annotations

import gc
import os
import secrets
import socket
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool

from vmcloud import memory
from vmcloud.api.accesslog import redacted_log_formatter
from vmcloud.api.site import ApiSite
from vmcloud.config import (
    DEFAULT_API,
    Config,
    ConfigError,
    listen_backlog,
    listens_on_loopback_only,
    parse_config,
    with_backlog,
)
from vmcloud.service import SequentialMultiService

log = Logger()

T = TypeVar("T")

#: Seconds between two returns of free heap pages to the system (:func:`vmcloud.memory.trim`).
TRIM_INTERVAL = 30.0


class Options(usage.Options):
    """``twistd vmcloud [--config FILE] [--api STRPORT] [--stomp STRPORT] [--state-dir DIR] [--driver D]``."""

    optParameters = [
        ["config", "c", None, "INI configuration file (see etc/vmcloud.conf); flags override it"],
        ["api", None, None, f"HTTP API listener, a strports description (default {DEFAULT_API})"],
        ["stomp", None, None, "embedded STOMP broker listener (default tcp:61613:interface=127.0.0.1)"],
        ["state-dir", None, None, "where checkpoint.json and driver state live (default ./state)"],
        ["driver", None, None, "cloud driver: local or nova (default local)"],
    ]

    def postOptions(self) -> None:  # noqa: N802 - Twisted's name
        text = None
        if self["config"]:
            try:
                text = FilePath(self["config"]).getContent().decode("utf-8")
            except OSError as e:
                raise usage.UsageError(f"cannot read config file {self['config']}: {e.strerror}") from None
        flags = {name: self[name] for name in ("api", "stomp", "state-dir", "driver")}
        try:
            self.config = parse_config(text, flags)
            check_deployment(self.config, os.environ)
        except ValueError as e:  # ConfigError, NovaConfigError
            raise usage.UsageError(str(e)) from None


def check_deployment(config: Config, environ: Mapping[str, str]) -> None:
    """Refuse, before anything starts, a configuration that would be unsafe or cannot work here."""
    if not config.api.token and not listens_on_loopback_only(config.api.listen):
        raise ConfigError(
            f"[api] listen = {config.api.listen} is reachable from other hosts but no [api] token is set; "
            "set a token or listen on 127.0.0.1"
        )
    if config.pool.driver == "nova":
        from vmcloud.drivers.nova import NovaConfig

        NovaConfig.from_sources(config.nova, environ)
    if not config.broker.external:
        guest_broker_address(config.broker.listen)


class ThreadPoolService(Service):
    """A dedicated, bounded thread pool that lives exactly as long as the daemon.

    Blocking libraries (python-novaclient, file fsyncs) run here rather than on the reactor's own
    pool, which DNS resolution shares.
    """

    def __init__(self, reactor: Any, name: str, size: int) -> None:
        self.setName(name)
        self._reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=size, name=name)

    def dispatch(self, fn: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self.pool, fn)

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.pool.start()

    def stopService(self) -> Deferred[None]:  # noqa: N802
        super().stopService()
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self.pool.stop)


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

    def startService(self) -> None:  # noqa: N802
        super().startService()
        d = Deferred.fromCoroutine(self._start())
        d.addErrback(lambda f: log.failure("start-up step {name} failed", f, name=self.name))

    def stopService(self) -> Deferred[None]:  # noqa: N802
        super().stopService()
        return Deferred.fromCoroutine(self._stop())


def build_controller(reactor: Any, config: Config, environ: Mapping[str, str]) -> IService:
    """The whole controller's service tree for ``config``; nothing is started yet."""
    from vmcloud.api.app import make_api
    from vmcloud.pool.config import PoolConfig
    from vmcloud.pool.service import PoolService
    from vmcloud.store.checkpoint import CheckpointStore
    from vmcloud.words.channel import GuestChannel, SharedGuestLogin

    clock: IReactorTime = reactor
    root = SequentialMultiService()
    state_dir = FilePath(os.path.abspath(config.pool.state_dir))
    state_dir.makedirs(ignoreExistingDirectory=True)
    controller_name = config.pool.controller_name or socket.gethostname()
    # every listener queues a whole pool's reconnects (a restarted broker), see listen_backlog
    backlog = listen_backlog(config.pool.max_pool_size)
    _warn_if_backlog_capped(backlog)

    cloud_threads = ThreadPoolService(reactor, "vmcloud-cloud", config.pool.cloud_threads)
    cloud_threads.setServiceParent(root)
    store_threads = ThreadPoolService(reactor, "vmcloud-checkpoint", 1)
    store_threads.setServiceParent(root)
    store = CheckpointStore(state_dir, dispatch=store_threads.dispatch, clock=clock)
    # free pages inside glibc's heaps go back to the system; off the reactor (no GIL held); a
    # no-op without glibc
    trimming = TimerService(TRIM_INTERVAL, lambda: store_threads.dispatch(memory.trim))
    trimming.setName("memory-trim")
    trimming.setServiceParent(root)

    # ---- broker and guest channel
    if config.broker.external:
        from vmcloud.stomp.client import ReconnectingSession

        session_service = ReconnectingSession(
            reactor,
            config.broker.external,
            login=config.broker.login,
            passcode=config.broker.passcode,
        )
        session_service.setServiceParent(root)
        session: Any = session_service
        credentials: Any = SharedGuestLogin(config.broker.guest_login, config.broker.guest_passcode)
        guest_broker = config.broker.guest_broker or config.broker.external
    else:
        from vmcloud.broker import Broker

        # Anonymous guests are decided per connection (loopback only, see broker.auth), so "auto"
        # and "yes" both allow them there; "no" refuses them everywhere.
        anonymous = config.broker.anonymous_guests != "no"
        broker = Broker(
            clock,
            controller_login=config.broker.login or "vmcloud-controller",
            controller_passcode=config.broker.passcode or secrets.token_urlsafe(24),
            operators=config.broker.users,
            anonymous_guests=anonymous,
        )
        listener = strports.service(with_backlog(config.broker.listen, backlog), broker.factory(), reactor)
        listener.setServiceParent(root)
        session = broker.attach_local("controller")
        credentials = broker.credentials
        guest_broker = config.broker.guest_broker or guest_broker_address(config.broker.listen)
        log.info(
            "embedded STOMP broker on {listen}; anonymous guests {anonymous}",
            listen=config.broker.listen,
            anonymous="allowed on loopback connections only" if anonymous else "refused",
        )

    channel = GuestChannel(
        clock,
        session,
        credentials=credentials,
        guest_broker=guest_broker,
        beacon_timeout=config.pool.timeout_update,
    )
    if IService.providedBy(channel):
        channel.setServiceParent(root)

    # ---- cloud driver
    driver: Any
    if config.pool.driver == "nova":
        from vmcloud.drivers.nova import NovaConfig, NovaDriver

        driver = NovaDriver(
            NovaConfig.from_sources(config.nova, environ),
            prefix=config.pool.prefix,
            dispatch=cloud_threads.dispatch,
            clock=clock,
            controller_name=controller_name,
        )
    else:
        from vmcloud.drivers.claims import HostInUse
        from vmcloud.drivers.local import LocalDriver, guest_agent_argv, vm_environment

        netns = {"yes": True, "no": False, "auto": None}[config.local.netns]
        driver = LocalDriver(
            reactor,
            prefix=config.pool.prefix,
            state_dir=state_dir,
            max_vms=config.local.max_vms,
            netns=netns,
            agent_argv=guest_agent_argv(),
            broker_port=_port_of(config.broker.listen),
            subnet=config.local.subnet or None,  # empty: derived from the state dir
            bridge=config.local.bridge or None,
            environ=vm_environment(environ),
            browser=config.local.browser,
        )
        # before anything reads the state dir: a second daemon on it stops here (HostInUse)
        driver.claim_state_dir()

        async def prepare_local() -> None:
            try:
                await driver.prepare()
            except HostInUse as e:  # a bridge or subnet of another daemon: never touch it, stop
                log.critical("Stopping: {reason}", reason=str(e), event="daemon-refused")
                reactor.stop()
                return
            interface = driver.broker_listen_interface()
            if interface is not None and not config.broker.external:
                port = _port_of(config.broker.listen)
                listener = strports.service(
                    with_backlog(f"tcp:{port}:interface={interface}", backlog), broker.factory(), reactor
                )
                listener.setServiceParent(root)
                log.info(
                    "guests in namespaces reach the broker on {interface}:{port}",
                    interface=interface,
                    port=port,
                )

        async def stop_local() -> None:
            # VMs stay up across a restart (the checkpoint recovers them); after /shutdown there are
            # none, and then the bridge goes too, so nothing is left behind.
            keep = bool(pool.all_status()["vms"])
            await driver.stop(keep_vms=keep)

        _Lifecycle("local-driver", prepare_local, stop_local).setServiceParent(root)

    # ---- pool
    pool = PoolService(
        clock,
        driver,
        channel,
        store,
        PoolConfig(
            prefix=config.pool.prefix,
            controller_name=controller_name,
            max_pool_size=config.pool.max_pool_size,
            beacon_interval=config.pool.beacon_interval,
            timeout_boot=config.pool.timeout_boot,
            timeout_update=config.pool.timeout_update,
            timeout_operation=config.pool.timeout_operation,
            timeout_cloud=config.pool.timeout_cloud,
            poll_interval=config.pool.poll_interval,
            events_per_handle=config.pool.events_per_handle,
            quota_retry=config.pool.quota_retry,
            max_boots_in_flight=config.pool.max_boots_in_flight,
            max_deletes_in_flight=config.pool.max_deletes_in_flight,
            long_poll_default=config.api.long_poll_default,
        ),
    )
    pool.setServiceParent(root)

    # ---- HTTP API
    check_deployment(config, environ)
    token = config.api.token or None
    listen = config.api.listen
    if token is None:
        log.warn("no API token configured: the API is open to local users only ({listen})", listen=listen)
    static_dir = FilePath(config.api.static_dir) if config.api.static_dir else _shipped_static()
    from vmcloud.console.proxies import build_proxies

    proxies = build_proxies(reactor, pool, token=token, cors_origins=config.api.cors_origins)
    app = make_api(
        pool,
        token=token,
        cors_origins=config.api.cors_origins,
        static_dir=static_dir,
        long_poll_default=config.api.long_poll_default,
        mounts=proxies.mounts,
    )
    site = _make_site(app.resource(), config.api.access_log, state_dir)
    strports.service(with_backlog(listen, backlog), site, reactor).setServiceParent(root)
    return root


def _make_site(resource: Any, access_log: str, state_dir: FilePath[str]) -> ApiSite:
    """The HTTP site, with its access log (handles shortened) in a file of its own by default.

    A file written directly costs a fraction of a line through the daemon's log system, which
    was the largest single cost of a request.  An ``ApiSite``: request limits, and every refusal
    in the API's JSON shape.
    """
    if access_log == "-":
        return ApiSite(resource, logFormatter=redacted_log_formatter)
    site = ApiSite(resource, logPath=None, logFormatter=redacted_log_formatter)
    if access_log == "none":
        site.log = lambda request: None  # type: ignore[method-assign]
        return site
    path = access_log if os.path.isabs(access_log) else state_dir.child(access_log).path
    return ApiSite(resource, logPath=path, logFormatter=redacted_log_formatter)


def _warn_if_backlog_capped(backlog: int, path: str = "/proc/sys/net/core/somaxconn") -> None:
    """Say so when the kernel gives the listeners a shorter queue than ``backlog`` (it caps every
    listen backlog at ``net.core.somaxconn`` without telling the program)."""
    try:
        with open(path) as f:
            cap = int(f.read().strip())
    except (OSError, ValueError):
        return  # not Linux, or not readable: nothing to say
    if cap < backlog:
        log.warn(
            "the kernel caps listen backlogs at net.core.somaxconn = {cap}, below the {backlog} this pool "
            "needs to take every guest reconnecting at once; raise it: sysctl net.core.somaxconn={backlog}",
            cap=cap,
            backlog=backlog,
            event="listen-backlog-capped",
        )


def _port_of(description: str) -> int:
    try:
        return int(description.split(":")[1])
    except (IndexError, ValueError):
        raise ConfigError(f"cannot find a port in {description!r}") from None


def _shipped_static() -> FilePath[str]:
    here = FilePath(__file__).parent().parent()
    for candidate in (here.child("static"), FilePath(sys.prefix).descendant(["share", "vmcloud", "static"])):
        if candidate.isdir():
            return candidate
    return here.child("static")


def makeService(options: Options) -> IService:  # noqa: N802 - twistd's name
    from twisted.internet import reactor

    _raise_file_limit()
    memory.tune_allocator()  # before the thread pools start: arenas already made stay
    from vmcloud.drivers.claims import HostInUse

    try:
        service = build_controller(reactor, options.config, os.environ)
    except HostInUse as e:  # another daemon runs on this state dir: nothing was started
        raise SystemExit(f"vmcloud: refusing to start: {e}") from None
    # Everything built so far lives as long as the daemon: keep it out of the garbage collector's
    # generations, so collections stay short (they showed as millisecond stalls in the broker's p99);
    # from then on, the survivors of every full collection likewise.
    reactor.callWhenRunning(gc.freeze)
    memory.FreezeSurvivors(reactor).setServiceParent(service)
    return service


def _raise_file_limit() -> None:
    """Every guest holds a connection; the default 1024 descriptors cap the pool far too low."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
