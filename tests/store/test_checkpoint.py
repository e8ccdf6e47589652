"""The checkpoint store: saving, coalescing, failures, loading and refusing bad files."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.store.fakes import FailingFileOps, ManualDispatch, RecordingFileOps, raising_dispatch
from vmcloud.pool.interfaces import ICheckpointStore
from vmcloud.pool.snapshot import EncodedRecord
from vmcloud.store.checkpoint import (
    CheckpointStore,
    CheckpointUnreadableError,
    CorruptCheckpointError,
    decode_checkpoint,
    encode_checkpoint,
)
from vmcloud.threads import synchronous_dispatch

T0 = 1_760_000_000.0


def pool_state(generation: int, vms: int = 3) -> dict[str, Any]:
    """A small snapshot shaped like the pool's."""
    return {
        "poolSize": {"min": 1, "max": 4, "linger": 60000},
        "vms": [
            {"vmid": f"{i:04d}", "state": "FREE", "version": generation, "ip": None, "caps": ["vnc"]}
            for i in range(vms)
        ],
        "handles": [],
        "generation": generation,
    }


def events_of(logged: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logged if e.get("event") == name]


class StoreTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.directory = FilePath(self.mktemp())
        self.directory.makedirs()
        self.checkpoint = self.directory.child("checkpoint.json")

    def store(self, **kwargs: Any) -> CheckpointStore:
        kwargs.setdefault("dispatch", synchronous_dispatch)
        kwargs.setdefault("clock", self.clock)
        return CheckpointStore(self.directory, **kwargs)

    def on_disk(self) -> dict[str, Any]:
        """The checkpoint file, parsed raw (not through the store)."""
        result: dict[str, Any] = json.loads(self.checkpoint.getContent())
        return result

    def leftovers(self) -> list[str]:
        return sorted(name for name in os.listdir(self.directory.path) if name != "checkpoint.json")


class SaveAndLoadTests(StoreTestCase):
    def test_provides_interface(self) -> None:
        store = self.store()
        self.assertTrue(verifyObject(ICheckpointStore, store))

    def test_no_checkpoint_loads_none(self) -> None:
        with capturedLogs() as logged:
            self.assertIsNone(self.store().load())
        self.assertEqual(len(events_of(logged, "checkpoint-none")), 1)

    def test_saved_state_loads_back(self) -> None:
        self.store().save(pool_state(7))
        self.assertEqual(self.store().load(), pool_state(7))

    def test_file_is_a_versioned_envelope(self) -> None:
        self.store().save(pool_state(1))
        self.assertEqual(self.on_disk(), {"schema": 1, "written": T0, "state": pool_state(1)})
        self.assertTrue(self.checkpoint.getContent().endswith(b"}\n"))
        self.assertEqual(self.leftovers(), [])

    def test_file_is_private(self) -> None:
        """The checkpoint holds guest credentials and VNC passwords: owner only."""
        self.store().save(pool_state(1))
        self.assertEqual(stat.S_IMODE(os.stat(self.checkpoint.path).st_mode), 0o600)

    def test_missing_state_directory_is_created(self) -> None:
        self.directory = self.directory.child("state").child("deeper")
        self.checkpoint = self.directory.child("checkpoint.json")
        self.store().save(pool_state(2))
        self.assertEqual(self.on_disk()["state"], pool_state(2))

    def test_write_steps_in_order(self) -> None:
        """Temp file written, made durable, then renamed over the target, then the directory synced."""
        files = RecordingFileOps()
        self.store(files=files).save(pool_state(1))
        self.assertEqual(files.calls, ["open", "write", "fsync", "close", "rename", "fsync_dir"])

    def test_unicode_and_large_state_round_trips(self) -> None:
        state = pool_state(3, vms=2000)
        state["handles"] = [{"events": [{"title": "Zürich — 東京 ✓", "n": n} for n in range(600)]}]
        self.store().save(state)
        self.assertEqual(self.store().load(), state)

    def test_encoded_records_load_back_as_plain_data(self) -> None:
        """The pool hands its VMs over as records encoded in advance; they load back as objects."""
        state = pool_state(5, vms=300)
        self.store().save({**state, "vms": [EncodedRecord(vm) for vm in state["vms"]]})
        self.assertEqual(self.store().load(), state)

    def test_stats_describe_the_last_write(self) -> None:
        store = self.store()
        store.save(pool_state(1))
        stats = store.stats()
        self.assertEqual((stats.saves, stats.writes, stats.failures), (1, 1, 0))
        self.assertEqual(stats.last_size, len(self.checkpoint.getContent()))
        self.assertEqual(stats.last_written, T0)
        self.assertIsNone(stats.last_error)


