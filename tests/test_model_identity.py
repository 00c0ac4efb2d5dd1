"""What a model is: its weights all load, and its fingerprint covers everything that changes the traced numbers.

A checkpoint with missing, unexpected or misshapen weights is refused in one line instead of traced with random
values; the fingerprint a store keeps covers the config and tokenizer files (chat template included) besides the
weights and dtype, so a changed tokenizer never reuses an old store; hub-cache files are hashed by their blob names.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tokenizer, tiny_config, tiny_model
from tokentrail.errors import ModelLoadError, StoreError
from tokentrail.models import fingerprint, load_model, resolve_source
from tokentrail.models import sources as models
from tokentrail.store import TraceStore

DROPPED = "model.layers.0.mlp.up_proj.weight"
PROMPTS = "# math\n2 + 2 =\n# story\nOnce upon a time\n"
TOKENTRAIL = Path(sys.executable).parent / "tokentrail"


def save_tiny(folder: Path, seed: int = 0) -> Path:
    tiny_model("llama", seed=seed).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def rewrite_weights(folder: Path, change) -> None:
    """Rewrite model.safetensors after `change` edits its tensors in place, as a damaged export would be."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def refusal(folder: Path) -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(folder))
    message = str(caught.value)
    assert "\n" not in message
    return message


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TOKENTRAIL), *args], check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


# --- no silent random weights --------------------------------------------------------------------------------

def test_missing_weight_is_refused(tmp_path):
    folder = save_tiny(tmp_path / "m")
    rewrite_weights(folder, lambda t: t.pop(DROPPED))
    assert refusal(folder) == (
        f"model {str(folder)!r} does not load completely: 1 missing weight ({DROPPED}); tokentrail refuses "
        "random or dropped weights"
    )


def test_many_missing_weights_name_three(tmp_path):
    folder = save_tiny(tmp_path / "m")
    dropped = sorted(name for name in tiny_model("llama").state_dict() if name.startswith("model.layers.1."))

    def drop(tensors):
        for name in dropped:
            tensors.pop(name)

    rewrite_weights(folder, drop)
    message = refusal(folder)
    assert f"{len(dropped)} missing weights ({', '.join(dropped[:3])}, and {len(dropped) - 3} more)" in message


def test_unexpected_weight_is_refused(tmp_path):
    folder = save_tiny(tmp_path / "m")
    rewrite_weights(folder, lambda t: t.__setitem__("model.extra.weight", torch.zeros(4)))
    assert refusal(folder) == (
        f"model {str(folder)!r} does not load completely: 1 unexpected (model.extra.weight); tokentrail refuses "
        "random or dropped weights"
    )


def test_misshapen_weight_is_refused_in_one_line(tmp_path):
    folder = save_tiny(tmp_path / "m")
    rewrite_weights(folder, lambda t: t.__setitem__(DROPPED, torch.zeros(3, 3)))
    assert refusal(folder) == (
        f"model {str(folder)!r} does not load completely: 1 of another shape ({DROPPED} is [3, 3] in the "
        "checkpoint, [64, 32] in the model); tokentrail refuses random or dropped weights"
    )


def test_tied_embeddings_are_not_missing(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    make_tokenizer().save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    loaded = load_model(str(tmp_path / "tied"))
    model = loaded.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_cli_refuses_a_damaged_checkpoint_and_stores_nothing(tmp_path):
    folder = save_tiny(tmp_path / "m")
    rewrite_weights(folder, lambda t: t.pop(DROPPED))
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    done = cli("trace", str(tmp_path / "prompts.txt"), "--model", str(folder), "--out", str(tmp_path / "run"), "-q")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [(
        f"error: model {str(folder)!r} does not load completely: 1 missing weight ({DROPPED}); tokentrail "
        "refuses random or dropped weights"
    )]
    # Nothing traced reaches the run: no shard, no run.json. (The store's manifest is created from the files-only
    # fingerprint before the model loads; runs.trace_run decides that, not model loading.)
    assert not list((tmp_path / "run").rglob("*.safetensors"))
    assert not (tmp_path / "run" / "run.json").exists()


# --- the fingerprint covers what changes the numbers ---------------------------------------------------------

def fp_of(folder: Path) -> dict:
    return fingerprint(resolve_source(str(folder)), "float32")


def test_fingerprint_separates_weights_config_and_tokenizer(tmp_path):
    folder = save_tiny(tmp_path / "m")
    base = fp_of(folder)
    assert all(len(base[key]) == 64 for key in ("weights_sha256", "config_sha256", "tokenizer_sha256"))

    template = folder / "chat_template.jinja"
    template.write_text(template.read_text() + "{# edited #}")
    chat = fp_of(folder)
    assert chat["tokenizer_sha256"] != base["tokenizer_sha256"]
    assert (chat["weights_sha256"], chat["config_sha256"]) == (base["weights_sha256"], base["config_sha256"])

    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["<|tool|>"])
    tokenizer.save_pretrained(folder)
    assert fp_of(folder)["tokenizer_sha256"] not in (base["tokenizer_sha256"], chat["tokenizer_sha256"])

    config = folder / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rms_norm_eps": 1e-3}))
    changed = fp_of(folder)
    assert changed["config_sha256"] != base["config_sha256"]
    assert changed["weights_sha256"] == base["weights_sha256"]


