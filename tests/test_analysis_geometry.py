"""Intrinsic dimension, anisotropy and effective rank on clouds whose answers are known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.stats import ortho_group

from tokentrail.analysis.geometry import (
    anisotropy,
    effective_rank,
    geometry_by_layer,
    intrinsic_dimension,
    token_geometry,
)


def subspace_cloud(n: int, k: int, ambient: int, seed: int) -> np.ndarray:
    """n standard Gaussian points in a random k-dimensional linear subspace of R^ambient, shifted off the origin."""
    rng = np.random.default_rng(seed)
    basis = ortho_group.rvs(ambient, random_state=seed)[:k]  # [k, ambient], orthonormal rows
    return rng.normal(size=(n, k)) @ basis + 10.0 * rng.normal(size=ambient)


def axis_pairs(scales: list[float], ambient: int, offset: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """The points +-scales[i] * e_i (rotated at random): centred, its singular values are sqrt(2) * scales."""
    rotation = ortho_group.rvs(ambient, random_state=seed)
    rows = []
    for axis, scale in enumerate(scales):
        for sign in (1.0, -1.0):
            point = np.zeros(ambient)
            point[axis] = sign * scale
            rows.append(point)
    cloud = np.array(rows) @ rotation
    return cloud if offset is None else cloud + offset


def twonn_by_hand(points: np.ndarray, discard_fraction: float = 0.1) -> float:
    """Facco et al.'s recipe written out: a line through the origin fitted to (log mu, -log(1 - F(mu)))."""
    distances = np.sort(cdist(points, points), axis=1)
    ratios = np.sort(distances[:, 2] / distances[:, 1])
    n = len(ratios)
    keep = int(n * (1 - discard_fraction))
    x = np.log(ratios[:keep])
    y = -np.log(1 - np.arange(1, keep + 1) / n)
    return float(np.sum(x * y) / np.sum(x * x))


@pytest.mark.parametrize("k", [2, 5])
def test_twonn_finds_the_dimension_of_a_linear_subspace(k):
    cloud = subspace_cloud(1000, k, ambient=40, seed=k)
    # TwoNN on 1000 Gaussian points is within about 10% of k; the subspace's ambient 40 must not show.
    assert intrinsic_dimension(cloud) == pytest.approx(k, rel=0.12)


def test_twonn_is_the_papers_estimator():
    cloud = subspace_cloud(200, 3, ambient=30, seed=7)
    assert intrinsic_dimension(cloud) == pytest.approx(twonn_by_hand(cloud), rel=1e-6)


def test_twonn_of_points_on_a_line_is_one():
    rng = np.random.default_rng(3)
    line = rng.uniform(-5, 5, size=(400, 1))
    assert intrinsic_dimension(line) == pytest.approx(1.0, rel=0.15)
    # The same line embedded in R^3 gives the same answer.
    embedded = line @ np.array([[1.0, 2.0, -2.0]]) / 3.0
    assert intrinsic_dimension(embedded) == pytest.approx(intrinsic_dimension(line), rel=1e-6)


def test_duplicate_points_are_dropped_before_twonn():
    cloud = subspace_cloud(150, 3, ambient=10, seed=11)
    with_twins = np.vstack([cloud, cloud[:40], cloud[:5]])
    assert intrinsic_dimension(with_twins) == pytest.approx(twonn_by_hand(cloud), rel=1e-6)


def test_too_few_distinct_points_give_nan():
    assert math.isnan(intrinsic_dimension(np.ones((10, 4))))
    assert math.isnan(intrinsic_dimension(np.array([[0.0, 1.0], [0.0, 1.0], [2.0, 3.0]])))


def test_equidistant_neighbours_give_nan_not_zero():
    # Each vertex of a regular simplex (or of the cross +-e_i) has its two nearest neighbours equally far: every
    # ratio r2 / r1 is 1 and the fit has nothing to measure.
    assert math.isnan(intrinsic_dimension(np.eye(5)))
    assert math.isnan(intrinsic_dimension(np.vstack([np.eye(4), -np.eye(4)])))
    # Rotated and shifted, rounding leaves some ratios a hair above 1; they must not pass for a dimension.
    assert math.isnan(intrinsic_dimension(axis_pairs([1.0] * 4, ambient=10, offset=np.full(10, 3.0), seed=1)))


@pytest.mark.parametrize(
    ("points", "message"),
    [
        (np.zeros((2, 5)), "at least 3 points, got 2"),
        (np.zeros(5), r"points must be \[n, d\]"),
        (np.zeros((3, 2, 2)), r"points must be \[n, d\]"),
        (np.array([[0.0, 1.0], [np.nan, 0.0], [1.0, 1.0]]), "nan or inf"),
    ],
)
def test_intrinsic_dimension_refuses_bad_input(points, message):
    with pytest.raises(ValueError, match=message):
        intrinsic_dimension(points)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_effective_rank_of_k_equal_singular_values_is_k(k):
    # Centred, the 2k points +-e_i have k singular values equal to sqrt(2): p_i = 1/k, exp(log k) = k.
    cloud = axis_pairs([1.0] * k, ambient=12, offset=np.full(12, 3.0), seed=k)
    assert effective_rank(cloud) == pytest.approx(k, rel=1e-9)


