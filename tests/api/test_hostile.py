"""Hostile HTTP requests get the API's JSON error shape with the right status (issue #8, points 2-4).

Each case here was answered otherwise before the fix: a 500 with a RecursionError, Twisted's
bare 400, a dropped connection, or 404 "no such route".  Requests go through the whole server
(ApiSite, its channel, the Klein app) as raw bytes, since a polite client cannot send most of them.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from tests.api.client import HANDLE, TOKEN, ApiTestCase
from tests.api.fake_pool import RecordingPool
from tests.api.wire import PEER, Exchange, RawAnswer, Wire, parse_answers
from vmcloud.api.app import make_api
from vmcloud.api.inputs import MAX_BODY_BYTES
from vmcloud.api.openapi import openapi_document
from vmcloud.api.site import (
    LINGER_SECONDS,
    MAX_HEADER_BYTES,
    MAX_HEADER_LINES,
    MAX_REQUEST_LINE,
    ApiChannel,
    ApiSite,
)
from vmcloud.compose import make_site

HOME = b"https%3A%2F%2Fexample.com%2F"
PREPARE = b"/prepare-batch/1/" + HOME


def request(
    method: bytes, path: bytes, headers: dict[bytes, bytes] | None = None, body: bytes = b""
) -> bytes:
    """One raw HTTP/1.1 request; Content-Length is added for a body unless a header says otherwise."""
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: vmcloud.test"]
    all_headers = dict(headers or {})
    if body and b"Content-Length" not in all_headers and b"Transfer-Encoding" not in all_headers:
        all_headers[b"Content-Length"] = str(len(body)).encode()
    lines += [name + b": " + value for name, value in all_headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class HostileTestCase(ApiTestCase):
    token = TOKEN

    def setUp(self) -> None:
        super().setUp()
        self.wire = Wire(self.app.resource())

    def send(self, raw: bytes, **kwargs: Any) -> RawAnswer:
        return self.wire.exchange(raw, **kwargs).only

    def auth(self, **more: bytes) -> dict[bytes, bytes]:
        return {b"Authorization": b"Bearer " + TOKEN.encode(), **{k.encode(): v for k, v in more.items()}}

    def assert_refused(self, answer: Any, status: int, code: str, *, says: str = "") -> None:
        document = self.assert_error(answer, status, code)
        self.assertIn(says, document["message"])

    def assert_closed_after(self, exchange: Exchange, status: int, code: str) -> None:
        """A refusal by the channel: one JSON answer, and the connection is closed."""
        self.assert_refused(exchange.only, status, code)
        self.assertEqual(exchange.only.header("connection"), "close")
        self.assertTrue(exchange.closed)


class NestedJsonTests(HostileTestCase):
    def test_the_issue_body_is_a_400_not_a_500(self) -> None:
        """30,000 '[' then 30,000 ']' (issue #8 point 2): was a RecursionError and a 500."""
        body = b"[" * 30_000 + b"]" * 30_000
        answer = self.send(request(b"POST", PREPARE, self.auth(), body))
        self.assert_refused(answer, 400, "bad-request", says="nested deeper than 32 levels")
        self.assertEqual(self.pool.calls, [])

    def test_a_deep_object_inside_the_options_is_refused_too(self) -> None:
        body = b'{"cookies": [' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"]}"
        answer = self.send(request(b"POST", PREPARE, self.auth(), body))
        self.assert_refused(answer, 400, "bad-request", says="nested deeper")

    def test_honest_options_still_parse(self) -> None:
        body = b'{"cookies": [{"name": "sid", "value": "[[[{{{"}], "window": {"width": 800}}'
        answer = self.send(request(b"POST", PREPARE, self.auth(), body))
        self.assertEqual(answer.status, 200, answer)
        [(_, (_, _, options))] = self.pool.calls
        self.assertEqual(options.cookies[0].value, "[[[{{{")


class FormBodyTests(HostileTestCase):
    """Twisted parsed form bodies before the app and answered a broken one with a bare 400."""

    def test_a_broken_multipart_body_reaches_the_route(self) -> None:
        headers = self.auth(**{"Content-Type": b"multipart/form-data; boundary=zz"})
        answer = self.send(request(b"POST", b"/shutdown", headers, b"--zz\r\nnot a part\r\n"))
        self.assertEqual(answer.status, 202, answer)
        self.assertEqual(self.pool.calls, [("shutdown", ())])

    def test_a_multipart_body_on_prepare_batch_is_the_json_400(self) -> None:
        headers = self.auth(**{"Content-Type": b"multipart/form-data; boundary=zz"})
        body = b'--zz\r\nContent-Disposition: form-data; name="cookies"\r\n\r\nx\r\n--zz--\r\n'
        answer = self.send(request(b"POST", PREPARE, headers, body))
        self.assert_refused(answer, 400, "bad-request", says="not valid JSON")

    def test_a_multipart_content_type_without_boundary(self) -> None:
        """Issue #8 point 3: Twisted's form parser refused this before the app, with a bare 400."""
        headers = self.auth(**{"Content-Type": b"multipart/form-data"})
        answer = self.send(request(b"POST", b"/lock/b1", headers, b"junk"))
        self.assertEqual((answer.status, answer.body), (200, HANDLE.encode()))

    def test_an_urlencoded_body_is_not_taken_for_arguments(self) -> None:
        """A form body must not smuggle ``wait`` (or anything) into the request's arguments."""
        headers = {b"Content-Type": b"application/x-www-form-urlencoded"}
        path = b"/fetch-events/" + HANDLE.encode() + b"/0"
        answer = self.send(request(b"GET", path, headers, b"wait=nonsense&%%%=&"))
        self.assertEqual(answer.status, 200, answer)
        self.assertEqual(self.pool.calls, [("fetch_events", (HANDLE, 0, 5.0))])


class HeadLimitTests(HostileTestCase):
    def test_a_long_path_is_414_json(self) -> None:
        """Issue #8 point 3: a path over ~16 KB got the connection closed with no answer."""
        path = b"/handle-status/" + b"a" * 20_000
        for step in (0, 4096):
            self.assert_closed_after(
                self.wire.exchange(request(b"GET", path), step=step), 414, "uri-too-long"
            )

    def test_a_request_line_at_the_limit_is_served(self) -> None:
        prefix = b"GET /handle-status/"
        path = b"/handle-status/" + b"a" * (MAX_REQUEST_LINE - len(prefix) - len(b" HTTP/1.1"))
        answer = self.send(request(b"GET", path))
        self.assertEqual(answer.status, 200, answer)

    def test_a_long_header_line_is_431_json(self) -> None:
        raw = request(b"GET", b"/all-status", {b"X-Junk": b"a" * 20_000})
        self.assert_closed_after(self.wire.exchange(raw), 431, "headers-too-large")

    def test_too_many_header_lines_are_431_json(self) -> None:
        headers = {b"X-%d" % i: b"y" for i in range(MAX_HEADER_LINES + 1)}
        self.assert_closed_after(
            self.wire.exchange(request(b"GET", b"/all-status", headers)), 431, "headers-too-large"
        )

    def test_too_many_header_bytes_are_431_json(self) -> None:
        headers = {b"X-%d" % i: b"y" * 1000 for i in range(20)}
        self.assert_closed_after(
            self.wire.exchange(request(b"GET", b"/all-status", headers)), 431, "headers-too-large"
        )

    def test_headers_at_the_limits_are_served(self) -> None:
        lines = MAX_HEADER_LINES - 2  # with Host and Authorization
        each = (MAX_HEADER_BYTES - 200) // lines
        headers = {b"X-%03d" % i: b"y" * (each - 7) for i in range(lines)}
        answer = self.send(request(b"GET", b"/all-status", {**self.auth(), **headers}))
        self.assertEqual(answer.status, 200, answer)

    def test_a_refused_connection_answers_nothing_more(self) -> None:
        raw = request(b"GET", b"/all-status", {b"Bad Header": b"x"}) + request(
            b"GET", b"/all-status", self.auth()
        )
        exchange = self.wire.exchange(raw)
        self.assert_closed_after(exchange, 400, "bad-request")
        self.assertEqual(self.pool.calls, [])

    def test_a_request_after_a_good_one_is_still_parsed_with_fresh_limits(self) -> None:
        headers = {**self.auth(), **{b"X-%d" % i: b"y" * 100 for i in range(90)}}
        raw = request(b"GET", b"/all-status", headers) * 3
        exchange = self.wire.exchange(raw)
        self.assertEqual([a.status for a in exchange.answers], [200, 200, 200])


class MalformedRequestTests(HostileTestCase):
    """Every way Twisted's parser refuses a request now answers 400 in the JSON shape."""

    CASES: tuple[tuple[str, bytes], ...] = (
        (
            "a header without a colon",
            request(b"GET", b"/all-status", {b"NoColonHere": b""}).replace(b"NoColonHere: ", b"NoColonHere"),
        ),
        ("a header name with a space", request(b"GET", b"/all-status", {b"Bad Name": b"x"})),
        ("a NUL in a header value", request(b"GET", b"/all-status", {b"X": b"a\x00b"})),
        (
            "a Content-Length that is not a number",
            request(b"POST", b"/shutdown", {b"Content-Length": b"ten"}),
        ),
        (
            "two Content-Lengths",
            request(b"POST", b"/shutdown", {b"Content-Length": b"1", b"content-length": b"2"}),
        ),
        (
            "Content-Length and chunked",
            request(b"POST", b"/shutdown", {b"Content-Length": b"1", b"Transfer-Encoding": b"chunked"}),
        ),
        ("an unknown Transfer-Encoding", request(b"POST", b"/shutdown", {b"Transfer-Encoding": b"gzip"})),
        (
            "a bad chunk size",
            request(b"POST", b"/shutdown", {b"Transfer-Encoding": b"chunked"}, b"zz\r\nabc\r\n0\r\n\r\n"),
        ),
        ("a request line of two words", b"GET /all-status\r\nHost: x\r\n\r\n"),
        ("a method that is not a token", request(b"G(E)T", b"/all-status")),
        ("HTTP/2.0 as the version", request(b"GET", b"/all-status").replace(b"HTTP/1.1", b"HTTP/2.0", 1)),
        ("a raw byte above 0x7F in the path", request(b"GET", b"/handle-status/\xe9")),
        ("a space in the path", request(b"GET", b"/handle-status/a b")),
        ("two empty lines before the request", b"\r\n\r\n" + request(b"GET", b"/all-status")),
    )

    def test_each_is_a_json_400(self) -> None:
        for what, raw in self.CASES:
            with self.subTest(what):
                exchange = self.wire.exchange(raw)
                self.assert_closed_after(exchange, 400, "bad-request")
        self.assertEqual(self.pool.calls, [])

    def test_one_empty_line_before_a_request_is_tolerated(self) -> None:
        self.assertEqual(self.send(b"\r\n" + request(b"GET", b"/all-status", self.auth())).status, 200)


class BodyLimitTests(HostileTestCase):
    def test_a_declared_body_over_the_limit_is_413_before_it_is_sent(self) -> None:
        headers = self.auth(**{"Content-Length": b"%d" % (MAX_BODY_BYTES + 1), "Expect": b"100-continue"})
        exchange = self.wire.exchange(request(b"POST", PREPARE, headers))
        self.assert_closed_after(exchange, 413, "body-too-large")
        self.assertEqual(self.pool.calls, [])

    def test_a_chunked_body_over_the_limit_is_413(self) -> None:
        chunk = b"%x\r\n%s\r\n" % (40_000, b" " * 40_000)
        raw = request(
            b"POST", PREPARE, self.auth(**{"Transfer-Encoding": b"chunked"}), chunk * 2 + b"0\r\n\r\n"
        )
        self.assert_closed_after(self.wire.exchange(raw, step=1000), 413, "body-too-large")
        self.assertEqual(self.pool.calls, [])

    def test_a_body_at_the_limit_is_read(self) -> None:
        body = b'{"audio": true}'.ljust(MAX_BODY_BYTES)
        answer = self.send(request(b"POST", PREPARE, self.auth(), body))
        self.assertEqual(answer.status, 200, answer)

    def test_a_chunked_body_under_the_limit_is_read(self) -> None:
        body = b'{"audio": true}'
        raw = request(
            b"POST",
            PREPARE,
            self.auth(**{"Transfer-Encoding": b"chunked"}),
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
        )
        self.assertEqual(self.send(raw).status, 200)
        self.assertTrue(self.pool.calls[0][1][2].audio)


class PathTests(HostileTestCase):
    def test_a_homepage_with_control_characters_is_400_about_the_homepage(self) -> None:
        """Issue #8 point 3: a homepage holding %0A was 404 "no such route"."""
        for escape in (b"%0A", b"%0D", b"%00", b"%09", b"%1B", b"%7F", b"%0D%0A"):
            with self.subTest(escape):
                path = b"/prepare-batch/1/https%3A%2F%2Fexample.com%2Fa" + escape + b"b"
                answer = self.send(request(b"POST", path, self.auth()))
                self.assert_refused(answer, 400, "bad-request", says="homepage")
        self.assertEqual(self.pool.calls, [])

    def test_an_empty_homepage_is_400_about_the_homepage(self) -> None:
        answer = self.send(request(b"POST", b"/prepare-batch/1/", self.auth()))
        self.assert_refused(answer, 400, "bad-request", says="homepage")

    def test_a_stray_percent_is_400(self) -> None:
        for path in (PREPARE + b"%ZZ", b"/lock/b%4", b"/handle-status/abc%", b"/nowhere/%%"):
            with self.subTest(path):
                answer = self.send(request(b"POST", path, self.auth()))
                self.assert_refused(answer, 400, "bad-request", says="percent-escape")
        self.assertEqual(self.pool.calls, [])

    def test_a_path_that_is_not_utf8_once_decoded_is_400(self) -> None:
        for path in (b"/lock/%FF", b"/prepare-batch/1/http%3A%2F%2Fa%2F%C3", b"/static/%80"):
            with self.subTest(path):
                self.assert_refused(
                    self.send(request(b"POST", path, self.auth())), 400, "bad-request", says="UTF-8"
                )


class BatchSizeTests(HostileTestCase):
    def test_size_zero_is_400_with_the_reason(self) -> None:
        """Issue #8 point 4: a batch of 0 was accepted, and a lock on it still got a VM."""
        answer = self.send(request(b"POST", b"/prepare-batch/0/" + HOME, self.auth()))
        self.assert_refused(answer, 400, "bad-request", says="size must be at least 1")
        self.assertEqual(self.pool.calls, [])

    def test_size_one_is_accepted(self) -> None:
        self.assertEqual(self.send(request(b"POST", b"/prepare-batch/1/" + HOME, self.auth())).status, 200)

    def test_the_openapi_document_says_so(self) -> None:
        operation = openapi_document()["paths"]["/prepare-batch/{size}/{homepage}"]["post"]
        [size] = [p for p in operation["parameters"] if p["name"] == "size"]
        self.assertEqual(size["schema"]["minimum"], 1)
        self.assertIn("at least 1", size["description"])


class MethodTests(HostileTestCase):
    """Answers that are not a route's own are JSON too, HEAD's included (without its body)."""

    def test_wrong_methods_and_unknown_paths(self) -> None:
        cases = [
            (b"PUT", b"/all-status", 405, "method-not-allowed"),
            (b"DELETE", b"/release/" + HANDLE.encode(), 405, "method-not-allowed"),
            (b"OPTIONS", b"/all-status", 405, "method-not-allowed"),
            (b"OPTIONS", b"/lock/b1", 405, "method-not-allowed"),
            (b"GET", b"/lock/b1", 405, "method-not-allowed"),
            (b"BREW", b"/lock/b1", 405, "method-not-allowed"),
            (b"GET", b"/no/such/route", 404, "not-found"),
            (b"POST", b"/static/monitor.html", 405, "method-not-allowed"),
            (b"GET", b"/static/nothing.js", 404, "not-found"),
        ]
        for method, path, status, code in cases:
            with self.subTest((method, path)):
                answer = self.send(request(method, path, self.auth()))
                self.assert_refused(answer, status, code)
                if status == 405:
                    self.assertTrue(answer.header("allow"))

    def test_head_answers_have_the_json_type_and_no_body(self) -> None:
        for path, status in ((b"/lock/b1", 405), (b"/no/such/route", 404), (b"/all-status", 200)):
            with self.subTest(path):
                answer = self.send(request(b"HEAD", path, self.auth()))
                self.assertEqual(
                    (answer.status, answer.header("content-type"), answer.body),
                    (status, "application/json", b""),
                )

    def test_a_head_refused_by_the_channel_has_no_body_either(self) -> None:
        """Found by the fuzz: the channel's own refusals wrote their body after a HEAD's head."""
        for path, headers in (
            (b"/all-status", {b"Content-Length": b"%d" % (MAX_BODY_BYTES + 1)}),
            (b"/all-status", {b"X-Long": b"y" * 20_000}),
            (b"/" + b"x" * 20_000, {}),
        ):
            with self.subTest(headers.keys()):
                exchange = self.wire.exchange(request(b"HEAD", path, headers))
                self.assertEqual(
                    (exchange.only.header("content-type"), exchange.only.body), ("application/json", b"")
                )
                self.assertIn(exchange.only.status, (413, 414, 431))

    def test_a_cors_preflight_on_a_handle_route_is_204(self) -> None:
        answer = self.send(
            request(b"OPTIONS", b"/release/" + HANDLE.encode(), {b"Origin": b"https://w.example"})
        )
        self.assertEqual((answer.status, answer.header("access-control-allow-origin")), (204, "*"))


@implementer(ITCPTransport)
class HalfClosingTransport(StringTransport):
    """A TCP-like transport that records a shut write side (StringTransport has none)."""

    write_shut = False

    def loseWriteConnection(self) -> None:
        self.write_shut = True

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class LingerTests(SynchronousTestCase):
    """After refusing, the channel reads and drops the rest for a while, then closes."""

    def test_refused_connection_lingers_then_closes(self) -> None:
        static = FilePath(self.mktemp())
        static.makedirs()
        clock = Clock()
        app = make_api(RecordingPool(), token=None, cors_origins=[], static_dir=static)
        channel = ApiSite(app.resource(), reactor=clock, logPath=None).buildProtocol(PEER)
        transport = HalfClosingTransport(peerAddress=PEER)
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /" + b"a" * 20_000)
        answered = transport.value()
        self.assertTrue(answered.startswith(b"HTTP/1.1 414 "), answered)
        self.assertEqual((transport.write_shut, transport.disconnecting), (True, False))
        channel.dataReceived(b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\nGET /all-status HTTP/1.1\r\n\r\n")
        clock.advance(LINGER_SECONDS - 0.1)
        self.assertEqual((transport.value(), transport.disconnecting), (answered, False))
        clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), answered)