def test_gguf_config_and_tokenizer_are_in_its_hash(tmp_path):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    fp = fingerprint(resolve_source(str(gguf)), "float32")
    assert fp["kind"] == "gguf" and fp["config_sha256"] == fp["tokenizer_sha256"] == "in-gguf"
    assert fp["weights_sha256"] == hashlib.sha256(b"tiny.gguf" + hashlib.sha256(gguf.read_bytes()).hexdigest()
                                                  .encode()).hexdigest()


def fake_hub_cache(tmp_path: Path, source: Path, monkeypatch) -> Path:
    """A Hugging Face cache as huggingface_hub lays it out: snapshot files are symlinks into blobs/.

    LFS files (the weights) are named by their SHA-256, files kept in git by their git blob SHA-1.
    """
    hub = tmp_path / "hub"
    repo = hub / "models--someone--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot_dir = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for path in sorted(source.iterdir()):
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot_dir / path.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    return repo


def test_hub_cache_reuses_blob_hashes_and_reads_no_weights(tmp_path, monkeypatch):
    folder = save_tiny(tmp_path / "m")
    local = fp_of(folder)
    repo = fake_hub_cache(tmp_path, folder, monkeypatch)
    weight_blobs = {p.resolve() for p in repo.glob("snapshots/*/*.safetensors")}
    real_sha256 = models.file_sha256

    def no_weights(path):
        assert Path(path).resolve() not in weight_blobs, f"re-hashed weight file {path}"
        return real_sha256(path)

    monkeypatch.setattr(models, "file_sha256", no_weights)
    hub = fingerprint(resolve_source("someone/tiny-llama"), "float32")
    assert hub["kind"] == "hub"
    # An LFS blob's name is the SHA-256 of its content; git blobs are small and hashed, so the hashes agree.
    assert {k: hub[k] for k in ("weights_sha256", "config_sha256", "tokenizer_sha256")} == {
        k: local[k] for k in ("weights_sha256", "config_sha256", "tokenizer_sha256")}


def test_file_outside_a_hub_cache_is_hashed(tmp_path):
    folder = save_tiny(tmp_path / "m")
    (tmp_path / "blobs").mkdir()
    fake = "f" * 64
    shutil.move(folder / "model.safetensors", tmp_path / "blobs" / fake)
    (folder / "model.safetensors").symlink_to(tmp_path / "blobs" / fake)
    # No snapshots/ beside blobs/: not a hub cache, so the name proves nothing and the content is hashed.
    assert fp_of(folder)["weights_sha256"] == hashlib.sha256(
        b"model.safetensors" + models.file_sha256(tmp_path / "blobs" / fake).encode()).hexdigest()


# --- stores refuse what changed ------------------------------------------------------------------------------

def holding_one_trace(store: TraceStore) -> TraceStore:
    """The store with one traced prompt in it: an empty store has nothing to protect and takes any model."""
    from tokentrail.tracing import Trace

    store.add(Trace(prompt_ids=["p"], prompts=["p"], categories=["c"], labels=[""],
                    states=np.zeros((1, 2, 3), np.float32), final_states=np.zeros((1, 3), np.float32),
                    token_ids=[np.array([1])], tokens=[["p"]], next_token_ids=np.zeros((1, 1), np.int64),
                    next_token_probs=np.ones((1, 1), np.float32), next_tokens=[["q"]]))
    return store


