"""Linear CKA against an independent implementation, its invariances, the debiased form and the null; mutual
k-nearest-neighbour alignment against hand-computed neighbour sets, its invariances and its chance level."""

from __future__ import annotations

import numpy as np
import pytest

from tokentrail.analysis.similarity import (
    cka_matrix,
    cka_permutation_null,
    gram_matrix,
    knn_neighbour_sets,
    linear_cka,
    mutual_knn_alignment,
    mutual_knn_chance,
    mutual_knn_matrix,
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


# ------------------------------------------------------------------------------------ mutual kNN alignment


def on_circle(degrees: list[float], radii: list[float] | None = None) -> np.ndarray:
    """2-D points at the given angles; the cosine distance between two of them depends on the angle alone."""
    angles = np.radians(np.asarray(degrees, dtype=np.float64))
    scale = np.ones(len(degrees)) if radii is None else np.asarray(radii, dtype=np.float64)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * scale[:, None]


def test_mutual_knn_hand_computed_example():
    """Five points in 2-D, k = 2. The angular gaps give the neighbour sets (nearest first):

    A at 0, 10, 30, 60, 100 degrees (lengths differ; cosine ignores them):
        0: 10 deg to 1, 30 to 2          -> {1, 2}
        1: 10 to 0, 20 to 2              -> {0, 2}
        2: 20 to 1, then 30 to 0 AND 3   -> {1, 0}  (tie: the lower index, 0)
        3: 30 to 2, 40 to 4              -> {2, 4}
        4: 40 to 3, 70 to 2              -> {3, 2}
    B at 0, 45, 20, 90, 135 degrees:
        0: 20 to 2, 45 to 1              -> {2, 1}
        1: 25 to 2, then 45 to 0 AND 3   -> {2, 0}  (tie: the lower index, 0)
        2: 20 to 0, 25 to 1              -> {0, 1}
        3: 45 to 1 and 4, 70 to 2        -> {1, 4}
        4: 45 to 3, 90 to 1              -> {3, 1}
    Shared: 2, 2, 2, 1 ({4}), 1 ({3}) of k = 2 -> (2 + 2 + 2 + 1 + 1) / (5 * 2) = 0.8; chance 2 / 4 = 0.5.
    """
    a = on_circle([0, 10, 30, 60, 100], radii=[1.0, 2.0, 0.5, 3.0, 1.5])
    b = on_circle([0, 45, 20, 90, 135])
    assert knn_neighbour_sets(a, k=2).tolist() == [[1, 2], [0, 2], [1, 0], [2, 4], [3, 2]]
    assert knn_neighbour_sets(b, k=2).tolist() == [[2, 1], [2, 0], [0, 1], [1, 4], [3, 1]]
    assert mutual_knn_alignment(a, b, k=2) == pytest.approx(0.8, abs=1e-15)
    assert mutual_knn_alignment(b, a, k=2) == pytest.approx(0.8, abs=1e-15)
    assert mutual_knn_chance(5, 2) == 0.5
    # k = 1: nearest only. A: 1, 0, 1, 2, 3; B: 2, 2, 0, 1 (tie with 4: lower index), 3 -> shared at 4 only.
    assert mutual_knn_alignment(a, b, k=1) == pytest.approx(1 / 5, abs=1e-15)
    # k = n - 1: every other point is a neighbour on both sides.
    assert mutual_knn_alignment(a, b, k=4) == 1.0 == mutual_knn_chance(5, 4)


def test_mutual_knn_never_counts_a_point_as_its_own_neighbour():
    """Duplicated rows are at distance 0 from each other: the duplicate is a neighbour, the row itself never is."""
    points = on_circle([0, 0, 50, 120, 200, 300])
    found = knn_neighbour_sets(points, k=3)
    assert not np.any(found == np.arange(6)[:, None])
    assert found[0, 0] == 1 and found[1, 0] == 0
    assert all(len(set(row)) == 3 for row in found.tolist())


def test_mutual_knn_zero_row_is_at_distance_one_from_everything():
    """As sklearn's cosine distance: a zero state has no direction, so it is equally far from every other."""
    points = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert knn_neighbour_sets(points, k=2).tolist() == [[1, 2], [3, 0], [3, 0], [1, 2]]


def test_mutual_knn_identical_representations_give_one():
    x, _ = random_pair(0)
    assert mutual_knn_alignment(x, x) == 1.0
    assert mutual_knn_alignment(x, x, k=29) == 1.0


def test_mutual_knn_is_invariant_to_rotation_and_scaling():
    """Cosine distances do not change under an orthogonal map or a positive scale, so neither do the sets."""
    x, y = random_pair(1, p=16)
    rotated = 37.5 * x @ random_orthogonal(16, seed=7)
    assert mutual_knn_alignment(x, rotated, k=5) == 1.0
    per_row = x * np.random.default_rng(3).uniform(0.1, 10.0, size=(x.shape[0], 1))  # each input its own scale
    assert mutual_knn_alignment(x, per_row, k=5) == 1.0
    assert mutual_knn_alignment(rotated, y, k=5) == mutual_knn_alignment(x, y, k=5)


def test_mutual_knn_is_not_translation_invariant():
    """Cosine looks at directions from the origin: the invariance tests above must be able to fail."""
    x, _ = random_pair(2)
    assert mutual_knn_alignment(x, x + 3.0 * np.abs(x).max(), k=5) < 1.0


def test_mutual_knn_of_independent_representations_is_near_chance():
    """Unrelated 20-d Gaussian states of n = 50 inputs, k = 5: the expectation is exactly k/(n-1) = 0.102.

    Tolerance: over 200 seeds one draw has a standard deviation of about 0.025 (measured while writing this
    test), so the mean of 30 draws has a standard error of about 0.0045; 0.02 is more than 4 standard errors,
    and still far below anything a related pair scores (the related pairs above score 0.4 or more).
    """
    n, k = 50, 5
    rng = np.random.default_rng(21)
    draws = [mutual_knn_alignment(rng.normal(size=(n, 20)), rng.normal(size=(n, 20)), k=k) for _ in range(30)]
    assert mutual_knn_chance(n, k) == pytest.approx(5 / 49)
    assert np.mean(draws) == pytest.approx(5 / 49, abs=0.02)
    x, y = random_pair(4, n=n)
    assert mutual_knn_alignment(x, y, k=k) > 0.4


def test_mutual_knn_is_high_dimensional_without_inflation():
    """Where plain CKA of unrelated 500-d states of 20 inputs is above 0.9, mutual kNN stays near chance."""
    n, k = 20, 5
    rng = np.random.default_rng(5)
    draws = [mutual_knn_alignment(rng.normal(size=(n, 500)), rng.normal(size=(n, 500)), k=k) for _ in range(30)]
    # One draw's standard deviation is about 0.05 at n = 20, so the mean of 30 is within 0.03 of 5/19 = 0.263.
    assert np.mean(draws) == pytest.approx(k / (n - 1), abs=0.03)


def test_mutual_knn_matrix_matches_pairwise_calls_and_needs_no_shared_width():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(15, 3, 7))
    b = np.concatenate([a[:, :2] @ rng.normal(size=(7, 19)), rng.normal(size=(15, 2, 19))], axis=1)
    matrix = mutual_knn_matrix(a, b, k=4)
    assert matrix.shape == (3, 4)
    expected = [[mutual_knn_alignment(a[:, i], b[:, j], k=4) for j in range(4)] for i in range(3)]
    np.testing.assert_array_equal(matrix, expected)
    assert np.all((matrix >= 0.0) & (matrix <= 1.0))
    assert np.all(matrix * (n := 15) * 4 == np.round(matrix * n * 4))  # a count of shared neighbours / (n k)


