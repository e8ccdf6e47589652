"""Events on handles: what an application polling fetch-events sees."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from tests.pool.answers import all_status, handle_status, page_json
from tests.pool.fakes import CONFIG, World
from vmcloud.pool.interfaces import BatchOptions, UnknownHandle
from vmcloud.pool.model import EventLog

HOME = "http://example.org/"


def locked() -> tuple[World, str, str]:
    """A world with one locked VM; returns it, the handle, and the guest's identity."""
    w = World()
    w.pool.set_pool_size(1, 2, 60_000)
    w.settle()
    batch = w.pool.prepare_batch(1, HOME, BatchOptions())
    w.settle()
    handle = w.pool.lock(batch)
    identity = w.state.vms[handle_status(w.pool, handle)["vmid"]].identity
    return w, handle, identity


def page(n: int) -> dict[str, str]:
    return {"action": "page-load", "url": f"http://example.org/{n}", "title": f"page {n}"}


class FetchEventsTests(SynchronousTestCase):
    def fetch(self, w: World, handle: str, last_id: int, wait: float | None = 0) -> Deferred[dict]:
        return Deferred.fromCoroutine(w.pool.fetch_events(handle, last_id, wait)).addCallback(page_json)

    def test_page_loads_of_the_locked_vm_reach_its_handle(self) -> None:
        w, handle, identity = locked()
        start = w.pool.last_event_id(handle)
        w.channel.event(identity, page(1))
        w.clock.advance(0.25)
        w.channel.event(identity, page(2))
        answer = self.successResultOf(self.fetch(w, handle, start))
        self.assertEqual([e["data"] for e in answer["newEvents"]], [page(1), page(2)])
        self.assertEqual(answer["lastId"], answer["newEvents"][-1]["id"])
        self.assertEqual(answer["newEvents"][1]["time"] - answer["newEvents"][0]["time"], 250)
        again = self.successResultOf(self.fetch(w, handle, answer["lastId"]))
        self.assertEqual(again, {"lastId": answer["lastId"], "newEvents": [], "dropped": 0})

    def test_the_assignment_is_an_event_too(self) -> None:
        w, handle, _ = locked()
        answer = self.successResultOf(self.fetch(w, handle, 0))
        self.assertEqual(answer["newEvents"][0]["data"]["action"], "vm-assigned")

    def test_events_of_unlocked_vms_and_unknown_guests_go_nowhere(self) -> None:
        w, handle, identity = locked()
        w.settle()  # the batch's replacement is READY
        start = w.pool.last_event_id(handle)
        w.channel.event("someone-else", page(1))
        other = next(vm for vm in w.state.vms.values() if vm.identity not in (None, identity))
        w.channel.event(other.identity, page(2))
        self.assertEqual(w.pool.last_event_id(handle), start)

    def test_a_ready_vms_home_page_event_reaches_the_handle_that_takes_it(self) -> None:
        """The browser says its home page while the VM waits READY; the worker's handle hears it."""
        w, _, _ = locked()
        w.settle()  # the batch's replacement is READY
        ready = next(vm for vm in w.state.vms.values() if vm.state.value == "READY")
        w.channel.event(ready.identity, page(1))
        batch = ready.batch
        assert batch is not None
        handle = w.pool.lock(batch)
        answer = self.successResultOf(self.fetch(w, handle, 0))
        self.assertEqual(
            [e["data"] for e in answer["newEvents"]][-2:],
            [{"action": "vm-assigned", "vmid": ready.vmid}, page(1)],
        )

    def test_long_poll_returns_as_soon_as_an_event_arrives(self) -> None:
        w, handle, identity = locked()
        start = w.pool.last_event_id(handle)
        d = self.fetch(w, handle, start, wait=5)
        self.assertNoResult(d)
        w.clock.advance(2)
        self.assertNoResult(d)
        w.channel.event(identity, page(1))
        answer = self.successResultOf(d)
        self.assertEqual([e["data"] for e in answer["newEvents"]], [page(1)])

    def test_one_event_answers_every_long_poll_of_the_handle(self) -> None:
        w, handle, identity = locked()
        start = w.pool.last_event_id(handle)
        polls = [self.fetch(w, handle, start, wait=5) for _ in range(3)]
        w.channel.event(identity, page(1))
        for d in polls:
            self.assertEqual([e["data"] for e in self.successResultOf(d)["newEvents"]], [page(1)])

    def test_long_poll_gives_up_after_wait_seconds(self) -> None:
        w, handle, _ = locked()
        start = w.pool.last_event_id(handle)
        d = self.fetch(w, handle, start, wait=None)  # the configured default
        w.clock.advance(CONFIG.long_poll_default - 0.01)
        self.assertNoResult(d)
        w.clock.advance(0.01)
        self.assertEqual(self.successResultOf(d)["newEvents"], [])

    def test_long_poll_on_a_handle_released_meanwhile_says_unknown(self) -> None:
        w, handle, _ = locked()
        d = self.fetch(w, handle, w.pool.last_event_id(handle), wait=5)
        w.pool.release(handle)
        self.failureResultOf(d).trap(UnknownHandle)

    def test_cancelled_long_poll_leaves_nothing_behind(self) -> None:
        w, handle, identity = locked()
        w.settle()
        timers = len(w.clock.getDelayedCalls())
        d = self.fetch(w, handle, w.pool.last_event_id(handle), wait=5)
        self.assertEqual(len(w.clock.getDelayedCalls()), timers + 1)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(len(w.clock.getDelayedCalls()), timers)
        w.channel.event(identity, page(1))  # nobody to wake; no error

    def test_oldest_events_are_dropped_and_counted(self) -> None:
        w, handle, identity = locked()
        start = w.pool.last_event_id(handle)
        for n in range(CONFIG.events_per_handle + 3):
            w.channel.event(identity, page(n))
        answer = self.successResultOf(self.fetch(w, handle, start))
        self.assertEqual(len(answer["newEvents"]), CONFIG.events_per_handle)
        self.assertEqual(answer["dropped"], 3)
        self.assertEqual(answer["newEvents"][-1]["data"], page(CONFIG.events_per_handle + 2))
        status = all_status(w.pool)["handles"][0]
        self.assertEqual(status["droppedEvents"], 4)  # the vm-assigned event went first

    def test_bad_events_from_a_guest_are_dropped_with_a_reason(self) -> None:
        w, handle, identity = locked()
        start = w.pool.last_event_id(handle)
        w.channel.event(identity, {"url": "no action"})
        w.channel.event(identity, {"action": "page-load", "blob": "x" * 20_000})
        w.channel.event(identity, {"action": "page-load", "bad": object()})
        self.assertEqual(w.pool.last_event_id(handle), start)

    def test_events_survive_in_the_checkpoint(self) -> None:
        w, handle, identity = locked()
        w.channel.event(identity, page(7))
        w.advance(CONFIG.checkpoint_interval)
        saved = w.store.saves[-1]
        (kept,) = [h for h in saved["handles"] if h["token"] == handle]
        self.assertEqual(kept["events"]["items"][-1]["data"], page(7))


class EventLogTests(SynchronousTestCase):
    def test_after_reports_missed_events(self) -> None:
        log = EventLog(2)
        for n in range(5):
            log.append({"n": n}, float(n))
        self.assertEqual(log.last_id, 5)
        events, missed = log.after(0)
        self.assertEqual([e.id for e in events], [4, 5])
        self.assertEqual(missed, 3)
        events, missed = log.after(4)
        self.assertEqual(([e.id for e in events], missed), ([5], 0))
        self.assertEqual(log.after(5), ([], 0))
        self.assertEqual(log.dropped, 3)