def test_store_names_the_changed_part(tmp_path):
    fp = {"name": "m", "kind": "dir", "weights_sha256": "w", "config_sha256": "c", "tokenizer_sha256": "t",
          "dtype": "float32"}
    holding_one_trace(TraceStore.open(tmp_path / "s", model=fp, options={}))
    assert TraceStore.open(tmp_path / "s", model=dict(fp), options={}).header["model"] == fp
    with pytest.raises(StoreError, match=r"^\S+ holds traces of model 'm' made with another tokenizer; refusing to "
                                         r"mix them: use a new --out directory$"):
        TraceStore.open(tmp_path / "s", model={**fp, "tokenizer_sha256": "t2"}, options={})
    with pytest.raises(StoreError, match="made with another config and tokenizer; refusing to mix them"):
        TraceStore.open(tmp_path / "s", model={**fp, "config_sha256": "c2", "tokenizer_sha256": "t2"}, options={})


def test_store_without_the_new_fields_is_refused(tmp_path):
    old = {"name": "m", "kind": "dir", "weights_sha256": "w", "dtype": "float32"}
    holding_one_trace(TraceStore.open(tmp_path / "s", model=old, options={}))
    with pytest.raises(StoreError) as caught:
        TraceStore.open(tmp_path / "s", model={**old, "config_sha256": "c", "tokenizer_sha256": "t"}, options={})
    assert str(caught.value) == (
        f"{tmp_path / 's'} was traced before tokentrail fingerprinted the model's tokenizer and config, so it "
        "cannot show they are unchanged; refusing to mix them: trace into a new --out directory"
    )
    # In-memory models (from_objects) have neither field on either side: nothing to compare, nothing refused.
    TraceStore.open(tmp_path / "s", model=dict(old), options={})


def test_cli_refuses_a_store_traced_with_another_chat_template(tmp_path):
    folder = save_tiny(tmp_path / "m")
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    argv = ("trace", str(tmp_path / "prompts.txt"), "--model", str(folder), "--out", str(tmp_path / "run"), "--chat",
            "-q")
    first = cli(*argv)
    assert first.returncode == 0, first.stderr
    before = snapshot(tmp_path / "run")
    template = folder / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|assistant|>", "<|assistant|>\n"))
    again = cli(*argv)
    assert again.returncode == 2, again.stderr
    assert again.stderr.strip().splitlines() == [(
        f"error: {tmp_path / 'run' / 'store'} holds traces of model 'm' made with another tokenizer; refusing to "
        "mix them: use a new --out directory"
    )]
    assert snapshot(tmp_path / "run") == before


def test_an_empty_store_takes_another_model(tmp_path):
    """A store left without traces (a model that failed to load after it was made, a run stopped before its first
    shard) blocks no one: it takes the next model and options; one with a trace refuses them."""
    fp = {"name": "m", "kind": "dir", "weights_sha256": "w", "config_sha256": "c", "tokenizer_sha256": "t",
          "dtype": "float32"}
    other = {**fp, "name": "n", "weights_sha256": "w2"}
    TraceStore.open(tmp_path / "s", model=fp, options={"top_k": 5})
    taken = TraceStore.open(tmp_path / "s", model=other, options={"top_k": 3})
    assert taken.header["model"] == other and taken.header["options"] == {"top_k": 3}
    assert json.loads((tmp_path / "s" / "header.json").read_text())["model"] == other
    holding_one_trace(taken)
    with pytest.raises(StoreError, match="holds traces of model 'n'"):
        TraceStore.open(tmp_path / "s", model=fp, options={"top_k": 3})


def test_a_writer_never_adds_to_a_store_another_model_took(tmp_path):
    fp = {"name": "m", "kind": "dir", "weights_sha256": "w", "dtype": "float32"}
    first = TraceStore.open(tmp_path / "s", model=fp, options={})
    TraceStore.open(tmp_path / "s", model={**fp, "weights_sha256": "w2"}, options={})  # meanwhile, elsewhere
    with pytest.raises(StoreError, match="was taken for another model or other options while this run was tracing"):
        holding_one_trace(first)
    assert list((tmp_path / "s" / "shards").iterdir()) == []
