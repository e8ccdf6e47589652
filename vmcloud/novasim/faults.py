"""Misbehaviour on demand: error answers, dropped connections and slow answers, by rate or next-N.

A rule applies to the requests whose route label (``"POST /v2.1/servers"``, ``"GET
/v2.1/servers/detail"``, ``"POST /identity/v3/auth/tokens"``) matches its ``match`` regex.  Next-N
rules are used first, in the order given; then every rate rule rolls its die.  The answers are the
ones a client meets in front of a real cloud: Nova's ``computeFault`` for 500, a load balancer's
HTML page for 502/503/504, ``overLimit`` with ``Retry-After`` for 413/429.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Literal

import attrs

from vmcloud.novasim.exchange import Reply

FaultKind = Literal["status", "drop", "slow"]
_RATE_LIMITED = (413, 429)
_PROXY_TITLES = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Time-out"}
_PROXY_TEXT = {
    502: "The server returned an invalid or incomplete response.",
    503: "No server is available to handle this request.",
    504: "The server didn't respond in time.",
}


def _valid_kind(_: object, __: object, value: str) -> None:
    if value not in ("status", "drop", "slow"):
        raise ValueError(f"fault kind must be status, drop or slow, not {value!r}")


def _valid_status(_: object, __: object, value: int) -> None:
    if not 400 <= value <= 599:
        raise ValueError(f"fault status must be a 4xx or 5xx code, not {value}")


def _valid_match(_: object, __: object, value: str) -> None:
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"fault match is not a regular expression: {e}") from None


@attrs.frozen
class FaultRule:
    """One misbehaviour and the requests it applies to.

    ``status``: answer ``status`` at once (413/429 carry ``Retry-After: retry_after``);
    ``drop``: close the connection without an answer; ``slow``: answer normally after ``delay``
    seconds on the simulator's clock (so a client with a shorter timeout gives up, and the request
    still takes effect, as with a real overloaded API).
    """

    kind: FaultKind = attrs.field(default="status", validator=_valid_kind)
    status: int = attrs.field(default=503, validator=_valid_status)
    retry_after: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    delay: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    match: str = attrs.field(default="", validator=_valid_match)  # re.search on the route label

    def applies_to(self, label: str) -> bool:
        return re.search(self.match, label) is not None

    def reply(self) -> Reply:
        """The answer of a ``status`` rule."""
        status = self.status
        if status in _RATE_LIMITED:
            return Reply(
                status,
                {
                    "overLimit": {
                        "code": status,
                        "message": "This request was rate-limited.",
                        "retryAfter": str(self.retry_after),
                    }
                },
                headers={"Retry-After": str(self.retry_after)},
                content_type="application/json; charset=UTF-8",
            )
        if status in _PROXY_TITLES:
            title = _PROXY_TITLES[status]
            page = f"<html><body><h1>{status} {title}</h1>\n{_PROXY_TEXT[status]}\n</body></html>\n"
            return Reply(status, page.encode(), content_type="text/html")
        kind = "computeFault" if status >= 500 else "badRequest"
        message = (
            "Unexpected API Error. Please report this at http://bugs.launchpad.net/nova/ and attach the Nova "
            "API log if possible.\n<class 'oslo_db.exception.DBConnectionError'>"
            if status >= 500
            else "Simulated error"
        )
        return Reply(
            status,
            {kind: {"code": status, "message": message}},
            content_type="application/json; charset=UTF-8",
        )

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> FaultRule:
        """Build a rule from control-API JSON; unknown keys and bad values raise ValueError."""
        known = {f.name for f in attrs.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault keys: {', '.join(sorted(unknown))}")
        try:
            return cls(**data)  # type: ignore[arg-type]
        except TypeError as e:
            raise ValueError(str(e)) from None


@attrs.define
class _Pending:
    rule: FaultRule
    remaining: int


class FaultInjector:
    """Decides, request by request, whether and how to misbehave."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._next: list[_Pending] = []
        self._rates: dict[FaultRule, float] = {}
        self.injected = 0

    def inject_next(self, rule: FaultRule, count: int = 1) -> None:
        """Apply ``rule`` to the next ``count`` matching requests."""
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self._next.append(_Pending(rule, count))

    def set_rate(self, rule: FaultRule, rate: float) -> None:
        """Apply ``rule`` to each matching request with probability ``rate`` (0 removes it)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {rate}")
        if rate == 0.0:
            self._rates.pop(rule, None)
        else:
            self._rates[rule] = rate

    def clear(self) -> None:
        self._next.clear()
        self._rates.clear()

    def pick(self, label: str) -> FaultRule | None:
        for pending in self._next:
            if pending.rule.applies_to(label):
                pending.remaining -= 1
                if pending.remaining == 0:
                    self._next.remove(pending)
                self.injected += 1
                return pending.rule
        for rule, rate in self._rates.items():
            if rule.applies_to(label) and self._rng.random() < rate:
                self.injected += 1
                return rule
        return None

    def to_json(self) -> dict[str, object]:
        return {
            "next": [{**p.rule.to_json(), "count": p.remaining} for p in self._next],
            "rates": [{**rule.to_json(), "rate": rate} for rule, rate in self._rates.items()],
            "injected": self.injected,
        }
