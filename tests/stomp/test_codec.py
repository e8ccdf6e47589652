"""The STOMP codec: every edge of STOMP.md §1, stomper's frames, and hypothesis properties."""

from __future__ import annotations

import gc
import random

import stomper
import stomper.stomp_10 as stomp_10
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from vmcloud.stomp.codec import (
    BODY_COMMANDS,
    HEARTBEAT,
    Decoder,
    Limits,
    ProtocolError,
    encode,
    encode_message,
)
from vmcloud.stomp.frame import Frame

DEFAULT_LIMITS = Limits()


def decode_all(data: bytes, version: str = "1.2", limits: Limits = DEFAULT_LIMITS) -> list[Frame]:
    """Feed ``data`` whole and one byte at a time; both must give the same frames."""
    whole = Decoder(limits)
    whole.version = version
    frames = whole.feed(data)
    bytewise = Decoder(limits)
    bytewise.version = version
    one_by_one: list[Frame] = []
    for i in range(len(data)):
        one_by_one.extend(bytewise.feed(data[i : i + 1]))
    assert frames == one_by_one, (frames, one_by_one)
    assert whole.buffered == bytewise.buffered
    return frames


def decode_error(data: bytes, version: str = "1.2", limits: Limits = DEFAULT_LIMITS) -> str:
    """The ProtocolError message for ``data``, fed whole and one byte at a time (both must fail)."""
    messages = []
    for chunk in (len(data), 1):
        decoder = Decoder(limits)
        decoder.version = version
        try:
            for i in range(0, len(data), chunk):
                decoder.feed(data[i : i + chunk])
        except ProtocolError as e:
            messages.append(e.message)
        else:
            raise AssertionError(f"no ProtocolError for {data!r} (chunk {chunk})")
    assert messages[0] == messages[1], messages
    return messages[0]