class CoalescingTests(StoreTestCase):
    def test_burst_of_saves_makes_at_most_two_writes(self) -> None:
        files = RecordingFileOps()
        dispatch = ManualDispatch()
        store = self.store(dispatch=dispatch, files=files)
        for generation in range(1000):
            store.save(pool_state(generation))
            self.assertEqual(len(dispatch.queue), 1, "more than one write in flight")
        dispatch.run_next()
        self.assertEqual(self.on_disk()["state"], pool_state(0))
        self.assertEqual(len(dispatch.queue), 1)
        dispatch.run_next()
        self.assertEqual(dispatch.queue, [])
        self.assertEqual(files.writes(), 2)
        self.assertEqual(self.on_disk()["state"], pool_state(999))
        self.assertEqual(store.stats().coalesced, 998)

    def test_save_when_idle_writes_at_once(self) -> None:
        dispatch = ManualDispatch()
        store = self.store(dispatch=dispatch)
        store.save(pool_state(1))
        dispatch.run_next()
        store.save(pool_state(2))
        self.assertEqual(len(dispatch.queue), 1)
        dispatch.run_next()
        self.assertEqual(self.on_disk()["state"], pool_state(2))

    def test_snapshot_is_stamped_when_its_write_starts(self) -> None:
        dispatch = ManualDispatch()
        store = self.store(dispatch=dispatch)
        store.save(pool_state(1))
        store.save(pool_state(2))
        self.clock.advance(3)
        dispatch.run_next()
        self.clock.advance(4)
        dispatch.run_next()
        self.assertEqual(self.on_disk()["written"], T0 + 3)

    def test_flush_waits_for_in_flight_and_pending(self) -> None:
        dispatch = ManualDispatch()
        store = self.store(dispatch=dispatch)
        store.save(pool_state(1))
        store.save(pool_state(2))
        flushed = Deferred.fromCoroutine(store.flush())
        self.assertNoResult(flushed)
        dispatch.run_next()
        self.assertNoResult(flushed)
        dispatch.run_next()
        self.successResultOf(flushed)
        self.assertEqual(self.on_disk()["state"], pool_state(2))

    def test_flush_is_not_satisfied_by_an_older_write(self) -> None:
        """A save made while flush waits is not required; one made before is."""
        dispatch = ManualDispatch()
        store = self.store(dispatch=dispatch)
        store.save(pool_state(1))
        flushed = Deferred.fromCoroutine(store.flush())
        store.save(pool_state(2))
        dispatch.run_next()
        self.successResultOf(flushed)
        late = Deferred.fromCoroutine(store.flush())
        self.assertNoResult(late)
        dispatch.run_next()
        self.successResultOf(late)

    def test_flush_when_idle_returns_at_once(self) -> None:
        store = self.store()
        self.successResultOf(Deferred.fromCoroutine(store.flush()))
        store.save(pool_state(1))
        self.successResultOf(Deferred.fromCoroutine(store.flush()))

    def test_min_interval_spaces_writes(self) -> None:
        files = RecordingFileOps()
        store = self.store(files=files, min_interval=2.0)
        store.save(pool_state(1))
        self.clock.advance(0.5)
        store.save(pool_state(2))
        store.save(pool_state(3))
        self.assertEqual(files.writes(), 1)
        self.clock.advance(1.4)
        self.assertEqual(files.writes(), 1)
        self.clock.advance(0.1)
        self.assertEqual(files.writes(), 2)
        self.assertEqual(self.on_disk()["state"], pool_state(3))

    def test_flush_does_not_wait_for_min_interval(self) -> None:
        store = self.store(min_interval=60.0)
        store.save(pool_state(1))
        store.save(pool_state(2))
        self.successResultOf(Deferred.fromCoroutine(store.flush()))
        self.assertEqual(self.on_disk()["state"], pool_state(2))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FailureTests(StoreTestCase):
    def test_disk_full_is_logged_and_keeps_the_old_checkpoint(self) -> None:
        self.store().save(pool_state(1))
        files = FailingFileOps("write")
        store = self.store(files=files)
        with capturedLogs() as logged:
            store.save(pool_state(2))  # must not raise
        [failed] = events_of(logged, "checkpoint-write-failed")
        self.assertIn("No space left on device", formatEvent(failed))
        self.assertEqual(self.on_disk()["state"], pool_state(1))
        self.assertEqual(self.leftovers(), [], "temp file left behind")
        self.assertEqual(store.stats().failures, 1)
        self.assertIn("No space left on device", store.stats().last_error or "")

    def test_failed_write_is_retried_after_the_delay_with_the_newest_snapshot(self) -> None:
        files = FailingFileOps("fsync")
        store = self.store(files=files, retry_delay=5.0)
        with capturedLogs() as logged:
            store.save(pool_state(1))
            store.save(pool_state(2))  # during the back-off: replaces, does not write
            store.save(pool_state(3))
        self.assertEqual(files.writes(), 1)
        self.assertEqual(len(events_of(logged, "checkpoint-write-failed")), 1)
        files.failing = False
        with capturedLogs() as logged:
            self.clock.advance(5.0)
        self.assertEqual(files.writes(), 2)
        self.assertEqual(self.on_disk()["state"], pool_state(3))
        self.assertEqual(len(events_of(logged, "checkpoint-recovered")), 1)
        self.assertIsNone(store.stats().last_error)

    def test_failed_write_is_retried_later_even_without_a_new_save(self) -> None:
        files = FailingFileOps("rename")
        store = self.store(files=files, retry_delay=5.0)
        store.save(pool_state(1))
        files.failing = False
        self.clock.advance(5.0)
        self.assertEqual(self.on_disk()["state"], pool_state(1))
        self.assertEqual(self.leftovers(), [])

    def test_without_retry_delay_next_save_retries(self) -> None:
        files = FailingFileOps("open", errno.EACCES)
        store = self.store(files=files, retry_delay=0)
        store.save(pool_state(1))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        files.failing = False
        store.save(pool_state(2))
        self.assertEqual(self.on_disk()["state"], pool_state(2))

    def test_flush_retries_a_failed_write_at_once(self) -> None:
        files = FailingFileOps("fsync_dir")
        store = self.store(files=files, retry_delay=30.0)
        store.save(pool_state(1))
        files.failing = False
        self.successResultOf(Deferred.fromCoroutine(store.flush()))
        self.assertEqual(store.stats().writes, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flush_returns_when_the_disk_stays_full(self) -> None:
        files = FailingFileOps("write")
        store = self.store(files=files, retry_delay=30.0)
        store.save(pool_state(1))
        self.successResultOf(Deferred.fromCoroutine(store.flush()))
        self.assertEqual(store.stats().failures, 2)
        self.assertFalse(self.checkpoint.exists())

    def test_unencodable_snapshot_is_logged_not_raised(self) -> None:
        self.store().save(pool_state(1))
        store = self.store()
        with capturedLogs() as logged:
            store.save({"vms": {1, 2}})
        self.flushLoggedErrors(TypeError)
        [failed] = events_of(logged, "checkpoint-write-failed")
        self.assertIn("cannot hold a set", formatEvent(failed))
        self.assertEqual(self.on_disk()["state"], pool_state(1))

    def test_stopped_thread_pool_is_logged_not_raised(self) -> None:
        store = self.store(dispatch=raising_dispatch)
        with capturedLogs() as logged:
            store.save(pool_state(1))
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(events_of(logged, "checkpoint-write-failed")), 1)


