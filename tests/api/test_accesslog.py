"""The access log keeps handles (capabilities) out of log archives."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from vmcloud.api.accesslog import redact_uri, redacted_log_formatter

HANDLE = b"Zk3x9q0123456789abcdefghijklmnop"


class RedactTests(SynchronousTestCase):
    def test_handle_routes_are_shortened(self) -> None:
        for route in (b"release", b"handle-status", b"last-event-id"):
            self.assertEqual(redact_uri(b"/" + route + b"/" + HANDLE), b"/" + route + b"/Zk3x9q...")
        self.assertEqual(redact_uri(b"/renew-expire/" + HANDLE + b"/1000"), b"/renew-expire/Zk3x9q.../1000")
        self.assertEqual(
            redact_uri(b"/fetch-events/" + HANDLE + b"/4?wait=5"), b"/fetch-events/Zk3x9q.../4?wait=5"
        )

    def test_other_paths_are_untouched(self) -> None:
        for uri in (b"/lock/b1", b"/all-status", b"/", b"/static/monitor.html", b"/release/"):
            self.assertEqual(redact_uri(uri), uri)

    def test_log_line(self) -> None:
        request = DummyRequest([b"release", HANDLE])
        request.uri = b"/release/" + HANDLE
        request.method = b"POST"
        request.code = 204
        request.sentLength = 0
        line = redacted_log_formatter("[ts]", request)
        self.assertIn('"POST /release/Zk3x9q... HTTP/1.0" 204', line)
        self.assertNotIn(HANDLE.decode(), line)