def test_top_pc_share_and_effective_rank_of_a_chosen_spectrum():
    cloud = axis_pairs([3.0, 2.0, 1.0], ambient=8, offset=np.arange(8.0), seed=1)
    top_share, _ = anisotropy(cloud)
    # Variances along the axes are proportional to 9, 4, 1.
    assert top_share == pytest.approx(9 / 14, rel=1e-9)
    # Singular values proportional to 3, 2, 1: p = (1/2, 1/3, 1/6).
    p = np.array([1 / 2, 1 / 3, 1 / 6])
    assert effective_rank(cloud) == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-9)


def test_mean_cosine_to_mean_by_hand():
    # Points c +- a_i e_i with c orthogonal to every e_i: the mean is c and cos(x, c) = |c| / sqrt(|c|^2 + a_i^2).
    scales = [3.0, 0.0, 4.0 * math.sqrt(3.0)]
    cloud = np.zeros((6, 6))
    cloud[:, 5] = 4.0  # c = 4 e_5
    for axis, scale in enumerate(scales):
        cloud[2 * axis, axis], cloud[2 * axis + 1, axis] = scale, -scale
    expected = np.mean([4 / 5, 4 / 5, 1.0, 1.0, 4 / 8, 4 / 8])
    _, mean_cosine = anisotropy(cloud)
    assert mean_cosine == pytest.approx(expected, rel=1e-12)


def test_identical_points_have_no_variance():
    cloud = np.tile([1.0, -2.0, 2.0], (5, 1))
    top_share, mean_cosine = anisotropy(cloud)
    assert math.isnan(top_share)
    assert mean_cosine == pytest.approx(1.0)
    assert math.isnan(effective_rank(cloud))


def test_a_cloud_around_the_origin_has_no_mean_direction():
    cloud = axis_pairs([1.0, 2.0], ambient=3)
    assert math.isnan(anisotropy(cloud)[1])


def test_geometry_by_layer_measures_each_layer():
    ambient = 10
    layer_0 = axis_pairs([1.0, 1.0, 1.0, 1.0], ambient, offset=np.full(ambient, 2.0), seed=2)  # erank 4
    layer_1 = axis_pairs([3.0, 2.0, 1.0, 0.0], ambient, seed=3)  # top share 9/14
    layer_2 = np.tile(np.arange(ambient, dtype=float), (8, 1))  # all prompts identical
    states = np.stack([layer_0, layer_1, layer_2], axis=1)  # [8 prompts, 3 layers, 10]
    result = geometry_by_layer(states)
    assert set(result) == {"intrinsic_dimension", "top_pc_share", "mean_cosine_to_mean", "effective_rank"}
    assert all(values.shape == (3,) for values in result.values())
    assert result["effective_rank"][0] == pytest.approx(4.0)
    assert result["top_pc_share"][1] == pytest.approx(9 / 14)
    assert result["top_pc_share"][0] == pytest.approx(1 / 4)
    assert math.isnan(result["intrinsic_dimension"][0])  # the cross +-e_i: equidistant neighbours
    assert math.isnan(result["intrinsic_dimension"][2])
    assert result["mean_cosine_to_mean"][2] == pytest.approx(1.0)
    assert math.isnan(result["effective_rank"][2])


def test_geometry_by_layer_refuses_too_few_prompts_and_bad_shapes():
    with pytest.raises(ValueError, match="at least 3 prompts, got 2"):
        geometry_by_layer(np.ones((2, 4, 5)))
    with pytest.raises(ValueError, match=r"states must be \[prompts, layers, hidden\]"):
        geometry_by_layer(np.ones((4, 5)))


def test_token_geometry_is_nan_where_a_prompt_has_too_few_tokens():
    rng = np.random.default_rng(5)
    prompts = [rng.normal(size=(1, 3, 6)), rng.normal(size=(2, 3, 6)), rng.normal(size=(40, 3, 6))]
    result = token_geometry(prompts)
    assert all(values.shape == (3, 3) for values in result.values())
    dimension = result["intrinsic_dimension"]
    assert np.isnan(dimension[:2]).all() and np.isfinite(dimension[2]).all()
    assert np.isnan(result["top_pc_share"][0]).all() and np.isfinite(result["top_pc_share"][1:]).all()
    assert np.isnan(result["effective_rank"][0]).all()
    # Two distinct points: one direction of variance, effective rank 1.
    np.testing.assert_allclose(result["effective_rank"][1], 1.0)
    np.testing.assert_allclose(result["mean_cosine_to_mean"][0], 1.0)


def test_token_geometry_refuses_mismatched_prompts():
    with pytest.raises(ValueError, match="prompt 1 has 4 layers, prompt 0 has 3"):
        token_geometry([np.ones((3, 3, 2)), np.ones((3, 4, 2))])
    with pytest.raises(ValueError, match="at least one prompt"):
        token_geometry([])
    with pytest.raises(ValueError, match="prompt 0 hold no tokens"):
        token_geometry([np.ones((0, 3, 2))])
    with pytest.raises(ValueError, match=r"prompt 0 must be \[tokens, layers, hidden\]"):
        token_geometry([np.ones((3, 2))])
