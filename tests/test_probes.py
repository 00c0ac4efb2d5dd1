"""The forward-pass probes against hand computations: the attention energy from the model's own projections and
rotary embedding, the worked example of its docstring, and the perturbation's growth from `inputs_embeds`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import tiny_model
from tokentrail.errors import TokentrailError
from tokentrail.models.loading import from_objects
from tokentrail.probes.energy import attention_energy, energy_from_scores
from tokentrail.probes.perturbation import random_directions, separations

TEXTS = ["Once upon a time in a castle", "def fibonacci(n): return n"]


def _loaded(tokenizer, implementation: str = "eager", seed: int = 0):
    model = tiny_model("llama", seed=seed)
    model.config._attn_implementation = implementation
    return from_objects(model, tokenizer, name=f"tiny-{implementation}")


def test_worked_example_of_the_docstring():
    inf = float("-inf")
    # One head; token 1 sees itself (score 1), token 2 sees both (scores 0 and 1).
    scores = torch.tensor([[[1.0, inf], [0.0, 1.0]]], dtype=torch.float64)
    weighted, log_partition = energy_from_scores(scores)
    a = math.e / (1 + math.e)
    np.testing.assert_allclose(weighted[0].numpy(), [-1.0, -a], atol=1e-12)
    np.testing.assert_allclose(log_partition[0].numpy(), [-1.0, -math.log(1 + math.e)], atol=1e-12)
    assert float(weighted.mean()) == pytest.approx(-0.866, abs=1e-3)
    assert float(log_partition.mean()) == pytest.approx(-1.157, abs=1e-3)


def _hand_energy(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """`[L, heads]` E_att and E_logZ per token, from the model's own projections and rotary embedding."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        hidden = model(input_ids, output_hidden_states=True).hidden_states
        positions = torch.arange(len(ids))[None]
        weighted, partition = [], []
        for index, layer in enumerate(model.model.layers):
            attention = layer.self_attn
            normed = layer.input_layernorm(hidden[index])
            head_dim = attention.head_dim
            q = attention.q_proj(normed).view(1, len(ids), -1, head_dim).transpose(1, 2)
            k = attention.k_proj(normed).view(1, len(ids), -1, head_dim).transpose(1, 2)
            cos, sin = model.model.rotary_emb(hidden[index], positions)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            s = (q.double() @ k.double().transpose(-1, -2))[0] * head_dim**-0.5  # [heads, T, T]
            s = s.masked_fill(~torch.ones(len(ids), len(ids), dtype=torch.bool).tril(), float("-inf"))
            a = torch.softmax(s, dim=-1)
            weighted.append((-(a * s.nan_to_num(neginf=0.0)).sum(-1)).mean(-1).numpy())
            partition.append((-torch.logsumexp(s, dim=-1)).mean(-1).numpy())
    return np.stack(weighted), np.stack(partition)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_energy_matches_a_hand_computation(tiny_tokenizer, implementation):
    loaded = _loaded(tiny_tokenizer, implementation)
    # Larger weights, so that the scores are far from zero and the energy far from -log(tokens).
    with torch.no_grad():
        for layer in loaded.model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    encoded = [tiny_tokenizer(text)["input_ids"] for text in TEXTS]
    energy = attention_energy(loaded, encoded)
    assert energy.weighted.shape == (2, 3, 4) and energy.implementation == implementation
    for i, ids in enumerate(encoded):
        weighted, partition = _hand_energy(loaded.model, ids)
        np.testing.assert_allclose(energy.weighted[i], weighted, atol=1e-5)
        np.testing.assert_allclose(energy.log_partition[i], partition, atol=1e-5)
    assert np.all(energy.weighted >= energy.log_partition - 1e-9)  # the gap is an entropy
    assert energy.max_logit_difference < 1e-5
    np.testing.assert_array_equal(energy.tokens, [len(ids) for ids in encoded])


def test_energy_refuses_what_it_cannot_read(tiny_tokenizer, monkeypatch):
    loaded = _loaded(tiny_tokenizer, "eager")
    loaded.model.config._attn_implementation = "flex_attention"
    with pytest.raises(TokentrailError, match="sdpa or eager"):
        attention_energy(loaded, [[1, 2, 3]])
    loaded.model.config._attn_implementation = "eager"
    # Scores that are not the model's: the measured pass's logits differ from the plain pass, so it is refused.
    import tokentrail.probes.energy as energy_module

    real = energy_module._scores
    monkeypatch.setattr(energy_module, "_scores", lambda *args: real(*args) * 1.5)
    with pytest.raises(TokentrailError, match="energy refused"):
        attention_energy(loaded, [tiny_tokenizer(TEXTS[0])["input_ids"]])


def test_a_model_is_left_as_it_was(tiny_tokenizer):
    from transformers.modeling_utils import AttentionInterface

    before = dict(AttentionInterface._global_mapping)
    loaded = _loaded(tiny_tokenizer, "sdpa")

    def hooks() -> list[int]:
        return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.model.modules()]

    held = hooks()
    attention_energy(loaded, [tiny_tokenizer(TEXTS[1])["input_ids"]])
    separations(loaded, [tiny_tokenizer(TEXTS[1])["input_ids"]], n_directions=2)
    assert AttentionInterface._global_mapping == before
    assert hooks() == held


def test_perturbation_growth_matches_inputs_embeds(tiny_tokenizer):
    loaded = _loaded(tiny_tokenizer)
    model = loaded.model
    ids = tiny_tokenizer(TEXTS[0])["input_ids"]
    units = random_directions(3, 32, seed=5)
    measured = separations(loaded, [ids], directions=units, epsilon=1e-2)[0]  # [3, L+1]
    with torch.no_grad():
        embedded = model.get_input_embeddings()(torch.tensor([ids]))
        base = model(inputs_embeds=embedded, output_hidden_states=True).hidden_states
        for row, unit in enumerate(units):
            moved = embedded.clone()
            moved[0, -1] += torch.tensor(1e-2 * float(embedded[0, -1].norm()) * unit, dtype=moved.dtype)
            hidden = model(inputs_embeds=moved, output_hidden_states=True).hidden_states
            # transformers' last entry is after the final norm: compare layers 0..L-1.
            expected = [float((hidden[layer][0, -1] - base[layer][0, -1]).norm()) for layer in range(len(hidden) - 1)]
            np.testing.assert_allclose(measured[row, :-1], expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(measured[:, 0], 1e-2 * float(embedded[0, -1].norm()), rtol=1e-5)
    with pytest.raises(TokentrailError, match="epsilon"):
        separations(loaded, [ids], epsilon=0)


def test_random_directions_are_seeded_unit_vectors():
    a, b = random_directions(4, 16, 1), random_directions(4, 16, 1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0)
    assert not np.allclose(a, random_directions(4, 16, 2))
