"""TraceStore: traced prompts on disk, content-addressed, resumable, verified, and safe for many writers.

Layout of a store directory (format 2):

    header.json                      model fingerprint and trace options; written once, never grows
    shards/<sha>.safetensors         arrays of one traced batch; its prompt keys and token strings in its metadata
    shards/<sha>.json                the shard's sidecar: its keys, texts, size, full SHA-256 and shapes
    index.npz                        a cache of every shard's keys, rebuilt when shards appear or go
    quarantine/                      shards that failed their checksum or could not be parsed, set aside

A prompt's key is the SHA-256 of its text: one store holds one model and one set of trace options, so the text
alone decides whether a prompt was traced before.

Committing a shard writes new files only: the sidecar, then the shard, each to a temporary name, flushed and
renamed. The shard's rename is the commit, so any number of processes (Ray actors on several machines included)
commit at once without a lock, and a process killed at any moment leaves a store that opens and resumes. No file
grows with the store: opening it lists `shards/` and reads the sidecars of shards the index cache does not know.

Every read checks the shard's SHA-256 (its name is the first half of it) and that the keys inside the shard are
the ones looked up. Reads never delete: a shard that fails is reported; `trace` (the only command that writes)
moves it to `quarantine/` and traces its prompts again. A transient OS error (EIO, ESTALE, a timeout) is retried,
then reported, and nothing is removed. Stores of format 1 (one manifest.json listing every shard) open as they
are; the first trace into one writes sidecars and header.json beside it (new files only).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from tokentrail._version import __version__
from tokentrail.atomic import atomic_create_bytes, atomic_write_bytes, atomic_write_json
from tokentrail.core.trace import PromptNames, Trace
from tokentrail.errors import StoreError

if TYPE_CHECKING:
    from typing_extensions import Unpack  # in `typing` from Python 3.11

STORE_FORMAT = 2
HEADER_FILE = "header.json"
LEGACY_MANIFEST = "manifest.json"  # format 1: header and every shard's entry in one file
INDEX_CACHE = "index.npz"
SHARD_SUFFIX = ".safetensors"

# Errors a network filesystem raises for a moment and then not: retried, never taken to mean "damaged".
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.EBUSY})
READ_ATTEMPTS = 4
RETRY_DELAY_S = 0.05  # then x4 per attempt: 0.05, 0.2, 0.8 s


def prompt_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _digests(keys: Sequence[str]) -> np.ndarray:
    """Hex keys as a fixed-width byte array, the form the index sorts and searches. [n] S32"""
    return np.frombuffer(b"".join(bytes.fromhex(key) for key in keys), dtype="S32") if keys else np.zeros(0, "S32")


@dataclass
class _KeyIndex:
    """Where each prompt key lives: sorted keys with their shard and row. A key stored in several shards (two
    writers traced the same prompt) is read from the shard whose name sorts first, whatever the order of commits,
    so every reader of the same shards reads the same copy."""

    names: list[str]  # shard names, sorted
    keys: np.ndarray  # [n] S32, sorted, unique
    shard: np.ndarray  # [n] int32 index into names
    row: np.ndarray  # [n] int32 row in that shard

    @classmethod
    def _from_entries(cls, names: list[str], keys: np.ndarray, shard: np.ndarray, row: np.ndarray) -> _KeyIndex:
        by_shard = np.argsort(shard, kind="stable")  # names are sorted: shard order is name order
        order = by_shard[np.argsort(keys[by_shard], kind="stable")]
        keys, shard, row = keys[order], shard[order], row[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        return cls(names, keys[first], shard[first].astype(np.int32), row[first].astype(np.int32))

    @classmethod
    def build(cls, keys_by_shard: dict[str, list[str]]) -> _KeyIndex:
        return cls.empty().merged(keys_by_shard)

    @classmethod
    def empty(cls) -> _KeyIndex:
        return cls([], np.zeros(0, "S32"), np.zeros(0, np.int32), np.zeros(0, np.int32))

    def merged(self, keys_by_shard: dict[str, list[str]]) -> _KeyIndex:
        """This index with more shards in it: O(n log n) once, not per commit."""
        if not keys_by_shard:
            return self
        names = sorted(set(self.names) | set(keys_by_shard))
        rank = {name: i for i, name in enumerate(names)}
        remap = np.array([rank[name] for name in self.names], dtype=np.int32)
        added = sorted(keys_by_shard)
        counts = [len(keys_by_shard[name]) for name in added]
        keys = np.concatenate([self.keys, _digests([key for name in added for key in keys_by_shard[name]])])
        shard = np.concatenate([remap[self.shard] if len(self.shard) else self.shard,
                                np.repeat(np.array([rank[name] for name in added], np.int32), counts)])
        row = np.concatenate([self.row, *[np.arange(count, dtype=np.int32) for count in counts]])
        return self._from_entries(names, keys, shard, row)

    def locate(self, keys: Sequence[str]) -> tuple[np.ndarray, list[str | None], np.ndarray]:
        """(found, shard name, row) for each key; name None and row -1 where not found."""
        wanted = _digests(keys)
        if not len(self.keys):
            return np.zeros(len(wanted), dtype=bool), [None] * len(wanted), np.full(len(wanted), -1)
        at = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
        found = self.keys[at] == wanted
        names = [self.names[int(s)] if hit else None for s, hit in zip(self.shard[at], found)]
        return found, names, np.where(found, self.row[at], -1)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class TraceStore:
    root: Path
    header: dict[str, Any]
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"keys": [...] or None, "bytes": n}
    index: _KeyIndex = field(default_factory=_KeyIndex.empty)
    problems: list[str] = field(default_factory=list)
    writable: bool = False  # a handle opened to trace may set damaged shards aside and save the index cache
    _legacy: dict[str, Any] | None = None  # a format-1 manifest, while the store has no header.json
    _pending: dict[str, list[str]] = field(default_factory=dict)  # shards this handle committed, not yet indexed
    _cache_names: list[str] | None = None  # the shards the index cache on disk describes, as last read or written

    def _current(self) -> _KeyIndex:
        if self._pending:
            self.index, self._pending = self.index.merged(self._pending), {}
        return self.index

    # --- opening -------------------------------------------------------------------------------------------
    @staticmethod
    def exists(root: Path) -> bool:
        """Whether a store has been made at `root` (whatever it holds)."""
        root = Path(root)
        return (root / HEADER_FILE).is_file() or (root / LEGACY_MANIFEST).is_file()

    @property
    def shard_dir(self) -> Path:
        return self.root / "shards"

    @classmethod
    def open(cls, root: Path, model: dict[str, Any] | None = None, options: dict[str, Any] | None = None) -> TraceStore:
        """Open a store to read (no `model`), or to trace into with `model` and `options`, creating it if needed.

        A store made with another model or other trace options is refused rather than mixed: states of two
        models in one projection would be a wrong picture that looks right. One that holds no trace yet takes the
        given model and options: there is nothing in it to mix.
        """
        root = Path(root)
        writing = model is not None and options is not None
        if not cls.exists(root):
            if not writing:
                raise StoreError(f"{root}: no trace store here; run `tokentrail trace` or `tokentrail run` first")
            (root / "shards").mkdir(parents=True, exist_ok=True)
            # Created once: of two processes making the same store, the second finds the first's header.
            atomic_create_bytes(root / HEADER_FILE, _header_bytes(model, options))
        store = cls._read(root)
        if writing:
            store.writable = True
            if not store.shards and (store.header["model"], store.header["options"]) != (model, options):
                atomic_write_bytes(root / HEADER_FILE, _header_bytes(model, options))
                store = cls._read(root)
                store.writable = True
            store._check_compatible(model, options)
            if store._legacy is not None:
                store._migrate()
        return store

    @classmethod
    def _read(cls, root: Path) -> TraceStore:
        legacy = None
        if (root / HEADER_FILE).is_file():
            header = _read_json(root / HEADER_FILE, "the store header")
        else:
            legacy = _read_json(root / LEGACY_MANIFEST, "the store manifest")
            header = {k: legacy[k] for k in ("format", "tool_version", "model", "options") if k in legacy}
        if header.get("format") not in (1, STORE_FORMAT) or "model" not in header or "options" not in header:
            raise StoreError(f"{root}: store format {header.get('format')} is not one tokentrail reads; use a new --out")
        store = cls(root=root, header=header, _legacy=legacy)
        store._scan()
        return store

    def _check_compatible(self, model: dict[str, Any], options: dict[str, Any]) -> None:
        mine = self.header["model"]
        if (mine.get("weights_sha256"), mine.get("dtype")) != (model.get("weights_sha256"), model.get("dtype")):
            raise StoreError(
                f"{self.root} holds traces of model {mine.get('name')!r} ({mine.get('dtype')}), not "
                f"{model.get('name')!r} ({model.get('dtype')}); refusing to mix them: use a new --out directory"
            )
        # Same weights, but the config or tokenizer (chat template included) may still change every number.
        parts = {"config_sha256": "config", "tokenizer_sha256": "tokenizer"}
        if any(key in model and key not in mine for key in parts):
            # A store made before these were fingerprinted cannot show they are unchanged.
            raise StoreError(
                f"{self.root} was traced before tokentrail fingerprinted the model's tokenizer and config, so "
                "it cannot show they are unchanged; refusing to mix them: trace into a new --out directory"
            )
        differ = [label for key, label in parts.items() if mine.get(key) != model.get(key)]
        if differ:
            raise StoreError(
                f"{self.root} holds traces of model {mine.get('name')!r} made with another "
                f"{' and '.join(differ)}; refusing to mix them: use a new --out directory"
            )
        if self.header["options"] != options:
            changed = sorted(k for k in set(options) | set(self.header["options"])
                             if options.get(k) != self.header["options"].get(k))
            raise StoreError(
                f"{self.root} was traced with other options ({', '.join(changed)} differ); refusing to mix them: "
                "use a new --out directory"
            )

    def _migrate(self) -> None:
        """Format 1 to 2 by adding files only: a sidecar per listed shard, then header.json. The old manifest
        stays where it is (a format-1 reader still opens the store as it was)."""
        assert self._legacy is not None
        for name, entry in self._legacy.get("shards", {}).items():
            sidecar = self.shard_dir / _sidecar_name(name)
            if (self.shard_dir / name).is_file() and not sidecar.exists():
                atomic_write_json(sidecar, {"format": STORE_FORMAT, "keys": entry["keys"], "texts": entry.get("texts"),
                                            "sha256": entry["sha256"], "bytes": entry["bytes"],
                                            "n_layers": self._legacy.get("n_layers"),
                                            "hidden_size": self._legacy.get("hidden_size")})
        header = {**self.header, "format": STORE_FORMAT}
        atomic_create_bytes(self.root / HEADER_FILE, _json_bytes(header))
        self.header, self._legacy = _read_json(self.root / HEADER_FILE, "the store header"), None
        self.refresh()

    # --- the index -----------------------------------------------------------------------------------------
    def _listed(self) -> list[str]:
        """Names of the committed shards (a temporary file starts with a dot and is never one)."""
        if self._legacy is not None:  # format 1: the manifest is the list
            return sorted(self._legacy.get("shards", {}))
        try:
            entries = os.listdir(self.shard_dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"cannot list {self.shard_dir}: {exc.strerror}; nothing was changed") from None
        return sorted(name for name in entries if name.endswith(SHARD_SUFFIX) and not name.startswith("."))

    def _scan(self) -> None:
        """Index the committed shards: from the cache for the shards it knows, from sidecars for new ones."""
        names = self._listed()
        cached = self._load_cache()
        self._pending = {}  # every listed shard is indexed below, this handle's own commits included
        self._cache_names = cached[0] if cached is not None else None
        if cached is not None and set(cached[0]) <= set(names):
            self.shards = {name: {"keys": None, "bytes": size} for name, size in zip(cached[0], cached[1])}
            self.index = cached[2]
            self._shapes(cached[3])
        else:  # no cache, or it lists shards that are gone: rebuild from the sidecars
            self.shards, self.index = {}, _KeyIndex.empty()
        new: dict[str, list[str]] = {}
        for name in names:
            if name in self.shards:
                continue
            info = self._shard_info(name)
            if info is not None:
                self.shards[name] = {"keys": info["keys"], "bytes": int(info["bytes"])}
                new[name] = info["keys"]
                self._shapes(info)
        self.index = self.index.merged(new)

    def _shapes(self, info: dict[str, Any]) -> None:
        if info.get("n_layers") is not None and int(info["n_layers"]) >= 0:
            self.header.setdefault("n_layers", int(info["n_layers"]))
            self.header.setdefault("hidden_size", int(info["hidden_size"]))

    def refresh(self) -> None:
        """See the shards other processes committed since this handle was opened (and forget vanished ones).
        Costs one directory listing plus the sidecars of the new shards."""
        names = set(self._listed())
        if not set(self.shards) <= names:  # shards were set aside or removed: index anew
            self._scan()
            return
        for name in sorted(names - set(self.shards)):
            info = self._shard_info(name)
            if info is not None:
                self.shards[name] = {"keys": info["keys"], "bytes": int(info["bytes"])}
                self._pending[name] = info["keys"]
                self._shapes(info)

    def holds(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text is stored, without indexing this handle's own recent commits first (cheap enough to
        ask before every shard)."""
        keys = [prompt_key(text) for text in texts]
        found = self.index.locate(keys)[0]
        recent = {key for pending in self._pending.values() for key in pending}
        return [bool(hit) or key in recent for hit, key in zip(found, keys)]

    def _shard_info(self, name: str) -> dict[str, Any] | None:
        """A shard's keys, size and shapes: from its sidecar, else (format 1, or a lost sidecar) from the shard's
        own header. None, with a problem recorded, when neither can be read."""
        if self._legacy is not None:
            entry = self._legacy["shards"][name]
            return {"keys": list(entry["keys"]), "bytes": int(entry["bytes"]), "sha256": entry["sha256"],
                    "n_layers": self._legacy.get("n_layers"), "hidden_size": self._legacy.get("hidden_size")}
        sidecar = self.shard_dir / _sidecar_name(name)
        try:
            info = json.loads(_read_retrying(sidecar))
            if isinstance(info, dict) and isinstance(info.get("keys"), list):
                return info
        except (OSError, ValueError):
            pass  # read the shard's own header instead
        try:
            path = self.shard_dir / name
            with open(path, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                meta = _decode_metadata(json.loads(handle.read(length)))
            return {"keys": list(meta["keys"]), "bytes": path.stat().st_size, "n_layers": None, "hidden_size": None}
        except (OSError, ValueError, KeyError):
            self._problem(name, "cannot be parsed")
            return None

    def _load_cache(self) -> tuple[list[str], list[int], _KeyIndex, dict[str, int]] | None:
        path = self.root / INDEX_CACHE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                names = [str(name) for name in data["names"]]
                index = _KeyIndex(names, data["keys"].astype("S32"), data["shard"].astype(np.int32),
                                  data["row"].astype(np.int32))
                return names, [int(n) for n in data["bytes"]], index, {
                    "n_layers": int(data["n_layers"]), "hidden_size": int(data["hidden_size"])}
        except Exception:  # noqa: BLE001 - a damaged cache is only a cache: rebuilt from the sidecars, kept on disk
            return None

    def save_index(self) -> None:
        """Write the index cache (a writer's handle only), so the next open reads one file instead of every
        sidecar. Skipped when the cache already describes these shards."""
        if not self.writable or self._legacy is not None:
            return
        index = self._current()
        if self._cache_names == index.names:
            return
        names = index.names
        buffer_arrays = {
            "names": np.array(names, dtype=str),
            "bytes": np.array([int(self.shards[name]["bytes"]) for name in names], dtype=np.int64),
            "keys": index.keys, "shard": index.shard, "row": index.row,
            "n_layers": np.int64(self.header.get("n_layers", -1)),
            "hidden_size": np.int64(self.header.get("hidden_size", -1)),
        }
        from io import BytesIO

        buffer = BytesIO()
        np.savez(buffer, **buffer_arrays)
        atomic_write_bytes(self.root / INDEX_CACHE, buffer.getvalue())
        self._cache_names = list(names)

    def keys_by_shard(self) -> dict[str, list[str]]:
        """Every committed shard's prompt keys, duplicates across shards included (for audits and tests)."""
        return {name: list(self._keys_of(name)) for name in sorted(self.shards)}

    def _keys_of(self, name: str) -> list[str]:
        info = self.shards[name]
        if info.get("keys") is None:  # known from the cache only
            fresh = self._shard_info(name)
            info["keys"] = fresh["keys"] if fresh is not None else []
        return info["keys"]

    # --- reading -------------------------------------------------------------------------------------------
    def _shard_data(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The shard's arrays and metadata if it is there, whole and parseable; else None with a problem recorded.
        A transient OS error is retried and then raised as a StoreError: it never passes for a damaged shard."""
        path = self.shard_dir / name
        try:
            data = _read_retrying(path)
        except FileNotFoundError:
            self._problem(name, "is missing")
            return None
        except OSError as exc:
            raise StoreError(f"cannot read shard {path}: {(exc.strerror or str(exc)).lower()} after {READ_ATTEMPTS} "
                             "tries; nothing was removed: rerun when the filesystem recovers") from None
        if not name.startswith(hashlib.sha256(data).hexdigest()[:32]):
            self._problem(name, "failed its checksum")
            return None
        try:
            return load_safetensors(data), _decode_metadata(_safetensors_header(data))
        except Exception:  # noqa: BLE001 - whole (the checksum holds) but not a shard this version can read
            self._problem(name, "cannot be parsed")
            return None

    def _problem(self, name: str, what: str) -> None:
        # A writer sets the shard aside and traces its prompts again; a reader only says what it found.
        then = "; set aside in quarantine/, its prompts will be traced again" if self.writable else ""
        self.problems.append(f"shard {name} {what}{then}")

    def _set_aside(self, names: Sequence[str]) -> None:
        """Move damaged shards (and their sidecars) to quarantine/, so the next trace traces their prompts again.
        A read-only handle only reports them."""
        if not self.writable or not names:
            return
        quarantine = self.root / "quarantine"
        quarantine.mkdir(exist_ok=True)
        for name in names:
            for file in (name, _sidecar_name(name)):
                source = self.shard_dir / file
                if source.exists():
                    target = quarantine / file
                    if target.exists():
                        target = quarantine / f"{file}.{time.time_ns()}"
                    os.replace(source, target)
        self.refresh()

    def verify(self, texts: Sequence[str] | None = None) -> list[str]:
        """Check the shards holding `texts` (all when None): checksum, parse, and the keys inside each shard
        against the index. Returns the problems found; a writer's handle sets the bad shards aside."""
        return self._verify_keys([prompt_key(t) for t in texts] if texts is not None else None)

    def _verify_keys(self, keys: list[str] | None) -> list[str]:
        before = len(self.problems)
        bad = []
        for name, wanted in sorted(self._rows_by_shard(keys, allow_absent=True).items()):
            loaded = self._shard_data(name)
            if loaded is None or self._wrong_keys(name, loaded[1], wanted):
                bad.append(name)
        self._set_aside(bad)
        return self.problems[before:]

    def _wrong_keys(self, name: str, meta: dict[str, Any], wanted: list[tuple[int, int, str]]) -> bool:
        """Whether the shard holds other prompts at the rows the index names (a swapped or mislabelled shard)."""
        inside = meta.get("keys") or []
        for _, row, key in wanted:
            if row >= len(inside) or inside[row] != key:
                self._problem(name, f"holds another prompt at row {row} than its index says")
                return True
        return False

    def missing(self, texts: Sequence[str]) -> list[str]:
        """Texts not yet traced (after verifying the shards of the others), in first-seen order, unique."""
        keys = [prompt_key(t) for t in texts]
        self._verify_keys(keys)
        found, _, _ = self._current().locate(keys)
        seen: set[str] = set()
        out = []
        for text, present in zip(texts, found):
            if not present and text not in seen:
                seen.add(text)
                out.append(text)
        return out

    def __contains__(self, text: str) -> bool:
        return self.holds([text])[0]

    def __len__(self) -> int:
        return len(self._current())

    def _rows_by_shard(self, keys: Sequence[str] | None, allow_absent: bool = False,
                       ) -> dict[str, list[tuple[int, int, str]]]:
        """For each shard holding some of `keys` (all shards' prompts when None): (position in keys, row in the
        shard, key) triples, in key order."""
        index = self._current()
        if keys is None:
            keys = [self._keys_of(index.names[shard])[row] for shard, row in zip(index.shard, index.row)]
        found, names, rows = index.locate(keys)
        if not allow_absent and not found.all():
            absent = int((~found).sum())
            raise StoreError(f"{self.root}: {absent} prompt(s) not traced yet; run trace")
        by_shard: dict[str, list[tuple[int, int, str]]] = {}
        for position in np.flatnonzero(found):
            by_shard.setdefault(names[position], []).append((int(position), int(rows[position]), keys[position]))
        return by_shard

    def _read_for(self, name: str, wanted: list[tuple[int, int, str]]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """A shard's contents for a read that must not guess: refused with one line if it is not what was asked."""
        loaded = self._shard_data(name)
        if loaded is None or self._wrong_keys(name, loaded[1], wanted):
            raise StoreError(f"{self.root}: {self.problems[-1]}; rerun `tokentrail trace` on this run to set it aside "
                             "and trace those prompts again")
        return loaded

    def load(self, texts: Sequence[str], **names: Unpack[PromptNames]) -> Trace:
        """Assemble a Trace for `texts` from the shards, in the order given; `names` are `prompt_ids`, `categories`
        and `labels`, each one per text."""
        texts = list(texts)
        by_shard = self._rows_by_shard([prompt_key(t) for t in texts])
        n = len(texts)
        pieces: dict[str, Any] = {}
        lists: dict[str, list[Any]] = {k: [None] * n for k in ("token_ids", "tokens", "next_tokens", "lens_tokens",
                                                               "token_states")}
        for name, wanted in by_shard.items():
            arrays, meta = self._read_for(name, wanted)
            offsets = arrays["token_offsets"]
            for position, row, _ in wanted:
                for key in ("states", "final_states", "next_token_ids", "next_token_probs", "lens_token_ids",
                            "lens_probs"):
                    if key in arrays:
                        if key not in pieces:
                            pieces[key] = np.zeros((n, *arrays[key].shape[1:]), dtype=arrays[key].dtype)
                        pieces[key][position] = arrays[key][row]
                span = slice(int(offsets[row]), int(offsets[row + 1]))
                lists["token_ids"][position] = arrays["token_ids"][span].copy()
                if "token_states" in arrays:
                    lists["token_states"][position] = arrays["token_states"][span].copy()
                lists["tokens"][position] = meta["tokens"][row]
                lists["next_tokens"][position] = meta["next_tokens"][row]
                if meta.get("lens_tokens") is not None:
                    lists["lens_tokens"][position] = meta["lens_tokens"][row]
        has_lens = "lens_token_ids" in pieces
        every_token = n > 0 and all(states is not None for states in lists["token_states"])
        return Trace.assemble(
            texts,
            **names,
            states=pieces["states"],
            final_states=pieces["final_states"],
            token_ids=lists["token_ids"],
            tokens=lists["tokens"],
            next_token_ids=pieces["next_token_ids"],
            next_token_probs=pieces["next_token_probs"],
            next_tokens=lists["next_tokens"],
            lens_token_ids=pieces.get("lens_token_ids"),
            lens_probs=pieces.get("lens_probs"),
            lens_tokens=lists["lens_tokens"] if has_lens else None,
            token_states=lists["token_states"] if every_token else None,
            model={**self.header["model"], **{k: self.header[k] for k in ("n_layers", "hidden_size") if k in self.header}},
            options=dict(self.header["options"]),
        )

    def iter_shards(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray],
                                                                   dict[str, Any]]]:
        """`(positions, rows, arrays, metadata)` for each shard holding some of `texts`, one shard in memory at a
        time, each checked (checksum and keys) as it is read. `positions` index into `texts` (a text listed twice
        gets both), `rows` are the matching rows of the shard's arrays."""
        wanted = self._rows_by_shard([prompt_key(t) for t in texts])
        for name in sorted(wanted):
            arrays, meta = self._read_for(name, wanted[name])
            pairs = np.asarray([(position, row) for position, row, _ in wanted[name]], dtype=np.int64)
            yield pairs[:, 0], pairs[:, 1], arrays, meta

    def iter_states(
        self, texts: Sequence[str], batch_prompts: int = 4096
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`(positions, states, final_states)` of `texts`, shard by shard, for fits that must not hold them all.

        Batches hold about `batch_prompts` prompts, and only the last-token states are kept from each shard.
        """
        buffered: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        count = 0
        for positions, rows, arrays, _ in self.iter_shards(texts):
            if np.array_equal(rows, np.arange(len(arrays["states"]))):
                taken = (positions, arrays["states"], arrays["final_states"])
            else:
                taken = (positions, arrays["states"][rows], arrays["final_states"][rows])
            del arrays  # the generator's frame outlives each yield: hold no more than the states taken
            buffered.append(taken)
            del taken
            count += len(positions)
            if count >= batch_prompts:
                yield _join(buffered)
                buffered, count = [], 0
        if buffered:
            yield _join(buffered)

    # --- writing -------------------------------------------------------------------------------------------
    def add(self, batch: Trace) -> str:
        """Commit the traced prompts of `batch` as one shard; returns the shard name.

        Writes two new files (the sidecar, then the shard, whose rename is the commit) and rewrites nothing, so
        writers never wait for each other. The header on disk is checked first: a store another process took for
        another model meanwhile is refused.
        """
        on_disk = _read_json(self.root / HEADER_FILE, "the store header")
        if (on_disk.get("model"), on_disk.get("options")) != (self.header["model"], self.header["options"]):
            raise StoreError(f"{self.root} was taken for another model or other options while this run was "
                             "tracing; refusing to mix them: use a new --out directory")
        offsets = np.zeros(len(batch.prompts) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(ids) for ids in batch.token_ids])
        arrays: dict[str, np.ndarray] = {
            "states": np.ascontiguousarray(batch.states, dtype=np.float32),
            "final_states": np.ascontiguousarray(batch.final_states, dtype=np.float32),
            "next_token_ids": np.ascontiguousarray(batch.next_token_ids, dtype=np.int64),
            "next_token_probs": np.ascontiguousarray(batch.next_token_probs, dtype=np.float32),
            "token_ids": np.concatenate([np.asarray(ids, dtype=np.int64) for ids in batch.token_ids]),
            "token_offsets": offsets,
        }
        if batch.lens_token_ids is not None:
            arrays["lens_token_ids"] = np.ascontiguousarray(batch.lens_token_ids, dtype=np.int64)
            arrays["lens_probs"] = np.ascontiguousarray(batch.lens_probs, dtype=np.float32)
        if batch.token_states is not None:
            arrays["token_states"] = np.concatenate([np.asarray(s, dtype=np.float32) for s in batch.token_states])
        keys = [prompt_key(t) for t in batch.prompts]
        metadata = {
            "keys": json.dumps(keys),
            "texts": json.dumps(list(batch.prompts), ensure_ascii=False),
            "tokens": json.dumps(batch.tokens, ensure_ascii=False),
            "next_tokens": json.dumps(batch.next_tokens, ensure_ascii=False),
            "lens_tokens": json.dumps(batch.lens_tokens, ensure_ascii=False),
        }
        data = save_safetensors(arrays, metadata=metadata)
        digest = hashlib.sha256(data).hexdigest()
        name = digest[:32] + SHARD_SUFFIX
        n_layers, hidden = int(batch.states.shape[1] - 1), int(batch.states.shape[2])
        info = {"format": STORE_FORMAT, "keys": keys, "texts": list(batch.prompts), "sha256": digest,
                "bytes": len(data), "arrays": sorted(arrays), "n_layers": n_layers, "hidden_size": hidden,
                "tool_version": __version__}
        atomic_write_json(self.shard_dir / _sidecar_name(name), info)
        if not (self.shard_dir / name).is_file():
            atomic_write_bytes(self.shard_dir / name, data)  # the commit
        self.header.setdefault("n_layers", n_layers)
        self.header.setdefault("hidden_size", hidden)
        self.shards[name] = {"keys": keys, "bytes": len(data)}
        self._pending[name] = keys  # indexed at the next lookup: a commit costs the same at any store size
        return name

    def size_bytes(self) -> int:
        return sum(int(entry["bytes"]) for entry in self.shards.values())


def _sidecar_name(shard_name: str) -> str:
    return shard_name[: -len(SHARD_SUFFIX)] + ".json"


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _header_bytes(model: dict[str, Any], options: dict[str, Any]) -> bytes:
    return _json_bytes({"format": STORE_FORMAT, "tool_version": __version__, "model": model, "options": options})


def _read_retrying(path: Path) -> bytes:
    """A file's bytes, retrying the errors a network filesystem gives for a moment (EIO, ESTALE, timeouts)."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return path.read_bytes()
        except OSError as exc:
            if exc.errno not in TRANSIENT_ERRNOS or attempt == READ_ATTEMPTS - 1:
                raise
            time.sleep(RETRY_DELAY_S * 4**attempt)
    raise AssertionError("unreachable")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(_read_retrying(path))
    except FileNotFoundError:
        raise StoreError(f"{path.parent}: {what} {path.name} is missing; nothing was changed") from None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {(exc.strerror or str(exc)).lower()}; nothing was changed") from None
    except ValueError as exc:
        raise StoreError(f"{path} is unreadable ({exc}); nothing was changed: move the store away and trace "
                         "again") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path} is not {what}; nothing was changed: move the store away and trace again")
    return data


def _join(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(parts) == 1:
        return parts.pop()  # one shard: hand its arrays over instead of copying them
    joined = tuple(np.concatenate(column) for column in zip(*parts))
    parts.clear()
    return joined  # type: ignore[return-value]


def _safetensors_header(data: bytes) -> dict[str, Any]:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len])


def _decode_metadata(header: dict[str, Any]) -> dict[str, Any]:
    """Decode the JSON strings a shard keeps in its safetensors header."""
    return {key: json.loads(value) for key, value in header.get("__metadata__", {}).items()}
