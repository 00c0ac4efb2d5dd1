"""Tracer checked against independent computations on tiny random models of every supported architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ARCHITECTURES
from tokentrail.errors import TokentrailError
from tokentrail.tracing import TraceOptions, Tracer

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "If John has 50 apples and gives 12 to Mary, he has",
    "Solve",
    "All men are mortal. Socrates is a man. Therefore,",
]


def reference(loaded, text: str):
    """Unpadded single-prompt forward with output_hidden_states and our own hook on the last block."""
    model = loaded.model
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    last_block_out = {}

    def hook(module, args, output):
        last_block_out["h"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    handle = loaded.parts.blocks[-1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        handle.remove()
    hidden = torch.stack(out.hidden_states, dim=1)[0]  # [L+1, T, H]; last entry is final-normed
    return hidden, last_block_out["h"][0], out.logits[0]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_states_match_output_hidden_states(tiny_loaded, arch):
    loaded = tiny_loaded(arch)
    trace = Tracer(loaded, TraceOptions(top_k=3), batch_size=3).trace(PROMPTS)
    L = loaded.parts.n_layers
    assert trace.states.shape == (len(PROMPTS), L + 1, loaded.model.config.get_text_config().hidden_size)
    for i, text in enumerate(PROMPTS):
        hidden, last_raw, logits = reference(loaded, text)
        np.testing.assert_allclose(trace.states[i, :L], hidden[:L, -1].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(trace.states[i, L], last_raw[-1].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(trace.final_states[i], hidden[L, -1].numpy(), rtol=1e-4, atol=1e-5)
        probs = torch.softmax(logits[-1], -1)
        top = probs.topk(3)
        assert trace.next_token_ids[i].tolist() == top.indices.tolist()
        np.testing.assert_allclose(trace.next_token_probs[i], top.values.numpy(), rtol=1e-4, atol=1e-6)
        # Lens parity: final norm + unembedding on the last block's raw output is the model's own readout.
        assert trace.lens_token_ids[i, L].tolist() == top.indices.tolist()
        np.testing.assert_allclose(trace.lens_probs[i, L], top.values.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_equals_unbatched(tiny_loaded, arch, padding_side):
    loaded = tiny_loaded(arch)
    one = Tracer(loaded, TraceOptions(logit_lens=False), batch_size=1).trace(PROMPTS)
    many = Tracer(loaded, TraceOptions(logit_lens=False), batch_size=5, padding_side=padding_side).trace(PROMPTS)
    scale = np.abs(one.states).max(axis=-1, keepdims=True)
    assert np.max(np.abs(many.states - one.states) / scale) < 1e-4
    np.testing.assert_allclose(many.final_states, one.final_states, rtol=1e-4, atol=1e-5)
    assert (many.next_token_ids == one.next_token_ids).all()


def hook_count(model) -> int:
    # transformers may keep hooks of its own; ours must leave the count where it was
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_and_model_unchanged(tiny_loaded):
    loaded = tiny_loaded("llama")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    hooks_before = hook_count(loaded.model)
    Tracer(loaded).trace(PROMPTS)
    assert hook_count(loaded.model) == hooks_before
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_hooks_removed_on_error(tiny_loaded, monkeypatch):
    loaded = tiny_loaded("gpt2")
    tracer = Tracer(loaded)
    hooks_before = hook_count(loaded.model)

    def boom(*args, **kwargs):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(loaded.model, "forward", boom)
    with pytest.raises(RuntimeError):
        tracer.trace(PROMPTS[:2])
    monkeypatch.undo()
    assert hook_count(loaded.model) == hooks_before


@pytest.mark.parametrize("position", [0, 2, -2])
def test_index_positions(tiny_loaded, position):
    loaded = tiny_loaded("qwen3")
    trace = Tracer(loaded, TraceOptions(position=str(position), logit_lens=False), batch_size=4).trace(PROMPTS)
    L = loaded.parts.n_layers
    for i, text in enumerate(PROMPTS):
        hidden, last_raw, _ = reference(loaded, text)
        if not -hidden.shape[1] <= position < hidden.shape[1]:
            continue
        np.testing.assert_allclose(trace.states[i, :L], hidden[:L, position].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(trace.states[i, L], last_raw[position].numpy(), rtol=1e-4, atol=1e-5)


def test_position_outside_prompt_is_an_error(tiny_loaded):
    with pytest.raises(TokentrailError, match="outside prompt"):
        Tracer(tiny_loaded("llama"), TraceOptions(position="40")).trace(["short"])


def test_all_positions_keep_every_token(tiny_loaded):
    loaded = tiny_loaded("gpt2")
    trace = Tracer(loaded, TraceOptions(position="all", logit_lens=False), batch_size=5).trace(PROMPTS)
    L = loaded.parts.n_layers
    for i, text in enumerate(PROMPTS):
        hidden, last_raw, _ = reference(loaded, text)
        tokens = trace.token_states[i]
        assert tokens.shape == (hidden.shape[1], L + 1, hidden.shape[2])
        np.testing.assert_allclose(tokens[:, :L], hidden[:L].permute(1, 0, 2).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(tokens[:, L], last_raw.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(trace.states[i], tokens[-1], rtol=1e-6)


def test_chat_template_is_applied(tiny_loaded):
    loaded = tiny_loaded("llama")
    tracer = Tracer(loaded, TraceOptions(chat=True))
    (ids,) = tracer.encode(["hello"])
    text = loaded.tokenizer.decode(ids)
    assert text.startswith("<|user|>hello<|end|>") and text.endswith("<|assistant|>")


def test_too_long_prompt_errors_unless_truncated(tiny_loaded):
    loaded = tiny_loaded("llama")
    long_text = "apples " * 400
    with pytest.raises(TokentrailError, match="more than the model's context of 128"):
        Tracer(loaded).encode([long_text])
    (ids,) = Tracer(loaded, TraceOptions(truncate=True)).encode([long_text])
    assert len(ids) == 128


def test_forward_passes_are_counted_per_batch(tiny_loaded):
    tracer = Tracer(tiny_loaded("llama"), batch_size=2)
    tracer.trace(PROMPTS)
    assert tracer.n_forward_passes == 3


def test_tracer_and_store_name_unlabelled_prompts_alike(tiny_loaded, tmp_path):
    """Both assemble a Trace through Trace.assemble: the same text gets the same default id either way."""
    from tokentrail.store import TraceStore

    loaded = tiny_loaded("llama")
    texts = ["The capital of France is", "def add(a, b):"]
    traced = Tracer(loaded, TraceOptions(top_k=2)).trace(texts)
    store = TraceStore.open(tmp_path / "store", loaded.fingerprint, TraceOptions(top_k=2).to_dict())
    store.add(traced)
    assert store.load(texts).prompt_ids == traced.prompt_ids
