"""The simulated cloud of ``bench/scale.py``: novasim in a process of its own, with a guest feed.

Run by ``bench/scale.py`` (not by hand)::

    .venv/bin/python bench/_scale_sim.py --instances 5000 --build-seconds 0.5

It runs :class:`vmcloud.novasim.Simulator` on 127.0.0.1 (a free port) with quota for
``--instances`` servers and prints one JSON line on stdout: where it listens and the ``[nova]``
settings to use.  Next to the simulator's own routes it serves:

* ``GET /_bench/state``: servers that exist, servers ACTIVE, and every ``GET /v2.1/servers/detail``
  seen since ``?since=<index>`` as ``[monotonic time, has a marker]`` (a list chain starts with
  a page without a marker: novaclient's ``limit=-1`` pages with ``marker`` until an empty page);
* a feed (TCP, JSON lines) on a second port: ``{"ev": "active", "id", "name", "user_data",
  "mac", "ip"}`` for every server that becomes ACTIVE (the simulator's ``on_active`` hook; the
  ones already ACTIVE are sent first to a new feed client) and ``{"ev": "deleted", "id"}`` when
  such a server is deleted.  ``bench/_scale_guests.py`` reads it.

Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from vmcloud.novasim import CloudSettings, ServerView, Simulator
from vmcloud.novasim.model import DEFAULT_FLAVORS, DEFAULT_IMAGES, DEFAULT_NETWORKS

reactor: Any = _reactor
LIST_PATH = b"/v2.1/servers/detail"
MAX_LIST_LOG = 200_000


def _active_json(view: ServerView) -> bytes:
    return (
        json.dumps(
            {
                "ev": "active",
                "id": view.id,
                "name": view.name,
                "user_data": (view.user_data or b"").decode("utf-8", "replace"),
                "mac": view.mac,
                "ip": view.ip,
            }
        ).encode()
        + b"\n"
    )


class Feed(Factory):
    """Fans the simulator's ACTIVE/deleted hooks out to connected feed clients."""

    def __init__(self) -> None:
        self.clients: list[Protocol] = []
        self.sim: Simulator | None = None
        self.active: set[str] = set()

    def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802 - Twisted's name
        feed = self

        class FeedClient(Protocol):
            def connectionMade(self) -> None:  # noqa: N802
                assert feed.sim is not None
                for view in feed.sim.servers():
                    if view.status == "ACTIVE" and view.task_state != "deleting":
                        self.transport.write(_active_json(view))  # type: ignore[union-attr]
                feed.clients.append(self)

            def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
                if self in feed.clients:
                    feed.clients.remove(self)

        return FeedClient()

    def send(self, line: bytes) -> None:
        for client in self.clients:
            client.transport.write(line)  # type: ignore[union-attr]

    def on_active(self, view: ServerView) -> None:
        self.active.add(view.id)
        self.send(_active_json(view))

    def on_deleted(self, view: ServerView) -> None:
        self.active.discard(view.id)
        self.send(json.dumps({"ev": "deleted", "id": view.id}).encode() + b"\n")


class BenchFront(Resource):
    """The simulator's resource with ``/_bench/state`` beside it and server lists logged."""

    isLeaf = True

    def __init__(self, sim: Simulator, feed: Feed) -> None:
        super().__init__()
        self.sim = sim
        self.feed = feed
        self.lists: list[tuple[float, bool]] = []
        self.dropped = 0

    def render(self, request: Request) -> Any:
        if request.path == b"/_bench/state":
            since = int((request.args or {}).get(b"since", [b"0"])[0])
            body = {
                "servers": len(self.sim.cloud),
                "active": len(self.feed.active),
                "used_instances": self.sim.cloud.used_instances,
                "lists": self.lists[max(0, since - self.dropped) :],
                "lists_next": self.dropped + len(self.lists),
                "now": time.monotonic(),
            }
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps(body).encode()
        if request.method == b"GET" and request.path == LIST_PATH:
            has_marker = b"marker" in (request.args or {})
            self.lists.append((time.monotonic(), has_marker))
            if len(self.lists) > MAX_LIST_LOG:
                cut = len(self.lists) // 2
                del self.lists[:cut]
                self.dropped += cut
        return self.sim.resource.render(request)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--build-seconds", type=float, default=0.5)
    parser.add_argument("--delete-seconds", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])], redirectStandardIO=False
    )
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    flavor = DEFAULT_FLAVORS[0]
    quota = args.instances + 100
    settings = CloudSettings(
        build_seconds=args.build_seconds,
        delete_seconds=args.delete_seconds,
        quota_instances=quota,
        quota_cores=quota * flavor.vcpus,
        quota_ram=quota * flavor.ram,
    )
    feed = Feed()
    sim = Simulator(
        reactor, settings=settings, seed=args.seed, on_active=feed.on_active, on_deleted=feed.on_deleted
    )
    feed.sim = sim
    site = Site(BenchFront(sim, feed))
    site.noisy = False
    site.displayTracebacks = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    sim.base_url = f"http://127.0.0.1:{port.getHost().port}"
    feed_port = reactor.listenTCP(0, feed, interface="127.0.0.1")
    ident = sim.identity
    ready = {
        "base_url": sim.base_url,
        "auth_url": sim.auth_url,
        "feed_port": feed_port.getHost().port,
        "username": ident.username,
        "password": ident.password,
        "project_name": ident.project_name,
        "domain": ident.domain,
        "region": ident.region,
        "image": DEFAULT_IMAGES[0].id,
        "flavor": flavor.id,
        "network": DEFAULT_NETWORKS[0].id,
    }
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
