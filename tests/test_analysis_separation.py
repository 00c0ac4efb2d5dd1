"""Separation by layer against sklearn's silhouette_score and a LeaveOneOut KNeighborsClassifier loop."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import silhouette_score
from sklearn.model_selection import LeaveOneOut
from sklearn.neighbors import KNeighborsClassifier

from tokentrail.analysis.separation import axis_score, best_separation_layer, separation_by_layer

CATEGORIES = ["poetry"] * 4 + ["code"] * 5 + ["math"] * 3


def layered_states(seed: int = 0, n_layers: int = 5, hidden: int = 8) -> np.ndarray:
    """Categories that separate more and more with depth: layer 0 is pure noise."""
    rng = np.random.default_rng(seed)
    centres = {name: rng.normal(size=hidden) for name in dict.fromkeys(CATEGORIES)}
    states = np.empty((len(CATEGORIES), n_layers, hidden))
    for p, name in enumerate(CATEGORIES):
        for layer in range(n_layers):
            states[p, layer] = 1.5 * layer * centres[name] + rng.normal(size=hidden)
    return states.astype(np.float32)


def loo_knn_accuracy(points: np.ndarray, labels: list[str], k: int) -> float:
    labels_array = np.asarray(labels)
    correct = 0
    for train, test in LeaveOneOut().split(points):
        model = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
        model.fit(points[train], labels_array[train])
        correct += int(model.predict(points[test])[0] == labels_array[test][0])
    return correct / len(points)


def test_silhouette_and_knn_match_sklearn_at_every_layer():
    states = layered_states()
    result = separation_by_layer(states, CATEGORIES, k=3, n_permutations=0)
    for layer in range(states.shape[1]):
        points = states[:, layer].astype(np.float64)
        expected = silhouette_score(points, CATEGORIES, metric="cosine")
        assert result["silhouette"][layer] == pytest.approx(expected, abs=1e-9)
        assert result["knn_accuracy"][layer] == pytest.approx(loo_knn_accuracy(points, CATEGORIES, 3))
    assert result["chance"] == pytest.approx(5 / 12)
    assert result["k"] == 3
    assert result["silhouette"][-1] > 0.3  # the planted structure is found
    assert best_separation_layer(result) >= 2


def test_permutation_p_value_matches_a_brute_force_test():
    states = layered_states(seed=1, n_layers=3)
    n_permutations = 25
    result = separation_by_layer(states, CATEGORIES, n_permutations=n_permutations, seed=7)
    # The documented shuffles: one default_rng(seed) permutation of the label codes per round.
    rng = np.random.default_rng(7)
    codes = np.unique(CATEGORIES, return_inverse=True)[1]
    shuffles = [rng.permutation(codes) for _ in range(n_permutations)]
    for layer in range(states.shape[1]):
        points = states[:, layer].astype(np.float64)
        observed = silhouette_score(points, CATEGORIES, metric="cosine")
        shuffled = [silhouette_score(points, labels, metric="cosine") for labels in shuffles]
        exceed = sum(value >= observed - 1e-12 for value in shuffled)
        assert result["p_value"][layer] == pytest.approx((1 + exceed) / (1 + n_permutations))
    # Well separated at the last layer: nothing shuffled reaches it, so p is the smallest possible.
    assert result["p_value"][-1] == pytest.approx(1 / (1 + n_permutations))
    assert result["knn_p_value"][-1] == pytest.approx(1 / (1 + n_permutations))


def test_pure_noise_is_not_significant():
    rng = np.random.default_rng(2)
    states = rng.normal(size=(len(CATEGORIES), 2, 8))
    result = separation_by_layer(states, CATEGORIES, n_permutations=200)
    assert np.all(result["p_value"] > 0.05)


def test_seeded_and_deterministic():
    states = layered_states(seed=3)
    first = separation_by_layer(states, CATEGORIES, n_permutations=50, seed=4)
    second = separation_by_layer(states, CATEGORIES, n_permutations=50, seed=4)
    for key in ("silhouette", "knn_accuracy", "p_value", "knn_p_value"):
        assert first[key].tobytes() == second[key].tobytes()


def test_k_is_capped_by_the_number_of_other_prompts():
    states = layered_states()[:4]
    result = separation_by_layer(states, ["a", "a", "b", "b"], k=10, n_permutations=0)
    assert result["k"] == 3


@pytest.mark.parametrize(
    ("categories", "message"),
    [
        (["a"] * 12, "at least 2 categories"),
        (["a"] * 11 + ["b"], "at least 2 prompts in every category; too few in: b"),
        (["a"] * 5, "5 categories for 12 prompts"),
    ],
)
def test_errors_say_what_is_needed(categories, message):
    with pytest.raises(ValueError, match=message) as info:
        separation_by_layer(layered_states(), categories)
    assert "\n" not in str(info.value)


def test_axis_score_places_centroids_at_zero_and_one():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(3, 2, 4))
    b = rng.normal(size=(2, 2, 4)) + 5.0
    centroid_a = a.mean(axis=0)
    centroid_b = b.mean(axis=0)
    extra = np.stack([centroid_a, centroid_b, (centroid_a + centroid_b) / 2, 2 * centroid_b - centroid_a])
    states = np.concatenate([a, b, extra])
    categories = ["A"] * 3 + ["B"] * 2 + ["C"] * 4
    scores = axis_score(states, categories, "A", "B")
    assert scores.shape == (9, 2)
    np.testing.assert_allclose(scores[5:], [[0, 0], [1, 1], [0.5, 0.5], [2, 2]], atol=1e-12)
    np.testing.assert_allclose(scores[:3].mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(scores[3:5].mean(axis=0), 1.0, atol=1e-12)
    # An orthogonal offset does not move a point along the axis.
    direction = centroid_b[0] - centroid_a[0]
    orthogonal = np.array([direction[1], -direction[0], 0.0, 0.0])
    moved = states.copy()
    moved[7, 0] += orthogonal
    assert axis_score(moved, categories, "A", "B")[7, 0] == pytest.approx(0.5)


def test_axis_score_errors_and_degenerate_layers():
    states = np.ones((4, 2, 3))
    scores = axis_score(states, ["A", "A", "B", "B"], "A", "B")
    assert np.isnan(scores).all()  # identical centroids: no axis
    with pytest.raises(ValueError, match="'Z' is not among the categories"):
        axis_score(states, ["A", "A", "B", "B"], "A", "Z")
    with pytest.raises(ValueError, match="two different categories"):
        axis_score(states, ["A", "A", "B", "B"], "A", "A")


def test_best_separation_layer():
    assert best_separation_layer({"silhouette": np.array([0.1, 0.5, 0.5, 0.2])}) == 1
    assert best_separation_layer({"silhouette": np.array([np.nan, 0.1, np.nan])}) == 1
    assert best_separation_layer({"silhouette": np.array([np.nan, np.nan])}) == -1
