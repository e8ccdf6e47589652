"""A recording :class:`~vmcloud.timings.ITimings` for the tests of every room that times something."""

from __future__ import annotations

from zope.interface import implementer

from vmcloud.timings import ITimings


@implementer(ITimings)
class RecordingTimings:
    """Keeps every observation, in order, as ``(name, seconds, labels)``."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float, dict[str, str]]] = []

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        self.seen.append((name, seconds, labels))

    def of(self, name: str) -> list[tuple[float, dict[str, str]]]:
        """The observations of ``name``: (seconds, labels) each."""
        return [(seconds, labels) for seen, seconds, labels in self.seen if seen == name]
