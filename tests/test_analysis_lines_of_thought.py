"""The Lines-of-Thought measurements on ensembles built so that the answer is known: a chosen singular spectrum,
trajectories that are exactly a rotation and a stretch of one another, residuals of a chosen distribution, and a
variance that grows as alpha * exp(lambda * t)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ortho_group

from tokentrail.analysis.lines_of_thought import (
    DriftResiduals,
    directions_needed,
    drift_residuals,
    fit_lambda,
    linear_drift,
)


def _rotated_ensemble(seed: int = 0, sentences: int = 40, hidden: int = 12, layers: int = 5, rank: int = 6):
    """x(t) = U(t) S(t) V^T: the same sentence coordinates V at every layer, rotated and stretched."""
    rng = np.random.default_rng(seed)
    v = np.linalg.qr(rng.standard_normal((sentences, rank)))[0]  # [sentences, rank], orthonormal columns
    states = np.zeros((sentences, layers, hidden))
    for layer in range(layers):
        u = ortho_group.rvs(hidden, random_state=seed * 100 + layer)[:, :rank]
        s = rng.uniform(1.0, 10.0, rank)  # a new order of the singular values at every layer
        states[:, layer] = (u @ np.diag(s) @ v.T).T
    return states


def test_directions_needed_from_a_chosen_spectrum():
    rng = np.random.default_rng(1)
    hidden, sentences = 10, 30
    u = ortho_group.rvs(hidden, random_state=2)
    v = np.linalg.qr(rng.standard_normal((sentences, hidden)))[0]
    singular = np.array([3.0, 2.0, 1.0, 1.0, 0.5, 0, 0, 0, 0, 0])
    layer = (u @ np.diag(singular) @ v.T).T  # [sentences, hidden]
    states = np.stack([layer, layer], axis=1)
    energy = singular**2 / np.sum(singular**2)  # 9, 4, 1, 1, 0.25 of 15.25
    counts, fractions = directions_needed(states, energy=0.9)
    assert np.cumsum(energy)[1] < 0.9 <= np.cumsum(energy)[2]  # by hand: 13/15.25 < 0.9 <= 14/15.25
    assert counts.tolist() == [3, 3] and fractions.tolist() == [0.3, 0.3]
    assert directions_needed(states, energy=1.0)[0].tolist() == [5, 5]
    # A large shared offset holds the uncentred norm alone; centring leaves the spectrum chosen above (v has
    # orthonormal columns, so adding one more direction along a constant vector is seen only uncentred).
    shifted = states + 100.0 * ortho_group.rvs(hidden, random_state=3)[0]
    assert directions_needed(shifted, energy=0.9)[0].tolist() == [1, 1]
    centred = directions_needed(shifted, energy=0.9, centred=True)[0]
    by_hand = np.linalg.svd(layer - layer.mean(axis=0), compute_uv=False)
    share = np.cumsum(by_hand**2) / np.sum(by_hand**2)
    assert centred.tolist() == [int(np.argmax(share >= 0.9)) + 1] * 2
    with pytest.raises(ValueError, match="energy"):
        directions_needed(states, energy=0)


def test_a_rotation_and_stretch_is_carried_exactly():
    states = _rotated_ensemble()
    for start, end in ((0, 1), (0, 4), (2, 3)):
        np.testing.assert_allclose(linear_drift(states, start, end), states[:, end], atol=1e-9)
    residuals = drift_residuals(states)
    assert len(residuals.start) == 10  # every pair of 5 layers
    assert np.all(residuals.variance < 1e-18)


def test_residual_statistics_tell_gaussian_from_heavy_tailed_noise():
    # Signal in the first 2 of 20 coordinates, noise only in the other 18 at the last layer: the residual there is
    # the noise itself, whose excess kurtosis is 0 (Gaussian) or 3 (Laplace).
    rng = np.random.default_rng(4)
    signal = _rotated_ensemble(seed=3, sentences=4000, hidden=2, layers=3, rank=2)
    clean = np.concatenate([signal, np.zeros((4000, 3, 18))], axis=2)
    for noise, kurtosis in ((rng.standard_normal, 0.0), (rng.laplace, 3.0)):
        states = clean.copy()
        states[:, 2, 2:] += 0.05 * noise(size=(4000, 18))
        residuals = drift_residuals(states)
        last = residuals.end == 2
        assert np.mean(residuals.excess_kurtosis[last]) == pytest.approx(kurtosis, abs=0.5)
        assert np.all(residuals.mean_over_sd[last] < 0.1)


def test_lambda_from_variances_that_grow_exponentially():
    starts, ends = np.triu_indices(8, k=1)
    variance = 0.64 * np.exp(0.18 * ends)
    lam, alpha = fit_lambda(DriftResiduals(start=starts, end=ends, variance=variance,
                                           mean_over_sd=np.zeros_like(variance),
                                           excess_kurtosis=np.zeros_like(variance)))
    assert lam == pytest.approx(0.18, abs=1e-12) and alpha == pytest.approx(0.64, rel=1e-12)
    with pytest.raises(ValueError, match="2 or more end layers"):
        fit_lambda(DriftResiduals(start=np.array([0]), end=np.array([1]), variance=np.array([1.0]),
                                  mean_over_sd=np.array([0.0]), excess_kurtosis=np.array([0.0])))


def test_refusals():
    with pytest.raises(ValueError, match="trajectories"):
        directions_needed(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="start"):
        linear_drift(_rotated_ensemble(), 3, 3)