def test_mutual_knn_layer_without_neighbour_structure_is_nan():
    """All inputs in one direction: every distance ties, the sets would be the tie rule's alone (as CKA: nan)."""
    rng = np.random.default_rng(7)
    a = rng.normal(size=(10, 3, 5))
    a[:, 1] = rng.normal(size=5) * rng.uniform(1.0, 2.0, size=(10, 1))  # one direction, different lengths
    a[:, 2] = 0.0
    matrix = mutual_knn_matrix(a, a, k=3)
    assert matrix[0, 0] == 1.0
    assert np.isnan(matrix[1:]).all() and np.isnan(matrix[:, 1:]).all()
    assert knn_neighbour_sets(a[:, 1], k=3) is None


@pytest.mark.parametrize(
    ("a", "b", "k", "message"),
    [
        (np.ones((5, 3)), np.ones((6, 3)), 2, r"^both sides need the same inputs: got 5 and 6$"),
        (np.ones((5, 3)), np.ones((5, 3)), 5,
         r"^k must be less than the number of inputs \(5, so each has 4 others\), got 5$"),
        (np.ones((5, 3)), np.ones((5, 3)), 9, r"^k must be less than the number of inputs"),
        (np.ones((5, 3)), np.ones((5, 3)), 0, r"^k must be at least 1, got 0$"),
        (np.ones((5, 3)), np.ones((5, 3)), -2, r"^k must be at least 1, got -2$"),
        (np.ones((1, 3)), np.ones((1, 3)), 1, r"^mutual kNN needs at least 2 inputs, got 1$"),
        (np.full((5, 3), np.inf), np.ones((5, 3)), 2, r"^states_a holds nan or inf$"),
        (np.ones(5), np.ones((5, 3)), 2, r"^states_a must be \[inputs, features\], got shape \(5,\)$"),
    ],
)
def test_mutual_knn_bad_inputs(a, b, k, message):
    with pytest.raises(ValueError, match=message) as error:
        mutual_knn_alignment(a, b, k=k)
    assert "\n" not in str(error.value)


def test_mutual_knn_bad_k_for_the_matrix_and_the_chance_level():
    with pytest.raises(ValueError, match=r"^both sides need the same inputs: got 4 and 3$"):
        mutual_knn_matrix(np.ones((4, 2, 3)), np.ones((3, 2, 3)), k=1)
    with pytest.raises(ValueError, match=r"^k must be less than the number of inputs \(4"):
        mutual_knn_matrix(np.ones((4, 2, 3)), np.ones((4, 2, 3)), k=4)
    with pytest.raises(ValueError, match=r"^k must be at least 1, got 0$"):
        mutual_knn_chance(10, 0)
    with pytest.raises(ValueError, match=r"^k must be less than the number of inputs \(10"):
        mutual_knn_chance(10, 10)
    with pytest.raises(ValueError, match=r"^mutual kNN needs at least 2 inputs, got 1$"):
        mutual_knn_chance(1, 1)
    with pytest.raises(TypeError, match=r"^k must be an integer, got 2.5$"):
        mutual_knn_matrix(np.ones((4, 2, 3)), np.ones((4, 2, 3)), k=2.5)
    with pytest.raises(TypeError, match=r"^k must be an integer, got True$"):
        mutual_knn_chance(10, True)
