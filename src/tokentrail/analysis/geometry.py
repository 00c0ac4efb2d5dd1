"""The shape of a cloud of states at each layer: intrinsic dimension, anisotropy and effective rank.

For a cloud `points [n, d]` (n points, one per row):

* intrinsic dimension: TwoNN (Facco, d'Errico, Rodriguez & Laio 2017, Sci. Rep. 7:12140), as implemented by
  scikit-dimension's `skdim.id.TwoNN` with its defaults (the paper's recipe: the ratios mu = r2 / r1 of each
  point's second to first nearest-neighbour distance, the largest 10% discarded, and the dimension the slope of
  a line through the origin fitted to (log mu, -log(1 - F_empirical(mu)))). Exact duplicate rows are dropped
  first: a point with a twin has r1 = 0 and an undefined ratio, and its neighbours would see r1 = r2 (mu = 1),
  which biases the estimate down. With fewer than 3 distinct points left the estimate is nan, and so it is
  when every kept ratio is 1 (each point's two nearest neighbours equally far, as on a regular simplex);
* top_pc_share: the share of the total variance on the first principal component of the centred cloud,
  s_1^2 / sum_i s_i^2 for the singular values s_i of the centred cloud; nan when the cloud has no variance;
* mean_cosine_to_mean: the mean over points of cos(x_i, m), m = the mean of the points, NOT centred (how much
  the raw states share one direction); a zero point counts as cosine 0; nan when m = 0;
* effective_rank: Roy & Vetterli (2007), exp(H(p)) with p_i = s_i / sum_j s_j for the singular values s_i of
  the centred cloud and H the Shannon entropy in nats (0 log 0 = 0); k equal non-zero singular values give
  exactly k. nan when the cloud has no variance.

`geometry_by_layer` measures the last-token cloud across prompts (`states [prompts, n_layers, hidden]`) at each
layer; `token_geometry` measures each prompt's own token cloud (`token_states`, one `[tokens, n_layers, hidden]`
array per prompt).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import entropy

# TwoNN needs two neighbours per point, and with its 10% discard at least 2 ratios to fit a line: 3 points.
MIN_TWONN_POINTS = 3

# log(r2 / r1) up to this size is a ratio of 1 blurred by the rounding of the distances.
_LOG_RATIO_ROUNDING = 1e-9

GEOMETRY_KEYS = ("intrinsic_dimension", "top_pc_share", "mean_cosine_to_mean", "effective_rank")


def _skdim() -> Any:
    """scikit-dimension, imported on first use (it pulls in numba, which is slow to import)."""
    return importlib.import_module("skdim")


def _check_points(points: np.ndarray) -> np.ndarray:
    values = np.asarray(points, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"points must be [n, d], got shape {values.shape}")
    if values.shape[0] < 1 or values.shape[1] < 1:
        raise ValueError(f"points must hold at least one point of at least one coordinate, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("points contain nan or inf")
    return values


def intrinsic_dimension(points: np.ndarray) -> float:
    """TwoNN intrinsic dimension of `points [n, d]` (n >= 3); nan if fewer than 3 distinct points remain.

    Exact duplicate rows are dropped before the estimate (see the module docstring).
    """
    values = _check_points(points)
    if values.shape[0] < MIN_TWONN_POINTS:
        raise ValueError(
            f"intrinsic dimension needs at least {MIN_TWONN_POINTS} points, got {values.shape[0]}"
        )
    distinct = np.unique(values, axis=0)
    if distinct.shape[0] < MIN_TWONN_POINTS:
        return float("nan")
    # Distances do not change under a translation, and centring keeps the |x|^2 + |y|^2 - 2xy distances that
    # the estimator computes from cancelling badly when the states are far from the origin.
    distinct = distinct - distinct.mean(axis=0)
    if distinct.shape[1] == 1:
        # scikit-dimension refuses a single feature; a zero second coordinate leaves every distance unchanged.
        distinct = np.hstack([distinct, np.zeros_like(distinct)])
    estimator = _skdim().id.TwoNN().fit(distinct)
    if not np.max(estimator.x_) > _LOG_RATIO_ROUNDING:
        # Every kept ratio is 1 (equidistant neighbours, as on a regular simplex): the line has no slope to
        # find, and the fit returns 0, or a huge number when rounding leaves some log ratios at 1e-16.
        return float("nan")
    return float(estimator.dimension_)


def _centred_singular_values(values: np.ndarray) -> np.ndarray:
    return np.linalg.svd(values - values.mean(axis=0), compute_uv=False)


def anisotropy(points: np.ndarray) -> tuple[float, float]:
    """(top_pc_share, mean_cosine_to_mean) of `points [n, d]`, as defined in the module docstring."""
    values = _check_points(points)
    squared = _centred_singular_values(values) ** 2
    total = float(squared.sum())
    top_share = float(squared[0] / total) if total > 0 else float("nan")

    mean = values.mean(axis=0)
    mean_norm = float(np.linalg.norm(mean))
    if mean_norm == 0:
        return top_share, float("nan")
    norms = np.linalg.norm(values, axis=1)
    cosines = np.where(norms > 0, (values @ mean) / (np.where(norms > 0, norms, 1.0) * mean_norm), 0.0)
    return top_share, float(np.mean(np.clip(cosines, -1.0, 1.0)))


def effective_rank(points: np.ndarray) -> float:
    """Roy & Vetterli's effective rank of the centred `points [n, d]`; nan when they have no variance."""
    values = _check_points(points)
    singular = _centred_singular_values(values)
    if not singular.sum() > 0:
        return float("nan")
    # scipy normalises the singular values to a distribution and treats 0 log 0 as 0.
    return float(np.exp(entropy(singular)))


