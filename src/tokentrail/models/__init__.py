"""Models: which model a spec names (`sources`, torch-free), the parts tracing addresses (`parts`), and loading
with the self-check (`loading`).

A model is named by a spec: `default` (the embedded SmolLM2-135M-Instruct), a name from `embedded_models()`, a
`.gguf` file, a local directory saved by `save_pretrained`, or a Hugging Face hub id resolved through the local
HF cache.

Names are imported from their submodule on first use, so `from tokentrail.models import fingerprint` does not
import torch; `load_model` does.
"""

from __future__ import annotations

import importlib
from typing import Any

_SOURCES = ("DEFAULT_MODEL", "DTYPE_NAMES", "DTYPE_CHOICES", "DEVICES", "CACHE_FORMAT", "EmbeddedModel", "EMBEDDED",
            "cache_root", "file_sha256", "assembled_gguf_path", "embedded_installed", "embedded_gguf_path",
            "embedded_models", "dtype_name", "cpu_flags", "auto_dtype", "ModelSource", "resolve_source",
            "fingerprint")
_PARTS = ("ModelParts", "config_value", "text_config_of", "contains", "modules_around_blocks", "find_parts")
_LOADING = ("DTYPES", "LoadedModel", "resolve_device", "resolve_dtype", "load_model", "from_objects")
_WHERE = {**dict.fromkeys(_SOURCES, "sources"), **dict.fromkeys(_PARTS, "parts"),
          **dict.fromkeys(_LOADING, "loading")}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'tokentrail.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tokentrail.models.{_WHERE[name]}"), name)