class FramingTests(SynchronousTestCase):
    def test_simple_frame(self) -> None:
        [frame] = decode_all(b"SEND\ndestination:/queue/a\n\nhello\x00")
        self.assertEqual(frame, Frame("SEND", {"destination": "/queue/a"}, b"hello"))

    def test_many_frames_in_one_read(self) -> None:
        data = b"SEND\ndestination:/q\n\none\x00SEND\ndestination:/q\n\ntwo\x00"
        self.assertEqual([f.body for f in decode_all(data)], [b"one", b"two"])

    def test_heartbeat_eols_between_frames_are_skipped(self) -> None:
        data = b"\n\r\n\nSEND\ndestination:/q\n\none\x00\n\n\r\nSEND\ndestination:/q\n\ntwo\x00\r\n"
        self.assertEqual([f.body for f in decode_all(data)], [b"one", b"two"])

    def test_heartbeats_alone_count_as_received_bytes(self) -> None:
        decoder = Decoder()
        self.assertEqual(decoder.feed(HEARTBEAT * 3), [])
        self.assertEqual(decoder.bytes_received, 3)
        self.assertEqual(decoder.buffered, 0)

    def test_nothing_of_a_finished_frame_stays_in_the_decoder(self) -> None:
        """A server keeps a decoder per idle connection: the last frame must not live on in it."""
        for data in (
            b"SEND\ndestination:/q\nx-long:" + b"v" * 500 + b"\n\nbody\x00",
            b"SEND\r\nx:1\r\n\r\n\x00",
        ):
            decoder = Decoder()
            [frame] = decoder.feed(data)
            held = gc.get_referents(decoder)
            self.assertFalse(any(ref is frame.headers or ref is frame.body for ref in held))
            self.assertFalse(any(isinstance(ref, dict) and ref for ref in held))

    def test_crlf_in_1_2(self) -> None:
        [frame] = decode_all(b"SEND\r\ndestination:/q\r\nreceipt:7\r\n\r\nbody\x00")
        self.assertEqual(frame, Frame("SEND", {"destination": "/q", "receipt": "7"}, b"body"))

    def test_crlf_blank_line_ends_headers_in_any_version(self) -> None:
        [frame] = decode_all(b"SEND\r\ndestination:/q\n\r\nbody\x00", version="1.1")
        self.assertEqual(frame.body, b"body")

    def test_nul_ends_a_frame_without_content_length(self) -> None:
        [frame] = decode_all(b"MESSAGE\nx:y\n\nline1\nline2\n\x00")
        self.assertEqual(frame.body, b"line1\nline2\n")

    def test_content_length_body_with_nul_bytes(self) -> None:
        body = b"a\x00b\x00\x00c"
        [frame] = decode_all(b"SEND\ndestination:/q\ncontent-length:6\n\n" + body + b"\x00")
        self.assertEqual(frame.body, body)

    def test_content_length_zero(self) -> None:
        [frame] = decode_all(b"SEND\ndestination:/q\ncontent-length:0\n\n\x00")
        self.assertEqual(frame.body, b"")

    def test_content_length_without_nul_after_body_is_an_error(self) -> None:
        message = decode_error(b"SEND\ndestination:/q\ncontent-length:2\n\nabc\x00")
        self.assertIn("content-length", message)

    def test_bad_content_length(self) -> None:
        for value in (b"-1", b"x", b"1.5", b""):
            message = decode_error(b"SEND\ncontent-length:" + value + b"\n\nabc\x00")
            self.assertIn("content-length", message)

    def test_header_split_at_first_colon(self) -> None:
        [frame] = decode_all(b"CONNECT\nlogin:a:b:c\n\n\x00")
        self.assertEqual(frame.headers, {"login": "a:b:c"})

    def test_first_repeated_header_wins(self) -> None:
        [frame] = decode_all(b"MESSAGE\nfoo:World\nfoo:Hello\n\n\x00")
        self.assertEqual(frame.headers, {"foo": "World"})

    def test_first_content_length_wins(self) -> None:
        [frame] = decode_all(b"SEND\ncontent-length:3\ncontent-length:1\n\na\x00c\x00")
        self.assertEqual(frame.body, b"a\x00c")

    def test_values_not_trimmed_in_1_1_and_1_2(self) -> None:
        for version in ("1.1", "1.2"):
            [frame] = decode_all(b"SEND\ndestination: /queue/a \n\n\x00", version=version)
            self.assertEqual(frame.headers["destination"], " /queue/a ")

    def test_values_trimmed_in_1_0(self) -> None:
        [frame] = decode_all(b"SEND\ndestination: /queue/a \n\n\x00", version="1.0")
        self.assertEqual(frame.headers["destination"], "/queue/a")

    def test_empty_value(self) -> None:
        [frame] = decode_all(b"SEND\npasscode:\n\n\x00")
        self.assertEqual(frame.headers, {"passcode": ""})

    def test_utf8_headers(self) -> None:
        [frame] = decode_all("SEND\nnom:héhé ✓\n\n\x00".encode())
        self.assertEqual(frame.headers["nom"], "héhé ✓")

    def test_not_utf8(self) -> None:
        self.assertIn("UTF-8", decode_error(b"SEND\nx:\xff\xfe\n\n\x00"))

    def test_header_without_colon(self) -> None:
        self.assertIn("colon", decode_error(b"SEND\ndestination\n\n\x00"))

    def test_header_with_empty_name(self) -> None:
        self.assertIn("colon", decode_error(b"SEND\n:value\n\n\x00"))

    def test_bare_cr_between_frames(self) -> None:
        self.assertIn("CR", decode_error(b"\rSEND\n\n\x00"))

    def test_nul_inside_header_line(self) -> None:
        self.assertIn("NUL", decode_error(b"SEND\ndesti\x00nation:/q\n\n\x00"))
        self.assertIn("NUL", decode_error(b"SEND\ndestination:/q\x00"))

    def test_stomper_disconnect_without_blank_line(self) -> None:
        frames = decode_all(b"DISCONNECT\nreceipt:r1\n\x00\nSEND\ndestination:/q\n\nx\x00")
        self.assertEqual(
            frames, [Frame("DISCONNECT", {"receipt": "r1"}), Frame("SEND", {"destination": "/q"}, b"x")]
        )

    def test_nul_right_after_command(self) -> None:
        self.assertEqual(decode_all(b"DISCONNECT\n\x00"), [Frame("DISCONNECT")])

    def test_partial_frame_is_held(self) -> None:
        decoder = Decoder()
        self.assertEqual(decoder.feed(b"SEND\ndestination:/q\n\nhal"), [])
        self.assertGreater(decoder.buffered, 0)
        self.assertEqual(decoder.feed(b"f\x00"), [Frame("SEND", {"destination": "/q"}, b"half")])
        self.assertEqual(decoder.buffered, 0)

    def test_hold_after_connect_lets_the_owner_set_the_version(self) -> None:
        decoder = Decoder(hold_after_connect=True)
        frames = decoder.feed(b"CONNECT\nlogin:a\n\n\x00SUBSCRIBE\ndestination: /queue/a\n\n\x00")
        self.assertEqual([f.command for f in frames], ["CONNECT"])
        decoder.version = "1.0"
        [subscribe] = decoder.feed(b"")
        self.assertEqual(subscribe.headers["destination"], "/queue/a")

    def test_large_body_without_content_length_across_reads(self) -> None:
        body = bytes(range(1, 256)) * 4000
        data = b"SEND\ndestination:/q\n\n" + body + b"\x00"
        decoder = Decoder()
        frames: list[Frame] = []
        for i in range(0, len(data), 4096):
            frames.extend(decoder.feed(data[i : i + 4096]))
        self.assertEqual([f.body for f in frames], [body])

    def test_header_line_cut_by_a_read_boundary(self) -> None:
        """CoilMQ's bug: a header line split between two recv() calls."""
        data = b"".join(
            encode(Frame("SEND", {"destination": "/queue/a", "n": str(i) * 50}, b"x" * 30))
            for i in range(200)
        )
        decoder = Decoder()
        frames: list[Frame] = []
        for i in range(0, len(data), 4096):
            frames.extend(decoder.feed(data[i : i + 4096]))
        self.assertEqual([f.headers["n"] for f in frames], [str(i) * 50 for i in range(200)])