class LoadTests(StoreTestCase):
    def load_corrupt(self, content: bytes) -> tuple[Any, list[Any]]:
        self.checkpoint.setContent(content)
        with capturedLogs() as logged:
            loaded = self.store().load()
        return loaded, events_of(logged, "checkpoint-corrupt")

    def assert_moved_aside(self, content: bytes, reason: str) -> None:
        loaded, [corrupt] = self.load_corrupt(content)
        self.assertIsNone(loaded)
        self.assertIn(reason, formatEvent(corrupt))
        self.assertFalse(self.checkpoint.exists())
        [aside] = self.leftovers()
        self.assertEqual(aside, "checkpoint.json.corrupt-20251009T085320Z")
        self.assertIn(aside, formatEvent(corrupt))
        self.assertEqual(self.directory.child(aside).getContent(), content)

    def test_garbage_is_moved_aside(self) -> None:
        self.assert_moved_aside(b"\x00\xffnot json", "not valid JSON")

    def test_truncated_checkpoint_is_moved_aside(self) -> None:
        whole = encode_checkpoint(pool_state(1, vms=50), T0)
        self.assert_moved_aside(whole[: len(whole) // 2], "not valid JSON")

    def test_empty_file_is_moved_aside(self) -> None:
        self.assert_moved_aside(b"", "not valid JSON")

    def test_unknown_schema_is_refused(self) -> None:
        content = json.dumps({"schema": 2, "written": T0, "state": {}}).encode()
        self.assert_moved_aside(content, "unknown schema 2 (this vmcloud reads 1)")

    def test_missing_schema_is_refused(self) -> None:
        self.assert_moved_aside(b'{"written": 1, "state": {}}', "no schema number")

    def test_envelope_without_state_is_refused(self) -> None:
        self.assert_moved_aside(b'{"schema": 1, "written": 1, "state": [1]}', "no 'state' object")

    def test_bare_state_without_envelope_is_refused(self) -> None:
        self.assert_moved_aside(b"[1, 2, 3]", "not an object")

    def test_corrupt_files_do_not_overwrite_each_other(self) -> None:
        self.load_corrupt(b"first")
        self.load_corrupt(b"second")
        self.assertEqual(
            [self.directory.child(name).getContent() for name in self.leftovers()], [b"first", b"second"]
        )

    def test_store_writes_again_after_a_corrupt_load(self) -> None:
        self.load_corrupt(b"{")
        store = self.store()
        store.save(pool_state(4))
        self.assertEqual(self.store().load(), pool_state(4))

    def test_leftover_temp_file_is_removed(self) -> None:
        self.store().save(pool_state(1))
        temp = self.directory.child("checkpoint.json.tmp")
        temp.setContent(b'{"schema":1,"written":1,"sta')
        with capturedLogs() as logged:
            self.assertEqual(self.store().load(), pool_state(1))
        self.assertFalse(temp.exists())
        self.assertEqual(len(events_of(logged, "checkpoint-temp-removed")), 1)

    def test_leftover_temp_file_without_checkpoint(self) -> None:
        self.directory.child("checkpoint.json.tmp").setContent(b"{")
        self.assertIsNone(self.store().load())
        self.assertEqual(self.leftovers(), [])

    def test_unreadable_checkpoint_raises_instead_of_starting_clean(self) -> None:
        """Starting clean would terminate every VM: an unreadable file stops the start instead."""
        self.checkpoint.makedirs()
        error = self.assertRaises(CheckpointUnreadableError, self.store().load)
        self.assertIn(self.checkpoint.path, str(error))
        self.assertTrue(self.checkpoint.isdir(), "an unreadable checkpoint must not be moved")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(), inner, max_size=6),
    max_leaves=40,
)


