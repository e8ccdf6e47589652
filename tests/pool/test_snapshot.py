"""The pool's snapshot as the checkpoint writes it: records encoded once, and the same bytes as ever.

``checkpoint_schema1.json`` was written from :func:`sample_state` by the encoder of before the
records were pre-encoded (commit 65d9521: a dict per record, the whole document encoded by the
store).  Files of that age must restore exactly as files written now.
"""

from __future__ import annotations

import gc
import math
import tracemalloc
from pathlib import Path
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.pool.fakes import CONFIG
from vmcloud.pool.interfaces import BatchOptions, Cookie
from vmcloud.pool.model import VM, LostVM, PoolSpec, VMState
from vmcloud.pool.snapshot import (
    EncodedRecord,
    SnapshotWriter,
    UnencodableRecordError,
    encode_json,
    handle_json,
    restore,
    snapshot,
)
from vmcloud.pool.state import PoolState
from vmcloud.store.checkpoint import decode_checkpoint, encode_checkpoint

OLD_FILE = Path(__file__).with_name("checkpoint_schema1.json")
WRITTEN = 1_760_000_100.5  # the time stamped in OLD_FILE
NOW = 1_760_000_000.25


def sample_state() -> PoolState:
    """A small pool with every kind of record and value a checkpoint holds; the same on every call."""
    state = PoolState("e1f2a3", PoolSpec(2, 6, 45_000), events_limit=4)
    cookies = (Cookie("sid", "v=1;x", domain="example.org", expires=1_760_086_400.5), Cookie("pref", "dark"))
    shop = state.add_batch(2, "https://example.org/shop?q=ä", BatchOptions(cookies, 1920, 1080, True), NOW)
    plain = state.add_batch(0, "http://intranet/", BatchOptions(), NOW + 1)
    state.cancel_batch(plain.id)

    def vm(n: int, kind: VMState, **fields: Any) -> VM:
        vmid = state.vmid_for(n)
        state.next_vmid = n + 1
        base: dict[str, Any] = {
            "server_id": f"srv-{n}",
            "booted_at": NOW - 300 + n,
            "login": f"vm-{vmid}",
            "passcode": f"pass-{n}",
            "identity": f"vm-{vmid}",
            "mac": f"fa:16:3e:00:00:{n:02x}",
            "ip": f"10.0.0.{n}",
            "macs": (f"fa:16:3e:00:00:{n:02x}",),
            "ips": (f"10.0.0.{n}", f"fd00::{n}"),
            "last_used": NOW - 60,
            "vnc_password": "Ab-9_xYz",
            "capabilities": ("browser", "vnc", "audio"),
        }
        return state.put(
            VM(vmid=vmid, state=kind, created_at=NOW - 400, version=n, since=NOW - n, **(base | fields))
        )

    vm(1, VMState.FREE)
    vm(2, VMState.READY, batch=shop.id)
    lent = vm(3, VMState.READY, batch=shop.id)
    vm(4, VMState.WAIT, batch=shop.id, recovering=True)
    vm(
        5,
        VMState.BOOTING,
        server_id=None,
        booted_at=None,
        login=None,
        passcode=None,
        identity=None,
        mac=None,
        ip=None,
        macs=(),
        ips=(),
        vnc_password=None,
        capabilities=(),
    )
    vm(6, VMState.ERROR, reason="guest said: «disk full» — 東京")

    busy = state.add_handle(shop.id, "tok-busy", NOW)
    state.assign(busy.token, lent.vmid, NOW + 2)
    for n in range(6):  # more than events_limit: the oldest are dropped and counted
        data = {"action": "page-load", "url": f"https://example.org/{n}", "title": "Zürich ✓", "n": n}
        state.add_event(busy.token, data | {"nested": {"list": [1, 2.5, None, True, "x"]}}, NOW + 3 + n)
    state.set_expiry(busy.token, NOW + 3600)
    gone = state.add_handle(shop.id, "tok-lost", NOW)
    state.handles[gone.token] = attrs.evolve(
        state.handles[gone.token], lost=LostVM("e1f2a3-9", "server gone from the cloud", NOW + 5)
    )
    state.add_handle(plain.id, "tok-waiting", NOW + 7)  # a pending lock
    state.next_vmid = 10
    return state


def encoded(data: Any) -> bytes:
    return encode_json(data).encode("ascii")


def file_of(state: PoolState, writer: SnapshotWriter | None = None) -> bytes:
    """The checkpoint file a controller at ``state`` writes now."""
    return encode_checkpoint((writer or SnapshotWriter()).snapshot(state), WRITTEN)


