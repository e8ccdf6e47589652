"""A simulator on a Clock driven through treq's in-memory StubTreq: HTTP without sockets."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from vmcloud.novasim import CloudSettings, Simulator

BASE = "http://127.0.0.1:8774"
IMAGE = "155d900f-4e14-4e4c-a73d-069cbf4541e6"
NET = "3cb9bc59-5699-4588-a4b1-b87f96708bc6"
PASSWORD_AUTH = {
    "auth": {
        "identity": {
            "methods": ["password"],
            "password": {"user": {"name": "demo", "password": "secret", "domain": {"name": "Default"}}},
        },
        "scope": {"project": {"name": "demo", "domain": {"name": "Default"}}},
    }
}


class Answer:
    """A finished exchange: status, headers (lower-case names) and the body (JSON when it is)."""

    def __init__(self, code: int, headers: dict[str, str], raw: bytes) -> None:
        self.code = code
        self.headers = headers
        self.raw = raw
        try:
            self.body: Any = json.loads(raw) if raw else None
        except ValueError:
            self.body = None


class SimClient:
    def __init__(self, settings: CloudSettings | None = None, **kw: Any) -> None:
        self.clock = Clock()
        self.sim = Simulator(self.clock, settings=settings, base_url=BASE, seed=42, **kw)
        self.stub = StubTreq(self.sim.resource)
        self.token: str | None = None

    def start(self, request: Deferred[Any]) -> list[Any]:
        out: list[Any] = []
        request.addBoth(out.append)
        self.stub.flush()
        return out

    def finish(self, out: list[Any]) -> Answer | Failure:
        self.stub.flush()
        if not out:
            raise AssertionError("no answer yet")
        response = out[0]
        if isinstance(response, Failure):
            return response
        body: list[bytes] = []
        response.content().addCallback(body.append)
        self.stub.flush()
        headers = {k.decode().lower(): v[-1].decode() for k, v in response.headers.getAllRawHeaders()}
        return Answer(response.code, headers, body[0])

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        mv: str | None = None,
        token: bool = True,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Answer:
        answer = self.finish(
            self.start(self.send(method, path, body, mv=mv, token=token, headers=headers, raw=raw))
        )
        assert isinstance(answer, Answer), answer
        return answer

    def send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        mv: str | None = None,
        token: bool = True,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Deferred[Any]:
        sent = dict(headers or {})
        if token:
            if self.token is None:
                self.login()
            assert self.token is not None
            sent["X-Auth-Token"] = self.token
        if mv is not None:
            sent["X-OpenStack-Nova-API-Version"] = mv
            if mv.split(".")[-1].isdigit() and int(mv.split(".")[-1]) >= 27:
                sent["OpenStack-API-Version"] = f"compute {mv}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        return self.stub.request(method, BASE + path, headers=sent, data=data)

    def login(self) -> None:
        answer = self.call("POST", "/identity/v3/auth/tokens", PASSWORD_AUTH, token=False)
        assert answer.code == 201, answer.raw
        self.token = answer.headers["x-subject-token"]

    def boot(self, name: str, mv: str = "2.1", **server: Any) -> str:
        body = {
            "server": {
                "name": name,
                "imageRef": IMAGE,
                "flavorRef": "1",
                "networks": [{"uuid": NET}],
                **server,
            }
        }
        answer = self.call("POST", "/v2.1/servers", body, mv=mv)
        assert answer.code == 202, answer.raw
        return str(answer.body["server"]["id"])
