"""``python -m vmcloud.novasim``: run a simulated Keystone + Nova on 127.0.0.1 until interrupted.

::

    python -m vmcloud.novasim --port 8774 [--build-seconds 2] [--quota-instances 50] ...

It prints the ``OS_*`` variables and the ``[nova]`` ids to use, and the control API's URL.  With
``--guest-command`` every server that becomes ACTIVE starts that command (see
:mod:`vmcloud.novasim.guests`), stopped again when the server is deleted.  With ``--request-log
FILE`` every request is appended to ``FILE`` as one JSON line ``{"t", "method", "path", "query",
"status"}`` (``t``: epoch seconds when the simulator took it), so a test can check *when* a client
called, not only how often (``/_sim/counters``).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from typing import IO, Any
from urllib.parse import urlsplit

from twisted.internet import defer, task
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from vmcloud.novasim.guests import GuestProcesses
from vmcloud.novasim.identity import Identity
from vmcloud.novasim.model import (
    DEFAULT_FLAVORS,
    DEFAULT_IMAGES,
    DEFAULT_NETWORKS,
    BootRule,
    CloudSettings,
    Image,
)
from vmcloud.novasim.simulator import Simulator

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError(f"must not be negative: {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must not be negative: {text}")
    return value


class Options(usage.Options):
    """Command line of the simulator."""

    synopsis = "python -m vmcloud.novasim [options]"
    optParameters: list[list[Any]] = [
        ["port", "p", 8774, "TCP port (0: any free port)", int],
        ["interface", None, "127.0.0.1", "address to listen on"],
        ["build-seconds", None, 2.0, "seconds from POST /servers to ACTIVE", _non_negative_float],
        [
            "delete-seconds",
            None,
            1.0,
            "seconds a deleted server stays visible (task_state deleting)",
            _non_negative_float,
        ],
        ["quota-instances", None, 50, "instances quota", _non_negative_int],
        ["quota-cores", None, 100, "cores quota", _non_negative_int],
        ["quota-ram", None, 102400, "RAM quota (MB)", _non_negative_int],
        [
            "capacity",
            None,
            None,
            "servers the hosts hold at once (beyond: ERROR 'No valid host')",
            _non_negative_int,
        ],
        ["max-limit", None, 1000, "page size cap of server lists (Nova's [api] max_limit)", int],
        ["boot-error-rate", None, 0.0, "fraction of boots that end in ERROR", float],
        ["boot-error-pattern", None, "", "only boots whose name matches this regex may fail"],
        ["username", None, "demo", "Keystone user name"],
        ["password", None, "secret", "Keystone password"],
        ["project", None, "demo", "Keystone project name"],
        ["static-token", None, None, "a token that is always valid (for endpoint_override + token)"],
        ["seed", None, None, "random seed (server ids, outcomes, fault rates)", int],
        [
            "guest-command",
            None,
            None,
            "command started for every ACTIVE server ({user_data} {mac} {ip} {id} {name})",
        ],
        ["request-log", None, None, "append one JSON line per request to this file"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.images: list[Image] = list(DEFAULT_IMAGES)

    def opt_image(self, value: str) -> None:
        """ID[=NAME]: one more image Glance lists and Nova boots (repeatable), e.g. a new guest image"""
        image_id, _, name = value.partition("=")
        if not _UUID_RE.match(image_id):
            raise usage.UsageError(f"--image: the id must be a UUID, got {image_id!r}")
        self.images.append(Image(image_id, name or image_id))

    def postOptions(self) -> None:  # noqa: N802
        if not 0 <= self["port"] <= 65535:
            raise usage.UsageError(f"--port must be 0..65535, got {self['port']}")
        if self["max-limit"] < 1:
            raise usage.UsageError("--max-limit must be at least 1")
        rules: tuple[BootRule, ...] = ()
        if self["boot-error-rate"]:
            try:
                rules = (
                    BootRule(
                        pattern=self["boot-error-pattern"], outcome="error", rate=self["boot-error-rate"]
                    ),
                )
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        self.settings = CloudSettings(
            build_seconds=self["build-seconds"],
            delete_seconds=self["delete-seconds"],
            quota_instances=self["quota-instances"],
            quota_cores=self["quota-cores"],
            quota_ram=self["quota-ram"],
            capacity=self["capacity"],
            max_limit=self["max-limit"],
            boot_rules=rules,
        )
        self.identity = Identity(
            username=self["username"],
            password=self["password"],
            project_name=self["project"],
            static_token=self["static-token"],
        )


class RequestLog(Resource):
    """Wraps the simulator's resource: one JSON line per request once it is answered (or dropped)."""

    isLeaf = True

    def __init__(self, inner: Resource, out: IO[str]) -> None:
        super().__init__()
        self._inner = inner
        self._out = out

    def render(self, request: Request) -> Any:
        record = {
            "t": round(time.time(), 6),
            "method": request.method.decode("latin-1"),
            "path": request.path.decode("latin-1"),
            "query": urlsplit(request.uri.decode("latin-1")).query,
        }

        def done(result: Failure | None) -> None:
            record["status"] = request.code
            if isinstance(result, Failure):
                record["dropped"] = True
            self._out.write(json.dumps(record) + "\n")
            self._out.flush()

        request.notifyFinish().addBoth(done)
        return self._inner.render(request)


