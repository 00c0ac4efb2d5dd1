"""TraceStore: traced prompts on disk, content-addressed, resumable and verified.

Layout of a store directory:

    manifest.json          header (model fingerprint, trace options, shapes, tool version) + shard index
    shards/<sha>.safetensors  arrays of one traced batch of prompts; token strings in its metadata

A prompt's key is the SHA-256 of its text: one store holds one model and one set of trace options, so the text
alone decides whether a prompt was traced before. Every file is written to a temporary name, flushed and renamed,
and a shard is listed in the manifest only after it is complete, so a process killed at any moment leaves a
store that opens and resumes. Each shard's SHA-256 is kept in the manifest and checked on every read; a shard that
fails is reported, dropped and traced again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from tokentrail import __version__
from tokentrail.atomic import atomic_write_bytes, atomic_write_json
from tokentrail.errors import StoreError
from tokentrail.trace import Trace

STORE_FORMAT = 1


def prompt_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class TraceStore:
    root: Path
    header: dict[str, Any]
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    index: dict[str, tuple[str, int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    # --- opening -------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @classmethod
    def open(cls, root: Path, model: dict[str, Any] | None = None, options: dict[str, Any] | None = None) -> TraceStore:
        """Open a store; create it when `model` and `options` are given and none exists.

        A store made with another model or other trace options is refused rather than mixed: states of two
        models in one projection would be a wrong picture that looks right.
        """
        root = Path(root)
        manifest_path = root / "manifest.json"
        if not manifest_path.exists():
            if model is None or options is None:
                raise StoreError(f"{root}: no trace store here; run `tokentrail trace` or `tokentrail run` first")
            header = {"format": STORE_FORMAT, "tool_version": __version__, "model": model, "options": options}
            store = cls(root=root, header=header)
            (root / "shards").mkdir(parents=True, exist_ok=True)
            with store._locked():
                if not manifest_path.exists():
                    atomic_write_json(manifest_path, store._manifest())
            return cls._read(root)
        store = cls._read(root)
        if model is not None and options is not None:
            if not store.shards and (store.header["model"], store.header["options"]) != (model, options):
                store = cls._reheaded(root, model, options)
            store._check_compatible(model, options)
        return store

    @classmethod
    def _reheaded(cls, root: Path, model: dict[str, Any], options: dict[str, Any]) -> TraceStore:
        """A store that holds no trace yet (its model failed to load, or the run stopped before its first shard)
        takes the new model and options: there is nothing in it to mix, and the out directory stays usable."""
        with cls(root=root, header={})._locked():
            store = cls._read(root)
            if not store.shards:
                store.header = {"format": STORE_FORMAT, "tool_version": __version__, "model": model,
                                "options": options}
                atomic_write_json(root / "manifest.json", store._manifest())
        return cls._read(root)

    @classmethod
    def _read(cls, root: Path) -> TraceStore:
        try:
            manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"{root}/manifest.json is unreadable ({exc}); move the store away and trace again") from None
        if manifest.get("format") != STORE_FORMAT:
            raise StoreError(f"{root}: store format {manifest.get('format')} is not {STORE_FORMAT}; use a new --out")
        header = {k: manifest[k] for k in ("format", "tool_version", "model", "options")}
        header.update({k: manifest[k] for k in ("n_layers", "hidden_size") if k in manifest})
        store = cls(root=root, header=header, shards=manifest.get("shards", {}))
        store._rebuild_index()
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

    def _rebuild_index(self) -> None:
        self.index = {}
        for name in sorted(self.shards):
            for row, key in enumerate(self.shards[name]["keys"]):
                self.index.setdefault(key, (name, row))

    def _manifest(self) -> dict[str, Any]:
        return {**self.header, "shards": self.shards}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize manifest updates between processes writing into the same store."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # --- reading -------------------------------------------------------------------------------------------
    def _shard_bytes(self, name: str) -> bytes | None:
        """The shard's bytes if present and its checksum holds, else None (and a problem is recorded)."""
        path = self.root / "shards" / name
        try:
            data = path.read_bytes()
        except OSError:
            self.problems.append(f"shard {name} is missing; its prompts will be traced again")
            return None
        if hashlib.sha256(data).hexdigest() != self.shards[name]["sha256"]:
            self.problems.append(f"shard {name} failed its checksum; its prompts will be traced again")
            return None
        return data

    def _drop_shards(self, names: Sequence[str]) -> None:
        with self._locked():
            fresh = TraceStore._read(self.root)
            for name in names:
                fresh.shards.pop(name, None)
            atomic_write_json(self.manifest_path, fresh._manifest())
            for name in names:
                with contextlib.suppress(OSError):
                    (self.root / "shards" / name).unlink()
            self.shards = fresh.shards
        self._rebuild_index()

    def verify(self, texts: Sequence[str] | None = None) -> list[str]:
        """Check the shards holding `texts` (all when None); bad ones are dropped. Returns the problems found."""
        keys = None if texts is None else {prompt_key(t) for t in texts}
        names = sorted({name for key, (name, _) in self.index.items() if keys is None or key in keys})
        before = len(self.problems)
        bad = [name for name in names if self._shard_bytes(name) is None]
        if bad:
            self._drop_shards(bad)
        return self.problems[before:]

    def missing(self, texts: Sequence[str]) -> list[str]:
        """Texts not yet traced (after verifying the shards of the others), in first-seen order, unique."""
        self.verify(texts)
        seen: set[str] = set()
        out = []
        for text in texts:
            key = prompt_key(text)
            if key not in self.index and key not in seen:
                seen.add(key)
                out.append(text)
        return out

    def __contains__(self, text: str) -> bool:
        return prompt_key(text) in self.index

    def __len__(self) -> int:
        return len(self.index)

    def _rows_by_shard(self, texts: Sequence[str]) -> dict[str, list[tuple[int, int]]]:
        """For each shard holding some of `texts`: (position in texts, row in the shard) pairs, in text order."""
        by_shard: dict[str, list[tuple[int, int]]] = {}
        absent: list[str] = []
        for position, text in enumerate(texts):
            located = self.index.get(prompt_key(text))
            if located is None:
                absent.append(text)
            else:
                by_shard.setdefault(located[0], []).append((position, located[1]))
        if absent:
            raise StoreError(f"{self.root}: {len(absent)} prompt(s) not traced yet (e.g. {absent[0][:40]!r}); run trace")
        return by_shard

    def load(
        self,
        texts: Sequence[str],
        prompt_ids: Sequence[str] | None = None,
        categories: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
    ) -> Trace:
        """Assemble a Trace for `texts` from the shards, in the order given."""
        texts = list(texts)
        by_shard = self._rows_by_shard(texts)
        n = len(texts)
        pieces: dict[str, Any] = {}
        lists: dict[str, list[Any]] = {k: [None] * n for k in ("token_ids", "tokens", "next_tokens", "lens_tokens",
                                                               "token_states")}
        for name, wanted in by_shard.items():
            data = self._shard_bytes(name)
            if data is None:
                raise StoreError(f"{self.root}: {self.problems[-1]}; rerun trace to recompute it")
            arrays = load_safetensors(data)
            meta = _shard_metadata(data)
            offsets = arrays["token_offsets"]
            for position, row in wanted:
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
        return Trace(
            prompt_ids=list(prompt_ids) if prompt_ids is not None else [prompt_key(t)[:12] for t in texts],
            prompts=texts,
            categories=list(categories) if categories is not None else ["uncategorized"] * n,
            labels=list(labels) if labels is not None else [""] * n,
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
            token_states=lists["token_states"] if "token_states" in self._array_names() else None,
            model={**self.header["model"], **{k: self.header[k] for k in ("n_layers", "hidden_size") if k in self.header}},
            options=dict(self.header["options"]),
        )

    def _array_names(self) -> set[str]:
        names: set[str] = set()
        for entry in self.shards.values():
            names.update(entry.get("arrays", []))
        return names

    def iter_states(
        self, texts: Sequence[str], batch_prompts: int = 4096
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`(positions, states, final_states)` of `texts`, shard by shard, for fits that must not hold them all.

        `positions` index into `texts` (a text listed twice gets both positions); batches hold about
        `batch_prompts` prompts, each shard is read and checked once per pass, and only the last-token states
        are kept from it.
        """
        wanted = self._rows_by_shard(texts)
        buffered: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        count = 0
        for name in sorted(wanted):
            data = self._shard_bytes(name)
            if data is None:
                raise StoreError(f"{self.root}: {self.problems[-1]}; rerun trace to recompute it")
            arrays = load_safetensors(data)
            del data  # the generator's frame outlives each yield: hold no more than the states taken
            pairs = np.asarray(wanted[name], dtype=np.int64)
            rows = pairs[:, 1]
            if np.array_equal(rows, np.arange(len(arrays["states"]))):
                taken = (pairs[:, 0], arrays["states"], arrays["final_states"])
            else:
                taken = (pairs[:, 0], arrays["states"][rows], arrays["final_states"][rows])
            del arrays
            buffered.append(taken)
            del taken
            count += len(pairs)
            if count >= batch_prompts:
                yield _join(buffered)
                buffered, count = [], 0
        if buffered:
            yield _join(buffered)

    # --- writing -------------------------------------------------------------------------------------------
    def add(self, batch: Trace) -> str:
        """Write the traced prompts of `batch` as one shard and list it; returns the shard name."""
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
            "tokens": json.dumps(batch.tokens, ensure_ascii=False),
            "next_tokens": json.dumps(batch.next_tokens, ensure_ascii=False),
            "lens_tokens": json.dumps(batch.lens_tokens, ensure_ascii=False),
        }
        data = save_safetensors(arrays, metadata=metadata)
        name = hashlib.sha256(data).hexdigest()[:32] + ".safetensors"
        atomic_write_bytes(self.root / "shards" / name, data)
        entry = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "keys": keys,
            "texts": list(batch.prompts),
            "arrays": sorted(arrays),
        }
        with self._locked():
            fresh = TraceStore._read(self.root)
            if (fresh.header["model"], fresh.header["options"]) != (self.header["model"], self.header["options"]):
                # Another process took this (then empty) store for another model while this one traced.
                with contextlib.suppress(OSError):
                    (self.root / "shards" / name).unlink()
                raise StoreError(f"{self.root} was taken for another model or other options while this run was "
                                 "tracing; refusing to mix them: use a new --out directory")
            fresh.shards[name] = entry
            fresh.header.setdefault("n_layers", int(batch.states.shape[1] - 1))
            fresh.header.setdefault("hidden_size", int(batch.states.shape[2]))
            atomic_write_json(self.manifest_path, fresh._manifest())
            self.shards, self.header = fresh.shards, fresh.header
        self._rebuild_index()
        return name

    def size_bytes(self) -> int:
        return sum(int(entry["bytes"]) for entry in self.shards.values())


def _join(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(parts) == 1:
        return parts.pop()  # one shard: hand its arrays over instead of copying them
    joined = tuple(np.concatenate(column) for column in zip(*parts))
    parts.clear()
    return joined  # type: ignore[return-value]


def _shard_metadata(data: bytes) -> dict[str, Any]:
    """Decode the JSON strings a shard keeps in its safetensors header."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return {key: json.loads(value) for key, value in header.get("__metadata__", {}).items()}
