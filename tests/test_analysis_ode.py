"""Euler steps, update linearity and expansion rates on trajectories built with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.model_selection import KFold

from tokentrail.analysis.ode import euler_steps, expansion_rates, update_linearity


def test_euler_steps_by_hand():
    states = np.array([[[0.0, 0.0], [3.0, 4.0], [3.0, 4.0], [6.0, 8.0]],
                       [[1.0, 0.0], [1.0, 2.0], [0.0, 2.0], [0.0, 0.0]]])
    result = euler_steps(states)
    np.testing.assert_allclose(result["step"], [[5.0, 0.0, 5.0], [2.0, 1.0, 2.0]])
    assert math.isnan(result["relative_step"][0, 0])  # the step starts at the origin
    np.testing.assert_allclose(result["relative_step"][0, 1:], [0.0, 1.0])
    np.testing.assert_allclose(result["relative_step"][1], [2.0, 1.0 / math.sqrt(5.0), 1.0])


def affine_trajectories(n_prompts: int, hidden: int, n_blocks: int, seed: int) -> np.ndarray:
    """h_{l+1} = h_l + A_l h_l + b_l exactly, a different (A_l, b_l) per block."""
    rng = np.random.default_rng(seed)
    states = [rng.normal(size=(n_prompts, hidden))]
    for _ in range(n_blocks):
        a = rng.normal(scale=0.3, size=(hidden, hidden))
        b = rng.normal(size=hidden)
        states.append(states[-1] + states[-1] @ a.T + b)
    return np.stack(states, axis=1)


def test_an_affine_update_is_fully_linear():
    states = affine_trajectories(n_prompts=300, hidden=6, n_blocks=3, seed=0)
    r_squared = update_linearity(states)
    assert r_squared.shape == (3,)
    assert np.all(r_squared > 0.9999)


def test_noise_updates_are_not_linear_even_with_fewer_prompts_than_dimensions():
    rng = np.random.default_rng(1)
    n_prompts, hidden = 30, 50
    h0 = rng.normal(size=(n_prompts, hidden))
    h1 = h0 + rng.normal(size=(n_prompts, hidden))  # an update that h0 says nothing about
    states = np.stack([h0, h1], axis=1)
    # In sample, an affine map through 30 points in 50 dimensions fits them exactly: R^2 = 1, a meaningless 1.
    design = np.hstack([h0, np.ones((n_prompts, 1))])
    update = h1 - h0
    coefficients, *_ = np.linalg.lstsq(design, update, rcond=None)
    in_sample = 1 - np.sum((update - design @ coefficients) ** 2) / np.sum((update - update.mean(axis=0)) ** 2)
    assert in_sample == pytest.approx(1.0)
    assert update_linearity(states)[0] < 0.05


def test_noise_updates_with_many_prompts():
    rng = np.random.default_rng(2)
    h0 = rng.normal(size=(400, 5))
    states = np.stack([h0, h0 + rng.normal(size=h0.shape)], axis=1)
    assert update_linearity(states)[0] < 0.05


def test_pooled_out_of_sample_r_squared_written_out():
    # A partly linear update, and the definition computed with closed-form ridge (centred, intercept unpenalised).
    rng = np.random.default_rng(3)
    n_prompts, hidden, alpha = 40, 4, 0.5
    h0 = rng.normal(size=(n_prompts, hidden))
    update = h0 @ rng.normal(size=(hidden, hidden)) + 0.7 * rng.normal(size=(n_prompts, hidden)) + 2.0
    states = np.stack([h0, h0 + update], axis=1)
    residual = 0.0
    for train, test in KFold(n_splits=4, shuffle=True, random_state=5).split(h0):
        x_mean, y_mean = h0[train].mean(axis=0), update[train].mean(axis=0)
        xc, yc = h0[train] - x_mean, update[train] - y_mean
        weights = np.linalg.solve(xc.T @ xc + alpha * np.eye(hidden), xc.T @ yc)
        prediction = (h0[test] - x_mean) @ weights + y_mean
        residual += np.sum((update[test] - prediction) ** 2)
    expected = 1 - residual / np.sum((update - update.mean(axis=0)) ** 2)
    assert update_linearity(states, n_splits=4, alpha=alpha, seed=5)[0] == pytest.approx(expected, rel=1e-9)


def test_a_constant_update_has_no_variance_to_explain():
    rng = np.random.default_rng(4)
    h0 = rng.normal(size=(10, 3))
    states = np.stack([h0, h0 + [1.0, 2.0, 3.0]], axis=1)
    assert math.isnan(update_linearity(states)[0])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: euler_steps(np.ones((3, 4))), r"states must be \[prompts, layers, hidden\]"),
        (lambda: euler_steps(np.ones((3, 1, 4))), "at least 2 layers"),
        (lambda: update_linearity(np.ones((4, 3, 2))), "needs at least 5 prompts, got 4"),
        (lambda: update_linearity(np.ones((8, 3, 2)), n_splits=1), "n_splits >= 2"),
        (lambda: update_linearity(np.ones((8, 3, 2)), alpha=-1.0), "alpha must be 0 or more"),
        (lambda: update_linearity(np.full((8, 3, 2), np.inf)), "nan or inf"),
    ],
)
def test_steps_and_linearity_refuse_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_exponential_separations_give_their_rate():
    rates = np.array([0.5, -0.2, 0.0, 1.3])
    layers = np.concatenate([[0.0], np.cumsum(rates)])  # log ||delta_l|| - log ||delta_0||
    starts = np.array([[1e-3], [2e-4], [5e-2]])
    separations = starts * np.exp(layers)[None, :]  # [3 runs, 5 layers]
    np.testing.assert_allclose(expansion_rates(separations), rates, atol=1e-12)


def test_expansion_rate_is_the_mean_over_runs():
    run_rates = np.array([0.1, 0.4, 1.0])
    separations = 1e-2 * np.exp(run_rates[:, None] * np.arange(6)[None, :])  # e^{lambda_r l}
    np.testing.assert_allclose(expansion_rates(separations), np.full(5, run_rates.mean()), atol=1e-12)


@pytest.mark.parametrize(
    ("separations", "message"),
    [
        (np.array([[1.0, 0.5, 0.0]]), "positive and finite.*run 0 has 0.0 at layer 2"),
        (np.array([[1.0, 2.0], [1.0, -1.0]]), "positive and finite.*run 1 has -1.0 at layer 1"),
        (np.array([[1.0, np.nan]]), "positive and finite"),
        (np.ones(4), r"separations must be \[runs, layers\]"),
        (np.ones((2, 1)), "at least 2 layers"),
        (np.ones((0, 3)), "no runs"),
    ],
)
def test_expansion_rates_refuse_bad_input(separations, message):
    with pytest.raises(ValueError, match=message):
        expansion_rates(separations)
