"""The API's JSON of the pool's records: the fake and the real pool give the same shapes, and the
OpenAPI document names every key the real pool's answers hold.

The API tests run against :class:`~tests.api.fake_pool.RecordingPool`; were its answers shaped
differently from the real pool's (as ``consoleUrl`` once was), those tests would pin a wire format
nobody serves.  Both answer with the same records and go through the same shaping, and these
tests compare the resulting key sets, list items and nested objects included.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from tests.api.fake_pool import RecordingPool, page_of, sample_handle
from tests.pool.fakes import World
from vmcloud.api.openapi import openapi_document
from vmcloud.api.shapes import all_status_json, events_json, handle_status_json
from vmcloud.pool.interfaces import BatchOptions
from vmcloud.pool.model import LostVM
from vmcloud.pool.views import EventPage, HandleStatus

HOME = "https://example.org/"
# Free-form values: what a guest says in an event.
OPAQUE = frozenset({"data"})


def shape(value: Any) -> Any:
    """The keys of a JSON value, nested: a dict's keys with their values' shapes, a list's objects'
    shapes (as a set: a list may hold objects of several kinds), nothing for a scalar."""
    if isinstance(value, dict):
        return frozenset((k, None if k in OPAQUE else shape(v)) for k, v in value.items())
    if isinstance(value, list):
        return frozenset(shape(item) for item in value if isinstance(item, dict | list))
    return None


def real_pool() -> tuple[World, str, str, str]:
    """A real pool holding one of everything /all-status lists: a VM lent, one being prepared and
    one booting for a queued preparation, a batch with sound, a handle waiting as a pending lock,
    and a handle whose VM died.  Returns it with the lent, the waiting and the lost handle."""
    w = World()
    w.pool.set_pool_size(2, 5, 60_000)
    w.settle()
    batch = w.pool.prepare_batch(1, HOME, BatchOptions(audio=True))
    w.settle()
    lost = w.pool.lock(batch)
    w.settle()
    dying = w.pool.handle_status(lost).vm
    assert dying is not None and dying.identity is not None
    w.channel.gone(dying.identity, "BYE")
    w.settle()
    lent = w.pool.lock(batch)
    waiting = w.pool.lock(batch)
    w.pool.renew_expire(lent, 60_000)
    w.turn()
    return w, lent, waiting, lost


class FakeAndRealPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world, self.lent, self.waiting, self.lost = real_pool()
        self.real = self.world.pool
        self.fake = RecordingPool()

    def test_all_status(self) -> None:
        real = all_status_json(self.real.all_status())
        fake = all_status_json(self.fake.all_status())
        for key in ("vms", "batches", "preps", "handles", "pendingLocks"):
            self.assertTrue(real[key], f"the real pool lists no {key}: the comparison would say nothing")
        self.assertEqual({p["state"] for p in real["preps"]}, {"preparing", "queued"})
        self.assertEqual(shape(fake), shape(real))

    def test_handle_status(self) -> None:
        real = handle_status_json(self.real.handle_status(self.lent))
        self.assertTrue(real["assigned"])
        self.assertEqual(shape(handle_status_json(self.fake.handle_status(self.lent))), shape(real))

    def test_handle_status_waiting_and_lost(self) -> None:
        waiting = HandleStatus(sample_handle(vmid=None), None, audio=True)
        lost = HandleStatus(sample_handle(vmid=None, lost=LostVM("e1-1", "BYE", 1.0)), None, audio=True)
        for token, fake in ((self.waiting, waiting), (self.lost, lost)):
            with self.subTest(token=token):
                real = handle_status_json(self.real.handle_status(token))
                self.assertFalse(real["assigned"])
                self.assertEqual(shape(handle_status_json(fake)), shape(real))

    def test_events(self) -> None:
        page: EventPage = self.successResultOf(
            Deferred.fromCoroutine(self.real.fetch_events(self.lost, 0, 0))
        )
        real = events_json(page)
        self.assertTrue(real["newEvents"])
        fake = events_json(page_of((1, 2.0, {"action": "page-load"})))
        self.assertEqual(shape(fake), shape(real))


class DocumentedKeysTests(SynchronousTestCase):
    """The OpenAPI schemas name every key the real pool's answers hold, and require those always there."""

    def assert_documented(self, schema: dict[str, Any], value: Any, where: str) -> None:
        if schema.get("type") == "array" or schema.get("type") == ["array"]:
            for item in value:
                self.assert_documented(schema["items"], item, f"{where}[]")
            return
        if not isinstance(value, dict) or "properties" not in schema:
            return
        properties = schema["properties"]
        self.assertLessEqual(set(value), set(properties), f"{where}: keys the document does not name")
        self.assertLessEqual(set(schema.get("required", ())), set(value), f"{where}: required keys missing")
        for key, item in value.items():
            if key not in OPAQUE:
                self.assert_documented(properties[key], item, f"{where}.{key}")

    def test_answers_of_the_real_pool(self) -> None:
        world, lent, waiting, lost = real_pool()
        pool = world.pool
        schemas = openapi_document()["components"]["schemas"]
        status = all_status_json(pool.all_status())
        self.assertEqual(set(schemas["AllStatus"]["properties"]), set(status))
        self.assert_documented(schemas["AllStatus"], status, "all-status")
        for token in (lent, waiting, lost):
            self.assert_documented(
                schemas["HandleStatus"], handle_status_json(pool.handle_status(token)), "handle-status"
            )
        page = self.successResultOf(Deferred.fromCoroutine(pool.fetch_events(lost, 0, 0)))
        self.assert_documented(schemas["Events"], events_json(page), "fetch-events")
