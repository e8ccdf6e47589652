"""The Ogg reader on a real ffmpeg Ogg/Opus stream, fed whole and in odd pieces."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from guest_agent.audio import encoder_argv
from vmcloud.console.ogg import CONTINUED, OggError, OggReader, OpusHead

FFMPEG = shutil.which("ffmpeg")


@pytest.fixture(scope="module")
def stream() -> bytes:
    if FFMPEG is None:
        pytest.skip("needs ffmpeg")
    # the guest's own encoder settings, with a second of sine instead of PulseAudio
    argv = encoder_argv(FFMPEG, b"audio.ogg", ("-f", "lavfi", "-i", "sine=frequency=440:duration=1"))
    return subprocess.run(argv, check=True, capture_output=True, timeout=30).stdout


def test_pages_headers_and_20ms_packets(stream: bytes) -> None:
    pages = OggReader().feed(stream)
    assert b"".join(p.raw for p in pages) == stream
    assert pages[0].first and pages[0].packets[0].startswith(b"OpusHead")
    head = OpusHead.parse(pages[0].packets[0])
    assert (head.channels, head.input_rate) == (2, 48000)
    assert pages[1].packets[0].startswith(b"OpusTags")
    audio = [packet for page in pages[2:] for packet in page.packets]
    assert 49 <= len(audio) <= 52  # one second in 20 ms frames
    assert {packet[0] >> 3 & 3 for packet in audio} == {3}  # TOC: every frame is 20 ms (RFC 6716 §3.1)


def test_any_chunking_gives_the_same_pages(stream: bytes) -> None:
    whole = [(p.raw, p.packets) for p in OggReader().feed(stream)]
    for size in (1, 7, 300, 4096):
        reader = OggReader()
        pieces = [p for i in range(0, len(stream), size) for p in reader.feed(stream[i : i + size])]
        assert [(p.raw, p.packets) for p in pieces] == whole


def _page(payload_lacing: list[int], data: bytes, header_type: int = 0) -> bytes:
    return (
        struct.pack("<4sBBqIIIB", b"OggS", 0, header_type, 0, 1, 0, 0, len(payload_lacing))
        + bytes(payload_lacing)
        + data
    )


def test_packets_spanning_pages_are_joined() -> None:
    first = _page([255], b"a" * 255)
    second = _page([10, 3], b"b" * 10 + b"ccc", CONTINUED)
    pages = OggReader().feed(first + second)
    assert pages[0].packets == ()
    assert pages[1].packets == (b"a" * 255 + b"b" * 10, b"ccc")


def test_a_lost_page_drops_the_unfinished_packet() -> None:
    reader = OggReader()
    reader.feed(_page([255], b"a" * 255))
    (page,) = reader.feed(_page([2], b"zz"))  # not continued: the half packet is gone
    assert page.packets == (b"zz",)


def test_not_ogg() -> None:
    with pytest.raises(OggError):
        OggReader().feed(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 40)
    with pytest.raises(OggError):
        OpusHead.parse(b"OpusTags\x00\x00")
