"""Model loading from every kind of source, and part discovery across architectures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ARCHITECTURES, tiny_model
from tokentrail.errors import ArchitectureError, ModelLoadError
from tokentrail.models import cache_root, embedded_gguf_path, find_parts, load_model, resolve_source
from tokentrail.tracing import TraceOptions, Tracer

EXPECTED_PATHS = {
    "gpt2": ("transformer.h", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm"),
    "opt": ("model.decoder.layers", "model.decoder.final_layer_norm"),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_find_parts(arch):
    model = tiny_model(arch)
    parts = find_parts(model)
    assert parts.n_layers == 3
    blocks, norm = EXPECTED_PATHS.get(arch, ("model.layers", "model.norm"))
    assert (parts.blocks_path, parts.final_norm_path) == (blocks, norm)
    assert parts.unembed is model.get_output_embeddings()
    assert (parts.logit_softcap is not None) == (arch == "gemma2")


def test_unknown_architecture_names_what_was_looked_for():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2})()
            self.stack = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
            self.head = torch.nn.Linear(2, 5)

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(ArchitectureError, match="unsupported architecture Odd: looked for a ModuleList of 2"):
        find_parts(Odd())

    class Headless(Odd):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ArchitectureError, match="gives no \\[vocab, hidden\\] unembedding matrix"):
        find_parts(Headless())


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("TOKENTRAIL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "tokentrail"
    monkeypatch.setenv("TOKENTRAIL_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_local_directory_loads_and_traces(tiny_model_dir, tiny_loaded):
    loaded = load_model(str(tiny_model_dir))
    assert loaded.fingerprint["kind"] == "dir" and len(loaded.fingerprint["weights_sha256"]) == 64
    direct = Tracer(tiny_loaded("llama"), TraceOptions(logit_lens=False)).trace(["The capital of France is"])
    traced = Tracer(loaded, TraceOptions(logit_lens=False)).trace(["The capital of France is"])
    np.testing.assert_allclose(traced.states, direct.states, rtol=1e-5, atol=1e-6)


def test_hub_id_resolves_through_local_cache(tiny_model_dir, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = hub / "models--someone--tiny-llama" / "snapshots" / commit
    shutil.copytree(tiny_model_dir, snapshot)
    (hub / "models--someone--tiny-llama" / "refs").mkdir()
    (hub / "models--someone--tiny-llama" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    loaded = load_model("someone/tiny-llama")
    assert loaded.fingerprint["kind"] == "hub" and loaded.parts.n_layers == 3
    with pytest.raises(ModelLoadError, match="model 'someone/absent' is not in the local Hugging Face cache"):
        load_model("someone/absent")


def test_custom_code_refused_without_flag(tiny_model_dir, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text("raise SystemExit('custom code must not run')\n")
    with pytest.raises(ModelLoadError, match="ships custom code .auto_map or .py files.; refusing to load it: re-run with --trust-remote-code"):
        load_model(str(folder))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spec": "/no/such/dir"}, "unknown model '/no/such/dir'"),
        ({"spec": "missing.gguf"}, "GGUF file 'missing.gguf' not found"),
        ({"spec": "default", "dtype": "float8"}, "unknown dtype 'float8'"),
        ({"spec": "default", "device": "tpu"}, "unknown device 'tpu'"),
    ],
)
def test_bad_model_arguments(kwargs, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(**kwargs)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_source(str(tmp_path))


@pytest.mark.slow
def test_embedded_model_predicts_paris(embedded):
    assert embedded_gguf_path() is not None
    trace = Tracer(embedded, TraceOptions(top_k=3)).trace(["The capital of France is"])
    assert trace.next_tokens[0][0] == " Paris"
    assert trace.n_layers == 30 and trace.hidden_size == 576
    # The lens at the last raw layer is the model's own readout.
    assert trace.lens_tokens[0][30][0] == " Paris"


@pytest.mark.slow
def test_cached_weights_give_the_gguf_logits(embedded):
    """The safetensors cache must be the dequantized GGUF exactly, not an approximation of it."""
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = embedded.tokenizer("Once upon a time in a castle", return_tensors="pt")
    with torch.no_grad():
        cached_logits = embedded.model(**ids).logits
        direct_logits = direct(**ids).logits
    assert torch.equal(cached_logits, direct_logits)
    cache_dirs = list((cache_root() / "models").glob("smollm2-135m-*"))
    assert cache_dirs and (cache_dirs[0] / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((cache_dirs[0] / "config.json").read_text())


def test_embedded_missing_package_message(monkeypatch):
    from tokentrail.models import sources as models

    monkeypatch.setattr(models, "embedded_gguf_path", lambda name="smollm2-135m": None)
    with pytest.raises(ModelLoadError, match="embedded model 'smollm2-135m' is not installed; run `make setup`"):
        resolve_source("default")


def test_path_helpers_return_paths():
    path = embedded_gguf_path()
    assert path is None or isinstance(path, Path)
