"""How similar two sets of representations of the same inputs are: linear CKA and its debiased form.

Centered kernel alignment (Kornblith et al., 2019) compares two representations `X [n, p]` and `Y [n, q]` of the
same n inputs through their n x n Gram matrices, so p and q need not match: two models of different widths
can be compared layer by layer. Linear CKA is

    CKA(X, Y) = <Kc, Lc>_F / (||Kc||_F ||Lc||_F),   K = X X^T, L = Y Y^T, Kc = H K H,  H = I - 11^T/n

which equals ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F). It is invariant to orthogonal transforms and
isotropic scaling of either side and to translations (the columns are centred), not to other linear maps.

The plain estimator is biased upwards when the inputs are few and the features many: with n = 21 prompts and
hundreds of hidden units, unrelated representations can score far above 0. Two corrections are offered:

* `debiased=True` uses the unbiased HSIC estimator (Song et al., 2012) in its U-centred form (Szekely & Rizzo,
  2014); the result is no longer confined to [0, 1] and is noisy for small n, but centred near 0 for unrelated
  representations.
* `cka_permutation_null` scores the same layers with the inputs of one side shuffled, which gives the CKA that
  this n and these feature spectra produce by chance.

Linear CKA weighs each direction by its variance; where one unit carries most of it (the "massive
activations" of many LMs), CKA mostly compares that unit. `standardize_features` gives every unit unit variance
first, a check on how much of a result such units carry.

Mutual k-nearest-neighbour alignment (Huh et al., 2024, "The Platonic Representation Hypothesis") asks a
different question, with no Gram matrix and no variance weighting: do the two representations give each input
the same nearest neighbours? For every input, N_A is the set of its k nearest *other* inputs in X and N_B the
same in Y, and

    mutual_knn(X, Y) = mean over inputs of |N_A ∩ N_B| / k

Neighbours are by cosine distance (1 - cos) on the raw rows, so the measure is invariant to orthogonal maps and
to any positive scaling of either side (isotropic or per input), not to translations; it needs no shared width.
A zero row has no direction: as in sklearn, it lies at cosine distance 1 from every other row. The search is
sklearn's `NearestNeighbors` (brute force, cosine), each input's own row excluded. Ties are resolved
deterministically: distances equal to 10 decimals count as tied (so rounding in the last bits
cannot order them), and tied neighbours are taken in order of input index, the lower index first. A layer
whose distances between inputs are *all* tied (every input in one direction, or all rows zero) has no
neighbour structure, and its alignment is nan, as is CKA's.

If the two neighbour sets are unrelated (the inputs of one side shuffled, or any side independent of the other
and its inputs exchangeable), each of the k neighbours of an input in X is among its k neighbours in Y with
probability k / (n - 1), so the expected alignment is k / (n - 1) for n inputs (`mutual_knn_chance`); 1 means
the same neighbours everywhere.

Everything here is pure numpy and scikit-learn on in-memory arrays; `tokentrail.compare` applies it to runs.
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.neighbors import NearestNeighbors

__all__ = [
    "cka_matrix",
    "cka_permutation_null",
    "gram_matrix",
    "knn_neighbour_sets",
    "linear_cka",
    "mutual_knn_alignment",
    "mutual_knn_chance",
    "mutual_knn_matrix",
    "standardize_features",
]

# Cosine distances (in [0, 2]) that agree to this many decimals are ties, broken by the lower input index.
_TIE_DECIMALS = 10


def _as_2d(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be [inputs, features], got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds nan or inf")
    return array


def gram_matrix(values: np.ndarray) -> np.ndarray:
    """The linear kernel X X^T of the rows, computed on column-centred X (so it is already centred)."""
    array = _as_2d(values, "values")
    centred = array - array.mean(axis=0, keepdims=True)
    return centred @ centred.T


def _u_centre(gram: np.ndarray) -> np.ndarray:
    """The U-centred Gram matrix: <U(K), U(L)> / (n (n - 3)) is the unbiased HSIC of K and L."""
    n = gram.shape[0]
    if n < 4:
        raise ValueError(f"debiased CKA needs at least 4 inputs, got {n}")
    off = gram.copy()
    np.fill_diagonal(off, 0.0)
    rows = off.sum(axis=1, keepdims=True) / (n - 2)
    cols = off.sum(axis=0, keepdims=True) / (n - 2)
    total = off.sum() / ((n - 1) * (n - 2))
    centred = off - rows - cols + total
    np.fill_diagonal(centred, 0.0)
    return centred


def _normalised_grams(states: np.ndarray, debiased: bool) -> np.ndarray:
    """One centred Gram matrix per layer, flattened and scaled to unit norm: `[n_layers, n * n]`.

    A layer whose inputs all share one state has a zero Gram matrix; its row stays zero and its CKA is nan.
    """
    n_inputs, n_layers, _ = states.shape
    flat = np.zeros((n_layers, n_inputs * n_inputs))
    norms = np.zeros(n_layers)
    for layer in range(n_layers):
        gram = gram_matrix(states[:, layer])
        if debiased:
            gram = _u_centre(gram)
        flat[layer] = gram.ravel()
        norms[layer] = np.linalg.norm(flat[layer])
    # A Gram matrix this small relative to the data's scale is rounding noise of identical states.
    scale = max(float(np.abs(states).max()) ** 2 * states.shape[2], 1e-300)
    usable = norms > 1e-12 * scale
    flat[usable] /= norms[usable, None]
    flat[~usable] = np.nan
    return flat


def standardize_features(states: np.ndarray) -> np.ndarray:
    """Each feature of `states [n, layers, p]` centred and scaled to unit variance across the inputs, per layer.

    Linear CKA weighs directions by their variance, so a single "massive activation" unit can carry most of a
    layer's CKA; on standardised features every unit counts alike. A unit constant across the inputs stays 0.
    """
    values = np.asarray(states, dtype=np.float64)
    if values.ndim != 3:
        raise ValueError(f"states must be [inputs, layers, features], got shape {values.shape}")
    centred = values - values.mean(axis=0, keepdims=True)
    scale = centred.std(axis=0, keepdims=True)
    # Relative to the layer's largest spread, so that a constant unit's rounding noise is not blown up.
    usable = scale > 1e-12 * np.maximum(scale.max(axis=2, keepdims=True), 1e-300)
    return np.where(usable, centred / np.where(usable, scale, 1.0), 0.0)


def _check_states(states_a: np.ndarray, states_b: np.ndarray, what: str = "CKA") -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(states_a, dtype=np.float64)
    b = np.asarray(states_b, dtype=np.float64)
    for name, array in (("states_a", a), ("states_b", b)):
        if array.ndim != 3:
            raise ValueError(f"{name} must be [inputs, layers, features], got shape {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} holds nan or inf")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"both sides need the same inputs: got {a.shape[0]} and {b.shape[0]}")
    if a.shape[0] < 2:
        raise ValueError(f"{what} needs at least 2 inputs, got {a.shape[0]}")
    return a, b


def linear_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    """Linear CKA of `x [n, p]` and `y [n, q]` (rows are the same n inputs); nan if either side is constant."""
    x = _as_2d(x, "x")
    y = _as_2d(y, "y")
    return float(cka_matrix(x[:, None, :], y[:, None, :], debiased=debiased)[0, 0])


def cka_matrix(states_a: np.ndarray, states_b: np.ndarray, debiased: bool = False) -> np.ndarray:
    """Linear CKA between every layer of `states_a [n, La, p]` and every layer of `states_b [n, Lb, q]`.

    Returns `[La, Lb]`; one matrix product over precomputed Gram matrices, so a 31 x 19 grid costs little.
    """
    a, b = _check_states(states_a, states_b)
    grams_a = _normalised_grams(a, debiased)
    grams_b = _normalised_grams(b, debiased)
    return grams_a @ grams_b.T


def cka_permutation_null(
    states_a: np.ndarray,
    states_b: np.ndarray,
    n_permutations: int = 200,
    seed: int = 0,
    debiased: bool = False,
) -> np.ndarray:
    """CKA of every layer pair with the inputs of `states_b` shuffled: `[n_permutations, La, Lb]`.

    Shuffling keeps each side's own geometry (its spectrum, the high dimension) and destroys only the pairing
    of inputs, so the result is what CKA reads when the two representations share nothing about the inputs.
    """
    a, b = _check_states(states_a, states_b)
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be at least 1, got {n_permutations}")
    n = a.shape[0]
    grams_a = _normalised_grams(a, debiased)
    grams_b = _normalised_grams(b, debiased).reshape(-1, n, n)
    rng = np.random.default_rng(seed)
    null = np.empty((n_permutations, a.shape[1], b.shape[1]))
    for i in range(n_permutations):
        order = rng.permutation(n)
        # Permuting the inputs permutes rows and columns of each Gram matrix alike; norms are unchanged.
        shuffled = grams_b[:, order][:, :, order].reshape(b.shape[1], n * n)
        null[i] = grams_a @ shuffled.T
    return null


def _check_k(k: int, n: int) -> int:
    """k as an int, refused unless 1 <= k <= n - 1 (each input has n - 1 others)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an integer, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k >= n:
        raise ValueError(f"k must be less than the number of inputs ({n}, so each has {n - 1} others), got {k}")
    return int(k)


