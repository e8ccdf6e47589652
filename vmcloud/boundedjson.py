"""JSON from strangers, parsed with a ceiling on its size and on how deeply it nests.

``json.loads`` recurses once per nesting level (in C, guarded by the interpreter's recursion
limit), so 30,000 ``[`` in a 60 KB request body end in a ``RecursionError`` rather than a
``ValueError``: a caller catching the usual parse errors lets it through as a crash, and the
parse still costs a deep stack.  :func:`loads` refuses such a text before parsing it, with a
:class:`JsonRefused` (a ``ValueError``, so callers' existing ``except ValueError`` holds), in one
quick pass over the text.

Generic on purpose (it imports nothing of vmcloud): the REST API parses request bodies with it
and the words parse guests' payloads with it, each with the size limit of its own channel.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

#: How deeply arrays and objects may nest.  Nothing vmcloud exchanges goes past 4 (a batch's
#: cookies: object > list > object > value); 32 leaves room for any honest document and keeps a
#: hostile one far from the interpreter's recursion limit (1,000).
MAX_DEPTH = 32

# A whole JSON string token, escapes included (the unrolled form keeps a long string one match).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Every byte but the four brackets, to delete; then each opener becomes +1, each closer -1.
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


class JsonRefused(ValueError):
    """A JSON text refused before parsing: larger or more deeply nested than allowed."""


def nesting_depth(data: bytes) -> int:
    """How deeply ``data``'s arrays and objects nest (brackets inside strings do not count).

    The deepest running count of open brackets from the start, as the parser would meet them;
    every step is a C loop (regex, translate, accumulate), so the check costs a fraction of what
    ``json.loads`` itself takes on the same bytes.
    Text that is not JSON gets some number back: the parser refuses it afterwards.
    """
    steps = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS).translate(_STEPS)
    return max(accumulate(memoryview(steps).cast("b")), default=0)


def loads(data: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(data)``, refused (:class:`JsonRefused`) when too large or too deeply nested.

    ``max_bytes`` counts bytes (the UTF-8 encoding of a ``str``).  Decoding errors and JSON syntax
    errors come out as ``json.loads`` raises them (``UnicodeDecodeError``, ``JSONDecodeError``:
    both ``ValueError``).
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise JsonRefused(f"JSON text of {len(raw)} bytes is larger than the limit of {max_bytes}")
    # A text with no more brackets than the limit cannot nest deeper: no scan for the usual case.
    if raw.count(b"[") + raw.count(b"{") > max_depth and nesting_depth(raw) > max_depth:
        raise JsonRefused(f"JSON nested deeper than {max_depth} levels")
    return json.loads(data)