class FileFormatTests(SynchronousTestCase):
    def test_a_file_is_byte_for_byte_what_the_old_encoder_wrote(self) -> None:
        self.assertEqual(file_of(sample_state()), OLD_FILE.read_bytes())

    def test_old_and_new_files_restore_to_the_same_pool(self) -> None:
        old = restore(decode_checkpoint(OLD_FILE.read_bytes())[1], NOW + 10, CONFIG)
        new = restore(decode_checkpoint(file_of(sample_state()))[1], NOW + 10, CONFIG)
        in_memory = restore(SnapshotWriter().snapshot(sample_state()), NOW + 10, CONFIG)
        self.assertEqual(file_of(new), file_of(old))
        self.assertEqual(file_of(in_memory), file_of(old))
        self.assertTrue(old.vms["e1f2a3-3"].recovering)  # the recovery rules did run
        self.assertEqual([e.data.get("n") for e in old.handles["tok-busy"].events], [2, 3, 4, 5])

    def test_a_sessions_server_ports_survive_a_restart(self) -> None:
        state = sample_state()
        ready = state.vms[state.vmid_for(2)]
        state.put(attrs.evolve(ready, vnc_port=15900, audio_port=15901))
        back = restore(decode_checkpoint(file_of(state))[1], NOW + 10, CONFIG)
        self.assertEqual((back.vms[ready.vmid].vnc_port, back.vms[ready.vmid].audio_port), (15900, 15901))

    def test_records_are_json_objects_with_the_layout_of_their_kind(self) -> None:
        state = sample_state()
        data = SnapshotWriter().snapshot(state)
        busy = next(h for h in data["handles"] if h["token"] == "tok-busy")
        self.assertIsInstance(busy, EncodedRecord)
        self.assertEqual(busy.encoded, encoded(handle_json(state.handles["tok-busy"])))
        self.assertEqual(busy["events"]["dropped"], 3)
        self.assertEqual(data["vms"][5]["reason"], "guest said: «disk full» — 東京")
        self.assertEqual(data["pending"][0].decoded(), {"handle": "tok-lost", "batch": "1", "since": NOW})


class CacheTests(SynchronousTestCase):
    """A writer that lives as long as the pool gives the bytes a fresh writer would."""

    def assert_as_fresh(self, writer: SnapshotWriter, state: PoolState) -> None:
        self.assertEqual(file_of(state, writer), file_of(state))

    def test_every_kind_of_change_is_seen(self) -> None:
        state = sample_state()
        writer = SnapshotWriter()
        self.assert_as_fresh(writer, state)
        changes = [
            lambda: state.put(attrs.evolve(state.vms["e1f2a3-1"], state=VMState.READY, batch="1")),
            lambda: state.remove_vm("e1f2a3-6"),
            lambda: state.put(VM(vmid="e1f2a3-10", state=VMState.CREATING, created_at=NOW)),
            lambda: state.add_event("tok-busy", {"action": "page-load", "title": "ünïcode"}, NOW + 20),
            lambda: state.set_expiry("tok-busy", None),
            lambda: state.release_handle("tok-lost"),
            lambda: state.add_handle("2", "tok-new", NOW + 30),
            lambda: state.add_event("tok-new", {"action": "vm-assigned"}, NOW + 31),
            lambda: state.cancel_batch("1"),
            lambda: state.drop_batch("2"),
        ]
        for change in changes:
            change()
            self.assert_as_fresh(writer, state)

    def test_unchanged_records_are_reused_and_snapshots_never_change(self) -> None:
        state = sample_state()
        writer = SnapshotWriter()
        first = writer.snapshot(state)
        kept = file_of(state, writer)
        state.put(attrs.evolve(state.vms["e1f2a3-2"], version=99))
        state.add_event("tok-busy", {"action": "page-load"}, NOW + 20)
        second = writer.snapshot(state)
        self.assertIs(second["vms"][0], first["vms"][0])
        self.assertIsNot(second["vms"][1], first["vms"][1])
        self.assertIsNot(second["vms"], first["vms"])  # a fresh list: the store may still hold the first
        self.assertEqual(encode_checkpoint(first, WRITTEN), kept)  # the first is what it was

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.dictionaries(
                    st.text(max_size=5),
                    st.recursive(
                        st.none()
                        | st.booleans()
                        | st.integers()
                        | st.floats(allow_nan=False, allow_infinity=False)
                        | st.text(),
                        lambda inner: (
                            st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3)
                        ),
                        max_leaves=8,
                    ),
                    max_size=4,
                ),
                st.sampled_from(["expire", "lose", "snapshot"]),
            ),
            max_size=25,
        )
    )
    def test_a_handle_record_follows_its_event_log(self, steps: list[Any]) -> None:
        """Events are encoded one by one and cut off the front as the log drops them."""
        state = PoolState("p", PoolSpec(0, 1, 0), events_limit=3)
        state.add_batch(0, "http://example.org/", BatchOptions(), NOW)
        state.add_handle("1", "tok", NOW)
        writer = SnapshotWriter()
        for n, step in enumerate([*steps, "snapshot"]):
            if step == "expire":
                state.set_expiry("tok", NOW + n)
            elif step == "lose":
                state.handles["tok"] = attrs.evolve(state.handles["tok"], lost=LostVM("p-1", "gone", NOW + n))
            elif step == "snapshot":  # in between, any number of events may have come, and gone
                (record,) = writer.snapshot(state)["handles"]
                self.assertEqual(record.encoded, encoded(handle_json(state.handles["tok"])))
            else:
                state.add_event("tok", step, NOW + n * 0.5)

    def test_the_cache_costs_less_than_a_kilobyte_per_vm(self) -> None:
        """Each VM's JSON, kept as bytes (a dict per VM cost about 1.5 KB): the pool's memory budget."""
        state = PoolState("p", PoolSpec(0, 500, 0))
        vm = sample_state().vms["e1f2a3-1"]  # every field set
        for i in range(500):
            state.put(attrs.evolve(vm, vmid=f"p-{i}", server_id=f"srv-{i}", login=f"vm-p-{i}"))
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            writer = SnapshotWriter()
            writer.snapshot(state)
            gc.collect()
            per_vm = (tracemalloc.get_traced_memory()[0] - before) / 500
        finally:
            tracemalloc.stop()
        self.assertLess(per_vm, 1000)


