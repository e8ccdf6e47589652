"""The simulator's own control API, JSON under ``/_sim/``, for benches and manual runs.

Tests in the same process use the :class:`~vmcloud.novasim.simulator.Simulator` methods directly;
this is the same set of knobs over HTTP:

=========================  ==========================================================================
``GET /_sim/servers``      every server (id, name, status, task_state, metadata, network, mac, ip, fault,
                           created, image)
``GET /_sim/counters``     requests seen, by route label (``"GET /v2.1/servers/{id}": 3``)
``DELETE /_sim/counters``  reset them
``GET /_sim/settings``     life-cycle, quota, capacity, paging and boot-outcome settings
``POST /_sim/settings``    change some of them: ``{"build_seconds": 0.5, "boot_rules": [{"pattern":
                           "^pool-", "outcome": "error", "rate": 0.2}]}``
``GET /_sim/faults``       the injected faults and how many were served
``POST /_sim/faults``      ``{"kind": "status", "status": 503, "count": 10}`` (next N) or ``..."rate":
                           0.3}``; ``kind`` drop/slow (``delay``), ``retry_after``, ``match``
``DELETE /_sim/faults``    no more faults
``POST /_sim/revoke``      revoke every issued token (clients must re-authenticate)
=========================  ==========================================================================

Errors are ``{"error": "<code>", "message": "<text>"}`` with 400/404/405.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from vmcloud.novasim.exchange import Handler, Reply, Routes, SimRequest
from vmcloud.novasim.faults import FaultInjector, FaultRule
from vmcloud.novasim.model import BootRule, CloudSettings, NovaCloud, ServerView

_FLOATS = frozenset({"build_seconds", "delete_seconds"})
_INTS = frozenset({"quota_instances", "quota_cores", "quota_ram", "max_limit"})
_NAMES = frozenset({"keypairs", "security_groups"})


def _error(status: int, code: str, message: str) -> Reply:
    return Reply(status, {"error": code, "message": message})


def settings_to_json(settings: CloudSettings) -> dict[str, Any]:
    return {
        "build_seconds": settings.build_seconds,
        "delete_seconds": settings.delete_seconds,
        "quota_instances": settings.quota_instances,
        "quota_cores": settings.quota_cores,
        "quota_ram": settings.quota_ram,
        "capacity": settings.capacity,
        "max_limit": settings.max_limit,
        "boot_rules": [
            {"pattern": r.pattern, "outcome": r.outcome, "rate": r.rate, "message": r.message}
            for r in settings.boot_rules
        ],
        "keypairs": list(settings.keypairs),
        "security_groups": list(settings.security_groups),
    }


def settings_changes(data: Mapping[str, Any]) -> dict[str, Any]:
    """Typed changes from control-API JSON; raises ValueError naming the bad key."""
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key in _FLOATS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number of seconds")
            changes[key] = float(value)
        elif key in _INTS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key} must be an integer")
            changes[key] = value
        elif key == "capacity":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError("capacity must be a non-negative integer or null")
            changes[key] = value
        elif key in _NAMES:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{key} must be a list of names")
            changes[key] = tuple(value)
        elif key == "boot_rules":
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ValueError("boot_rules must be a list of objects")
            try:
                changes[key] = tuple(BootRule(**rule) for rule in value)
            except TypeError as e:
                raise ValueError(f"boot_rules: {e}") from None
        else:
            raise ValueError(f"unknown setting {key!r}")
    return changes


class Steerable(Protocol):
    """What the control API reads and steers; :class:`~vmcloud.novasim.simulator.Simulator` is one.

    Named here, by its user, so that the simulator imports the control API and not the other way
    round (issue #12: no import cycles).
    """

    cloud: NovaCloud
    faults: FaultInjector

    @property
    def auth_url(self) -> str: ...

    @property
    def compute_url(self) -> str: ...

    def servers(self) -> list[ServerView]: ...

    def counts(self) -> dict[str, int]: ...

    def reset_counters(self) -> None: ...

    def configure(self, **changes: object) -> CloudSettings: ...

    def revoke_tokens(self) -> int: ...


class ControlApi:
    """``/_sim/...`` over a :class:`Steerable` (the simulator)."""

    def __init__(self, sim: Steerable) -> None:
        self.sim = sim
        routes: Routes[Handler] = Routes()
        routes.add("GET", "/_sim", self._index)
        routes.add("GET", "/_sim/servers", self._servers)
        routes.add("GET", "/_sim/counters", self._counters)
        routes.add("DELETE", "/_sim/counters", self._reset_counters)
        routes.add("GET", "/_sim/settings", self._settings)
        routes.add("POST", "/_sim/settings", self._configure)
        routes.add("GET", "/_sim/faults", self._faults)
        routes.add("POST", "/_sim/faults", self._add_fault)
        routes.add("DELETE", "/_sim/faults", self._clear_faults)
        routes.add("POST", "/_sim/revoke", self._revoke)
        self.routes = routes

    def handle(self, request: SimRequest) -> Reply:
        found = self.routes.match(request.method, request.path)
        if found is None:
            if self.routes.knows(request.path):
                return _error(405, "method-not-allowed", f"{request.method} is not allowed on {request.path}")
            return _error(404, "not-found", f"no control route {request.path}")
        _, handler, params = found
        return handler(request, params)

    def _index(self, request: SimRequest, _: Mapping[str, str]) -> Reply:
        return Reply(
            200,
            {
                "auth_url": self.sim.auth_url,
                "compute": self.sim.compute_url,
                "routes": [
                    "/_sim/servers",
                    "/_sim/counters",
                    "/_sim/settings",
                    "/_sim/faults",
                    "/_sim/revoke",
                ],
            },
        )

    def _servers(self, request: SimRequest, _: Mapping[str, str]) -> Reply:
        return Reply(200, {"servers": [view.to_json() for view in self.sim.servers()]})

    def _counters(self, request: SimRequest, _: Mapping[str, str]) -> Reply:
        return Reply(200, {"counters": self.sim.counts()})

    def _reset_counters(self, request: SimRequest, _: Mapping[str, str]) -> Reply:
        self.sim.reset_counters()
        return Reply(204)

    def _settings(self, request: SimRequest, _: Mapping[str, str]) -> Reply:
        return Reply(200, settings_to_json(self.sim.cloud.settings))

    def _configure(self, request: SimRequest, _: Mapping[str, str]) -> Reply:
        return self._with_json(
            request, lambda data: Reply(200, settings_to_json(self.sim.configure(**settings_changes(data))))
        )

    def _faults(self, request: SimRequest, _: Mapping[str, str]) -> Reply:
        return Reply(200, self.sim.faults.to_json())

    def _add_fault(self, request: SimRequest, _: Mapping[str, str]) -> Reply:
        def add(data: Mapping[str, Any]) -> Reply:
            fields = dict(data)
            count = fields.pop("count", None)
            rate = fields.pop("rate", None)
            rule = FaultRule.from_json(fields)
            if (count is None) == (rate is None):
                raise ValueError("give exactly one of count (next N requests) or rate (0..1)")
            if count is not None:
                if isinstance(count, bool) or not isinstance(count, int):
                    raise ValueError("count must be an integer")
                self.sim.faults.inject_next(rule, count)
            else:
                if isinstance(rate, bool) or not isinstance(rate, int | float):
                    raise ValueError("rate must be a number within [0, 1]")
                self.sim.faults.set_rate(rule, float(rate))
            return Reply(200, self.sim.faults.to_json())

        return self._with_json(request, add)

    def _clear_faults(self, request: SimRequest, _: Mapping[str, str]) -> Reply:
        self.sim.faults.clear()
        return Reply(204)

    def _revoke(self, request: SimRequest, _: Mapping[str, str]) -> Reply:
        return Reply(200, {"revoked": self.sim.revoke_tokens()})

    def _with_json(self, request: SimRequest, action: Callable[[Mapping[str, Any]], Reply]) -> Reply:
        try:
            data = request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "bad-request", "the body must be a JSON object")
        if not isinstance(data, dict):
            return _error(400, "bad-request", "the body must be a JSON object")
        try:
            return action(data)
        except ValueError as e:
            return _error(400, "bad-request", str(e))
