"""The root service: children start in order and stop one at a time in reverse order.

Plain ``MultiService`` stops all children at once; the controller needs listeners to close first
(no new work), then the pool to drain, then the broker and the thread pools it still uses.
"""

from __future__ import annotations

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger


class SequentialMultiService(MultiService):
    """A ``MultiService`` whose ``stopService`` stops children one by one, last started first."""

    log = Logger()

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        super(MultiService, self).stopService()  # skip MultiService's all-at-once stop
        return Deferred.fromCoroutine(self._stop_children(list(reversed(list(self)))))

    async def _stop_children(self, children: list[IService]) -> None:
        for child in children:
            if not child.running:
                continue
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("stopping {service} failed", service=child.name or repr(child))
