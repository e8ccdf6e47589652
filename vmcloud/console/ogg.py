"""Ogg pages and the Opus packets in them, read from a live stream (RFC 3533, RFC 7845); no I/O.

The audio relay needs three things from a guest's Ogg/Opus stream: the page boundaries (a late
listener of ``/audio/{handle}.ogg`` must start on a page, after the cached header pages), which
pages are headers (``OpusHead``, ``OpusTags``), and the Opus packets themselves (each one becomes a
WebSocket message for the page's WebCodecs decoder).  :class:`OggReader` gives all three, bytes in,
pages out.
"""

from __future__ import annotations

import struct

import attrs

CAPTURE = b"OggS"
#: header_type flags
CONTINUED = 0x01
FIRST = 0x02
LAST = 0x04
_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, type, granule, serial, sequence, crc, segments
#: A page is at most 27 + 255 + 255 * 255 bytes; a packet the relay keeps, at most this.
MAX_PACKET = 256 * 1024


class OggError(ValueError):
    """Not an Ogg stream (or a broken one): the capture must be restarted."""


@attrs.frozen
class OggPage:
    """One page: its bytes as they came, and the packets that end on it (continued ones joined)."""

    raw: bytes
    header_type: int
    granule: int
    serial: int
    sequence: int
    packets: tuple[bytes, ...]

    @property
    def first(self) -> bool:
        return bool(self.header_type & FIRST)


@attrs.frozen
class OpusHead:
    """The identification header (RFC 7845 §5.1): what a decoder must be configured with."""

    raw: bytes
    channels: int
    pre_skip: int
    input_rate: int

    @classmethod
    def parse(cls, packet: bytes) -> OpusHead:
        if len(packet) < 19 or not packet.startswith(b"OpusHead"):
            raise OggError("the stream's first packet is not an OpusHead")
        version, channels, pre_skip, rate = struct.unpack_from("<BBHI", packet, 8)
        if version >> 4 != 0 or channels == 0:
            raise OggError(f"unsupported OpusHead (version {version}, {channels} channels)")
        return cls(packet, channels, pre_skip, rate)


class OggReader:
    """Splits a byte stream into :class:`OggPage` s, whatever the chunks it arrives in."""

    __slots__ = ("_buffer", "_partial")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[OggPage]:
        self._buffer += data
        pages = []
        buf = self._buffer
        while len(buf) >= _HEADER.size:
            capture, version, header_type, granule, serial, sequence, _crc, count = _HEADER.unpack_from(buf)
            if capture != CAPTURE or version != 0:
                raise OggError(f"lost the Ogg page boundary (read {bytes(buf[:4])!r})")
            if len(buf) < _HEADER.size + count:
                break
            lacing = buf[_HEADER.size : _HEADER.size + count]
            size = _HEADER.size + count + sum(lacing)
            if len(buf) < size:
                break
            raw = bytes(buf[:size])
            del buf[:size]
            pages.append(
                OggPage(raw, header_type, granule, serial, sequence, self._packets(raw, count, header_type))
            )
        return pages

    def _packets(self, raw: bytes, count: int, header_type: int) -> tuple[bytes, ...]:
        if not header_type & CONTINUED:
            self._partial.clear()  # a packet left unfinished by a lost page is dropped
        packets = []
        offset = _HEADER.size + count
        for lace in raw[_HEADER.size : _HEADER.size + count]:
            self._partial += raw[offset : offset + lace]
            offset += lace
            if len(self._partial) > MAX_PACKET:
                raise OggError(f"an Ogg packet longer than {MAX_PACKET} bytes")
            if lace < 255:
                packets.append(bytes(self._partial))
                self._partial.clear()
        return tuple(packets)