class UnencodableTests(SynchronousTestCase):
    """The pool validates what it takes in; should something slip through, the error says where."""

    def test_a_value_json_cannot_say_names_its_record(self) -> None:
        state = sample_state()
        writer = SnapshotWriter()
        state.add_event("tok-busy", {"action": "x", "tags": {"a", "b"}}, NOW + 20)
        error = self.assertRaises(UnencodableRecordError, writer.snapshot, state)
        self.assertIn("handle 'tok-busy' cannot be checkpointed: a checkpoint cannot hold a set", str(error))
        state.add_event("tok-busy", {"action": "fine"}, NOW + 21)
        state.add_event("tok-busy", {"action": "fine"}, NOW + 22)
        state.add_event("tok-busy", {"action": "fine"}, NOW + 23)
        state.add_event("tok-busy", {"action": "fine"}, NOW + 24)  # the bad one is dropped
        self.assertEqual(file_of(state, writer), file_of(state))

    def test_nan_names_its_vm(self) -> None:
        state = sample_state()
        state.put(attrs.evolve(state.vms["e1f2a3-2"], since=math.nan))
        error = self.assertRaises(UnencodableRecordError, snapshot, state)
        self.assertIn("VM 'e1f2a3-2' cannot be checkpointed: Out of range float values", str(error))


class EncodedRecordTests(SynchronousTestCase):
    def test_reads_as_the_object_it_encodes(self) -> None:
        data = {"vmid": "p-1", "ips": ["10.0.0.1"], "since": 1.5, "lost": None, "name": "Zürich"}
        record = EncodedRecord(data)
        self.assertEqual(
            record.encoded, b'{"vmid":"p-1","ips":["10.0.0.1"],"since":1.5,"lost":null,"name":"Z\\u00fcrich"}'
        )
        self.assertEqual(dict(record), data)
        self.assertEqual(record["ips"], ["10.0.0.1"])
        self.assertEqual(record.get("missing"), None)
        self.assertEqual((len(record), list(record)), (5, list(data)))
        self.assertEqual(record, data)
        self.assertEqual(record, EncodedRecord(dict(reversed(data.items()))))
        self.assertNotEqual(record, EncodedRecord({**data, "since": 2.5}))
        self.assertIn("p-1", repr(record))

    def test_refuses_what_is_not_a_json_object(self) -> None:
        self.assertRaises(TypeError, EncodedRecord, ["a", "list"])
        self.assertRaises(ValueError, EncodedRecord, {"x": math.inf})
        self.assertRaises(TypeError, EncodedRecord, {"x": object()})
