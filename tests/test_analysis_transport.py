"""Wasserstein-2 on clouds with answers known by hand, and the mean pairwise token cosine."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tokentrail.analysis.transport import token_cosine_by_layer, wasserstein_by_layer


def two_layer_cloud(layer_a: np.ndarray, layer_b: np.ndarray) -> np.ndarray:
    return np.stack([layer_a, layer_b], axis=1)  # [tokens, 2 layers, hidden]


def test_translated_cloud_moves_by_the_translation():
    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(7, 5))
    shift = np.array([3.0, -1.0, 0.5, 0.0, 2.0])
    distances = wasserstein_by_layer(two_layer_cloud(cloud, cloud + shift))
    assert distances.shape == (1,)
    assert distances[0] == pytest.approx(np.linalg.norm(shift), rel=1e-9)


def test_two_points_against_two_points_by_hand():
    # Matching (0,0)->(0,1) and (2,0)->(2,3) costs (1 + 9) / 2 = 5; crossing costs (13 + 5) / 2 = 9.
    a = np.array([[0.0, 0.0], [2.0, 0.0]])
    b = np.array([[0.0, 1.0], [2.0, 3.0]])
    assert wasserstein_by_layer(two_layer_cloud(a, b))[0] == pytest.approx(math.sqrt(5.0))
    # Clouds are matched as sets: the same two points in the other order did not move.
    assert wasserstein_by_layer(two_layer_cloud(a, a[::-1].copy()))[0] == pytest.approx(0.0, abs=1e-12)


def test_matches_the_best_assignment_found_by_brute_force():
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(5, 4, 3))
    distances = wasserstein_by_layer(tokens)
    assert distances.shape == (3,)
    for layer in range(3):
        a, b = tokens[:, layer], tokens[:, layer + 1]
        best = min(
            sum(float(np.sum((a[i] - b[j]) ** 2)) for i, j in enumerate(order))
            for order in itertools.permutations(range(5))
        )
        assert distances[layer] == pytest.approx(math.sqrt(best / 5), rel=1e-9)


def test_single_token_is_the_plain_distance():
    tokens = np.array([[[0.0, 0.0], [3.0, 4.0], [3.0, 4.0]]])
    np.testing.assert_allclose(wasserstein_by_layer(tokens), [5.0, 0.0], atol=1e-12)
    assert np.isnan(token_cosine_by_layer(tokens)).all()


def test_token_cosine_matches_a_loop():
    rng = np.random.default_rng(2)
    tokens = rng.normal(size=(4, 3, 6))
    result = token_cosine_by_layer(tokens)
    assert result.shape == (3,)
    for layer in range(3):
        pairs = [
            float(tokens[i, layer] @ tokens[j, layer])
            / (np.linalg.norm(tokens[i, layer]) * np.linalg.norm(tokens[j, layer]))
            for i in range(4)
            for j in range(4)
            if i != j
        ]
        assert result[layer] == pytest.approx(sum(pairs) / len(pairs), rel=1e-9)


def test_identical_tokens_have_cosine_one():
    tokens = np.tile(np.array([[1.0, 2.0, 3.0]]), (5, 2, 1)).reshape(5, 2, 3)
    np.testing.assert_allclose(token_cosine_by_layer(tokens), [1.0, 1.0])


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\[tokens, layers, hidden\]"):
        wasserstein_by_layer(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="no tokens"):
        token_cosine_by_layer(np.zeros((0, 2, 3)))
