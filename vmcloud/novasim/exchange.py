"""One HTTP exchange as the simulator's APIs see it: a parsed request in, a reply record out.

The Keystone, Nova and Glance handlers work on these plain records, so they are testable without
a socket; :mod:`vmcloud.novasim.web` adapts them to twisted.web.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

import attrs


@attrs.frozen
class SimRequest:
    method: str
    path: str  # percent-decoded, without the query
    query: tuple[tuple[str, str], ...] = ()
    headers: Mapping[str, str] = attrs.field(factory=dict)  # lower-case names
    body: bytes = b""
    base_url: str = "http://127.0.0.1:8774"

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def param(self, name: str) -> str | None:
        """The last value of a query parameter (webob's ``params[name]`` behaviour)."""
        found = None
        for key, value in self.query:
            if key == name:
                found = value
        return found

    def json(self) -> object:
        """The body as JSON; raises ValueError when it is not."""
        return json.loads(self.body.decode("utf-8"))


@attrs.frozen
class Reply:
    status: int
    body: object = None  # JSON-able, or bytes sent as they are, or None for an empty body
    headers: Mapping[str, str] = attrs.field(factory=dict)
    content_type: str = "application/json"

    def encoded(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode("utf-8")


Handler = Callable[[SimRequest, Mapping[str, str]], Reply]
H = TypeVar("H")


@attrs.frozen
class Match:
    """A routed request: ``label`` names the route for the request counters (``GET /v2.1/servers/{id}``)."""

    label: str
    handler: Handler
    params: Mapping[str, str]


class Routes(Generic[H]):
    """Method + path template -> handler, in the order added (put literal paths before ``{id}`` ones)."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], str, H]] = []

    def add(self, method: str, template: str, handler: H) -> None:
        pattern = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)
        self._routes.append((method, re.compile(f"^{pattern}/?$"), f"{method} {template}", handler))

    def match(self, method: str, path: str) -> tuple[str, H, dict[str, str]] | None:
        """``(label, handler, path parameters)`` of the first route that fits, or None."""
        for route_method, regex, label, handler in self._routes:
            found = regex.match(path)
            if found and route_method == method:
                return label, handler, found.groupdict()
        return None

    def knows(self, path: str) -> bool:
        """Whether some method is routed for ``path`` (a 405 rather than a 404)."""
        return any(regex.match(path) for _, regex, _, _ in self._routes)
