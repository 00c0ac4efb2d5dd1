"""Linear CKA against an independent implementation, its invariances, the debiased form and the null."""

from __future__ import annotations

import numpy as np
import pytest

from tokentrail.analysis.similarity import (
    cka_matrix,
    cka_permutation_null,
    gram_matrix,
    linear_cka,
    standardize_features,
)


def reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Feature-space formula with an explicit centring matrix (Kornblith et al. 2019, eq. 2), no Gram tricks."""
    n = x.shape[0]
    centring = np.eye(n) - np.ones((n, n)) / n
    xc, yc = centring @ x, centring @ y
    cross = np.linalg.norm(yc.T @ xc, "fro") ** 2
    return float(cross / (np.linalg.norm(xc.T @ xc, "fro") * np.linalg.norm(yc.T @ yc, "fro")))


def reference_unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, written out term by term."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    ones = np.ones(n)
    value = (
        np.trace(kt @ lt)
        + (ones @ kt @ ones) * (ones @ lt @ ones) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (ones @ kt @ lt @ ones)
    )
    return float(value / (n * (n - 3)))


def reference_debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    k, l = x @ x.T, y @ y.T
    return reference_unbiased_hsic(k, l) / np.sqrt(reference_unbiased_hsic(k, k) * reference_unbiased_hsic(l, l))


def random_pair(seed: int, n: int = 30, p: int = 12, q: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Two related representations of different widths: y is a noisy nonlinear function of x."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)) * rng.uniform(0.2, 3.0, size=p)  # anisotropic, as real states are
    y = np.tanh(x @ rng.normal(size=(p, q))) + 0.5 * rng.normal(size=(n, q)) + 3.0
    return x, y


def random_orthogonal(size: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(size, size)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("seed", range(5))
def test_matches_independent_implementation(seed):
    x, y = random_pair(seed)
    assert linear_cka(x, y) == pytest.approx(reference_cka(x, y), rel=1e-10, abs=1e-12)
    assert linear_cka(x, y, debiased=True) == pytest.approx(reference_debiased_cka(x - x.mean(0), y - y.mean(0)),
                                                            rel=1e-8, abs=1e-10)


def test_debiased_estimator_does_not_depend_on_centring_the_features():
    x, y = random_pair(3)
    assert reference_debiased_cka(x, y) == pytest.approx(linear_cka(x, y, debiased=True), rel=1e-8)


@pytest.mark.parametrize("debiased", [False, True])
def test_identity_gives_one(debiased):
    x, _ = random_pair(0)
    assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_invariances(debiased):
    x, y = random_pair(1, p=16)
    base = linear_cka(x, y, debiased=debiased)
    rotated = x @ random_orthogonal(16, seed=7)
    assert linear_cka(rotated, y, debiased=debiased) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x, rotated, debiased=debiased) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(37.5 * x, 0.01 * y, debiased=debiased) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x + 1e3, y - 42.0, debiased=debiased) == pytest.approx(base, rel=1e-7)
    assert linear_cka(y, x, debiased=debiased) == pytest.approx(base, rel=1e-12)


def test_not_invariant_to_anisotropic_scaling():
    """The invariance tests must be able to fail: stretching one feature changes CKA."""
    x, y = random_pair(2)
    stretched = x.copy()
    stretched[:, 0] *= 25.0
    assert abs(linear_cka(stretched, y) - linear_cka(x, y)) > 1e-3


def test_range_and_different_widths():
    rng = np.random.default_rng(4)
    for _ in range(10):
        x = rng.normal(size=(15, int(rng.integers(1, 50))))
        y = rng.normal(size=(15, int(rng.integers(1, 50))))
        assert 0.0 <= linear_cka(x, y) <= 1.0 + 1e-12


def test_few_inputs_many_features_inflates_plain_cka_not_debiased():
    """Why the comparison reports a null: unrelated 500-d states of 20 inputs score near 1."""
    rng = np.random.default_rng(5)
    plain = [linear_cka(rng.normal(size=(20, 500)), rng.normal(size=(20, 500))) for _ in range(10)]
    debiased = [linear_cka(rng.normal(size=(20, 500)), rng.normal(size=(20, 500)), debiased=True)
                for _ in range(10)]
    assert np.mean(plain) > 0.9
    assert abs(np.mean(debiased)) < 0.1


def test_matrix_matches_pairwise_calls_and_needs_no_shared_width():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(12, 4, 7))
    b = rng.normal(size=(12, 6, 19))
    for debiased in (False, True):
        matrix = cka_matrix(a, b, debiased=debiased)
        assert matrix.shape == (4, 6)
        expected = [[linear_cka(a[:, i], b[:, j], debiased=debiased) for j in range(6)] for i in range(4)]
        np.testing.assert_allclose(matrix, expected, rtol=1e-10, atol=1e-12)


def test_constant_layer_gives_nan_not_a_number_from_rounding():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(10, 3, 5))
    a[:, 1] = rng.normal(size=5)  # every input has the same state at layer 1
    matrix = cka_matrix(a, a)
    assert np.isnan(matrix[1]).all() and np.isnan(matrix[:, 1]).all()
    assert matrix[0, 0] == pytest.approx(1.0) and matrix[2, 2] == pytest.approx(1.0)


def test_gram_matrix_is_centred():
    x, _ = random_pair(8)
    gram = gram_matrix(x)
    np.testing.assert_allclose(gram.sum(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(gram, gram.T)


def test_permutation_null_is_cka_of_shuffled_inputs():
    rng = np.random.default_rng(9)
    a = rng.normal(size=(14, 3, 6))
    b = a[:, :, :4] @ rng.normal(size=(4, 8)) + 0.1 * rng.normal(size=(14, 3, 8))
    null = cka_permutation_null(a, b, n_permutations=5, seed=11)
    assert null.shape == (5, 3, 3)
    orders = np.random.default_rng(11)
    for i in range(5):
        order = orders.permutation(14)
        np.testing.assert_allclose(null[i], cka_matrix(a, b[order]), rtol=1e-10)
    observed = cka_matrix(a, b)
    assert np.all(np.diag(observed) > null.max(axis=0).diagonal())


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (np.zeros((5, 2, 3)), np.zeros((6, 2, 3)), "same inputs"),
        (np.zeros((5, 3)), np.zeros((5, 2, 3)), r"must be \[inputs, layers, features\]"),
        (np.full((5, 2, 3), np.nan), np.zeros((5, 2, 3)), "nan or inf"),
        (np.zeros((1, 2, 3)), np.zeros((1, 2, 3)), "at least 2 inputs"),
    ],
)
def test_bad_inputs(a, b, message):
    with pytest.raises(ValueError, match=message):
        cka_matrix(a, b)


def test_debiased_needs_four_inputs():
    with pytest.raises(ValueError, match="at least 4 inputs"):
        linear_cka(np.eye(3), np.eye(3), debiased=True)


def test_standardized_features_undo_a_massive_unit():
    """One unit with 1000x the spread dominates plain CKA; standardising every unit gives it back its share."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(25, 1, 30))
    y = x.copy() + 0.1 * rng.normal(size=x.shape)
    massive = x.copy()
    massive[:, :, 0] = 1000.0 * rng.normal(size=(25, 1))  # a unit unrelated to y, with huge variance
    assert cka_matrix(massive, y)[0, 0] < 0.2
    assert cka_matrix(standardize_features(massive), standardize_features(y))[0, 0] > 0.8
    z = standardize_features(massive)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=0), 1.0, rtol=1e-12)


def test_standardized_constant_unit_stays_zero():
    states = np.random.default_rng(13).normal(size=(6, 2, 4))
    states[:, 1, 2] = 5.0
    z = standardize_features(states)
    assert np.all(z[:, 1, 2] == 0.0) and np.all(np.isfinite(z))
