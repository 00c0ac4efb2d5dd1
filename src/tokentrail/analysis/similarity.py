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

Everything here is pure numpy on in-memory arrays; `tokentrail.compare` applies it to runs.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cka_matrix", "cka_permutation_null", "gram_matrix", "linear_cka", "standardize_features"]


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


def _check_states(states_a: np.ndarray, states_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
        raise ValueError(f"CKA needs at least 2 inputs, got {a.shape[0]}")
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