class EscapingTests(SynchronousTestCase):
    def test_unescape_1_2(self) -> None:
        [frame] = decode_all(b"MESSAGE\na\\cb:x\\ny\\\\z\\r\\c\n\n\x00")
        self.assertEqual(frame.headers, {"a:b": "x\ny\\z\r:"})

    def test_1_1_has_no_cr_escape(self) -> None:
        self.assertIn("\\r", decode_error(b"MESSAGE\nx:a\\rb\n\n\x00", version="1.1"))
        [frame] = decode_all(b"MESSAGE\nx:a\\nb\\c\n\n\x00", version="1.1")
        self.assertEqual(frame.headers["x"], "a\nb:")

    def test_undefined_escape_is_fatal(self) -> None:
        self.assertIn("\\t", decode_error(b"SEND\nx:a\\tb\n\n\x00"))

    def test_lone_trailing_backslash_is_fatal(self) -> None:
        self.assertIn("backslash", decode_error(b"SEND\nx:ab\\\n\n\x00"))

    def test_1_0_never_unescapes(self) -> None:
        [frame] = decode_all(b"SEND\nx:a\\tb\\n\n\n\x00", version="1.0")
        self.assertEqual(frame.headers["x"], "a\\tb\\n")

    def test_connect_frames_are_never_unescaped(self) -> None:
        for command in (b"CONNECT", b"STOMP", b"CONNECTED"):
            [frame] = decode_all(command + b"\npasscode:a\\tb\\c\n\n\x00")
            self.assertEqual(frame.headers["passcode"], "a\\tb\\c")

    def test_encode_escapes_per_version(self) -> None:
        frame = Frame("MESSAGE", {"k:1": "a\nb\\c\r"})
        self.assertEqual(encode(frame, "1.2"), b"MESSAGE\nk\\c1:a\\nb\\\\c\\r\ncontent-length:0\n\n\x00")
        self.assertEqual(encode(frame, "1.1"), b"MESSAGE\nk\\c1:a\\nb\\\\c\r\ncontent-length:0\n\n\x00")

    def test_encode_never_escapes_connected(self) -> None:
        frame = Frame("CONNECTED", {"version": "1.2", "server": "vmcloud/1:x\\y"})
        self.assertEqual(encode(frame), b"CONNECTED\nversion:1.2\nserver:vmcloud/1:x\\y\n\n\x00")

    def test_encode_refuses_unrepresentable_headers(self) -> None:
        with self.assertRaises(ValueError):
            encode(Frame("MESSAGE", {"x": "a\nb"}), "1.0")
        with self.assertRaises(ValueError):
            encode(Frame("MESSAGE", {"a:b": "x"}), "1.0")
        with self.assertRaises(ValueError):
            encode(Frame("CONNECTED", {"x": "a\nb"}))
        with self.assertRaises(ValueError):
            encode(Frame("MESSAGE", {"": "x"}))
        with self.assertRaises(ValueError):
            encode(Frame("BAD\nCOMMAND"))