class DaemonSiteTests(SynchronousTestCase):
    def test_the_daemon_serves_the_api_through_api_site(self) -> None:
        """Whatever the access log setting, the composition root builds an ApiSite."""
        state = FilePath(self.mktemp())
        state.makedirs()
        resource = make_api(RecordingPool(), token=None, cors_origins=[], static_dir=state).resource()
        for access_log in ("-", "none", "access.log"):
            with self.subTest(access_log):
                self.assertIsInstance(make_site(resource, access_log, state), ApiSite)


class RealSocketTests(TestCase):
    """What a blocking client (curl, requests) sees over TCP when the channel refuses early."""

    timeout = 30

    def setUp(self) -> None:
        static = FilePath(self.mktemp())
        static.makedirs()
        app = make_api(RecordingPool(), token=None, cors_origins=["*"], static_dir=static)
        site = ApiSite(app.resource(), logPath=None)
        self.closed: list[Deferred[None]] = []
        closed = self.closed

        class TrackedChannel(ApiChannel):
            """Tells the test when the server side of a connection is gone (for a clean reactor)."""

            def connectionMade(self) -> None:
                self.gone: Deferred[None] = Deferred()
                closed.append(self.gone)
                super().connectionMade()

            def connectionLost(self, reason: Any) -> None:
                super().connectionLost(reason)
                self.gone.callback(None)

        site.protocol = TrackedChannel
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def send_blocking(self, raw: bytes) -> tuple[bytes, str | None]:
        """In a thread: send all of ``raw``, then read to the end; any socket error is returned too."""
        address = ("127.0.0.1", self.port.getHost().port)
        received, error = b"", None
        with socket.create_connection(address, timeout=10) as sock:
            try:
                sock.sendall(raw)
                while chunk := sock.recv(65536):
                    received += chunk
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
        return received, error

    def test_an_8_mb_request_line_gets_its_414_without_a_reset(self) -> None:
        """Closing at once would reset the connection under a client still sending (EPIPE/ECONNRESET)."""

        async def check() -> None:
            raw = b"GET /" + b"a" * 8_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
            received, error = await deferToThread(self.send_blocking, raw)
            await self.closed[0]
            self.assertIsNone(error)
            answers, leftover = parse_answers(received, (b"GET",))
            self.assertEqual((len(answers), leftover), (1, b""))
            self.assertEqual((answers[0].status, answers[0].json()["error"]), (414, "uri-too-long"))

        return Deferred.fromCoroutine(check())

    def test_a_multipart_post_gets_the_routes_answer(self) -> None:
        async def check() -> None:
            raw = request(b"POST", b"/shutdown", {b"Content-Type": b"multipart/form-data"}, b"--q\r\nbroken")
            received, error = await deferToThread(
                self.send_blocking, raw.replace(b"HTTP/1.1", b"HTTP/1.0", 1)
            )
            await self.closed[0]
            self.assertIsNone(error)
            answers, _ = parse_answers(received, (b"POST",))
            self.assertEqual([a.status for a in answers], [202])

        return Deferred.fromCoroutine(check())
