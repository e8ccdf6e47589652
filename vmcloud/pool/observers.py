"""Who hears what the pool's state does: the hooks through which the pure core tells its service.

:class:`~vmcloud.pool.state.PoolState` does no I/O; the service around it logs VM transitions,
wakes long-polls when a handle gets an event, and forgets a handle's waiters when it goes.  It
does so through :class:`PoolObservers`: each hook is optional, and unset means nobody listens.
"""

from __future__ import annotations

from collections.abc import Callable

from vmcloud.pool.model import VM, Event

#: Sees every change of a VM's state: (old, new), None for a VM that appears or disappears.
TransitionObserver = Callable[[VM | None, VM | None], None]
#: Sees every event put on a handle: (token, event).
EventObserver = Callable[[str, Event], None]
#: Sees every handle that goes: its token.
HandleGoneObserver = Callable[[str], None]


class PoolObservers:
    """The three hooks; the pool calls :meth:`transition`, :meth:`handle_event`, :meth:`handle_gone`."""

    __slots__ = ("on_handle_event", "on_handle_gone", "on_transition")

    def __init__(self) -> None:
        self.on_transition: TransitionObserver | None = None
        self.on_handle_event: EventObserver | None = None
        self.on_handle_gone: HandleGoneObserver | None = None

    def transition(self, old: VM | None, new: VM | None) -> None:
        if self.on_transition is not None:
            self.on_transition(old, new)

    def handle_event(self, token: str, event: Event) -> None:
        if self.on_handle_event is not None:
            self.on_handle_event(token, event)

    def handle_gone(self, token: str) -> None:
        if self.on_handle_gone is not None:
            self.on_handle_gone(token)
