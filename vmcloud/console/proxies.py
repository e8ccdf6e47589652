"""The console and audio proxies put together over a pool, for the composition root to mount.

``/console/`` also answers ``/console/vm/{vmid}/screen.png``, the monitor's thumbnails
(:mod:`vmcloud.console.screen`), with the same dial and admin gate.

:func:`build_proxies` wires the parts: the pool's live state resolves handles
(:class:`~vmcloud.console.targets.PoolTargets`), the pool's news of ended handles and dead VMs
reaches the :class:`~vmcloud.console.registry.AccessRegistry` (``watch_access``), and the
resources dial VMs over TCP (VNC) and HTTP (audio) with timeouts.  ``vmcloud/tap.py`` passes
the result to :func:`vmcloud.api.app.make_api` as ``mounts``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import IResource

from vmcloud.console.audio import AudioFactory, AudioHub, AudioResource
from vmcloud.console.gate import Gate
from vmcloud.console.registry import AccessRegistry
from vmcloud.console.screen import Captures, ScreenResource
from vmcloud.console.targets import AUDIO_PORT, VNC_PORT, HasPoolState, PoolTargets, Target
from vmcloud.console.vnc import ConsoleFactory, ConsoleResource

#: Seconds to reach a VM's VNC or audio server.
DIAL_TIMEOUT = 5.0


class WatchedPool(HasPoolState, Protocol):
    """The pool as the proxies need it: its state, and news of ended handles and dead VMs."""

    def watch_access(
        self, handle_ended: Callable[[str, str], None], vm_ended: Callable[[str, str], None]
    ) -> None: ...


@attrs.frozen
class Proxies:
    """What to mount (path prefix -> resource), and the registry of open sockets (for metrics)."""

    mounts: dict[str, IResource]
    registry: AccessRegistry
    hub: AudioHub


def build_proxies(
    reactor: Any,
    pool: WatchedPool,
    *,
    token: str | None,
    cors_origins: Sequence[str],
    vnc_port: int = VNC_PORT,
    audio_port: int = AUDIO_PORT,
) -> Proxies:
    """``/console/`` and ``/audio/`` over ``pool``; ``token`` and ``cors_origins`` as the API's."""
    registry = AccessRegistry()
    pool.watch_access(registry.handle_ended, registry.vm_ended)
    targets = PoolTargets(pool, vnc_port=vnc_port, audio_port=audio_port)
    gate = Gate(token=token, cors_origins=cors_origins)

    def dial(target: Target, protocol: TwistedProtocol) -> Deferred[Any]:
        endpoint = HostnameEndpoint(reactor, target.host, target.port, timeout=DIAL_TIMEOUT)
        connected: Deferred[Any] = connectProtocol(endpoint, protocol)
        return connected

    screen = ScreenResource(Captures(clock=reactor, dial=dial), gate, resolve=targets.screen_of_vm)
    console = ConsoleResource(
        ConsoleFactory(clock=reactor, dial=dial, registry=registry),
        gate,
        resolve_handle=targets.console,
        resolve_vm=targets.console_of_vm,
        screen=screen,
    )
    agent = Agent(reactor, connectTimeout=DIAL_TIMEOUT, pool=HTTPConnectionPool(reactor, persistent=False))
    hub = AudioHub(clock=reactor, agent=agent, registry=registry)
    audio = AudioResource(AudioFactory(clock=reactor, hub=hub), gate, resolve=targets.audio)
    return Proxies({"console": console, "audio": audio}, registry, hub)
