"""Bifurcations on synthetic trajectories with planted events, and divergence against a brute-force loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tokentrail.analysis.bifurcation import bifurcation_layers, divergence_layers, prompt_bifurcation

N_LAYERS = 12
CATEGORIES = ["story"] * 4 + ["code"] * 4 + ["math"] * 4


def planted(seed: int = 0, leaver: int = 2, leave_at: int = 6, blip_at: int | None = None) -> np.ndarray:
    """Each category sits along its own axis; prompt `leaver` (a story) moves to the code axis at `leave_at`.

    With `blip_at`, prompt 5 (code) visits the math axis for that one layer only.
    """
    rng = np.random.default_rng(seed)
    axes = {"story": 0, "code": 1, "math": 2}
    hidden = 6
    states = np.zeros((len(CATEGORIES), N_LAYERS, hidden))
    for p, name in enumerate(CATEGORIES):
        for layer in range(N_LAYERS):
            target = axes[name]
            if p == leaver and layer >= leave_at:
                target = axes["code"]
            if p == 5 and layer == blip_at:
                target = axes["math"]
            states[p, layer, target] = 1.0 + layer  # growing norm, as in a real residual stream
            states[p, layer] += rng.normal(0, 0.05, hidden)
    return states


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_planted_bifurcation_is_found_exactly(metric):
    layers, toward = bifurcation_layers(planted(), CATEGORIES, sustain=2, metric=metric)
    expected = np.full(len(CATEGORIES), -1)
    expected[2] = 6
    np.testing.assert_array_equal(layers, expected)
    assert toward[2] == "code"
    assert [t for i, t in enumerate(toward) if i != 2] == [""] * (len(CATEGORIES) - 1)
    assert layers.dtype.kind == "i"


def test_sustain_ignores_a_one_layer_blip():
    states = planted(blip_at=4)
    layers, _ = bifurcation_layers(states, CATEGORIES, sustain=2)
    assert layers[5] == -1
    layers, toward = bifurcation_layers(states, CATEGORIES, sustain=1)
    assert layers[5] == 4 and toward[5] == "math"


def test_a_run_cut_short_by_the_last_layer_does_not_count():
    states = planted(leave_at=N_LAYERS - 1)
    assert bifurcation_layers(states, CATEGORIES, sustain=2)[0][2] == -1
    assert bifurcation_layers(states, CATEGORIES, sustain=1)[0][2] == N_LAYERS - 1


def test_a_prompt_must_have_been_with_its_category_to_leave_it():
    # Prompt 2 is labelled "story" but sits on the code axis from the first layer on.
    states = planted(leave_at=0)
    layers, toward = bifurcation_layers(states, CATEGORIES)
    assert layers[2] == -1 and toward[2] == ""
    assert prompt_bifurcation(states, CATEGORIES, 2)["outside"].all()


def test_prompt_bifurcation_uses_leave_one_out_centroids():
    states = planted()
    explained = prompt_bifurcation(states, CATEGORIES, 2)
    assert explained["layer"] == 6 and explained["toward"] == "code" and explained["category"] == "story"
    own_others = [0, 1, 3]  # the other story prompts
    for layer in range(N_LAYERS):
        x = states[2, layer]
        own_centroid = states[own_others, layer].mean(axis=0)
        code_centroid = states[4:8, layer].mean(axis=0)
        cos_own = float(x @ own_centroid) / (math.hypot(*x) * math.hypot(*own_centroid))
        cos_code = float(x @ code_centroid) / (math.hypot(*x) * math.hypot(*code_centroid))
        assert explained["distance_own"][layer] == pytest.approx(1 - cos_own, abs=1e-12)
        assert explained["distances"]["code"][layer] == pytest.approx(1 - cos_code, abs=1e-12)
    assert explained["nearest_other"][6:] == ["code"] * (N_LAYERS - 6)
    assert not explained["outside"][:6].any() and explained["outside"][6:].all()
    # Negative indices count from the end, as for lists.
    assert prompt_bifurcation(states, CATEGORIES, -1)["index"] == len(CATEGORIES) - 1


def test_lonely_prompts_and_single_categories_never_bifurcate():
    states = planted()
    categories = CATEGORIES[:-1] + ["alone"]
    layers, toward = bifurcation_layers(states, categories)
    assert layers[-1] == -1 and toward[-1] == ""
    assert np.isnan(prompt_bifurcation(states, categories, len(categories) - 1)["distance_own"]).all()
    layers, _ = bifurcation_layers(states, ["one"] * len(CATEGORIES))
    assert (layers == -1).all()


def test_errors():
    states = planted()
    with pytest.raises(ValueError, match="metric must be one of"):
        bifurcation_layers(states, CATEGORIES, metric="manhattan")
    with pytest.raises(ValueError, match="sustain"):
        bifurcation_layers(states, CATEGORIES, sustain=0)
    with pytest.raises(ValueError, match="3 categories for 12 prompts"):
        bifurcation_layers(states, CATEGORIES[:3])
    with pytest.raises(ValueError, match="out of range"):
        prompt_bifurcation(states, CATEGORIES, 12)
    with pytest.raises(ValueError, match="at least 2 layers"):
        divergence_layers(states[:, :1])


def brute_force_divergence(states: np.ndarray, metric: str) -> np.ndarray:
    n_prompts, n_layers, _ = states.shape

    def distance(a, b):
        if metric == "euclidean":
            return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))
        cos = sum(float(x) * float(y) for x, y in zip(a, b)) / (
            math.sqrt(sum(float(x) ** 2 for x in a)) * math.sqrt(sum(float(y) ** 2 for y in b))
        )
        return 1 - cos

    expected = np.full((n_prompts, n_prompts), -1)
    for i in range(n_prompts):
        for j in range(n_prompts):
            if i == j:
                continue
            series = [distance(states[i, layer], states[j, layer]) for layer in range(n_layers)]
            increases = [series[layer + 1] - series[layer] for layer in range(n_layers - 1)]
            if max(increases) > 0:
                expected[i, j] = int(np.argmax(increases)) + 1
    return expected


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_divergence_layers_match_brute_force(metric):
    rng = np.random.default_rng(3)
    states = np.cumsum(rng.normal(size=(6, 7, 4)), axis=1)
    result = divergence_layers(states, metric=metric)
    np.testing.assert_array_equal(result, brute_force_divergence(states, metric))
    np.testing.assert_array_equal(result, result.T)
    assert (np.diag(result) == -1).all()


def test_planted_divergence_layer():
    # Two prompts that travel together and split at layer 6 (the block that makes layer 6).
    states = planted(leave_at=6)
    result = divergence_layers(states)
    assert result[2, 0] == 6 and result[0, 2] == 6
    identical = np.repeat(states[:1], 2, axis=0)
    assert (divergence_layers(identical) == -1).all()


def test_explain_prompt_adds_the_steps_to_prompt_bifurcation():
    from tokentrail.analysis.bifurcation import explain_prompt, prompt_bifurcation

    rng = np.random.default_rng(3)
    states = rng.normal(size=(6, 5, 4))
    categories = ["a", "a", "a", "b", "b", "b"]
    found = explain_prompt(states, categories, 1, sustain=1, metric="euclidean")
    plain = prompt_bifurcation(states, categories, 1, sustain=1, metric="euclidean")
    assert (found.layer, found.toward, found.category) == (plain["layer"], plain["toward"], "a")
    np.testing.assert_array_equal(found.distance_own, plain["distance_own"])
    # Steps by hand: the size of each layer's change, for the prompt and for the rest of its category.
    by_hand = [np.sqrt(((states[1, layer] - states[1, layer - 1]) ** 2).sum()) for layer in range(1, 5)]
    np.testing.assert_allclose(found.step[1:], by_hand)
    rest = [np.mean([np.sqrt(((states[p, layer] - states[p, layer - 1]) ** 2).sum()) for p in (0, 2)])
            for layer in range(1, 5)]
    np.testing.assert_allclose(found.category_step[1:], rest)
    assert np.isnan(found.step[0]) and np.isnan(found.category_step[0])
    assert found.sentence.endswith("(euclidean distance to leave-one-out centroids, sustained for 1 layers)")