class EncodeTests(SynchronousTestCase):
    def test_content_length_added_and_replaced(self) -> None:
        data = encode(Frame("SEND", {"destination": "/q", "content-length": "99"}, b"a\x00b"))
        self.assertEqual(data, b"SEND\ndestination:/q\ncontent-length:3\n\na\x00b\x00")

    def test_no_content_length_on_frames_without_body(self) -> None:
        self.assertEqual(encode(Frame("RECEIPT", {"receipt-id": "1"})), b"RECEIPT\nreceipt-id:1\n\n\x00")

    def test_error_frame(self) -> None:
        data = encode(Frame("ERROR", {"message": "bad"}, b"details"))
        self.assertEqual(decode_all(data)[0].body, b"details")


class LimitTests(SynchronousTestCase):
    limits = Limits(max_headers=3, max_header_line=20, max_body=10)

    def test_header_count(self) -> None:
        ok = b"SEND\na:1\nb:2\nc:3\n\n\x00"
        self.assertEqual(len(decode_all(ok, limits=self.limits)), 1)
        message = decode_error(b"SEND\na:1\nb:2\nc:3\nd:4\n\n\x00", limits=self.limits)
        self.assertIn("more than 3 headers", message)

    def test_header_line_length(self) -> None:
        ok = b"SEND\na:" + b"x" * 18 + b"\r\n\n\x00"
        self.assertEqual(len(decode_all(ok, limits=self.limits)), 1)
        message = decode_error(b"SEND\na:" + b"x" * 19 + b"\n\n\x00", limits=self.limits)
        self.assertIn("longer than 20", message)

    def test_endless_header_line_fails_before_it_ends(self) -> None:
        decoder = Decoder(self.limits)
        decoder.feed(b"SEND\na:")
        with self.assertRaises(ProtocolError):
            decoder.feed(b"x" * 100)

    def test_long_command_line(self) -> None:
        self.assertIn("longer", decode_error(b"S" * 30 + b"\n\n\x00", limits=self.limits))

    def test_body_size_with_content_length(self) -> None:
        message = decode_error(b"SEND\ncontent-length:11\n\n" + b"x" * 11 + b"\x00", limits=self.limits)
        self.assertIn("larger than 10", message)

    def test_body_size_without_content_length_fails_before_nul(self) -> None:
        decoder = Decoder(self.limits)
        decoder.feed(b"SEND\n\n" + b"x" * 10)
        with self.assertRaises(ProtocolError) as caught:
            decoder.feed(b"x")
        self.assertIn("larger than 10", caught.exception.message)

    def test_body_at_limit(self) -> None:
        [frame] = decode_all(b"SEND\n\n" + b"x" * 10 + b"\x00", limits=self.limits)
        self.assertEqual(frame.body, b"x" * 10)


class StomperReplayTests(SynchronousTestCase):
    """What seed-001 agents built on stomper send must decode to what they meant."""

    def test_stomp_11_frames(self) -> None:
        data = (
            stomper.connect("user", "secret", "vm-host", (1000, 2000))
            + stomper.subscribe("/queue/vmcloud.guest.a", "1", "client-individual")
            + stomper.send("/queue/vmcloud.controller", "HELLO\nline two")
            + stomper.ack("m-1", "1")
            + stomper.nack("m-2", "1")
            + stomper.begin("t1")
            + stomper.commit("t1")
            + stomper.disconnect("bye")
        ).encode()
        frames = decode_all(data, version="1.1")
        self.assertEqual(
            [f.command for f in frames],
            ["CONNECT", "SUBSCRIBE", "SEND", "ACK", "NACK", "BEGIN", "COMMIT", "DISCONNECT"],
        )
        connect, subscribe, send, ack, _nack, _begin, _commit, disconnect = frames
        self.assertEqual(connect.headers["accept-version"], "1.1")
        self.assertEqual(connect.headers["heart-beat"], "1000,2000")
        self.assertEqual(connect.headers["passcode"], "secret")
        self.assertEqual(subscribe.headers["ack"], "client-individual")
        self.assertEqual(send.headers["destination"], "/queue/vmcloud.controller")
        self.assertEqual(send.body, b"HELLO\nline two")
        self.assertEqual(ack.headers, {"subscription": "1", "message-id": "m-1"})
        self.assertEqual(disconnect.headers, {"receipt": "bye"})

    def test_stomp_10_frames_with_space_after_colon(self) -> None:
        data = (stomp_10.subscribe("/queue/a") + stomp_10.send("/queue/a", "x") + stomp_10.ack("m1")).encode()
        subscribe, send, ack = decode_all(data, version="1.0")
        self.assertEqual(subscribe.headers, {"destination": "/queue/a", "ack": "auto"})
        self.assertEqual(send.headers["destination"], "/queue/a")
        self.assertEqual(ack.headers["message-id"], "m1")


