"""How a trajectory moves from layer to layer: step sizes, angles, norms, curvature.

With `n_layers` states per prompt there are `n_layers - 1` steps (step s goes from layer s to layer s + 1) and
`n_layers - 2` turns (turn t is the angle between step t and step t + 1, i.e. the bend at layer t + 1).

Divisions by a quantity that is zero or below `ZERO_TOLERANCE` in absolute value (a zero state, a zero step, a
step with no PC1 change) give nan instead of inf or an arbitrary angle; sums over such values skip the nans.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

ZERO_TOLERANCE = 1e-12


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    usable = np.abs(denominator) > ZERO_TOLERANCE
    safe = np.where(usable, denominator, 1.0)
    return np.where(usable, numerator / safe, np.nan)


def _angle_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in radians between vectors along the last axis; nan where either is (almost) zero."""
    cosine = _divide(np.sum(a * b, axis=-1), np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.arccos(np.clip(cosine, -1.0, 1.0))


def trajectory_dynamics(states: np.ndarray) -> dict[str, np.ndarray]:
    """Dynamics of trajectories `states [prompts, n_layers, hidden]` in the full hidden space.

    Returns (P = prompts, S = n_layers - 1 steps):
      step_size [P, S]          ||h[l+1] - h[l]||
      relative_step [P, S]      step_size / ||h[l]||
      cosine_successive [P, S]  cos(h[l], h[l+1])
      norm [P, n_layers]        ||h[l]||
      norm_growth [P, S]        ||h[l+1]|| / ||h[l]||
      turning_angle [P, S - 1]  angle between step l and step l + 1, radians in [0, pi]
      arc_length [P]            sum of step sizes
      total_curvature [P]       sum of turning angles (nan turns skipped)
    """
    values = np.asarray(states, dtype=np.float64)
    if values.ndim != 3:
        raise ValueError(f"states must be [prompts, layers, hidden], got shape {values.shape}")
    if values.shape[1] < 2:
        raise ValueError(f"dynamics need at least 2 layers per trajectory, got {values.shape[1]}")
    steps = np.diff(values, axis=1)
    step_size = np.linalg.norm(steps, axis=-1)
    norm = np.linalg.norm(values, axis=-1)
    cosine = _divide(np.sum(values[:, :-1] * values[:, 1:], axis=-1), norm[:, :-1] * norm[:, 1:])
    turning = _angle_between(steps[:, :-1], steps[:, 1:])
    return {
        "step_size": step_size,
        "relative_step": _divide(step_size, norm[:, :-1]),
        "cosine_successive": np.clip(cosine, -1.0, 1.0),
        "norm": norm,
        "norm_growth": _divide(norm[:, 1:], norm[:, :-1]),
        "turning_angle": turning,
        "arc_length": step_size.sum(axis=1),
        "total_curvature": np.nansum(turning, axis=1),
    }


def projected_dynamics(projection: np.ndarray) -> dict[str, np.ndarray]:
    """Motion in a projection `[prompts, layers, k]` (k >= 2), by finite differences between layers.

    Returns, each `[prompts, layers - 1]`:
      speed             length of the step in the projected plane/space
      velocity_pc2_pc1  dPC2 / dPC1, the seed's "velocity"; nan where dPC1 is (almost) zero
      heading           atan2(dPC2, dPC1) in radians, the same direction without the blow-up near dPC1 = 0
    """
    values = np.asarray(projection, dtype=np.float64)
    if values.ndim != 3 or values.shape[2] < 2:
        raise ValueError(f"projection must be [prompts, layers, k>=2], got shape {values.shape}")
    if values.shape[1] < 2:
        raise ValueError(f"projected dynamics need at least 2 layers, got {values.shape[1]}")
    steps = np.diff(values, axis=1)
    return {
        "speed": np.linalg.norm(steps, axis=-1),
        "velocity_pc2_pc1": _divide(steps[..., 1], steps[..., 0]),
        "heading": np.arctan2(steps[..., 1], steps[..., 0]),
    }


def category_summary(values: np.ndarray, categories: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per category (in order of first appearance): nan-aware mean and population std over its prompts.

    `values` is `[prompts, T]` (or `[prompts]`, giving 0-d arrays); a column that is nan for every prompt of a
    category gives nan.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.shape[0] != len(categories):
        raise ValueError(f"values have {data.shape[0]} rows but there are {len(categories)} categories")
    labels = np.asarray(list(categories), dtype=object)
    summary: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in dict.fromkeys(categories):
        rows = data[labels == name]
        with warnings.catch_warnings():
            # An all-nan column is an expected outcome here (e.g. an undefined velocity), not a problem.
            warnings.simplefilter("ignore", RuntimeWarning)
            summary[name] = (np.nanmean(rows, axis=0), np.nanstd(rows, axis=0))
    return summary