class EncodingTests(SynchronousTestCase):
    @settings(max_examples=100, deadline=None)
    @given(st.dictionaries(st.text(), json_values, max_size=6))
    def test_any_json_state_round_trips(self, state: dict[str, Any]) -> None:
        self.assertEqual(decode_checkpoint(encode_checkpoint(state, T0)), (T0, state))

    def test_large_containers_at_every_depth_round_trip(self) -> None:
        """The encoder splits large containers into pieces; the result is one valid document."""
        state = {
            "vms": {f"vm{i}": {"n": i, "tags": ["a"] * (i % 3)} for i in range(1500)},
            "deep": {"deeper": {"deepest": list(range(3000)), "tiny": []}},
            "mixed": [[], {}, [list(range(400))], *range(600)],
            "tuples": (1, (2, 3)),
        }
        self.assertEqual(decode_checkpoint(encode_checkpoint(state, 0))[1], json.loads(json.dumps(state)))

    @settings(max_examples=100, deadline=None)
    @given(st.dictionaries(st.text(), json_values, max_size=6), st.data())
    def test_encoded_records_anywhere_make_the_same_bytes(
        self, state: dict[str, Any], data: st.DataObject
    ) -> None:
        """Objects encoded in advance, at any depth and among any members, change no byte of the file."""

        def some_encoded(value: Any) -> Any:
            if isinstance(value, list):
                return [some_encoded(v) for v in value]
            if isinstance(value, dict):
                if data.draw(st.booleans()):
                    return EncodedRecord(value)
                return {k: some_encoded(v) for k, v in value.items()}
            return value

        mixed = {k: some_encoded(v) for k, v in state.items()}
        self.assertEqual(encode_checkpoint(mixed, T0), encode_checkpoint(state, T0))

    def test_a_pool_sized_list_of_records_is_joined_as_is(self) -> None:
        vms = [
            {"vmid": f"{i:04d}", "state": "FREE", "ips": ["10.0.0.1"], "since": i / 3} for i in range(3000)
        ]
        records = [EncodedRecord(vm) for vm in vms]
        state = {"vms": records, "deep": {"deeper": {"deepest": [*records[:300], {}, 1, *records[:2]]}}}
        plain = {"vms": vms, "deep": {"deeper": {"deepest": [*vms[:300], {}, 1, *vms[:2]]}}}
        self.assertEqual(encode_checkpoint(state, T0), encode_checkpoint(plain, T0))
        # Joined, not encoded again: a record's own bytes reach the file, spaces and all.
        spaced = EncodedRecord._assembled(b'{"vmid": "x"}')
        self.assertIn(
            b'"vms":[{"vmid": "x"},{"vmid":"0000"', encode_checkpoint({"vms": [spaced, *records]}, T0)
        )

    def test_non_string_keys_are_refused(self) -> None:
        self.assertRaises(TypeError, encode_checkpoint, {"vms": {7: "x"}}, 0)
        self.assertRaises(TypeError, encode_checkpoint, {"vms": {str(i): {} for i in range(300)} | {8: 1}}, 0)

    def test_nan_is_refused(self) -> None:
        self.assertRaises(ValueError, encode_checkpoint, {"load": float("nan")}, 0)

    def test_decode_reports_why(self) -> None:
        error = self.assertRaises(CorruptCheckpointError, decode_checkpoint, b'{"schema": true}')
        self.assertIn("unknown schema True", str(error))