# --------------------------------------------------------------------------- properties

header_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
names = header_text.filter(bool)
bodies = st.binary(max_size=200)
commands = st.sampled_from(["SEND", "MESSAGE", "ERROR", "SUBSCRIBE", "ACK", "RECEIPT", "BEGIN"])


@st.composite
def frames_for(draw: st.DrawFn, version: str) -> Frame:
    command = draw(commands)
    headers = draw(st.dictionaries(names, header_text, max_size=6))
    headers.pop("content-length", None)
    if version == "1.0":
        headers = {
            k: v.strip()
            for k, v in headers.items()
            if not any(c in k for c in ":\r\n") and not any(c in v for c in "\r\n")
        }
    return Frame(command, headers, draw(bodies))


def with_length(frame: Frame) -> Frame:
    if not frame.body and frame.command not in BODY_COMMANDS:
        return frame
    return Frame(frame.command, {**frame.headers, "content-length": str(len(frame.body))}, frame.body)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(st.data(), st.sampled_from(["1.0", "1.1", "1.2"]))
    def test_round_trip(self, data: st.DataObject, version: str) -> None:
        frame = data.draw(frames_for(version))
        decoder = Decoder()
        decoder.version = version
        self.assertEqual(decoder.feed(encode(frame, version)), [with_length(frame)])

    @settings(max_examples=100, deadline=None)
    @given(
        st.data(),
        st.sampled_from(["1.0", "1.1", "1.2"]),
        st.lists(st.sampled_from([b"", b"\n", b"\r\n", b"\n\n"]), min_size=1, max_size=8),
        st.randoms(use_true_random=False),
    )
    def test_whole_chunked_and_bytewise_agree(
        self, data: st.DataObject, version: str, gaps: list[bytes], rng: random.Random
    ) -> None:
        frames = [data.draw(frames_for(version)) for _ in gaps]
        stream = b"".join(gap + encode(f, version) for gap, f in zip(gaps, frames, strict=True))
        expected = [with_length(f) for f in frames]
        self.assertEqual(decode_all(stream, version), expected)
        decoder = Decoder()
        decoder.version = version
        got: list[Frame] = []
        i = 0
        while i < len(stream):
            step = rng.randint(1, 64)
            got.extend(decoder.feed(stream[i : i + step]))
            i += step
        self.assertEqual(got, expected)
        self.assertEqual(decoder.bytes_received, len(stream))


#: Pieces of header text on the wire: plain, escapes of every version, wrong escapes, odd bytes.
_pieces = ["a", "b", " ", ":", "\u00e9", "\\n", "\\c", "\\r", "\\\\", "\\t", "\\", "\r"]
_escaped_text = st.lists(st.sampled_from(_pieces[:8]) | st.sampled_from(_pieces), max_size=6).map("".join)
raw_header_text = st.builds(
    lambda name, value: f"{name}:{value}", _escaped_text, _escaped_text
) | st.sampled_from(["", "no-colon", ":no-name"])


@st.composite
def raw_header_blocks(draw: st.DrawFn) -> bytes:
    """Header blocks as a peer may write them, escapes right or wrong, content-length or not."""
    command = draw(st.sampled_from(["SEND", "MESSAGE", "CONNECT", "ACK"]))
    lines = draw(st.lists(raw_header_text, max_size=4))
    if draw(st.booleans()):
        length = "content-length:" + draw(st.sampled_from(["3", "x", " 3"]))
        lines.insert(draw(st.integers(0, len(lines))), length)
    return "\n".join([command, *lines]).encode("utf-8") + b"\n\nabc\x00"


