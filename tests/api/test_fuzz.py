"""The REST attack suite: every route of the served ``/openapi.json`` fuzzed through the whole server.

Requests are made two ways and sent as raw bytes through the API's real HTTP server (``ApiSite``,
its channel, the Klein app) over an in-memory connection, into a real ``PoolService`` (with the
pool tests' recording cloud and guest fakes) holding a batch and an assigned handle:

* schemathesis draws them from the OpenAPI document the API serves, conforming and not (wrong
  types, out-of-range numbers, odd strings in every parameter, bodies that break the schema);
* hypothesis builds hostile ones the document says nothing about: any method, raw or broken
  percent-encoding, control bytes, form content types, broken or oversized framing, deep JSON,
  long lines, requests split at any byte.

Whatever comes in: no 5xx, every answer outside 2xx/3xx is ``{"error": code, "message": text}``
as ``application/json``, exactly one answer per complete request, nothing logged as an error.

The number of examples is bounded for CI (a few seconds); ``VMCLOUD_FUZZ_EXAMPLES=5000`` (any
number) runs that many of each kind, with fresh random seeds instead of the fixed ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import requests
import schemathesis
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import provider

from tests.api.client import TOKEN
from tests.api.wire import Exchange, RawAnswer, Wire
from tests.pool.fakes import World
from vmcloud.api.app import make_api
from vmcloud.api.inputs import MAX_BODY_BYTES
from vmcloud.api.site import MAX_REQUEST_LINE
from vmcloud.pool.interfaces import BatchOptions

LONG_RUN = "VMCLOUD_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("VMCLOUD_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not LONG_RUN,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
MAX_LONG_POLL = 1.0
HOMEPAGE = "https://example.com/"


class PoolSlot:
    """The pool the app talks to, swapped for a fresh one per example (building the app takes 50 ms)."""

    pool: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


class Target:
    """A fresh pool per example, with a batch and an assigned handle, behind the API and its server."""

    def __init__(self, static_dir: FilePath[str]) -> None:
        self.slot = PoolSlot()
        app = make_api(
            self.slot,
            token=TOKEN,
            cors_origins=["https://w.example"],
            static_dir=static_dir,
            max_long_poll=MAX_LONG_POLL,
        )
        self.wire = Wire(app.resource())
        self.fresh()

    def fresh(self) -> None:
        world = World()
        pool = world.pool
        pool.set_pool_size(1, 3, 60_000)
        self.batch = pool.prepare_batch(1, HOMEPAGE, BatchOptions())
        world.settle()
        self.handle = pool.lock(self.batch)
        self.vmid = pool.handle_status(self.handle).handle.vmid or "none"
        self.slot.pool = pool
        self.wire.clock = world.clock

    def exchange(self, raw: bytes, step: int = 0) -> Exchange:
        # Long polls end within MAX_LONG_POLL of the pool's clock: let it pass so they answer too.
        return self.wire.exchange(raw, step=step, settle=MAX_LONG_POLL + 0.5)


@contextmanager
def errors_logged() -> Iterator[list[LogEvent]]:
    """The events logged meanwhile that an operator would read as a crash (failures, errors)."""
    seen: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        level = event.get("log_level")
        if "log_failure" in event or level in (LogLevel.error, LogLevel.critical):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observe)


class AnswerChecks:
    """What every answer must be, whatever the request."""

    def assert_answer(self, answer: RawAnswer, method: bytes, what: object) -> None:
        test: Any = self
        event(
            f"{answer.status} {answer.body[:60].decode('utf-8', 'replace') if answer.status >= 400 else ''}"
        )
        test.assertLess(answer.status, 500, what)
        content_type = answer.header("content-type")
        if answer.status >= 400 or (200 <= answer.status < 300 and content_type == "application/json"):
            test.assertEqual(content_type, "application/json", what)
            if method != b"HEAD" and answer.status != 204:
                document = json.loads(answer.body)
                if answer.status >= 400:
                    test.assertIsInstance(document, dict, what)
                    test.assertEqual(set(document), {"error", "message"}, what)
                    test.assertIsInstance(document["error"], str, what)
                    test.assertTrue(document["error"], what)
        elif 300 <= answer.status < 400:
            test.assertIsNotNone(answer.header("location"), what)

    def assert_quiet(self, logged: list[LogEvent], what: object) -> None:
        test: Any = self
        test.assertEqual([event.get("log_format") for event in logged], [], what)


# ------------------------------------------------------------------------- from the OpenAPI document


def _served_schema() -> Any:
    """The OpenAPI document as the API serves it at /openapi.json, loaded by schemathesis."""
    target = Target(FilePath(os.path.dirname(__file__)).child("no-such-directory"))
    answer = target.exchange(b"GET /openapi.json HTTP/1.1\r\nHost: vmcloud.test\r\n\r\n").only
    assert answer.status == 200, answer
    return schemathesis.openapi.from_dict(json.loads(answer.body))


SCHEMA = _served_schema()


def _operation_cases() -> st.SearchStrategy[Any]:
    strategies = []
    for result in SCHEMA.get_all_operations():
        operation = result.ok()
        strategies.append(operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
        if operation.path_parameters or operation.query or operation.body:
            strategies.append(operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    return st.one_of(strategies)


CASES = _operation_cases()
# How the request is authorised: with the token, as schemathesis made it, with none, with a wrong one.
AUTH = st.sampled_from(["token", "token", "token", "generated", "none", "wrong"])


def raw_request(case: Any, auth: str, known: dict[str, str]) -> tuple[bytes, bytes]:
    """A schemathesis case as the bytes of one HTTP/1.1 request (and its method)."""
    for name, value in known.items():
        if name in (case.path_parameters or {}):
            case.path_parameters[name] = value
    kwargs = case.as_transport_kwargs(base_url="http://vmcloud.test")
    headers = dict(kwargs.get("headers") or {})
    if auth != "generated":
        headers.pop("Authorization", None)
    if auth == "token":
        headers["Authorization"] = f"Bearer {TOKEN}"
    elif auth == "wrong":
        headers["Authorization"] = "Bearer not-the-token"
    fields = {k: kwargs[k] for k in ("params", "json", "data", "cookies") if k in kwargs}
    try:
        prepared = requests.Request(kwargs["method"], kwargs["url"], headers=headers, **fields).prepare()
    except (ValueError, requests.RequestException):
        assume(False)  # not something a client can send (e.g. a header requests refuses)
        raise
    lines = [f"{prepared.method} {prepared.path_url} HTTP/1.1".encode(), b"Host: vmcloud.test"]
    for name, value in prepared.headers.items():
        lines.append(name.encode("latin-1") + b": " + value.encode("latin-1", "replace"))
    body = prepared.body or b""
    if isinstance(body, str):
        body = body.encode("utf-8")
    method = str(prepared.method).encode()
    return b"\r\n".join(lines) + b"\r\n\r\n" + body, method


class OpenApiFuzzTests(SynchronousTestCase, AnswerChecks):
    def setUp(self) -> None:
        # No files: a file's body would stream through the global reactor, which these tests never run.
        static = FilePath(self.mktemp())
        static.makedirs()
        self.target = Target(static)

    @FUZZ
    @given(case=CASES, auth=AUTH, known_ids=st.booleans(), step=st.sampled_from([0, 0, 0, 1, 13]))
    def test_every_route_from_the_served_document(
        self, case: Any, auth: str, known_ids: bool, step: int
    ) -> None:
        target = self.target
        target.fresh()
        known = {"handle": target.handle, "batch": target.batch, "vmid": target.vmid} if known_ids else {}
        raw, method = raw_request(case, auth, known)
        with errors_logged() as logged:
            exchange = target.exchange(raw, step=step)
        what = (raw[:300], exchange)
        self.assertEqual((len(exchange.answers), exchange.leftover), (1, b""), what)
        self.assert_answer(exchange.answers[0], method, what)
        self.assert_quiet(logged, what)


# ------------------------------------------------------------------------- what the document does not say


def _sometimes(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``rare`` about one draw in eight: most requests must get past the HTTP parser to be useful."""
    return st.integers(0, 7).flatmap(lambda n: rare if n == 0 else common)


