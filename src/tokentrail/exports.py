"""Exports: a run's arrays as one .npz that loads with `np.load(path, allow_pickle=False)`, in bounded memory.

The store is read shard by shard; every array that grows with the store (states, lens, every token's states and
strings) is filled on disk through a temporary .npy beside the target (positioned writes, rows in the run's
order) and then copied into the archive in chunks, so an export needs about one shard in memory whatever the store holds. Arrays of one row per
prompt that the prompt set already holds in memory (ids, texts, categories, labels) are written directly.

Layout (P prompts, L blocks, H hidden size, k top tokens, T tokens over all prompts):

    states [P, L+1, H]  final_states [P, H]  layers [L+1]  prompts, prompt_ids, categories, labels [P]
    next_token_ids, next_token_probs, next_tokens [P, k]
    lens_token_ids, lens_probs, lens_tokens [P, L+1, k]           when the logit lens was traced
    token_offsets [P+1]  token_ids, tokens [T]                      prompt i's tokens: offsets[i]:offsets[i+1]
    token_states [T, L+1, H]                                        for a --position all run
    projection, projection_layers, explained_variance_ratio, depth_projection    the run's PCA (see below)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tokentrail.atomic import atomic_writer, write_error
from tokentrail.core.npz import NpzWriter
from tokentrail.errors import StoreError, TokentrailError

# The projection comes from the run's in-memory analysis (the same numbers `analyze` gives), which holds every
# prompt's states: it is added when the store is at most this big, else left to `tokentrail project`.
PROJECTION_MAX_STORE_BYTES = 2 * 1024**3


def _width(strings: Any) -> int:
    """Characters of the longest string in a nest of lists (at least 1: numpy has no zero-width strings)."""
    if isinstance(strings, str):
        return max(1, len(strings))
    return max((_width(item) for item in strings), default=1)


class _Column:
    """One array under construction as an .npy file, filled by positioned writes (rows in any order).

    Not a memory map: pages written through a map count in the process's resident set until the kernel writes
    them back, so an export of a big store would look (and be accounted) as big as the store."""

    def __init__(self, path: Path, dtype: Any, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        self.row_bytes = self.dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        with open(path, "wb") as handle:
            np.lib.format.write_array_header_2_0(handle, header)
            self.offset = handle.tell()
        self.fd = os.open(path, os.O_RDWR)
        # Reserve the blocks now: a full disk is an OSError here, not halfway through.
        os.posix_fallocate(self.fd, 0, self.offset + self.row_bytes * shape[0])

    def write(self, first_row: int, rows: Any) -> None:
        """Rows `first_row`, `first_row + 1`, ... from `rows` (anything numpy turns into them)."""
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        os.pwrite(self.fd, data.tobytes(), self.offset + first_row * self.row_bytes)

    def write_at(self, positions: np.ndarray, rows: Any) -> None:
        """`rows[i]` to row `positions[i]`, one write per run of consecutive positions."""
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        order = np.argsort(positions, kind="stable")
        positions, data = np.asarray(positions)[order], data[order]
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        for chunk, block in zip(np.split(positions, breaks), np.split(data, breaks)):
            self.write(int(chunk[0]), block)

    def close(self) -> None:
        os.close(self.fd)


class _Columns:
    """The arrays under construction, as .npy files in a temporary folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.arrays: dict[str, _Column] = {}

    def make(self, name: str, dtype: Any, shape: tuple[int, ...]) -> _Column:
        self.arrays[name] = _Column(self.folder / f"{name}.npy", dtype, shape)
        return self.arrays[name]

    def finish_into(self, writer: NpzWriter, names: Sequence[str]) -> None:
        for name in names:
            column = self.arrays.pop(name)
            column.close()
            writer.add_npy_file(name, column.path)
            column.path.unlink()