class FastPathTests(SynchronousTestCase):
    """The decoder parses a fully buffered, plain header block in one go (fed whole) and line by
    line otherwise (fed byte by byte); both must give the same frames, or the same error."""

    @settings(max_examples=400, deadline=None)
    @given(raw_header_blocks(), st.sampled_from(["1.0", "1.1", "1.2"]))
    def test_fast_and_line_by_line_paths_agree(self, data: bytes, version: str) -> None:
        outcomes = []
        for chunk in (len(data), 1):
            decoder = Decoder()
            decoder.version = version
            frames: list[Frame] = []
            try:
                for i in range(0, len(data), chunk):
                    frames.extend(decoder.feed(data[i : i + chunk]))
            except ProtocolError as e:
                outcomes.append(("error", e.message))
            else:
                outcomes.append(("frames", [(f.command, list(f.headers.items()), f.body) for f in frames]))
        self.assertEqual(outcomes[0], outcomes[1])


def reference_encode(frame: Frame, version: str) -> bytes:
    """The encoder as first written, one header at a time: the fast encoder must match it."""
    escape_11 = str.maketrans({"\\": "\\\\", "\n": "\\n", ":": "\\c"})
    escape_12 = str.maketrans({"\\": "\\\\", "\n": "\\n", ":": "\\c", "\r": "\\r"})
    command = frame.command
    escaped = version != "1.0" and command not in ("CONNECT", "CONNECTED", "STOMP")
    table = escape_12 if version == "1.2" else escape_11
    body = frame.body
    with_length = bool(body) or command in BODY_COMMANDS
    parts = [command]
    for name, value in frame.headers.items():
        if not name:
            raise ValueError("empty header name")
        if with_length and name == "content-length":
            continue
        if escaped:
            name = name.translate(table)
            value = value.translate(table)
        else:
            if ":" in name or "\n" in name or "\r" in name:
                raise ValueError(f"header name {name!r} cannot travel unescaped")
            if "\n" in value or "\r" in value:
                raise ValueError(f"header {name!r} has a line break and cannot travel unescaped")
        if "\x00" in name or "\x00" in value:
            raise ValueError(f"header {name!r} contains NUL")
        parts.append(f"{name}:{value}")
    if with_length:
        parts.append(f"content-length:{len(body)}")
    parts.append("")
    parts.append("")
    return "\n".join(parts).encode("utf-8") + body + b"\x00"


any_header_text = st.text(st.sampled_from(list("ab:\\\n\r\x00c\u00e9")), max_size=8)


class EncodeFastPathTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(
        st.sampled_from(["SEND", "MESSAGE", "CONNECT", "CONNECTED", "ACK", "RECEIPT"]),
        st.dictionaries(any_header_text | st.just("content-length"), any_header_text, max_size=5),
        st.binary(max_size=4),
        st.sampled_from(["1.0", "1.1", "1.2"]),
    )
    def test_encode_matches_the_one_header_at_a_time_encoder(
        self, command: str, headers: dict[str, str], body: bytes, version: str
    ) -> None:
        outcomes = []
        for encoder in (encode, reference_encode):
            try:
                outcomes.append(encoder(Frame(command, headers, body), version))
            except ValueError as e:
                outcomes.append(str(e))
        self.assertEqual(outcomes[0], outcomes[1])

    @settings(max_examples=300, deadline=None)
    @given(
        any_header_text,
        any_header_text,
        any_header_text,
        st.dictionaries(
            any_header_text | st.sampled_from(["content-length", "destination"]), any_header_text, max_size=5
        ),
        st.binary(max_size=4),
        st.sampled_from(["1.0", "1.1", "1.2"]),
        st.none() | any_header_text,
        st.booleans(),
    )
    def test_encode_message_is_what_encode_writes(
        self,
        destination: str,
        message_id: str,
        subscription: str,
        headers: dict[str, str],
        body: bytes,
        version: str,
        ack: str | None,
        redelivered: bool,
    ) -> None:
        """The broker's fast path makes the bytes of the MESSAGE frame, or the same error."""
        fields = {"destination": destination, "message-id": message_id, "subscription": subscription}
        if ack is not None:
            fields["ack"] = ack
        if redelivered:
            fields["redelivered"] = "true"
        outcomes = []
        for make in (
            lambda: encode(Frame("MESSAGE", {**fields, **headers}, body), version),
            lambda: encode_message(
                destination,
                message_id,
                subscription,
                headers,
                body,
                version,
                ack=ack,
                redelivered=redelivered,
            ),
        ):
            try:
                outcomes.append(make())
            except ValueError as e:
                outcomes.append(str(e))
        self.assertEqual(outcomes[0], outcomes[1])
