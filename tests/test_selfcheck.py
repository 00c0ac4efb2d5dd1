"""The load-time self-check: what it proves, what it chooses, and what it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zoo
from conftest import tiny_model
from model_coverage import PROMPTS, _relative, reference
from tokentrail.errors import ArchitectureError, TokentrailError
from tokentrail.models import from_objects, parts
from tokentrail.tracing import TraceOptions, Tracer
from zoo import tiny_causal_lm


def _worst_error(loaded, padding: str) -> float:
    trace = Tracer(loaded, TraceOptions(logit_lens=False), batch_size=len(PROMPTS), padding_side=padding).trace(PROMPTS)
    worst = 0.0
    for row, ids in enumerate(trace.token_ids):
        layers, _, _, _ = reference(loaded.model, loaded.parts.blocks, ids.tolist(), loaded.parts.entry)
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


def test_a_shared_block_gets_one_layer_per_call(tiny_tokenizer):
    model = tiny_model("llama")
    model.model.layers[2] = model.model.layers[0]  # one block called twice per forward pass
    loaded = from_objects(model, tiny_tokenizer, name="shared")
    assert [id(block) for block in loaded.parts.blocks] == [id(block) for block in model.model.layers]
    assert _worst_error(loaded, loaded.parts.padding) < 1e-4  # each call's output in its own layer


def test_a_block_that_runs_more_often_than_the_self_check_saw_is_refused(tiny_tokenizer):
    model = tiny_model("llama")
    loaded = from_objects(model, tiny_tokenizer, name="llama")
    model.model.layers[2] = model.model.layers[0]  # changed after the check: block 1 now runs twice
    with pytest.raises(TokentrailError, match="block 1 ran 2 times in one forward pass"):
        Tracer(loaded).trace(PROMPTS[:1])


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


def test_a_bidirectional_model_is_proven_against_each_prompt_alone(tiny_tokenizer):
    """XLNet attends both ways over its input and runs its blocks sequence first ([T, B, H]): a prefix's states
    are not the prompt's first tokens', so each padded prompt is compared with its own forward pass."""
    loaded = from_objects(tiny_causal_lm("xlnet"), tiny_tokenizer, name="xlnet")
    assert loaded.parts.bidirectional and loaded.parts.layout == "sequence"
    assert loaded.self_check["forward_passes"] >= 3  # the prefix's own reference costs one more
    assert _worst_error(loaded, loaded.parts.padding) < 1e-4


def test_a_causal_model_is_not_taken_for_a_bidirectional_one(tiny_tokenizer):
    loaded = from_objects(tiny_model("llama"), tiny_tokenizer, name="llama")
    assert not loaded.parts.bidirectional and loaded.parts.layout == "batch"


def test_extra_tokens_ahead_of_the_prompt_are_not_stored(tiny_tokenizer):
    """CPM-Ant runs prompt-tuning tokens ahead of the input; a prompt's states are the last T positions."""
    loaded = from_objects(tiny_causal_lm("cpmant"), tiny_tokenizer, name="cpmant")
    assert loaded.parts.extra_leading_tokens
    trace = Tracer(loaded, TraceOptions(position="all", logit_lens=False)).trace(PROMPTS[:2])
    assert [len(states) for states in trace.token_states] == [len(ids) for ids in trace.token_ids]
    assert _worst_error(loaded, loaded.parts.padding) < 1e-4


def test_altup_streams_stacked_in_front_are_traced_and_read_out(tiny_tokenizer):
    """Gemma-3n passes [streams, batch, tokens, hidden] between blocks and collapses the streams before its
    norm; the lens at the last layer must restate that collapse to equal the model's own next-token readout."""
    loaded = from_objects(tiny_causal_lm("gemma3n_text"), tiny_tokenizer, name="gemma3n_text")
    assert loaded.parts.layout == "streams" and loaded.parts.stream_shape == (4, 64)
    assert "altup_unembed_projections" in loaded.parts.final_norm_path
    trace = Tracer(loaded, TraceOptions(top_k=3)).trace(PROMPTS[:2])
    assert trace.states.shape[2] == 4 * 64 and trace.final_states.shape[1] == 64
    assert (trace.lens_token_ids[:, -1] == trace.next_token_ids).all()
    np.testing.assert_allclose(trace.lens_probs[:, -1], trace.next_token_probs, rtol=1e-4)


def test_layers_split_across_parallel_lists_start_at_the_first_list(tiny_tokenizer):
    loaded = from_objects(tiny_causal_lm("xlm"), tiny_tokenizer, name="xlm")
    assert loaded.parts.entry is loaded.model.transformer.attentions[0]
    assert loaded.parts.blocks[0] is loaded.model.transformer.layer_norm2[0]
    assert _worst_error(loaded, loaded.parts.padding) < 1e-4


def test_one_codebook_traces_and_several_are_refused(tiny_tokenizer, monkeypatch):
    loaded = from_objects(tiny_causal_lm("musicgen"), tiny_tokenizer, name="musicgen")
    assert loaded.parts.unembed is loaded.model.lm_heads[0]
    monkeypatch.setitem(zoo.OVERRIDES, "musicgen", {"decoder.num_codebooks": 2})
    with pytest.raises(ArchitectureError, match="predicts 2 codebooks at once"):
        from_objects(tiny_causal_lm("musicgen"), tiny_tokenizer, name="musicgen")


@pytest.mark.parametrize("model_type", ["deepseek_v4", "gemma3n_text", "xlnet"])
def test_steering_refuses_blocks_that_pass_on_more_than_one_plain_state(model_type, tiny_tokenizer):
    from tokentrail.steering import Steering, SteeringVector

    loaded = from_objects(tiny_causal_lm(model_type), tiny_tokenizer, name=model_type)
    width = int(np.prod(loaded.parts.stream_shape))
    vector = SteeringVector(1, np.eye(width, dtype=np.float32)[0], 1.0, "test")
    with pytest.raises(TokentrailError, match="tokentrail steers only"):
        Steering(loaded, [vector], alpha=1.0)


def test_block_outputs_are_turned_batch_first_by_the_layout_found():
    found = parts.ModelParts(blocks=[torch.nn.Identity()], final_norm=None, unembed=torch.nn.Linear(4, 8),
                             blocks_path="layers", final_norm_path="")
    batch = torch.arange(2 * 3 * 4.0).reshape(2, 3, 4)  # [B, T, H]
    assert torch.equal(found.batch_first(batch, 2, 3), batch)
    found.layout = "sequence"
    assert torch.equal(found.batch_first(batch.transpose(0, 1).contiguous(), 2, 3), batch)
    found.layout = "streams"
    streams = torch.stack([batch, -batch])  # [S, B, T, H]
    assert torch.equal(found.batch_first(streams, 2, 3)[:, :, 1], -batch)
    found.layout, found.extra_leading_tokens = "batch", True
    longer = torch.cat([torch.zeros(2, 5, 4), batch], dim=1)
    assert torch.equal(found.batch_first(longer, 2, 3), batch)
    assert found.batch_first(batch, 3, 3) is None and found.batch_first(batch[:, :2], 2, 3) is None