def _no_line_breaks(value: bytes) -> bytes:
    return value.replace(b"\r", b"").replace(b"\n", b"")


METHODS = _sometimes(
    st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"PATCH", b"get", b"BREW"]),
    st.binary(min_size=1, max_size=8).map(lambda m: _no_line_breaks(m).replace(b" ", b"") or b"X"),
)
SEGMENT_TEXT = st.text(max_size=40) | st.sampled_from(["", "..", ".", "%", "%ZZ", "%0", "*", "~", "a\nb"])
SEGMENT = _sometimes(
    SEGMENT_TEXT.map(lambda t: quote(t, safe="").encode())  # any text, well encoded
    | st.binary(max_size=20).map(lambda b: b"".join(b"%%%02X" % c for c in b))  # any bytes, encoded
    | st.sampled_from([b"1", b"0", b"-1", b"99999999999999999", b"1.5", b"b1", b"1e3", b"%2F", b"%00"]),
    SEGMENT_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass"))  # sent as it is: spaces, line breaks
    | st.binary(max_size=10),
)
TEMPLATES = sorted(SCHEMA.raw_schema["paths"])
QUERY = st.just(b"") | st.binary(max_size=30).map(lambda q: b"?" + _no_line_breaks(q).replace(b" ", b"+"))


