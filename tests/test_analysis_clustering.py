"""Token clustering on planted clusters, and metastable plateaus of series with known jumps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ortho_group
from sklearn.cluster import AgglomerativeClustering

from tokentrail.analysis.clustering import (
    clustering_by_prompt,
    jump_layers,
    metastable_plateaus,
    token_clustering,
)


def planted(sizes: list[int], hidden: int, noise: float, seed: int) -> np.ndarray:
    """Tokens in len(sizes) tight groups around orthonormal directions (random lengths): `[tokens, hidden]`."""
    rng = np.random.default_rng(seed)
    directions = ortho_group.rvs(hidden, random_state=seed)[: len(sizes)]
    rows = [direction + noise * rng.normal(size=hidden) for direction, size in zip(directions, sizes)
            for _ in range(size)]
    lengths = rng.uniform(0.5, 20.0, size=(len(rows), 1))  # cosine ignores length
    return np.array(rows) * lengths


def test_planted_clusters_are_counted_at_every_layer():
    hidden = 24
    layers = [
        planted([5, 3, 8, 1], hidden, noise=1e-3, seed=0),  # 4 clusters, one of them a single token
        planted([10, 7], hidden, noise=1e-3, seed=1),  # 2 clusters
        np.tile(np.linspace(1.0, 2.0, hidden), (17, 1)),  # every token identical
        planted([1] * 17, hidden, noise=0.0, seed=2),  # 17 orthogonal tokens: 17 clusters
    ]
    tokens = np.stack(layers, axis=1)  # [17 tokens, 4 layers, hidden]
    result = token_clustering(tokens)
    np.testing.assert_array_equal(result["clusters"], [4, 2, 1, 17])
    np.testing.assert_array_equal(result["spectral_clusters"], [4, 2, 1, 17])
    # Same cluster: cosine ~1; different clusters: ~0 (both up to the 1e-3 noise). The mean over ordered pairs
    # i != j is then sum_c m_c (m_c - 1) / (T (T - 1)).
    expected_0 = (5 * 4 + 3 * 2 + 8 * 7) / (17 * 16)
    expected_1 = (10 * 9 + 7 * 6) / (17 * 16)
    np.testing.assert_allclose(result["mean_cosine"], [expected_0, expected_1, 1.0, 0.0], atol=1e-3)
    assert result["clusters"].dtype.kind == "i" and result["spectral_clusters"].dtype.kind == "i"


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_k_equal_clusters(k):
    tokens = planted([4] * k, hidden=16, noise=1e-3, seed=k)[:, None, :]
    result = token_clustering(tokens)
    assert result["clusters"][0] == k
    assert result["spectral_clusters"][0] == k


def test_identical_tokens_have_mean_cosine_one():
    tokens = np.tile([[3.0, -1.0, 2.0]], (6, 1))[:, None, :] * np.arange(1.0, 7.0)[:, None, None]
    result = token_clustering(tokens)
    assert result["mean_cosine"][0] == pytest.approx(1.0)
    assert result["clusters"][0] == 1 and result["spectral_clusters"][0] == 1


def test_a_single_token_is_one_cluster_without_a_mean_cosine():
    result = token_clustering(np.ones((1, 5, 3)))
    np.testing.assert_array_equal(result["clusters"], np.ones(5))
    np.testing.assert_array_equal(result["spectral_clusters"], np.ones(5))
    assert np.isnan(result["mean_cosine"]).all()


def test_the_threshold_is_the_cosine_at_which_clusters_merge():
    # Two groups whose directions have cosine 0.8 with each other.
    a = np.array([1.0, 0.0])
    b = np.array([0.8, 0.6])
    tokens = np.array([a, a * 2, b, b * 3])[:, None, :]
    assert token_clustering(tokens, threshold=0.9)["clusters"][0] == 2
    assert token_clustering(tokens, threshold=0.7)["clusters"][0] == 1


def test_opposite_tokens_are_two_clusters_but_one_spectral_direction():
    tokens = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-2.0, 0.0]])[:, None, :]
    result = token_clustering(tokens)
    assert result["clusters"][0] == 2
    assert result["spectral_clusters"][0] == 1  # the Gram matrix cannot tell u from -u (documented)
    assert result["mean_cosine"][0] == pytest.approx((2 * 1 + 2 * 1 - 8 * 1) / 12)


def test_spectral_count_by_hand():
    # Three tokens on e1 and one on e2: Gram eigenvalues 3, 1, 0, 0 -> floored 3, 1, .01, .01 and a virtual
    # .01; the ratios 3, 100, 1, 1 peak after the second eigenvalue.
    tokens = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 1.0, 0.0]])[:, None, :]
    assert token_clustering(tokens)["spectral_clusters"][0] == 2


def test_agglomerative_count_agrees_with_scikit_learn():
    rng = np.random.default_rng(9)
    for layer_seed in range(5):
        points = rng.normal(size=(30, 6)) + rng.normal(size=6) * layer_seed
        threshold = 0.5
        count = token_clustering(points[:, None, :], threshold=threshold)["clusters"][0]
        reference = AgglomerativeClustering(
            n_clusters=None, metric="cosine", linkage="average", distance_threshold=1 - threshold
        ).fit(points)
        assert count == reference.n_clusters_


def test_clustering_by_prompt_stacks_prompts():
    hidden = 12
    first = np.stack([planted([3, 3], hidden, 1e-3, 0), planted([6], hidden, 1e-3, 1)], axis=1)
    second = np.stack([planted([2, 2, 2, 1], hidden, 1e-3, 2), planted([1] * 7, hidden, 0.0, 3)], axis=1)
    single = np.ones((1, 2, hidden))
    result = clustering_by_prompt([first, second, single])
    assert set(result) == {"mean_cosine", "clusters", "spectral_clusters"}
    np.testing.assert_array_equal(result["clusters"], [[2, 1], [4, 7], [1, 1]])
    np.testing.assert_array_equal(result["spectral_clusters"], [[2, 1], [4, 7], [1, 1]])
    assert result["mean_cosine"].shape == (3, 2)
    assert np.isnan(result["mean_cosine"][2]).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: token_clustering(np.ones((3, 4))), r"token states must be \[tokens, layers, hidden\]"),
        (lambda: token_clustering(np.ones((0, 4, 2))), "hold no tokens"),
        (lambda: token_clustering(np.full((2, 1, 2), np.nan)), "nan or inf"),
        (lambda: token_clustering(np.ones((2, 1, 2)), threshold=1.5), r"cosine similarity in \[-1, 1\]"),
        (lambda: clustering_by_prompt([]), "at least one prompt"),
        (lambda: clustering_by_prompt([np.ones((2, 3, 2)), np.ones((2, 4, 2))]), "prompt 1 has 4 layers"),
        (lambda: clustering_by_prompt([np.ones((2, 3, 2)), np.ones((3, 2))]), r"prompt 1 must be \[tokens"),
    ],
)
def test_clustering_refuses_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def step_series(levels: list[float], lengths: list[int], noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    series = np.repeat(levels, lengths).astype(float)
    return series + rng.uniform(-noise, noise, size=series.shape)


def test_plateaus_of_a_piecewise_constant_series():
    # Layers 0-5 at 5, 6-12 at 3, 13-14 at 1, 15-20 at 0.5: jumps into layers 6, 13 and 15.
    series = step_series([5.0, 3.0, 1.0, 0.5], [6, 7, 2, 6], noise=1e-4, seed=0)
    np.testing.assert_array_equal(jump_layers(series, tolerance=0.01), [6, 13, 15])
    # [13, 14] is too short; [15, 20] runs to the last layer without a jump after it.
    assert metastable_plateaus(series, tolerance=0.01) == [(0, 5), (6, 12)]
    assert metastable_plateaus(series, tolerance=0.01, min_length=2) == [(0, 5), (6, 12), (13, 14)]
    assert metastable_plateaus(series, tolerance=0.01, min_length=7) == [(6, 12)]
    # With a tolerance above every jump nothing ever jumps, so nothing ends.
    assert metastable_plateaus(series, tolerance=3.0) == []
    assert jump_layers(series, tolerance=3.0).size == 0


def test_a_jump_into_the_last_layer_ends_a_plateau():
    series = np.array([2.0, 2.0, 2.0, 2.0, 7.0])
    assert metastable_plateaus(series, tolerance=0.0) == [(0, 3)]
    np.testing.assert_array_equal(jump_layers(series, tolerance=0.0), [4])


def test_a_cluster_count_series():
    # Integer counts: 8 tokens merging 8 -> 5 -> 2 -> 1, with a long pause at 5.
    counts = np.array([8, 8, 8, 5, 5, 5, 5, 5, 2, 2, 1, 1, 1])
    assert metastable_plateaus(counts, tolerance=0) == [(0, 2), (3, 7)]
    assert metastable_plateaus(counts, tolerance=0, min_length=1) == [(0, 2), (3, 7), (8, 9)]


def test_nan_steps_are_neither_flat_nor_jumps():
    series = np.array([1.0, 1.0, 1.0, np.nan, 4.0, 4.0, 4.0, 9.0])
    assert metastable_plateaus(series, tolerance=0.1) == [(4, 6)]
    np.testing.assert_array_equal(jump_layers(series, tolerance=0.1), [7])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: metastable_plateaus(np.ones((3, 2)), 0.1), r"one value per layer \[n_layers\]"),
        (lambda: metastable_plateaus(np.ones(5), -0.1), "tolerance must be 0 or more"),
        (lambda: metastable_plateaus(np.ones(5), math.nan), "tolerance must be 0 or more"),
        (lambda: metastable_plateaus(np.ones(5), 0.1, min_length=0), "min_length must be at least 1"),
        (lambda: jump_layers(np.ones((2, 2)), 0.1), r"one value per layer"),
    ],
)
def test_plateaus_refuse_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_short_series():
    assert metastable_plateaus(np.array([1.0]), 0.1, min_length=1) == []
    assert metastable_plateaus(np.array([], dtype=float), 0.1) == []
    assert jump_layers(np.array([1.0]), 0.1).size == 0
