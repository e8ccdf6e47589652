"""Every bad input of the SPEC against the real daemon: a 4xx JSON error, never a traceback (issue #3, 5).

The unit tests of ``vmcloud/api`` check each refusal against a fake pool; this checks the wire as
an application sees it, through twistd, Klein and the real pool: status, ``Content-Type``, the
``{"error", "message"}`` shape, that a refusal changes nothing, and that the daemon logged no
traceback for any of it.  The VMs run without network namespaces here (nothing needs them), so
this module runs without root too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_daemon_harness import Daemon, running_daemon
from tests.integration.vmcloud_daemon import Answer

HOME = "https%3A%2F%2Fexample.com%2F"
UNKNOWN_HANDLE = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("inputs"), "i", netns="no", pool_max_pool_size=4) as d:
        yield d
        # the module's last word: nothing any test sent made the daemon log a traceback
        log = d.all_logs()
        assert "Traceback" not in log, log
        assert "api-internal-error" not in log and "failed unexpectedly" not in log, log


def refused(answer: Answer, status: int | tuple[int, ...], error: str | None = None) -> dict[str, Any]:
    """``answer`` is the JSON error the SPEC promises (with one of ``status``); its body."""
    assert answer.status in (status if isinstance(status, tuple) else (status,)), (answer.status, answer.text)
    assert answer.headers.get("content-type", "").startswith("application/json"), answer.headers
    body = json.loads(answer.body)
    assert set(body) == {"error", "message"}, body
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["message"], str) and body["message"], body
    assert "Traceback" not in body["message"] and 'File "' not in body["message"], body
    if error is not None:
        assert body["error"] == error, body
    return body  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "path",
    [
        "/set-pool-size/a/2/1000",
        "/set-pool-size/1/two/1000",
        "/set-pool-size/1/2/1.5",
        "/set-pool-size/1.0/2/1000",
        "/set-pool-size/-1/2/1000",
        "/set-pool-size/1/-2/1000",
        "/set-pool-size/1/2/-1000",
        "/set-pool-size/+1/2/1000",
        "/set-pool-size/1_0/20/1000",
        "/set-pool-size/%201/2/1000",
        "/set-pool-size/0x1/2/1000",
        "/set-pool-size/1e2/200/1000",
        "/set-pool-size/3/2/1000",  # min > max
        "/set-pool-size/1/2/99999999999999999999999",  # overflows 15 digits
        "/set-pool-size/1/2/999999999999999",  # linger beyond a year
        "/set-pool-size/1/2/%FF",  # not UTF-8
    ],
)
def test_set_pool_size_refuses(daemon: Daemon, path: str) -> None:
    before = daemon.status()["poolSize"]
    refused(daemon.post(path), 400)
    assert daemon.status()["poolSize"] == before


def test_set_pool_size_above_the_cap_is_clamped(daemon: Daemon) -> None:
    """Not an error (the SPEC: the cap clamps max); /all-status shows both numbers."""
    daemon.ok("POST", "/set-pool-size/0/100/1000", 204)
    size = daemon.status()["poolSize"]
    assert (size["max"], size["effectiveMax"], size["maxPoolSize"]) == (100, 4, 4)


@pytest.mark.parametrize(
    "path",
    [
        f"/prepare-batch/x/{HOME}",
        f"/prepare-batch/-1/{HOME}",
        f"/prepare-batch/1.5/{HOME}",
        f"/prepare-batch/5/{HOME}",  # above the hard cap of 4: could never be READY
        "/prepare-batch/1/ftp%3A%2F%2Fexample.com%2F",
        "/prepare-batch/1/javascript%3Aalert(1)",
        "/prepare-batch/1/file%3A%2F%2F%2Fetc%2Fpasswd",
        "/prepare-batch/1/data%3Atext%2Fhtml%2Chi",
        "/prepare-batch/1/example.com",  # no scheme
        "/prepare-batch/1/http%3A%2F%2F",  # no host
        "/prepare-batch/1/http%3A%2F%2Fexample.com%2Fa%20b",  # whitespace
        "/prepare-batch/1/https://example.com/",  # slashes not encoded: several segments
        "/prepare-batch/1/http%3A%2F%2Fexample.com%2F%FF",  # not UTF-8 once decoded
        "/prepare-batch/1/http%3A%2F%2Fexample.com%2F" + "a" * 5000,  # too long
    ],
)
def test_prepare_batch_refuses(daemon: Daemon, path: str) -> None:
    refused(daemon.post(path), 400)
    assert daemon.status()["batches"] == []


def test_prepare_batch_refuses_a_homepage_with_a_line_break(daemon: Daemon) -> None:
    body = refused(daemon.post("/prepare-batch/1/http%3A%2F%2Fexample.com%2F%0A"), 400, "bad-request")
    assert "homepage" in body["message"], body
    assert daemon.status()["batches"] == []


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'"cookies"',
        b'{"cookie": []}',  # a typo is an error, not a batch without its cookies
        b'{"cookies": 5}',
        b'{"cookies": [{"name": "a"}]}',
        b'{"cookies": [{"name": "", "value": "v"}]}',
        b'{"cookies": [{"name": "a", "value": 1}]}',
        b'{"cookies": [{"name": "a", "value": "v", "secure": "yes"}]}',
        b'{"cookies": [{"name": "a", "value": "v", "expires": "tomorrow"}]}',
        b'{"window": {"width": 10, "height": 600}}',
        b'{"window": {"width": 800.5, "height": 600}}',
        b'{"window": "800x600"}',
        b'{"audio": "yes"}',
        b'{"cookies": [' + b",".join([b'{"name": "a", "value": "v"}'] * 101) + b"]}",
        b'{"audio": true, "pad": "' + b"x" * 70_000 + b'"}',  # larger than the body limit
    ],
)
def test_prepare_batch_refuses_bad_json_bodies(daemon: Daemon, body: bytes) -> None:
    answer = daemon.post(f"/prepare-batch/1/{HOME}", body=body, headers={"Content-Type": "application/json"})
    refused(answer, 413 if len(body) > 64 * 1024 else 400)  # 413: refused before it is read
    assert daemon.status()["batches"] == []


def test_unknown_batch(daemon: Daemon) -> None:
    refused(daemon.post("/lock/424242"), 404, "unknown-batch")
    refused(daemon.post("/cancel-batch/424242"), 404, "unknown-batch")
    refused(daemon.post("/lock/%E2%98%83"), 404, "unknown-batch")


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", f"/release/{UNKNOWN_HANDLE}"),
        ("GET", f"/handle-status/{UNKNOWN_HANDLE}"),
        ("POST", f"/renew-expire/{UNKNOWN_HANDLE}/1000"),
        ("GET", f"/last-event-id/{UNKNOWN_HANDLE}"),
        ("GET", f"/fetch-events/{UNKNOWN_HANDLE}/0"),
        ("GET", f"/fetch-events/{UNKNOWN_HANDLE}/0?wait=1"),
    ],
)
def test_unknown_handle(daemon: Daemon, method: str, path: str) -> None:
    refused(daemon.call(method, path), 404, "unknown-handle")
    refused(daemon.get("/handle-status/..%2F..%2Fetc%2Fpasswd"), 404)  # no such route either


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/no-such-route", 404),
        ("GET", "/lock/1", 405),  # lock is a POST
        ("POST", "/all-status", 405),
        ("GET", "/set-pool-size/1/2", 404),
    ],
)
def test_routing_errors_are_json(daemon: Daemon, method: str, path: str, status: int) -> None:
    refused(daemon.call(method, path), status)


def test_cancelled_batch_refuses_locks(daemon: Daemon) -> None:
    """A cancelled batch answers 409 while it exists: here it waits for a VM its pending lock needs.

    (A cancelled batch whose VMs are all OCCUPIED does not exist any more: the pool drops a
    cancelled batch with no READY or preparing VM and no pending lock, so a lock then gets 404.)
    """
    daemon.set_pool_size(0, 0)  # no VM may boot: the lock stays pending
    daemon.wait_vms()
    batch = daemon.prepare_batch(1)
    waiting = daemon.lock(batch)
    daemon.ok("POST", f"/cancel-batch/{batch}", 204)
    batches = {b["id"]: b for b in daemon.status()["batches"]}
    assert batches[batch]["cancelled"] is True and batches[batch]["pendingLocks"] == 1
    refused(daemon.post(f"/lock/{batch}"), 409, "batch-cancelled")
    refused(daemon.post(f"/lock/{batch}", headers={"Accept": "application/json"}), 409, "batch-cancelled")
    # the lock taken before the cancel is still served, then the batch goes
    daemon.set_pool_size(1, 2)
    assert daemon.wait_assigned(waiting)["vm"]["state"] == "OCCUPIED"
    daemon.ok("POST", f"/release/{waiting}", 204)
    daemon.wait_pool(lambda s: batch not in {b["id"] for b in s["batches"]}, f"batch {batch} gone")
    refused(daemon.post(f"/lock/{batch}"), 404, "unknown-batch")


def test_bad_handle_inputs(daemon: Daemon) -> None:
    """Bad values on a live handle are 400 and change nothing; a released handle is unknown (404)."""
    daemon.set_pool_size(1, 2)
    batch = daemon.prepare_batch(1)
    handle = daemon.lock(batch)
    assert daemon.wait_assigned(handle)["vm"]["state"] == "OCCUPIED"
    daemon.ok("POST", f"/cancel-batch/{batch}", 204)
    assert daemon.handle_status(handle)["assigned"] is True  # locked VMs stay usable

    for path in (
        f"/renew-expire/{handle}/soon",
        f"/renew-expire/{handle}/-5",
        f"/renew-expire/{handle}/1.5",
        f"/renew-expire/{handle}/999999999999999",  # beyond a year
    ):
        refused(daemon.post(path), 400)
    last = int(daemon.ok("GET", f"/last-event-id/{handle}").text)
    for path in (
        f"/fetch-events/{handle}/x",
        f"/fetch-events/{handle}/-1",
        f"/fetch-events/{handle}/{last + 5}",  # beyond the handle's last event
        f"/fetch-events/{handle}/0?wait=forever",
        f"/fetch-events/{handle}/0?wait=-1",
    ):
        refused(daemon.get(path), 400)
    # none of it touched the handle
    status = daemon.handle_status(handle)
    assert status["assigned"] is True and status["expires"] is False

    daemon.ok("POST", f"/release/{handle}", 204)
    refused(daemon.post(f"/release/{handle}"), 404, "unknown-handle")  # released: unknown from then on
    refused(daemon.get(f"/handle-status/{handle}"), 404, "unknown-handle")


def test_after_shutdown(daemon: Daemon) -> None:
    """Batches and locks are refused (409) until set-pool-size starts the pool again."""
    batch = daemon.prepare_batch(1)
    daemon.ok("POST", "/shutdown", 202)
    refused(daemon.post(f"/prepare-batch/1/{HOME}"), 409, "shutting-down")
    refused(daemon.post(f"/lock/{batch}"), (404, 409))  # cancelled by the shutdown, then gone
    refused(daemon.post("/cancel-batch/1"), 404, "unknown-batch")
    daemon.wait_pool(lambda s: not s["vms"] and not s["batches"], "every VM terminated")
    assert daemon.stop() in (0, -15)
    daemon.assert_nothing_left()