def _cloud_measures(cloud: np.ndarray) -> tuple[float, float, float, float]:
    """All four measures of one cloud `[n, d]`; the intrinsic dimension is nan below 3 points."""
    dimension = intrinsic_dimension(cloud) if cloud.shape[0] >= MIN_TWONN_POINTS else float("nan")
    top_share, mean_cosine = anisotropy(cloud)
    return dimension, top_share, mean_cosine, effective_rank(cloud)


def geometry_by_layer(states: np.ndarray) -> dict[str, np.ndarray]:
    """The four measures of the cloud of prompts' states at each layer of `states [prompts, n_layers, hidden]`.

    Returns `intrinsic_dimension`, `top_pc_share`, `mean_cosine_to_mean`, `effective_rank`, each `[n_layers]`.
    """
    values = np.asarray(states, dtype=np.float64)
    if values.ndim != 3:
        raise ValueError(f"states must be [prompts, layers, hidden], got shape {values.shape}")
    if values.shape[0] < MIN_TWONN_POINTS:
        raise ValueError(f"geometry across prompts needs at least {MIN_TWONN_POINTS} prompts, got {values.shape[0]}")
    n_layers = values.shape[1]
    result = {key: np.empty(n_layers) for key in GEOMETRY_KEYS}
    for layer in range(n_layers):
        for key, value in zip(GEOMETRY_KEYS, _cloud_measures(values[:, layer])):
            result[key][layer] = value
    return result


def token_geometry(token_states: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The four measures of each prompt's token cloud, per layer: each `[prompts, n_layers]`.

    `token_states` holds one `[tokens, n_layers, hidden]` array per prompt, all with the same number of layers.
    A measure a prompt has too few tokens for is nan: the intrinsic dimension below 3 tokens (or 3 distinct
    ones), the top-PC share and the effective rank below 2 (a single point has no variance).
    """
    clouds = [np.asarray(tokens, dtype=np.float64) for tokens in token_states]
    if not clouds:
        raise ValueError("token_geometry needs at least one prompt's token states")
    for index, tokens in enumerate(clouds):
        if tokens.ndim != 3:
            raise ValueError(f"token states of prompt {index} must be [tokens, layers, hidden], got shape {tokens.shape}")
        if tokens.shape[0] < 1:
            raise ValueError(f"token states of prompt {index} hold no tokens")
    n_layers = clouds[0].shape[1]
    for index, tokens in enumerate(clouds):
        if tokens.shape[1] != n_layers:
            raise ValueError(f"prompt {index} has {tokens.shape[1]} layers, prompt 0 has {n_layers}")
    result = {key: np.empty((len(clouds), n_layers)) for key in GEOMETRY_KEYS}
    for index, tokens in enumerate(clouds):
        for layer in range(n_layers):
            for key, value in zip(GEOMETRY_KEYS, _cloud_measures(tokens[:, layer])):
                result[key][index, layer] = value
    return result
