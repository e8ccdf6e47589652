"""twisted.web adapter of the simulator: parse, count, misbehave on purpose, answer.

Every request is routed first, so the counters know it by its route label even when a fault is
injected instead of an answer; then the fault injector may answer with an error, drop the
connection, or delay the real answer on the simulator's clock.  A handler that raises gives a
logged 500 ``computeFault``, never a traceback to the client.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from urllib.parse import parse_qsl, unquote, urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from vmcloud.novasim.exchange import Match, Reply, SimRequest
from vmcloud.novasim.faults import FaultInjector

log = Logger()

#: Nova's ``osapi_max_request_body_size`` (112 KiB): bigger bodies get 413 before any handler.
MAX_BODY = 114688


class SimResource(Resource):
    """The whole simulator as one leaf resource (its routing is its own, see ``route``)."""

    isLeaf = True

    def __init__(
        self,
        *,
        route: Callable[[SimRequest], Match],
        control: Callable[[SimRequest], Reply],
        faults: FaultInjector,
        counters: Counter[str],
        clock: IReactorTime,
        base_url: Callable[[], str | None],
    ) -> None:
        super().__init__()
        self._route = route
        self._control = control
        self._faults = faults
        self._counters = counters
        self._clock = clock
        self._base_url = base_url

    def render(self, request: Request) -> bytes | int:
        sim_request = self._parse(request)
        if sim_request is None:
            return _answer(
                request, Reply(413, {"computeFault": {"code": 413, "message": "Request is too large."}})
            )
        if sim_request.path == "/_sim" or sim_request.path.startswith("/_sim/"):
            return _answer(request, self._run(self._control, sim_request))
        match = self._route(sim_request)
        self._counters[match.label] += 1
        rule = self._faults.pick(match.label)
        if rule is None:
            return _answer(request, self._run(lambda r: match.handler(r, match.params), sim_request))
        log.debug("novasim: injecting {kind} into {label}", kind=rule.kind, label=match.label)
        if rule.kind == "drop":
            request.transport.abortConnection()  # type: ignore[union-attr]
            return NOT_DONE_YET
        if rule.kind == "slow":
            gone: list[Failure] = []
            request.notifyFinish().addErrback(gone.append)

            def answer_late() -> None:
                reply = self._run(lambda r: match.handler(r, match.params), sim_request)
                if not gone:
                    request.write(_answer(request, reply))
                    request.finish()

            self._clock.callLater(rule.delay, answer_late)
            return NOT_DONE_YET
        return _answer(request, rule.reply())

    def _parse(self, request: Request) -> SimRequest | None:
        assert request.content is not None
        body = request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            return None
        raw_path = request.path.decode("latin-1")
        query = urlsplit(request.uri.decode("latin-1")).query
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        base_url = self._base_url()
        if base_url is None:
            host = headers.get("host", "127.0.0.1")
            base_url = f"http://{host}"
        return SimRequest(
            method=request.method.decode("latin-1").upper(),
            path=unquote(raw_path),
            query=tuple(parse_qsl(query, keep_blank_values=True)),
            headers=headers,
            body=body,
            base_url=base_url,
        )

    def _run(self, handler: Callable[[SimRequest], Reply], request: SimRequest) -> Reply:
        try:
            return handler(request)
        except Exception:
            log.failure("novasim: {method} {path} failed", method=request.method, path=request.path)
            return Reply(
                500,
                {"computeFault": {"code": 500, "message": "Unexpected API Error (simulator)."}},
                content_type="application/json; charset=UTF-8",
            )


def _answer(request: Request, reply: Reply) -> bytes:
    request.setResponseCode(reply.status)
    for name, value in reply.headers.items():
        request.setHeader(name, value)
    request.setHeader("Content-Type", reply.content_type)
    body = reply.encoded()
    request.setHeader("Content-Length", str(len(body)))
    return body
