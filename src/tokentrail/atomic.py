"""Atomic file writes: a reader (or a process killed mid-write) sees the old file or the whole new one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from tokentrail.errors import StoreError


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux), so threads never race."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    with atomic_writer(path) as handle:
        handle.write(data)


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: written under a temporary name beside it, flushed to disk and
    renamed over `path` when the block ends; removed, leaving `path` as it was, if the block fails.

    The file gets the permissions an ordinary `open(path, "w")` would give (0666 less the umask, so usually
    0644): mkstemp's private 0600 would hide results from the colleagues a run directory is shared with.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        with os.fdopen(handle, "w+b") as tmp:
            os.fchmod(tmp.fileno(), 0o666 & ~current_umask())
            yield tmp
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise


def nearest_existing(path: Path) -> Path | None:
    """`path` if it exists, else its nearest ancestor that does (None for a relative path none of whose
    ancestors exist)."""
    path = Path(path)
    return next((candidate for candidate in (path, *path.parents) if candidate.exists()), None)


def write_error(path: Path, exc: OSError) -> StoreError:
    """One line for an OS error while writing `path`: what is wrong with the place, not errno jargon."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"disk full while writing {path}; nothing stored was changed: free space and rerun to resume")
    if path.is_dir():
        return StoreError(f"cannot write {path}: it is a directory; give a file path")
    blocking = nearest_existing(path.parent)
    if blocking is not None and not blocking.is_dir():
        return StoreError(f"cannot write {path}: {blocking} is a file, not a directory")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"cannot write {path}: {exc.strerror.lower()}; choose a directory you can write to")
    return StoreError(f"cannot write {path}: {(exc.strerror or type(exc).__name__).lower()}")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def atomic_create_bytes(path: Path, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists; True if this call created it.

    The file is written whole under a temporary name and then hard-linked to `path`, which fails if `path`
    exists: of several processes creating the same file at once exactly one wins, and no reader ever sees it
    half-written.
    """
    path = Path(path)
    if path.exists():
        return False
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.new"
    atomic_write_bytes(tmp, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
