"""Files the controller copies to and from a guest (FILE_PUT / FILE_GET), confined to a work directory.

The controller names files by paths relative to the agent's work directory.  Whatever the path
says, nothing outside that directory is ever read or written: absolute paths, ``..`` components
and symbolic links that resolve outside the root are refused with :class:`FileRefused`, whose
``reason`` is meant to travel back to the controller as is.  Writes are atomic (a temporary file
in the same directory, fsync, rename), so a reader inside the guest never sees half a file, and a
failed write leaves the old file in place.  Sizes are bounded both ways by ``max_size``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat

from twisted.logger import Logger
from twisted.python.filepath import FilePath

MiB = 1024 * 1024

#: Mode of a new file when the request names none (umask is not consulted: the controller decides).
DEFAULT_MODE = 0o644

log = Logger()


class FileRefused(Exception):
    """A FILE_PUT or FILE_GET that the agent will not carry out; ``reason`` says why, for the peer."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FileStore:
    """Reads and writes files under ``root`` for the controller.

    ``root`` is created if missing.  Paths use ``/`` as separator; parent directories of a written
    file are created (mode 0755).  Symbolic links inside the root are followed as long as they
    stay inside it.
    """

    def __init__(self, root: FilePath[str], *, max_size: int = 64 * MiB) -> None:
        if max_size < 0:
            raise ValueError("max_size must be >= 0")
        self.max_size = max_size
        root.makedirs(ignoreExistingDirectory=True)
        self._root = os.path.realpath(root.path)

    @property
    def root(self) -> str:
        """The real (symlink-free) path of the work directory."""
        return self._root

    def put(self, path: str, data: bytes, mode: int | None = None) -> int:
        """Write ``data`` to ``path`` atomically; return the number of bytes written."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise FileRefused("file content must be bytes")
        if len(data) > self.max_size:
            raise self._refuse(path, f"file too large: {len(data)} bytes, the limit is {self.max_size}")
        if mode is None:
            mode = DEFAULT_MODE
        elif isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise self._refuse(path, f"bad file mode {mode!r}: expected an integer from 0 to 0o7777")
        parts = self._parts(path)
        parent = self._directory(parts[:-1], path, create=True)
        target = os.path.join(parent, parts[-1])
        if os.path.isdir(target):
            raise self._refuse(path, "a directory is in the way")
        if os.path.islink(target):
            # The rename below replaces the link itself; refuse only links that point out of the root.
            self._confined(os.path.realpath(target), path)
        temp = os.path.join(parent, f".{parts[-1]}.{secrets.token_hex(6)}.part")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, target)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise self._refuse(path, f"cannot write: {e.strerror}") from e
        with contextlib.suppress(OSError):
            dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        log.info("Wrote {size} bytes to {path}", size=len(data), path=path, event="file-put")
        return len(data)

    def get(self, path: str) -> bytes:
        """The content of the regular file at ``path``."""
        parts = self._parts(path)
        parent = self._directory(parts[:-1], path, create=False)
        target = self._confined(os.path.realpath(os.path.join(parent, parts[-1])), path)
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise self._refuse(path, "no such file") from None
        except OSError as e:
            raise self._refuse(path, f"cannot read: {e.strerror}") from e
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise self._refuse(path, "not a regular file")
            if info.st_size > self.max_size:
                raise self._refuse(
                    path, f"file too large: {info.st_size} bytes, the limit is {self.max_size}"
                )
            chunks: list[bytes] = []
            size = 0
            while size <= self.max_size:
                chunk = os.read(fd, min(1 * MiB, self.max_size + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except OSError as e:
            raise self._refuse(path, f"cannot read: {e.strerror}") from e
        finally:
            os.close(fd)
        if size > self.max_size:  # it grew while we read it
            raise self._refuse(path, f"file too large: more than {self.max_size} bytes")
        return b"".join(chunks)

    def _refuse(self, path: object, reason: str) -> FileRefused:
        log.warn("Refused file {path!r}: {reason}", path=path, reason=reason, event="file-refused")
        return FileRefused(reason)

    def _parts(self, path: object) -> list[str]:
        """The components of a relative path, or a refusal saying what is wrong with it."""
        if not isinstance(path, str) or not path:
            raise self._refuse(path, "the path must be a non-empty string")
        if "\0" in path:
            raise self._refuse(path, "the path contains a NUL character")
        if path.startswith("/") or path.startswith("\\"):
            raise self._refuse(
                path, "absolute paths are not allowed; paths are relative to the work directory"
            )
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self._refuse(path, "'..' is not allowed in paths")
        if not parts:
            raise self._refuse(path, "the path names the work directory itself, not a file")
        if len(path.encode("utf-8", "surrogateescape")) > 4096 or any(len(p) > 255 for p in parts):
            raise self._refuse(path, "the path is too long")
        return parts

    def _confined(self, real: str, path: str) -> str:
        if real != self._root and not real.startswith(self._root + os.sep):
            raise self._refuse(path, "the path leads outside the work directory (through a symbolic link)")
        return real

    def _directory(self, parts: list[str], path: str, *, create: bool) -> str:
        """The real path of the directory holding the file, checked (and created) one level at a time."""
        current = self._root
        for part in parts:
            real = self._confined(os.path.realpath(os.path.join(current, part)), path)
            if not os.path.isdir(real):
                if not create or os.path.lexists(os.path.join(current, part)):
                    raise self._refuse(path, f"{part!r} is not a directory" if create else "no such file")
                try:
                    os.mkdir(real, 0o755)
                except FileExistsError:
                    pass
                except OSError as e:
                    raise self._refuse(path, f"cannot create directory {part!r}: {e.strerror}") from e
                real = self._confined(os.path.realpath(real), path)
            current = real
        return current
