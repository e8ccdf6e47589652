"""FileStore: what FILE_PUT / FILE_GET may and may not touch on a guest."""

from __future__ import annotations

import os
import resource
import stat

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from guest_agent.files import FileRefused, FileStore


class FileStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = FilePath(self.mktemp())
        self.base.makedirs()
        self.root = self.base.child("work")
        self.store = FileStore(self.root, max_size=6 * 1024 * 1024)
        self.outside = self.base.child("secret")
        self.outside.setContent(b"top secret")

    def refused(self, call: object, *args: object) -> str:
        with self.assertRaises(FileRefused) as caught:
            call(*args)  # type: ignore[operator]
        return caught.exception.reason

    def test_binary_round_trip_5mb(self) -> None:
        """Every byte value, 5 MB, comes back identical and lands in the work directory."""
        data = os.urandom(5 * 1024 * 1024) + bytes(range(256)) + b"\0\r\n"
        self.assertEqual(self.store.put("in/deep/blob.bin", data, None), len(data))
        self.assertEqual(self.store.get("in/deep/blob.bin"), data)
        self.assertEqual(self.root.descendant(["in", "deep", "blob.bin"]).getContent(), data)

    def test_mode(self) -> None:
        self.store.put("run.sh", b"#!/bin/sh\n", 0o750)
        self.assertEqual(stat.S_IMODE(os.stat(self.root.child("run.sh").path).st_mode), 0o750)
        self.store.put("plain", b"x", None)
        self.assertEqual(stat.S_IMODE(os.stat(self.root.child("plain").path).st_mode), 0o644)
        self.assertIn("mode", self.refused(self.store.put, "m", b"x", 0o17777))
        self.assertIn("mode", self.refused(self.store.put, "m", b"x", -1))

    def test_overwrite_is_atomic_and_leaves_no_temp_files(self) -> None:
        self.store.put("a.txt", b"old", None)
        self.store.put("a.txt", b"new content", None)
        self.assertEqual(self.store.get("a.txt"), b"new content")
        self.assertEqual(sorted(os.listdir(self.root.path)), ["a.txt"])

    def test_failed_write_keeps_the_old_file(self) -> None:
        """A write that fails half way (here: the file size limit) leaves the old file and no debris."""
        self.store.put("d/a.txt", b"old", None)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
        try:
            reason = self.refused(self.store.put, "d/a.txt", b"n" * 200_000, None)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        self.assertIn("cannot write", reason)
        self.assertEqual(self.store.get("d/a.txt"), b"old")
        self.assertEqual(os.listdir(self.root.child("d").path), ["a.txt"])

    def test_escapes_are_refused(self) -> None:
        for bad in ["../secret", "a/../../secret", "/etc/passwd", "..", "", ".", "./", "a\0b"]:
            reason = self.refused(self.store.put, bad, b"x", None)
            self.assertTrue(reason, bad)
            self.refused(self.store.get, bad)
        self.assertEqual(self.outside.getContent(), b"top secret")
        self.assertIn("absolute", self.refused(self.store.get, "/etc/passwd"))
        self.assertIn("'..'", self.refused(self.store.get, "../secret"))

    def test_symlinks_out_of_the_root_are_refused(self) -> None:
        self.outside.linkTo(self.root.child("link-file"))
        self.base.linkTo(self.root.child("link-dir"))
        self.assertIn("outside", self.refused(self.store.get, "link-file"))
        self.assertIn("outside", self.refused(self.store.get, "link-dir/secret"))
        self.assertIn("outside", self.refused(self.store.put, "link-dir/secret", b"pwned", None))
        self.assertIn("outside", self.refused(self.store.put, "link-dir/new", b"pwned", None))
        self.assertIn("outside", self.refused(self.store.put, "link-file", b"pwned", None))
        self.assertEqual(self.outside.getContent(), b"top secret")
        self.assertFalse(self.base.child("new").exists())

    def test_symlinks_inside_the_root_work(self) -> None:
        self.store.put("real/file", b"inside", None)
        self.root.child("real").linkTo(self.root.child("alias"))
        self.assertEqual(self.store.get("alias/file"), b"inside")
        self.store.put("alias/other", b"2", None)
        self.assertEqual(self.root.descendant(["real", "other"]).getContent(), b"2")

    def test_size_limit_both_ways(self) -> None:
        small = FileStore(self.root, max_size=10)
        self.assertEqual(small.put("ok", b"0123456789", None), 10)
        self.assertIn("too large", self.refused(small.put, "big", b"01234567890", None))
        self.assertFalse(self.root.child("big").exists())
        self.root.child("big").setContent(b"x" * 11)
        self.assertIn("too large", self.refused(small.get, "big"))

    def test_missing_and_odd_files(self) -> None:
        self.assertEqual(self.refused(self.store.get, "nope"), "no such file")
        self.assertEqual(self.refused(self.store.get, "no/such/dir/file"), "no such file")
        self.root.child("dir").makedirs()
        self.assertEqual(self.refused(self.store.get, "dir"), "not a regular file")
        self.assertIn("directory", self.refused(self.store.put, "dir", b"x", None))
        os.mkfifo(self.root.child("fifo").path)
        self.assertEqual(self.refused(self.store.get, "fifo"), "not a regular file")
        self.store.put("file", b"x", None)
        self.assertIn("not a directory", self.refused(self.store.put, "file/below", b"x", None))

    def test_non_bytes_content_is_refused(self) -> None:
        self.refused(self.store.put, "a", "text", None)

    def test_root_is_created(self) -> None:
        self.assertTrue(self.root.isdir())
        self.assertEqual(self.store.root, os.path.realpath(self.root.path))
