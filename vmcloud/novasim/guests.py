"""A ready-made ``on_active``/``on_deleted`` hook pair: one local process per ACTIVE server.

Lets the whole system run on the Nova path with no cloud: the command (typically the guest
agent) gets the server's user-data in a private file, and its fake MAC and IP, as a real VM would
from its metadata service and its network interface.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IProcessTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from vmcloud.novasim.model import ServerView

log = Logger()


class _GuestProtocol(protocol.ProcessProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        log.info(
            "novasim: guest process of {name} ended: {reason}",
            name=self.name,
            reason=reason.getErrorMessage(),
        )
        self.ended.callback(None)


class GuestProcesses:
    """Starts ``argv`` for every server that becomes ACTIVE and stops it when the server is deleted.

    ``argv`` items may use ``{user_data}`` (path of a 0600 file holding the decoded user-data),
    ``{mac}``, ``{ip}``, ``{id}`` and ``{name}``; the same values are in the environment as
    ``NOVASIM_USER_DATA``, ``NOVASIM_MAC``, ``NOVASIM_IP``, ``NOVASIM_SERVER_ID``, ``NOVASIM_NAME``.
    """

    def __init__(self, reactor: Any, argv: Sequence[str], *, stop_timeout: float = 5.0) -> None:
        if not argv:
            raise ValueError("the guest command is empty")
        self._reactor = reactor
        self._argv = list(argv)
        try:
            for item in self._argv:
                item.format(user_data="", mac="", ip="", id="", name="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"the guest command has a bad placeholder ({e});"
                " use {user_data} {mac} {ip} {id} {name}"
            ) from None
        self._stop_timeout = stop_timeout
        self._dir = tempfile.mkdtemp(prefix="novasim-guests-")
        self._running: dict[str, tuple[IProcessTransport, _GuestProtocol]] = {}

    def on_active(self, server: ServerView) -> None:
        path = os.path.join(self._dir, f"{server.id}.user-data")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(server.user_data or b"")
        values = {
            "user_data": path,
            "mac": server.mac or "",
            "ip": server.ip or "",
            "id": server.id,
            "name": server.name,
        }
        argv = [item.format(**values) for item in self._argv]
        env = dict(os.environ)
        env.update({f"NOVASIM_{key.upper()}": value for key, value in values.items()})
        env["NOVASIM_SERVER_ID"] = server.id
        proto = _GuestProtocol(server.name)
        transport = self._reactor.spawnProcess(proto, argv[0], argv, env=env, childFDs={0: "w", 1: 1, 2: 2})
        self._running[server.id] = (transport, proto)

        def forget(_: None) -> None:
            if self._running.get(server.id, (None, None))[1] is proto:
                del self._running[server.id]

        proto.ended.addCallback(forget)
        log.info("novasim: started guest process for {name} (pid {pid})", name=server.name, pid=transport.pid)

    def running(self) -> frozenset[str]:
        """Ids of the servers whose process is running."""
        return frozenset(self._running)

    def on_deleted(self, server: ServerView) -> defer.Deferred[None]:
        """Stop the server's process; the answer fires once it has ended (callers may ignore it)."""
        ended = self._stop(server.id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._dir, f"{server.id}.user-data"))
        return ended

    def _stop(self, server_id: str) -> defer.Deferred[None]:
        entry = self._running.pop(server_id, None)
        if entry is None:
            return defer.succeed(None)
        transport, proto = entry
        _signal(transport, signal.SIGTERM)
        killer = self._reactor.callLater(self._stop_timeout, _signal, transport, signal.SIGKILL)

        def cancel_killer(result: None) -> None:
            if killer.active():
                killer.cancel()

        proto.ended.addCallback(cancel_killer)
        return proto.ended

    def stop_all(self) -> defer.Deferred[Any]:
        """Stop every guest process (at shutdown) and remove the user-data files."""
        ended = [self._stop(server_id) for server_id in list(self._running)]
        done = defer.DeferredList(ended)

        def clean(result: object) -> object:
            shutil.rmtree(self._dir, ignore_errors=True)
            return result

        return done.addBoth(clean)


def _signal(transport: IProcessTransport, signum: int) -> None:
    with contextlib.suppress(ProcessExitedAlready):
        transport.signalProcess(signum)
