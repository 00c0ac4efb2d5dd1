"""The measurements of "Lines of Thought in Large Language Models" (Sarfati, Liu, Boullé, Earls, arXiv 2410.01545,
ICLR 2025), on an ensemble of trajectories `states [sentences, T, hidden]`: the last token of many pseudo-sentences
after each layer t = 1..T (the embedding and the final norm left out, as in the paper).

* **Low dimension.** At each layer, the singular values of the (uncentred) hidden x sentences matrix M(t); the
  number of singular directions needed to hold `energy` (90 %) of its squared Frobenius norm, and that number as a
  fraction of the hidden size; and the same for the centred ensemble (its variance), since one large direction
  shared by every state can hold most of the uncentred norm alone. (The paper's own test truncates the state and compares next-token distributions by
  KL divergence, and finds about 256 of 1024 directions, 25 %, enough in GPT-2 medium; this is the
  variance-share reading of the same SVD.)
* **Linear drift.** From layer t to t' the ensemble is carried by a rotation and a stretch read off the two SVDs,
  `x~(t') = U(t') S(t') S(t)^-1 U(t)^T x(t)`, with the singular directions of t' matched to those of t by the
  sentences' coordinates (the right singular vectors V: each direction of t' is paired with the direction of t
  whose V it overlaps most, one to one, and its sign set so that the overlap is positive).
* **Residuals.** `dx = x(t') - x~(t')`, per coordinate over the sentences: mean, variance and excess kurtosis, then
  averaged over coordinates. The paper finds them Gaussian (excess kurtosis near 0), centred (|mean|/sd small) and
  with a variance that grows as `alpha * exp(lambda * t')` with the end layer t'.
* **lambda.** The slope of a least-squares line through ln(coordinate-mean variance) against t' over every pair
  t < t'; per layer, and times T as a rate per unit of normalised depth, so that models of different depth compare.
  The paper reports lambda = 0.18 per layer for GPT-2 medium (24 layers; 4.3 per unit depth) and 0.27 for Llama 2
  7B (32 layers) (arXiv v1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.optimize import linear_sum_assignment

from tokentrail.analysis.arrays import checked

__all__ = ["PAPER_LAMBDA", "DriftResiduals", "directions_needed", "drift_residuals", "fit_lambda", "linear_drift"]

# Per layer, from the paper (arXiv v1): GPT-2 medium (24 layers) and Llama 2 7B (32 layers).
PAPER_LAMBDA = {"gpt2-medium": (0.18, 24), "llama-2-7b": (0.27, 32)}


def _ensemble(states: np.ndarray) -> np.ndarray:
    values = checked(states, "[sentences, layers, hidden]", "trajectories", finite=True, min_length=2)
    if values.shape[1] < 2:
        raise ValueError(f"lines of thought need at least 2 layers, got {values.shape[1]}")
    return values


def directions_needed(states: np.ndarray, energy: float = 0.9, centred: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: how many singular directions of the ensemble hold `energy` of its squared norm, `[T]` ints, and
    that count over the hidden size, `[T]`. Uncentred as in the paper; `centred` subtracts each layer's mean
    first (its variance), which a large shared direction (a model's outlier features) cannot dominate."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    values = _ensemble(states)
    counts = np.zeros(values.shape[1], dtype=int)
    for layer in range(values.shape[1]):
        cloud = values[:, layer] - values[:, layer].mean(axis=0) if centred else values[:, layer]
        singular = np.linalg.svd(cloud, compute_uv=False)
        share = np.cumsum(singular**2) / np.sum(singular**2)
        counts[layer] = int(np.searchsorted(share, energy - 1e-12) + 1)
    return counts, counts / values.shape[2]


def _svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of `matrix [hidden, sentences]` keeping the directions with a non-zero singular value."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    keep = s > s[0] * 1e-10
    return u[:, keep], s[keep], vt[keep]


def _carry(start_svd: tuple[np.ndarray, ...], end_svd: tuple[np.ndarray, ...]) -> np.ndarray:
    """`[hidden, hidden]`: U(end) S(end) S(start)^-1 U(start)^T with the directions paired as the module says."""
    u0, s0, v0 = start_svd
    u1, s1, v1 = end_svd
    # Pair the directions of `end` with those of `start` by how the sentences load on them (|V overlap|).
    overlap = v1 @ v0.T  # [k1, k0]
    rows, cols = linear_sum_assignment(-np.abs(overlap))
    signs = np.sign(overlap[rows, cols])
    signs[signs == 0] = 1.0
    return (u1[:, rows] * (signs * s1[rows] / s0[cols])) @ u0[:, cols].T


def linear_drift(states: np.ndarray, start: int, end: int) -> np.ndarray:
    """`x~(end)` `[sentences, hidden]`: every sentence's state at `start` carried to `end` by the ensemble's
    rotation and stretch (module docstring)."""
    values = _ensemble(states)
    if not 0 <= start < end < values.shape[1]:
        raise ValueError(f"need 0 <= start < end < {values.shape[1]}, got start={start}, end={end}")
    carried = _carry(_svd(values[:, start].T), _svd(values[:, end].T))
    return values[:, start] @ carried.T


@dataclass(frozen=True)
class DriftResiduals:
    """For every pair start < end (arrays `[pairs]`): `start`, `end`, and over the coordinates the mean of the
    residual's variance across sentences, of |mean| / sd, and of the excess kurtosis."""

    start: np.ndarray
    end: np.ndarray
    variance: np.ndarray
    mean_over_sd: np.ndarray
    excess_kurtosis: np.ndarray


def drift_residuals(states: np.ndarray, max_gap: int | None = None) -> DriftResiduals:
    """Residuals around the linear drift for every pair of layers start < end (at most `max_gap` apart)."""
    values = _ensemble(states)
    layers = values.shape[1]
    svds = [_svd(values[:, layer].T) for layer in range(layers)]  # one SVD per layer, shared by every pair
    starts, ends, variances, ratios, kurtoses = [], [], [], [], []
    for start in range(layers - 1):
        for end in range(start + 1, layers if max_gap is None else min(layers, start + max_gap + 1)):
            residual = values[:, end] - values[:, start] @ _carry(svds[start], svds[end]).T  # [sentences, hidden]
            mean = residual.mean(axis=0)
            sd = residual.std(axis=0, ddof=1)
            usable = sd > 0
            starts.append(start)
            ends.append(end)
            variances.append(float(np.mean(sd**2)))
            ratios.append(float(np.mean(np.abs(mean[usable]) / sd[usable])) if usable.any() else np.nan)
            kurtoses.append(float(np.mean(stats.kurtosis(residual[:, usable], axis=0, fisher=True)))
                            if usable.any() else np.nan)
    return DriftResiduals(start=np.asarray(starts), end=np.asarray(ends), variance=np.asarray(variances),
                          mean_over_sd=np.asarray(ratios), excess_kurtosis=np.asarray(kurtoses))


def fit_lambda(residuals: DriftResiduals) -> tuple[float, float]:
    """(lambda, alpha): the least-squares line ln(variance) = ln(alpha) + lambda * end over every pair."""
    keep = np.isfinite(residuals.variance) & (residuals.variance > 0)
    if np.unique(residuals.end[keep]).size < 2:
        raise ValueError("fitting lambda needs residual variances at 2 or more end layers")
    slope, intercept = np.polyfit(residuals.end[keep].astype(np.float64), np.log(residuals.variance[keep]), 1)
    return float(slope), float(np.exp(intercept))