def knn_neighbour_sets(points: np.ndarray, k: int = 5) -> np.ndarray | None:
    """The k nearest other rows of every row of `points [n, d]` by cosine distance: `[n, k]` input indices.

    Nearest first; rows at the same distance (to `_TIE_DECIMALS` decimals) in order of index, the lower first.
    None where all distances between rows are tied and k < n - 1, so the sets would come from the tie rule
    alone (with k = n - 1 every set is all the other rows, whatever the distances).
    """
    values = _as_2d(points, "points")
    n = values.shape[0]
    k = _check_k(k, n)
    search = NearestNeighbors(n_neighbors=n - 1, metric="cosine", algorithm="brute").fit(values)
    # Without a query, sklearn leaves each row's own entry out: every other row, by distance.
    distances, indices = search.kneighbors()
    distances = np.round(distances, _TIE_DECIMALS)
    if k < n - 1 and np.ptp(distances) == 0.0:
        return None
    order = np.lexsort((indices, distances), axis=1)  # by distance, then by index
    return np.take_along_axis(indices, order, axis=1)[:, :k]


def _layer_sets(states: np.ndarray, k: int) -> list[np.ndarray | None]:
    return [knn_neighbour_sets(states[:, layer], k) for layer in range(states.shape[1])]


def mutual_knn_chance(n: int, k: int = 5) -> float:
    """The expected mutual kNN alignment of unrelated neighbour sets of n inputs: k / (n - 1)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an integer, got {n!r}")
    if n < 2:
        raise ValueError(f"mutual kNN needs at least 2 inputs, got {n}")
    return _check_k(k, int(n)) / (int(n) - 1)


def mutual_knn_matrix(states_a: np.ndarray, states_b: np.ndarray, k: int = 5) -> np.ndarray:
    """Mutual kNN alignment of every layer of `states_a [n, La, p]` with every layer of `states_b [n, Lb, q]`.

    Returns `[La, Lb]` in [0, 1] (nan for a layer without neighbour structure); the neighbour sets are found
    once per layer, so the grid costs La + Lb searches.
    """
    a, b = _check_states(states_a, states_b, what="mutual kNN")
    n = a.shape[0]
    k = _check_k(k, n)
    sets_a, sets_b = _layer_sets(a, k), _layer_sets(b, k)
    usable_b = [j for j, found in enumerate(sets_b) if found is not None]
    stacked_b = np.stack([sets_b[j] for j in usable_b]) if usable_b else np.zeros((0, n, k), dtype=int)
    result = np.full((a.shape[1], b.shape[1]), np.nan)
    for i, found in enumerate(sets_a):
        if found is None or not usable_b:
            continue
        # The k indices of a set are distinct, so counting equal pairs counts the shared neighbours.
        shared = (found[None, :, :, None] == stacked_b[:, :, None, :]).sum(axis=(1, 2, 3))
        result[i, usable_b] = shared / (n * k)
    return result


def mutual_knn_alignment(states_a: np.ndarray, states_b: np.ndarray, k: int = 5) -> float:
    """Mutual kNN alignment of `states_a [n, p]` and `states_b [n, q]` (rows are the same n inputs), in [0, 1]."""
    a = _as_2d(states_a, "states_a")
    b = _as_2d(states_b, "states_b")
    return float(mutual_knn_matrix(a[:, None, :], b[:, None, :], k=k)[0, 0])
