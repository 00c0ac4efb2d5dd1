"""The residual stream read as an ordinary differential equation in depth.

A residual block computes h_{l+1} = h_l + f_l(h_l): one explicit Euler step of dh/dt = f(h, t) with step 1
(Chen, Rubanova, Bettencourt & Duvenaud 2018). For `states [prompts, n_layers, hidden]` (n_layers = L + 1:
the embedding, then each of the L blocks) and block l = 0..L-1:

* step = ||h_{l+1} - h_l|| and relative_step = step / ||h_l|| (nan where ||h_l|| = 0): how far each Euler step
  goes, in absolute terms and relative to where it starts; `[prompts, L]`;
* update linearity: how much of the update dh_l = h_{l+1} - h_l is a linear (affine) function of h_l across
  prompts, dh_l ~ W h_l + b. It is the out-of-sample R^2 of a ridge regression (scikit-learn `Ridge`, a small
  `alpha`) under K-fold cross-validation over prompts (`KFold(n_splits, shuffle=True, random_state=seed)`),
  pooled over the folds:
      R^2 = 1 - sum over held-out prompts of ||dh_i - prediction_i||^2 / sum over all prompts of ||dh_i - mean dh||^2
  (the mean taken over all prompts). It has to be out of sample: with fewer prompts than hidden dimensions an
  affine map fitted to the same prompts passes through every one of them, so an in-sample R^2 is 1 whatever the
  block does. Noise that no linear map predicts scores about 0 or below; nan where the update does not vary
  (its spread across prompts is within rounding of the size of the states);
* expansion rates: given the norms ||delta_l|| of the separation between a perturbed and an unperturbed
  trajectory at every layer (`separations [runs, n_layers]`), the finite-time (Lyapunov-like) expansion rate
  of block l is the mean over runs of log(||delta_{l+1}|| / ||delta_l||): > 0 where the block pulls nearby
  trajectories apart, < 0 where it draws them together.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold

from tokentrail.analysis.arrays import checked

# Relative size of the rounding in a difference of two states (float64 holds about 16 digits; margin left).
_ROUNDING = 1e-10


def _check_states(states: np.ndarray) -> np.ndarray:
    values = checked(states, "[prompts, layers, hidden]", "states", finite=True)
    if values.shape[1] < 2:
        raise ValueError(f"an Euler step needs at least 2 layers per trajectory, got {values.shape[1]}")
    return values


def euler_steps(states: np.ndarray) -> dict[str, np.ndarray]:
    """`step [prompts, L]` = ||h_{l+1} - h_l|| and `relative_step [prompts, L]` = step / ||h_l|| (nan at 0)."""
    values = _check_states(states)
    step = np.linalg.norm(np.diff(values, axis=1), axis=-1)
    start_norm = np.linalg.norm(values[:, :-1], axis=-1)
    usable = start_norm > 0
    relative = np.where(usable, step / np.where(usable, start_norm, 1.0), np.nan)
    return {"step": step, "relative_step": relative}


def update_linearity(states: np.ndarray, n_splits: int = 5, alpha: float = 1e-3, seed: int = 0) -> np.ndarray:
    """Out-of-sample R^2 of the best affine map h_l -> h_{l+1} - h_l, per block: `[L]` (see the module docstring).

    Needs at least `n_splits` prompts (every fold holds out at least one).
    """
    values = _check_states(states)
    n_prompts, n_layers, _ = values.shape
    if n_splits < 2:
        raise ValueError(f"cross-validation needs n_splits >= 2, got {n_splits}")
    if n_prompts < n_splits:
        raise ValueError(f"update linearity with {n_splits} folds needs at least {n_splits} prompts, got {n_prompts}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be 0 or more, got {alpha}")
    # The same folds at every block, so the blocks are compared on the same held-out prompts.
    folds = list(KFold(n_splits=n_splits, shuffle=True, random_state=seed).split(np.arange(n_prompts)))
    r_squared = np.empty(n_layers - 1)
    for layer in range(n_layers - 1):
        inputs = values[:, layer]  # [P, H]
        updates = values[:, layer + 1] - inputs  # [P, H]
        total = float(np.sum((updates - updates.mean(axis=0)) ** 2))
        # h_{l+1} - h_l carries rounding of the size of the states, so an update that is the same for every
        # prompt leaves a variance of that size, not 0: below it there is nothing to explain.
        if total <= _ROUNDING**2 * float(np.sum(inputs**2) + np.sum(values[:, layer + 1] ** 2)):
            r_squared[layer] = np.nan
            continue
        residual = 0.0
        for train, test in folds:
            model = Ridge(alpha=alpha).fit(inputs[train], updates[train])
            residual += float(np.sum((updates[test] - model.predict(inputs[test])) ** 2))
        r_squared[layer] = 1.0 - residual / total
    return r_squared


def expansion_rates(separations: np.ndarray) -> np.ndarray:
    """Mean over runs of log(||delta_{l+1}|| / ||delta_l||) for `separations [runs, n_layers]`: `[n_layers - 1]`."""
    values = checked(separations, "[runs, layers]", "separations")
    if values.shape[1] < 2:
        raise ValueError(f"an expansion rate needs at least 2 layers, got {values.shape[1]}")
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        run, layer = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"separation norms must be positive and finite (a log is taken); run {run} has {values[run, layer]}"
            f" at layer {layer}"
        )
    return np.mean(np.diff(np.log(values), axis=1), axis=0)