@st.composite
def paths(draw: st.DrawFn) -> bytes:
    """Mostly a documented route with hostile segments in its parameters; sometimes anything."""
    if draw(st.integers(0, 7)) == 0:
        segments = draw(st.lists(SEGMENT, max_size=5))
    else:
        template = draw(st.sampled_from(TEMPLATES)).lstrip("/")
        segments = [draw(SEGMENT) if part.startswith("{") else part.encode() for part in template.split("/")]
    return b"/" + b"/".join(segments) + draw(_sometimes(st.just(b""), QUERY))


PATH = paths()
CONTENT_TYPES = st.sampled_from(
    [
        b"application/json",
        b"multipart/form-data",
        b"multipart/form-data; boundary=zz",
        b"multipart/form-data; boundary=",
        b"application/x-www-form-urlencoded",
        b"text/plain; charset=utf-9",
        b"",
        b";;;",
    ]
)
HEADER_NAMES = _sometimes(
    st.sampled_from(
        [b"Content-Type", b"Accept", b"Origin", b"Authorization", b"Expect", b"X-Any", b"Cookie", b"Range"]
    ),
    st.sampled_from([b"Bad Name", b"", b"X\x00", b"\xff"]),
)
HEADER_VALUES = _sometimes(
    CONTENT_TYPES
    | st.sampled_from(
        [b"application/json", b"Bearer " + TOKEN.encode(), b"100-continue", b"https://w.example"]
    )
    | st.text(max_size=30).map(lambda t: _no_line_breaks(t.encode("utf-8"))),
    st.binary(max_size=40).map(_no_line_breaks),
)
HEADERS = st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6)
BODY = (
    st.just(b"")
    | st.binary(max_size=200)
    | st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n)
    | st.integers(1, 200).map(lambda n: b'{"cookies": [' + b'{"a": ' * n + b"1" + b"}" * n + b"]}")
    | st.just(
        b'{"cookies": [{"name": "a", "value": "b"}], "window": {"width": 800, "height": 600}, "audio": true}'
    )
    | st.just(b"--zz\r\nContent-Disposition: form-data; name=x\r\n\r\ny\r\n--zz--\r\n")
    | st.just(b"wait=1&a=%%%&")
)
FRAMING = st.sampled_from(["length", "length", "chunked", "none", "too-large", "long-line", "long-header"])


def hostile_request(
    method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes, framing: str
) -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: vmcloud.test"]
    lines += [name + b": " + value for name, value in headers]
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    elif framing == "too-large":
        lines.append(b"Content-Length: %d" % (MAX_BODY_BYTES + 1))
        body = b""
    elif framing == "long-line":
        lines[0] = method + b" " + path + b"x" * MAX_REQUEST_LINE + b" HTTP/1.1"
    elif framing == "long-header":
        lines.append(b"X-Long: " + b"y" * MAX_REQUEST_LINE)
    if framing in ("none", "long-line", "long-header", "too-large"):
        body = b""
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class HostileFuzzTests(SynchronousTestCase, AnswerChecks):
    def setUp(self) -> None:
        # No files: a file's body would stream through the global reactor, which these tests never run.
        static = FilePath(self.mktemp())
        static.makedirs()
        self.target = Target(static)

    @FUZZ
    @given(
        method=METHODS,
        path=PATH,
        headers=HEADERS,
        body=BODY,
        framing=FRAMING,
        step=st.sampled_from([0, 0, 1, 7, 4096]),
    )
    def test_hostile_requests(
        self,
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        framing: str,
        step: int,
    ) -> None:
        target = self.target
        target.fresh()
        raw = hostile_request(method, path, headers, body, framing)
        if framing.startswith("long") and 0 < step < 4096:
            step = 4096  # a 16 KB line fed a byte at a time costs seconds and finds nothing more
        with errors_logged() as logged:
            exchange = target.exchange(raw, step=step)
        what = (raw[:300], exchange)
        self.assertEqual(exchange.leftover, b"", what)
        self.assertEqual(len(exchange.answers), 1, what)
        self.assert_answer(exchange.answers[0], method, what)
        self.assert_quiet(logged, what)