class _LoggedSimulator(Simulator):
    """A simulator whose site logs every request when :attr:`request_log` is set."""

    request_log: IO[str] | None = None

    def site(self) -> Site:
        site = super().site()
        if self.request_log is not None:
            site.resource = RequestLog(site.resource, self.request_log)
        return site


def banner(sim: Simulator) -> str:
    """What an operator needs to point vmcloud (or the openstack CLI) at the simulator."""
    ident = sim.identity
    lines = [
        f"novasim: Keystone v3 + Nova listening on {sim.base_url}",
        f"export OS_AUTH_URL={sim.auth_url}",
        f"export OS_USERNAME={ident.username}",
        f"export OS_PASSWORD={ident.password}",
        f"export OS_PROJECT_NAME={ident.project_name}",
        f"export OS_USER_DOMAIN_NAME={ident.domain}",
        f"export OS_PROJECT_DOMAIN_NAME={ident.domain}",
        f"export OS_REGION_NAME={ident.region}",
        f"# application credential: id={ident.application_credential_id}"
        f" secret={ident.application_credential_secret}",
        f"# compute endpoint: {sim.compute_url}",
        "# [nova] ids:",
        *(f"#   image = {image.id}   ; {image.name}" for image in sim.cloud.images.values()),
        f"#   flavor = {DEFAULT_FLAVORS[0].id}",
        f"#   network = {DEFAULT_NETWORKS[0].id}",
        "#   key_name = vmcloud",
        "#   security_groups = default",
        f"# control API: {sim.base_url}/_sim/",
    ]
    return "\n".join(lines) + "\n"


def main(reactor: Any, *argv: str) -> defer.Deferred[None]:
    options = Options()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        sys.stderr.write(f"{e}\n\n{options}")
        raise SystemExit(2) from None
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])], redirectStandardIO=False
    )
    guests = None
    if options["guest-command"]:
        guests = GuestProcesses(reactor, shlex.split(options["guest-command"]))
    sim = _LoggedSimulator(
        reactor,
        settings=options.settings,
        identity=options.identity,
        seed=options["seed"],
        images=options.images,
        on_active=guests.on_active if guests else None,
        on_deleted=guests.on_deleted if guests else None,
    )
    if options["request-log"]:
        sim.request_log = open(options["request-log"], "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    sim.listen(reactor, options["port"], options["interface"])
    sys.stdout.write(banner(sim))
    sys.stdout.flush()
    forever: defer.Deferred[None] = defer.Deferred()
    if guests is not None:
        reactor.addSystemEventTrigger("before", "shutdown", guests.stop_all)
    return forever


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
