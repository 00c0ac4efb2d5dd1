"""Load a causal LM in eval mode with its tokenizer and discovered parts, refuse incomplete checkpoints, and
self-check it. GGUF weights are dequantized once and cached as safetensors, because dequantizing takes ~15 s and
reading the cached copy well under a second."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokentrail.errors import ModelLoadError, first_line
from tokentrail.models.parts import ModelParts, find_parts
from tokentrail.models.sources import (
    CACHE_FORMAT,
    ModelSource,
    auto_device_kind,
    cache_root,
    check_device_name,
    dtype_name,
    fingerprint,
    log,
    resolve_source,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    check_device_name(device)
    if device == "auto":
        return torch.device(auto_device_kind())
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("device 'mps' requested but MPS is not available; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: str | torch.device = "cpu", device_map: str | None = None) -> torch.dtype:
    return DTYPES[dtype_name(dtype, device, device_map)]


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

