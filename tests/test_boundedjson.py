"""Bounded JSON: the nesting a parser would meet is measured exactly, and refused above the limit."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from vmcloud.boundedjson import MAX_DEPTH, JsonRefused, loads, nesting_depth

# Strings full of what a naive bracket counter would trip on.
TRICKY_TEXT = st.text(alphabet=st.sampled_from('[]{}"\\\n\u00e9\u2028 x'), max_size=12)
DOCUMENTS = st.recursive(
    st.none() | st.booleans() | st.integers() | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TRICKY_TEXT, inner, max_size=3),
    max_leaves=20,
)


def depth_of(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


def nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


class NestingDepthTests(SynchronousTestCase):
    @given(DOCUMENTS, st.booleans())
    def test_depth_is_the_documents_depth(self, document: Any, ascii_only: bool) -> None:
        text = json.dumps(document, ensure_ascii=ascii_only).encode("utf-8")
        self.assertEqual(nesting_depth(text), depth_of(document))
        self.assertEqual(loads(text, max_bytes=len(text)), document)

    def test_unbalanced_openers_count(self) -> None:
        self.assertEqual(nesting_depth(b'[{"a": [[[[['), 7)
        self.assertEqual(nesting_depth(b"]]]["), -1)


class LoadsTests(SynchronousTestCase):
    def test_the_issue_body_is_refused_not_a_recursion_error(self) -> None:
        """Issue #8: 30,000 '[' then 30,000 ']' was a RecursionError; now a ValueError saying why."""
        with self.assertRaises(JsonRefused) as caught:
            loads(nested(30_000), max_bytes=64 * 1024)
        self.assertIsInstance(caught.exception, ValueError)
        self.assertIn("deeper than 32", str(caught.exception))

    def test_unclosed_openers_are_refused_too(self) -> None:
        self.assertRaises(JsonRefused, loads, b"[" * 5000, max_bytes=64 * 1024)

    def test_the_limit_itself_is_allowed(self) -> None:
        self.assertEqual(depth_of(loads(nested(MAX_DEPTH), max_bytes=1000)), MAX_DEPTH)
        self.assertRaises(JsonRefused, loads, nested(MAX_DEPTH + 1), max_bytes=1000)
        self.assertEqual(loads(nested(3), max_bytes=1000, max_depth=3), [[[]]])

    def test_brackets_inside_strings_do_not_count(self) -> None:
        text = json.dumps({"out": "[" * 10_000 + '\\"[' + "{" * 10_000})
        self.assertEqual(loads(text, max_bytes=len(text)), json.loads(text))

    def test_size_is_counted_in_bytes(self) -> None:
        self.assertEqual(loads('"\u00e9\u00e9"', max_bytes=6), "\u00e9\u00e9")
        with self.assertRaises(JsonRefused) as caught:
            loads('"\u00e9\u00e9"', max_bytes=5)
        self.assertIn("larger than the limit of 5", str(caught.exception))

    def test_syntax_errors_stay_json_errors(self) -> None:
        self.assertRaises(json.JSONDecodeError, loads, b"[1,", max_bytes=100)
        self.assertRaises(UnicodeDecodeError, loads, b'"\xff"', max_bytes=100)
