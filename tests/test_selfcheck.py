"""The load-time self-check: what it proves, what it chooses, and what it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model
from coverage import PROMPTS, _relative, reference
from tokentrail.errors import ArchitectureError
from tokentrail.models import from_objects, parts
from tokentrail.tracing import TraceOptions, Tracer
from zoo import tiny_causal_lm


def _worst_error(loaded, padding: str) -> float:
    trace = Tracer(loaded, TraceOptions(logit_lens=False), batch_size=len(PROMPTS), padding_side=padding).trace(PROMPTS)
    worst = 0.0
    for row, ids in enumerate(trace.token_ids):
        layers, _, _, _ = reference(loaded.model, loaded.parts.blocks, ids.tolist())
        worst = max(worst, max(_relative(trace.states[row, layer], layers[layer]) for layer in range(len(layers))))
    return worst


def test_a_plain_decoder_is_proven_with_left_padding(tiny_tokenizer):
    loaded = from_objects(tiny_model("llama"), tiny_tokenizer, name="llama")
    report = loaded.self_check
    assert report["padding"] == "left" and report["final_norm"] == "model.norm" and report["head"] == "lm_head"
    assert report["forward_passes"] == 2 and report["max_state_error"] < 1e-5


def test_left_padding_is_avoided_where_it_changes_the_states(tiny_tokenizer):
    """RoBERTa numbers positions from its padding index: left-padded rows get other position embeddings."""
    loaded = from_objects(tiny_causal_lm("roberta"), tiny_tokenizer, name="roberta")
    assert loaded.parts.padding == "right"
    assert _worst_error(loaded, "left") > 1e-2  # what the check protected against
    assert _worst_error(loaded, loaded.parts.padding) < 1e-4


def test_shared_blocks_are_refused(tiny_tokenizer):
    model = tiny_model("llama")
    model.model.layers[2] = model.model.layers[0]  # one block called twice per forward pass
    with pytest.raises(ArchitectureError, match="block 1 ran 2 times in one forward pass"):
        from_objects(model, tiny_tokenizer, name="shared")


def test_an_unknown_logit_scaling_is_refused(tiny_tokenizer, monkeypatch):
    """Cohere multiplies its logits by logit_scale; without it the logit lens would be wrong, so: refused."""
    monkeypatch.setattr(parts, "_readout_scalings", lambda model, config: {})
    with pytest.raises(ArchitectureError, match="the readout .* gives next-token log-probabilities that differ"):
        from_objects(tiny_causal_lm("cohere"), tiny_tokenizer, name="cohere")


def test_parallel_residual_streams_are_stored_side_by_side(tiny_tokenizer):
    loaded = from_objects(tiny_causal_lm("deepseek_v4"), tiny_tokenizer, name="deepseek_v4")
    streams, hidden = loaded.parts.stream_shape
    trace = Tracer(loaded, TraceOptions(top_k=3)).trace(PROMPTS[:2])
    assert trace.states.shape[2] == streams * hidden and trace.final_states.shape[1] == hidden
    # The lens at the last layer collapses the streams the way the model does before its norm.
    assert (trace.lens_token_ids[:, -1] == trace.next_token_ids).all()
    np.testing.assert_allclose(trace.lens_probs[:, -1], trace.next_token_probs, rtol=1e-4)


def test_a_block_the_forward_pass_skips_keeps_its_input_state(tiny_tokenizer):
    loaded = from_objects(tiny_causal_lm("mllama"), tiny_tokenizer, name="mllama")
    (skipped,) = loaded.parts.skipped_blocks
    trace = Tracer(loaded, TraceOptions(logit_lens=False)).trace(PROMPTS[:2])
    np.testing.assert_array_equal(trace.states[:, skipped], trace.states[:, skipped - 1])


def test_no_self_check_batches_only_equal_lengths(tiny_tokenizer):
    loaded = from_objects(tiny_model("llama"), tiny_tokenizer, name="llama", self_check=False)
    assert loaded.self_check is None and loaded.parts.padding == "none"
    tracer = Tracer(loaded, batch_size=8)
    lengths = [len(ids) for ids in tracer.encode(PROMPTS)]
    for batch in tracer.plan_batches(lengths):
        assert len({lengths[i] for i in batch}) == 1


def test_self_check_leaves_the_model_unhooked(tiny_tokenizer):
    model = tiny_model("gpt2")

    def ours(module):
        return [hook for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
                if not getattr(hook, "__module__", "").startswith("transformers")]

    before = {key: value.clone() for key, value in model.state_dict().items()}
    from_objects(model, tiny_tokenizer, name="gpt2")
    assert not any(ours(module) for module in model.modules())
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
