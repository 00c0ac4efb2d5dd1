"""The .npz writer every export uses: ZIP_STORED members with fixed timestamps, written one at a time, so that
the same arrays always give the same bytes and a member never has to be in memory whole."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from tokentrail.atomic import atomic_writer
from tokentrail.errors import TokentrailError

COPY_CHUNK_BYTES = 1024**2
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


class NpzWriter:
    """Members of an .npz written one at a time into an open binary file: ZIP_STORED, fixed timestamps, and
    the arrays' .npy bytes streamed, so a member never has to exist in memory whole."""

    def __init__(self, handle: BinaryIO) -> None:
        self._archive = zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._names: set[str] = set()

    def _member(self, name: str) -> BinaryIO:
        if name in self._names:
            raise ValueError(f"export array {name!r} written twice")
        self._names.add(name)
        info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_TIME)
        return self._archive.open(info, "w", force_zip64=True)  # type: ignore[return-value]

    def add(self, name: str, array: np.ndarray) -> None:
        if array.dtype == object:
            raise TokentrailError(f"export array {name!r} holds Python objects; that would need pickle")
        with self._member(name) as member:
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)

    def add_npy_file(self, name: str, path: Path) -> None:
        """Copy a finished .npy file into the archive as `name`, in chunks."""
        with self._member(name) as member, open(path, "rb") as source:
            shutil.copyfileobj(source, member, COPY_CHUNK_BYTES)

    def close(self) -> None:
        self._archive.close()


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Arrays held in memory as an .npz, atomically; the same arrays always give the same bytes."""
    path = Path(path)
    if path.suffix != ".npz":
        raise TokentrailError(f"export target {path} must end in .npz")
    with atomic_writer(path) as handle:
        writer = NpzWriter(handle)
        for name in sorted(arrays):
            writer.add(name, arrays[name])
        writer.close()
    return path


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz in memory, with the same fixed layout as every export."""
    buffer = io.BytesIO()
    writer = NpzWriter(buffer)
    for name in sorted(arrays):
        writer.add(name, arrays[name])
    writer.close()
    return buffer.getvalue()
