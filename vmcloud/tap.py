"""The edge of ``twistd vmcloud``: the only place that reads files, the environment, the reactor.

:class:`Options` reads the config file and the environment and checks them
(:func:`~vmcloud.compose.check_deployment`), so a bad configuration is refused as a usage error
before anything starts; :func:`makeService` hands the global reactor and that checked
:class:`~vmcloud.compose.Deployment` to :func:`~vmcloud.compose.build_controller`, which builds
the service tree room by room (see :mod:`vmcloud.compose` for the order).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.filepath import FilePath

from vmcloud import memory
from vmcloud.compose import build_controller, check_deployment
from vmcloud.config import DEFAULT_API, listen_backlog, parse_config

log = Logger()


class Options(usage.Options):
    """``twistd vmcloud [--config FILE] [--api STRPORT] [--stomp STRPORT] [--state-dir DIR] [--driver D]``."""

    optParameters = [
        ["config", "c", None, "INI configuration file (see etc/vmcloud.conf); flags override it"],
        ["api", None, None, f"HTTP API listener, a strports description (default {DEFAULT_API})"],
        ["stomp", None, None, "embedded STOMP broker listener (default tcp:61613:interface=127.0.0.1)"],
        ["state-dir", None, None, "where checkpoint.json and driver state live (default ./state)"],
        ["driver", None, None, "cloud driver: local or nova (default local)"],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        """``environ``: the daemon's environment (default: this process's)."""
        super().__init__()
        self._environ = os.environ if environ is None else environ

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
            self.deployment = check_deployment(self.config, self._environ)
        except ValueError as e:  # ConfigError, NovaConfigError
            raise usage.UsageError(str(e)) from None


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


def makeService(options: Options) -> IService:  # noqa: N802 - twistd's name
    from twisted.internet import reactor

    _raise_file_limit()
    from vmcloud.drivers.claims import HostInUse

    deployment = options.deployment
    _warn_if_backlog_capped(listen_backlog(deployment.config.pool.max_pool_size))
    try:
        service = build_controller(reactor, deployment)
    except HostInUse as e:  # another daemon runs on this state dir: nothing was started
        raise SystemExit(f"vmcloud: refusing to start: {e}") from None
    memory.apply_policy(reactor, service)  # the allocator and the garbage collector
    return service


def _raise_file_limit() -> None:
    """Every guest holds a connection; the default 1024 descriptors cap the pool far too low."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
