"""The OpenAPI document is kept true: same routes as Klein, and the statuses the handlers really give."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from tests.api.client import HANDLE, TOKEN, ApiTestCase
from vmcloud.api.openapi import MOUNTED_PATHS, openapi_document
from vmcloud.pool.interfaces import (
    BatchCancelled,
    InvalidRequest,
    ShuttingDown,
    UnknownBatch,
    UnknownHandle,
    UnknownVM,
)

HOME = "http%3A%2F%2Fexample.com%2F"
HTTP_METHODS = {"get", "post", "put", "delete", "patch", "options", "head"}

BUG = RuntimeError("bug")
# (method, path, pool method that raises, what it raises, send the admin token, extra headers)
SCENARIOS: list[tuple[str, str, str | None, BaseException | None, bool, dict[str, str]]] = [
    ("POST", "/set-pool-size/1/2/3", None, None, True, {}),
    ("POST", "/set-pool-size/x/2/3", None, None, True, {}),
    ("POST", "/set-pool-size/1/2/3", None, None, False, {}),
    ("POST", "/set-pool-size/1/2/3", "set_pool_size", ShuttingDown("s"), True, {}),
    ("POST", "/set-pool-size/1/2/3", "set_pool_size", BUG, True, {}),
    ("POST", f"/prepare-batch/1/{HOME}", None, None, True, {}),
    ("POST", "/prepare-batch/1/gopher%3A%2F%2Fx", None, None, True, {}),
    ("POST", f"/prepare-batch/1/{HOME}", None, None, False, {}),
    ("POST", f"/prepare-batch/1/{HOME}", "prepare_batch", ShuttingDown("s"), True, {}),
    ("POST", f"/prepare-batch/1/{HOME}", "prepare_batch", BUG, True, {}),
    ("POST", "/lock/b1", None, None, True, {}),
    ("POST", "/lock/b1", None, None, False, {}),
    ("POST", "/lock/b9", "lock", UnknownBatch("b9"), True, {}),
    ("POST", "/lock/b1", "lock", BatchCancelled("b1"), True, {}),
    ("POST", "/lock/b1", "lock", InvalidRequest("2 locks are already waiting for a VM"), True, {}),
    ("POST", "/lock/b1", "lock", BUG, True, {}),
    ("POST", f"/release/{HANDLE}", None, None, False, {}),
    ("POST", f"/release/{HANDLE}", "release", UnknownHandle("h"), False, {}),
    ("POST", f"/release/{HANDLE}", "release", BUG, False, {}),
    ("GET", f"/handle-status/{HANDLE}", None, None, False, {}),
    ("GET", f"/handle-status/{HANDLE}", "handle_status", UnknownHandle("h"), False, {}),
    ("GET", f"/handle-status/{HANDLE}", "handle_status", BUG, False, {}),
    ("POST", f"/renew-expire/{HANDLE}/10", None, None, False, {}),
    ("POST", f"/renew-expire/{HANDLE}/ten", None, None, False, {}),
    ("POST", f"/renew-expire/{HANDLE}/10", "renew_expire", UnknownHandle("h"), False, {}),
    ("POST", f"/renew-expire/{HANDLE}/10", "renew_expire", BUG, False, {}),
    ("GET", f"/last-event-id/{HANDLE}", None, None, False, {}),
    ("GET", f"/last-event-id/{HANDLE}", "last_event_id", UnknownHandle("h"), False, {}),
    ("GET", f"/last-event-id/{HANDLE}", "last_event_id", BUG, False, {}),
    ("GET", f"/fetch-events/{HANDLE}/0", None, None, False, {}),
    ("GET", f"/fetch-events/{HANDLE}/0?wait=x", None, None, False, {}),
    ("GET", f"/fetch-events/{HANDLE}/0", "fetch_events", UnknownHandle("h"), False, {}),
    ("GET", f"/fetch-events/{HANDLE}/0", "fetch_events", BUG, False, {}),
    ("POST", "/cancel-batch/b1", None, None, True, {}),
    ("POST", "/cancel-batch/b1", None, None, False, {}),
    ("POST", "/cancel-batch/b9", "cancel_batch", UnknownBatch("b9"), True, {}),
    ("POST", "/cancel-batch/b1", "cancel_batch", BUG, True, {}),
    ("POST", "/shutdown", None, None, True, {}),
    ("POST", "/shutdown", None, None, False, {}),
    ("POST", "/shutdown", "shutdown", BUG, True, {}),
    ("GET", "/all-status", None, None, True, {}),
    ("GET", "/all-status", None, None, False, {}),
    ("GET", "/all-status", "all_status", BUG, True, {}),
    ("GET", "/all-status?since=3&wait=1.5", None, None, True, {}),
    ("GET", "/all-status?since=x", None, None, True, {}),
    ("GET", "/all-status?since=3&wait=-1", None, None, True, {}),
    ("POST", "/terminate-vm/e1-1", None, None, True, {}),
    ("POST", "/terminate-vm/e1-1", None, None, False, {}),
    ("POST", "/terminate-vm/nope", "terminate_vm", UnknownVM("nope"), True, {}),
    ("POST", "/terminate-vm/e1-1", "terminate_vm", ShuttingDown("s"), True, {}),
    ("POST", "/terminate-vm/e1-1", "terminate_vm", BUG, True, {}),
    ("GET", "/metrics", None, None, True, {}),
    ("GET", "/metrics", None, None, False, {}),
    ("GET", "/metrics", "all_status", BUG, True, {}),
    ("GET", "/openapi.json", None, None, False, {}),
    ("GET", "/", None, None, False, {}),
    # A GET of a file streams through the reactor's cooperator; HEAD runs the same handler in memory
    # (the body itself is checked against a real socket in test_static).
    ("HEAD", "/static/monitor.html", None, None, False, {}),
    (
        "GET",
        "/static/monitor.html",
        None,
        None,
        False,
        {"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"},
    ),
    ("GET", "/static/nothing-here.js", None, None, False, {}),
    *[
        ("OPTIONS", path, None, None, False, {"Origin": "https://w.example"})
        for path in (
            f"/release/{HANDLE}",
            f"/handle-status/{HANDLE}",
            f"/renew-expire/{HANDLE}/1",
            f"/last-event-id/{HANDLE}",
            f"/fetch-events/{HANDLE}/0",
        )
    ],
]


def template(rule: str) -> str:
    """A werkzeug rule in OpenAPI spelling: ``/lock/<batch>`` -> ``/lock/{batch}``."""
    rule = rule.replace("<path:__rest__>", "{path}")  # Klein's branch route under /static/
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule)


def documented(document: dict[str, Any], *, mounted: bool = False) -> dict[tuple[str, str], set[int]]:
    """Operations and their statuses: Klein's routes, or (``mounted``) the console and audio proxies'
    (checked in tests/console/test_openapi_mounted.py)."""
    return {
        (path, method.upper()): {int(status) for status in operation["responses"]}
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS and (path in MOUNTED_PATHS) == mounted
    }


class OpenApiDriftTests(ApiTestCase):
    token = TOKEN
    maxDiff = None

    def klein_operations(self) -> set[tuple[str, str]]:
        operations = set()
        for rule in self.app.url_map.iter_rules():
            if rule.rule == "/static/":
                continue  # the root of the /static/ branch: a directory, never listed (404)
            for method in rule.methods or ():
                if method != "HEAD":  # werkzeug adds HEAD to every GET
                    operations.add((template(rule.rule), method))
        return operations

    def test_document_paths_and_methods_are_the_routes(self) -> None:
        mounts = {path.split("/")[1] for path in MOUNTED_PATHS}
        routes = {
            (path, method) for path, method in self.klein_operations() if path.split("/")[1] not in mounts
        }
        self.assertEqual(set(documented(openapi_document())), routes)

    def test_documented_statuses_are_the_ones_handlers_produce(self) -> None:
        observed: dict[tuple[str, str], set[int]] = defaultdict(set)
        adapter = self.app.url_map.bind("vmcloud.test")
        for method, path, failing, error, with_token, headers in SCENARIOS:
            self.pool.raises = {failing: error} if failing and error else {}
            answer = self.call(method, path, headers={**(self.admin() if with_token else {}), **headers})
            rule, _ = adapter.match(path.split("?")[0], method=method, return_rule=True)
            operation = (template(rule.rule), "GET" if method == "HEAD" else method)
            observed[operation].add(answer.status)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(dict(observed), documented(openapi_document()))

    def test_path_parameters_are_declared(self) -> None:
        for path, item in openapi_document()["paths"].items():
            names = set(re.findall(r"{([^}]+)}", path))
            for method, operation in item.items():
                if method == "options":
                    continue
                declared = {p["name"] for p in operation.get("parameters", ()) if p["in"] == "path"}
                self.assertEqual(declared, names, f"{method} {path}")

    def test_every_reference_resolves(self) -> None:
        document = openapi_document()
        refs: list[str] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    if key == "$ref":
                        refs.append(value)
                    else:
                        walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(document)
        self.assertTrue(refs)
        for ref in refs:
            node: Any = document
            for part in ref.removeprefix("#/").split("/"):
                node = node[part]
            self.assertIsInstance(node, dict, ref)

    def test_admin_operations_declare_the_token(self) -> None:
        admin_paths = {
            "/set-pool-size/{min}/{max}/{linger}",
            "/prepare-batch/{size}/{homepage}",
            "/lock/{batch}",
            "/cancel-batch/{batch}",
            "/terminate-vm/{vmid}",
            "/shutdown",
            "/all-status",
            "/metrics",
            "/console/vm/{vmid}",
            "/console/vm/{vmid}/screen.png",
        }
        for path, item in openapi_document()["paths"].items():
            for method, operation in item.items():
                self.assertEqual(bool(operation["security"]), path in admin_paths, f"{method} {path}")
