"""Placing a new prompt among stored ones: checked against scikit-learn's neighbours and hand computations on
data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from tokentrail.analysis.placement import home_category, place_prompt


def _cloud(seed: int = 0, n_per: int = 6, layers: int = 5, hidden: int = 8):
    rng = np.random.default_rng(seed)
    centres = {"a": rng.normal(size=(layers, hidden)) * 4, "b": rng.normal(size=(layers, hidden)) * 4}
    stored, categories = [], []
    for name, centre in centres.items():
        for _ in range(n_per):
            stored.append(centre + rng.normal(size=(layers, hidden)))
            categories.append(name)
    return np.stack(stored), categories, centres


def test_nearest_prompts_match_scikit_learn():
    rng = np.random.default_rng(3)
    stored = rng.normal(size=(40, 4, 16))
    live = rng.normal(size=(4, 16))
    placement = place_prompt(stored, ["x"] * 20 + ["y"] * 20, live, k=7)
    for layer in range(4):
        finder = NearestNeighbors(n_neighbors=7, metric="cosine").fit(stored[:, layer])
        distances, indices = finder.kneighbors(live[layer][None])
        np.testing.assert_array_equal(placement.neighbours[layer], indices[0])
        np.testing.assert_allclose(placement.similarity[layer], 1 - distances[0], atol=1e-12)


def test_vote_counts_the_categories_of_the_nearest():
    stored, categories, centres = _cloud()
    live = centres["b"] + 0.01
    placement = place_prompt(stored, categories, live, k=5)
    assert placement.winner == ["b"] * 5
    assert all(vote == {"b": 5} for vote in placement.vote)
    # A tie goes to the category whose best neighbour is nearer.
    stored = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[0.9, 0.1]], [[0.2, 0.8]]])
    tied = place_prompt(stored, ["p", "q", "q", "p"], np.array([[1.0, 0.05]]), k=4)
    assert tied.vote == [{"p": 2, "q": 2}] and tied.winner == ["p"]


def test_axis_score_is_zero_at_a_one_at_b_and_ignores_orthogonal_offsets():
    stored, categories, _ = _cloud(seed=1)
    labels = np.asarray(categories)
    a = stored[labels == "a"].mean(axis=0)
    b = stored[labels == "b"].mean(axis=0)
    for live, expected in ((a, 0.0), (b, 1.0), ((a + b) / 2, 0.5), (a + 2 * (b - a), 2.0)):
        placement = place_prompt(stored, categories, live, axis=("a", "b"))
        np.testing.assert_allclose(placement.axis, expected, atol=1e-9)
    # A step orthogonal to the axis at every layer leaves the score where it was.
    direction = b - a
    offset = np.random.default_rng(5).normal(size=a.shape)
    offset -= (np.sum(offset * direction, axis=-1) / np.sum(direction**2, axis=-1))[:, None] * direction
    np.testing.assert_allclose(place_prompt(stored, categories, (a + b) / 2 + offset, axis=("a", "b")).axis, 0.5,
                               atol=1e-9)
    assert np.isnan(place_prompt(stored, categories, a).axis).all()  # no axis asked for


def test_bifurcation_layer_where_the_prompt_moves_from_its_home_to_another_category():
    stored, categories, centres = _cloud(seed=2, layers=8)
    live = np.concatenate([centres["a"][:4], centres["b"][4:]])
    placement = place_prompt(stored, categories, live, sustain=2)
    assert placement.home == "a"  # nearest centroid at layer 1
    assert (placement.layer, placement.toward) == (4, "b")
    stays = place_prompt(stored, categories, centres["a"], sustain=2)
    assert (stays.layer, stays.toward) == (-1, "")
    # Told its home is b, a prompt that starts in a is outside b from the start: nothing to leave until it
    # has been with b, which it never leaves.
    assert place_prompt(stored, categories, live, home="b").layer == -1


def test_home_category_is_the_nearest_centroid_by_cosine():
    stored = np.array([[[0.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.9, 0.1]], [[0.0, 0.0], [0.0, 1.0]],
                       [[0.0, 0.0], [0.1, 0.9]]])
    live = np.array([[0.0, 0.0], [5.0, 1.0]])  # far in length, close in angle to the first pair
    assert home_category(stored, ["x", "x", "y", "y"], live) == "x"


def test_refusals():
    stored, categories, _ = _cloud()
    with pytest.raises(ValueError, match="do not match"):
        place_prompt(stored, categories, np.zeros((5, 9)))
    with pytest.raises(ValueError, match="not in this run"):
        place_prompt(stored, categories, stored[0], home="zzz")
    with pytest.raises(ValueError, match="k must be"):
        place_prompt(stored, categories, stored[0], k=0)
    with pytest.raises(ValueError, match="categories for"):
        place_prompt(stored, categories[:-1], stored[0])
