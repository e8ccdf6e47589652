"""Drive the Klein app in memory with treq's StubTreq and get plain answers back."""

from __future__ import annotations

import json
from typing import Any

import attrs
from treq.testing import StubTreq
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from tests.api.fake_pool import RecordingPool
from vmcloud.api.app import make_api

TOKEN = "s3cret-admin-token"
HANDLE = "h-0123456789abcdef0123456789abcdef"


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class ApiTestCase(SynchronousTestCase):
    """A RecordingPool behind a fresh app; ``self.call`` sends one request."""

    token: str | None = None
    cors_origins: tuple[str, ...] = ("*",)

    def setUp(self) -> None:
        self.pool = RecordingPool()
        self.static_dir = FilePath(self.mktemp())
        self.static_dir.makedirs()
        self.static_dir.child("monitor.html").setContent(b"<!doctype html><title>monitor</title>")
        self.static_dir.child("vmcloud.js").setContent(b"export const x = 1;\n")
        self.static_dir.child("sub").makedirs()
        self.static_dir.child("sub").child("index.html").setContent(b"an index nobody asked for")
        self.make(max_long_poll=30.0)

    def make(self, **options: Any) -> None:
        self.app = make_api(
            self.pool,
            token=self.token,
            cors_origins=self.cors_origins,
            static_dir=self.static_dir,
            **options,
        )
        self.treq = StubTreq(self.app.resource())

    def start(self, method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes = b""):
        """Send a request; returns the Deferred of the treq response (for answers that wait)."""
        hdrs = {k: [v] for k, v in (headers or {}).items()}
        d = self.treq.request(
            method, "http://vmcloud.test" + path, headers=hdrs, data=body or None, allow_redirects=False
        )
        self.treq.flush()
        return d

    def finish(self, d) -> Answer:
        self.treq.flush()
        response = self.successResultOf(d)
        content = response.content()
        self.treq.flush()
        body = self.successResultOf(content)
        headers = {
            k.decode().lower(): [v.decode("latin-1") for v in vs]
            for k, vs in response.headers.getAllRawHeaders()
        }
        return Answer(response.code, headers, body)

    def call(self, method: str, path: str, **kwargs: Any) -> Answer:
        return self.finish(self.start(method, path, **kwargs))

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def assert_error(self, answer: Answer, status: int, code: str) -> dict[str, Any]:
        """A refusal: the status, the JSON content type, and the error shape of the SPEC."""
        self.assertEqual((answer.status, answer.header("content-type")), (status, "application/json"), answer)
        document = answer.json()
        self.assertEqual(set(document), {"error", "message"})
        self.assertEqual(document["error"], code)
        self.assertTrue(document["message"])
        return document
