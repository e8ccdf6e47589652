"""The controller's console and audio proxies alone, in a process of their own (for bench/worker.py).

``python bench/_console_server.py PORT VNC_PORT AUDIO_PORT PASSWORD``: every handle leads to the
VNC server and audio server on 127.0.0.1 at those ports; prints ``ready`` once listening, so the
bench can read this process's CPU time apart from the clients'.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from vmcloud.console.audio import AudioFactory, AudioHub, AudioResource
from vmcloud.console.gate import Gate
from vmcloud.console.registry import AccessRegistry
from vmcloud.console.targets import Target, handle_key
from vmcloud.console.vnc import ConsoleFactory, ConsoleResource


def main() -> None:
    port, vnc_port, audio_port = (int(x) for x in sys.argv[1:4])
    password = sys.argv[4]
    registry = AccessRegistry()
    gate = Gate(token=None, cors_origins=["*"])
    console = ConsoleFactory(
        clock=reactor,
        dial=lambda t, p: connectProtocol(HostnameEndpoint(reactor, t.host, t.port, timeout=5), p),
        registry=registry,
    )
    root = Resource()
    root.putChild(
        b"console",
        ConsoleResource(
            console,
            gate,
            resolve_handle=lambda h: Target(handle_key(h), "127.0.0.1", vnc_port, "vm"),
            resolve_vm=lambda v: None,
            max_per_key=64,
        ),
    )
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    hub = AudioHub(clock=reactor, agent=agent, registry=registry)
    root.putChild(
        b"audio",
        AudioResource(
            AudioFactory(clock=reactor, hub=hub),
            gate,
            resolve=lambda h: Target(handle_key(h), "127.0.0.1", audio_port, "vm", password),
            max_per_handle=64,
        ),
    )
    site = Site(root)
    site.log = lambda request: None  # type: ignore[method-assign]
    d = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(site)
    d.addCallback(lambda _: print("ready", flush=True))
    reactor.run()


if __name__ == "__main__":
    main()
