"""Shared fixtures: tiny random models of many architectures, a locally trained tokenizer, the embedded model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tokentrail.models import LoadedModel, from_objects

CORPUS = [
    "The capital of France is Paris. Once upon a time in a castle there lived a king.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Solve: 15 * 12 + 4 = 184. The square root of 144 is 12. import numpy as np",
    "All men are mortal. Socrates is a man. Therefore, Socrates is mortal.",
    "If John has 50 apples and gives 12 to Mary, he has 38 apples left.",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|user|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer():
    """A byte-level BPE trained here, so tests need no download; any unicode text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


def _common(vocab: int) -> dict:
    return {"vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
            "intermediate_size": 64, "max_position_embeddings": 128}


def tiny_config(arch: str, vocab: int = 320):
    """Small configs of real architectures; random weights, built locally."""
    import transformers as tf

    common = _common(vocab)
    if arch == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=2)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=2)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, num_key_value_heads=2, head_dim=8)
    if arch == "mistral":
        return tf.MistralConfig(**common, num_key_value_heads=2, sliding_window=None)
    if arch == "gemma":
        return tf.GemmaConfig(**common, num_key_value_heads=2, head_dim=8)
    if arch == "gemma2":
        return tf.Gemma2Config(**common, num_key_value_heads=2, head_dim=8, final_logit_softcapping=30.0,
                               sliding_window=16)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=8, sliding_window=16)
    if arch == "phi3":
        return tf.Phi3Config(**common, num_key_value_heads=2, pad_token_id=0)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=128)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**common, rotary_pct=0.5)
    if arch == "opt":
        return tf.OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            ffn_dim=64, max_position_embeddings=128, word_embed_proj_dim=32)
    raise KeyError(arch)


ARCHITECTURES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt"]


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at identity; perturb them so a skipped norm would show in the comparisons.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_loaded(tiny_tokenizer):
    cache: dict[str, LoadedModel] = {}

    def get(arch: str) -> LoadedModel:
        if arch not in cache:
            cache[arch] = from_objects(tiny_model(arch), tiny_tokenizer, name=f"tiny-{arch}")
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama saved as a local HF folder, as a user's fine-tuned model would be."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M-Instruct, loaded once; its dequantized weights are cached on disk."""
    from tokentrail.models import load_model

    return load_model("default")


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")


def traced_run(folder: Path, model_dir: Path, prompts: str, *options: str) -> Path:
    """`tokentrail trace` of `prompts` (a plain-text prompt file's content) by the model in `model_dir` into
    `folder/run`, as a user runs it; returns the run directory."""
    from tokentrail import cli

    (folder / "prompts.txt").write_text(prompts)
    assert cli.main(["trace", str(folder / "prompts.txt"), "--model", str(model_dir), "--out", str(folder / "run"),
                     "-q", *options]) == 0
    return folder / "run"
