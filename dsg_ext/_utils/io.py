"""Files read only when they are regular files (a FIFO or a device would block or never end), files
written whole or not at all, and their checksums (datasets, quantized models, reports)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from typing import Any, Type

from ..errors import DsgError, OutputError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_regular(path: str, error: Type[DsgError], what: str = "file", follow_links: bool = True) -> bytes:
    """The bytes of ``path``, refused with ``error`` (naming ``what`` and the problem) unless it is a
    regular file. It is opened without blocking and checked on the open descriptor, so a FIFO or a
    link to /dev/zero is refused at once instead of hanging; ``follow_links=False`` refuses symbolic
    links too (for names read from inside our own files, which must stay in their directory)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
        if os.path.islink(path):
            raise error(f"{what} {path} is a symbolic link; only regular files are read")
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as e:
        if os.path.isdir(path):
            raise error(f"{what} {path} is a directory, not a file") from None
        raise error(f"cannot open {what} {path}: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{what} {path} is {_kind(mode)}, not a regular file")
    with os.fdopen(fd, "rb") as f:
        os.set_blocking(fd, True)
        try:
            return f.read()
        except OSError as e:
            raise error(f"cannot read {what} {path}: {e.strerror or e}") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _probe_write(directory: str, what: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".dsg-write-test-", dir=directory)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"cannot write {what} in {directory}: {e.strerror or e}") from None


def check_output_file(path: str, what: str = "output file", force: bool = True) -> None:
    """Refuses, before any work, an output file that could not be written at the end: an empty
    name, a directory, a missing or unwritable parent directory, an existing file without ``force``."""
    if not path:
        raise OutputError(f"the {what} name is empty")
    if os.path.isdir(path):
        raise OutputError(f"{what} {path} is a directory; give a file name")
    if os.path.lexists(path) and not force:
        raise OutputError(f"{what} {path} exists; use force=True to replace it "
                          "(it is replaced only once the new file is complete)", parameter="force")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f"the directory of {what} {path} does not exist ({parent})")
    _probe_write(parent, what)


def check_output_dir(path: str, what: str = "output directory") -> None:
    """Refuses, creating nothing, an output directory that could not be made or written: an empty
    name, an existing file, a path below a file, a missing one whose nearest existing parent is not
    writable. An existing directory passes (whether it must be written is decided later)."""
    if not path:
        raise OutputError(f"the {what} name is empty")
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise OutputError(f"{what} {path} exists and is not a directory")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"cannot create {what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {what} {path}: {parent} is not writable")


def prepare_output_dir(path: str, what: str = "output directory", need_write: bool = True) -> None:
    """Creates ``path`` (and its parents) and checks it can be written; refuses an empty name, a
    file, a path below a file, a read-only or unwritable place, with the reason."""
    check_output_dir(path, what)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {what} {path}: {e.strerror or e}") from None
    if need_write:
        _probe_write(path, what)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path``, syncs it and renames it over ``path``: a
    reader (or a killed run) only ever sees the old file or the complete new one. Failing (a full
    disk, a read-only file system), it leaves the old file and raises OutputError."""
    try:
        _atomic_write(path, data)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