def export_run(run_dir: Path, to: Path, projection: bool | None = None) -> tuple[Path, list[str]]:
    """Write the run's arrays to `to` (.npz) reading the store shard by shard. Returns the path and notes for the
    user (e.g. why the projection was left out).

    `projection`: add the run's PCA (True), leave it out (False), or add it when the store is small enough for
    the in-memory analysis (None).
    """
    from tokentrail.runs import projection_extras, traced_run

    to = Path(to)
    if to.suffix != ".npz":
        raise TokentrailError(f"export target {to} must end in .npz")
    _, prompt_set, store = traced_run(run_dir, verify=False)  # each shard is checked as it is read
    notes: list[str] = []
    extra: dict[str, np.ndarray] = {}
    fits = store.size_bytes() <= PROJECTION_MAX_STORE_BYTES
    if projection or (projection is None and fits):
        extra = projection_extras(run_dir)
    elif projection is None:
        notes.append(f"the store holds {store.size_bytes() / 1024**3:.1f} GiB, more than the in-memory analysis "
                     "reads for the projection: it is left out; `tokentrail project` computes it shard by shard")
    texts = prompt_set.texts
    n = len(texts)
    # Pass 1: sizes, from the shards' own metadata and offsets (checked like every read).
    lengths = np.zeros(n, dtype=np.int64)
    widths = {"tokens": 1, "next_tokens": 1, "lens_tokens": 1}
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
    has_lens, every_token = False, True
    for positions, rows, arrays, meta in store.iter_shards(texts):
        offsets = arrays["token_offsets"]
        lengths[positions] = offsets[rows + 1] - offsets[rows]
        for key in ("states", "final_states", "next_token_ids", "next_token_probs", "lens_token_ids", "lens_probs"):
            if key in arrays:
                shapes[key] = (arrays[key].shape[1:], arrays[key].dtype)
        has_lens = has_lens or "lens_token_ids" in arrays
        every_token = every_token and "token_states" in arrays
        if "token_states" in arrays:
            shapes["token_states"] = (arrays["token_states"].shape[1:], arrays["token_states"].dtype)
        for key, width in widths.items():
            if meta.get(key) is not None:
                widths[key] = max(width, _width([meta[key][row] for row in rows]))
    token_offsets = np.zeros(n + 1, dtype=np.int64)
    token_offsets[1:] = np.cumsum(lengths)
    try:
        _write(to, run_dir, prompt_set, store, token_offsets, shapes, widths, has_lens, every_token, extra)
    except OSError as exc:  # the temporary columns beside the target: a full disk, a folder not writable
        raise write_error(to, exc) from None
    return to, notes


def _write(to: Path, run_dir: Path, prompt_set: Any, store: Any, token_offsets: np.ndarray,
           shapes: dict[str, tuple[tuple[int, ...], Any]], widths: dict[str, int], has_lens: bool,
           every_token: bool, extra: dict[str, np.ndarray]) -> None:
    texts = prompt_set.texts
    n = len(texts)
    total = int(token_offsets[-1])
    with tempfile.TemporaryDirectory(dir=to.parent if to.parent.is_dir() else None, prefix=".export-") as folder:
        columns = _Columns(Path(folder))
        try:
            per_prompt = [key for key in ("states", "final_states", "next_token_ids", "next_token_probs",
                                          "lens_token_ids", "lens_probs") if key in shapes]
            for key in per_prompt:
                columns.make(key, shapes[key][1], (n, *shapes[key][0]))
            k = shapes["next_token_ids"][0][0]
            columns.make("next_tokens", f"<U{widths['next_tokens']}", (n, k))
            if has_lens:
                columns.make("lens_tokens", f"<U{widths['lens_tokens']}", (n, *shapes["lens_token_ids"][0]))
            columns.make("token_ids", np.int64, (total,))
            columns.make("tokens", f"<U{widths['tokens']}", (total,))
            if every_token and "token_states" in shapes:
                columns.make("token_states", shapes["token_states"][1], (total, *shapes["token_states"][0]))
            # Pass 2: every row to its place, one shard in memory at a time.
            for positions, rows, arrays, meta in store.iter_shards(texts):
                for key in per_prompt:
                    columns.arrays[key].write_at(positions, arrays[key][rows])
                columns.arrays["next_tokens"].write_at(positions, [meta["next_tokens"][row] for row in rows])
                if has_lens:
                    columns.arrays["lens_tokens"].write_at(positions, [meta["lens_tokens"][row] for row in rows])
                offsets = arrays["token_offsets"]
                for position, row in zip(positions, rows):
                    start, end = token_offsets[position], token_offsets[position + 1]
                    span = slice(int(offsets[row]), int(offsets[row + 1]))
                    if end - start != span.stop - span.start:
                        raise StoreError(f"{run_dir}: a shard changed while it was exported; export again")
                    columns.arrays["token_ids"].write(int(start), arrays["token_ids"][span])
                    columns.arrays["tokens"].write(int(start), meta["tokens"][row])
                    if "token_states" in columns.arrays:
                        columns.arrays["token_states"].write(int(start), arrays["token_states"][span])
            n_layers = shapes["states"][0][0] - 1
            in_memory = {
                "layers": np.arange(n_layers + 1, dtype=np.int64),
                "prompts": np.array(texts, dtype=str),
                "prompt_ids": np.array(prompt_set.ids, dtype=str),
                "categories": np.array(prompt_set.categories, dtype=str),
                "labels": np.array(prompt_set.labels, dtype=str),
                "token_offsets": token_offsets,
                **extra,
            }
            with atomic_writer(to) as handle:
                writer = NpzWriter(handle)
                for name in sorted([*in_memory, *columns.arrays]):
                    if name in in_memory:
                        writer.add(name, in_memory[name])
                    else:
                        columns.finish_into(writer, [name])
                writer.close()
        finally:
            for column in columns.arrays.values():
                column.close()
