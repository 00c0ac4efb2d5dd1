"""What the principal components of a projection measure, with 95 % bootstrap intervals.

The seed reads its PCA plot as "PC1 is time (the layers), PC2 is the language space (natural vs formal)". Three
readings per component make that testable:

* `depth_spearman`: each prompt's Spearman correlation between its layer index and its coordinate along its
  own trajectory, averaged over prompts (+1: the component grows with depth for every prompt);
* `category_share` (per layer): the share of the component's variance across prompts at that layer that lies
  between the category means (eta squared; 1: the component only tells the categories apart). With no category
  effect at all it is still (C - 1) / (N - 1) on average for C categories and N prompts: that is its `chance`;
* `axis_correlation` (per layer, where an axis score exists): Pearson's r across prompts between the coordinate
  and the prompt's axis score (e.g. natural -> formal); +-1: the component is the axis at that layer.

Intervals come from resamples of the prompts within categories (`analysis.intervals.resample_counts`); the
fitted components are held fixed, so an interval says how much the reading depends on which prompts were drawn,
given these axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from tokentrail.analysis.arrays import checked
from tokentrail.analysis.intervals import DEFAULT_BOOTSTRAP, percentile_interval, resample_counts

__all__ = ["READINGS", "component_readings"]

READINGS = ("depth_spearman", "category_share", "axis_correlation")


def _weighted_moments(weights: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and sum of squared deviations of each column of `x [P, K]` for each row of
    `weights [B, P]`: ([B, K], [B, K])."""
    total = weights.sum(axis=1, keepdims=True)
    mean = weights @ x / total
    return mean, weights @ (x**2) - total * mean**2


def _category_share(weights: np.ndarray, x: np.ndarray, members: list[np.ndarray]) -> np.ndarray:
    """`[B, K]`: between-category sum of squares over total sum of squares, per weighting and column."""
    mean, total_ss = _weighted_moments(weights, x)
    between = np.zeros_like(total_ss)
    for rows in members:
        size = weights[:, rows].sum(axis=1, keepdims=True)
        between += size * (weights[:, rows] @ x[rows] / size - mean) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total_ss > 0, between / np.where(total_ss > 0, total_ss, 1.0), np.nan)


def _correlation(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """`[B, K]`: weighted Pearson r between each column of `x [P, K]` and the same column of `y [P, K]`."""
    total = weights.sum(axis=1, keepdims=True)
    mean_x, ss_x = _weighted_moments(weights, x)
    mean_y, ss_y = _weighted_moments(weights, y)
    cross = weights @ (x * y) - total * mean_x * mean_y
    scale = np.sqrt(np.clip(ss_x, 0, None) * np.clip(ss_y, 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, cross / np.where(scale > 0, scale, 1.0), np.nan)


def _depth_spearman(coordinates: np.ndarray) -> np.ndarray:
    """`[P, K]`: per prompt and component, Spearman's rho between the layer order and the coordinate."""
    n_layers = coordinates.shape[1]
    ranks = rankdata(coordinates, axis=1)  # [P, T, K], ties averaged as scipy.stats.spearmanr does
    order = np.arange(1, n_layers + 1, dtype=np.float64)
    centred_order = order - order.mean()
    centred = ranks - ranks.mean(axis=1, keepdims=True)
    denominator = np.sqrt(np.sum(centred**2, axis=1) * np.sum(centred_order**2))
    numerator = np.einsum("ptk,t->pk", centred, centred_order)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def _row(component: int, reading: str, layer: int | None, value: float, low: float, high: float,
         prompts: int, chance: float | None = None) -> dict[str, object]:
    return {"component": f"pc{component + 1}", "reading": reading, "layer": layer, "value": value, "low": low,
            "high": high, "prompts": prompts, "chance": chance}


def component_readings(
    projection: np.ndarray,
    layers: Sequence[int],
    categories: Sequence[str],
    axis_scores: np.ndarray | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    level: float = 0.95,
    seed: int = 0,
) -> list[dict[str, object]]:
    """The readings of the module docstring for `projection [prompts, T, components]` at `layers [T]`.

    `axis_scores [prompts, L+1]` (nan for prompts without a score) gives `axis_correlation` at the projection
    layers it covers. Returns one row per component and reading (and layer, for the per-layer readings):
    component ("pc1"...), reading, layer (None for depth_spearman), value, low, high, prompts (how many the
    reading used), chance (category_share's value with no category effect; None for the other readings).
    """
    coordinates = checked(projection, "[prompts, layers, components]", "projected coordinates", finite=True,
                          min_length=2)
    n_prompts, n_layers, n_components = coordinates.shape
    layer_list = [int(layer) for layer in layers]
    if len(layer_list) != n_layers:
        raise ValueError(f"got {len(layer_list)} layers for a projection of {n_layers}")
    if len(categories) != n_prompts:
        raise ValueError(f"got {len(categories)} categories for {n_prompts} prompts")
    labels = np.asarray([str(c) for c in categories], dtype=object)
    names = list(dict.fromkeys(labels.tolist()))
    members = [np.flatnonzero(labels == name) for name in names]
    draws = resample_counts(labels.tolist(), n_boot, seed)  # [B, P]
    everyone = np.ones((1, n_prompts))
    rows: list[dict[str, object]] = []

    rho = _depth_spearman(coordinates)  # [P, K]
    for component in range(n_components):
        # A prompt whose coordinate never changes has no rank correlation; it is left out of the mean.
        values = rho[:, component]
        present = np.isfinite(values)
        kept = np.where(present, values, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = (draws @ kept) / (draws @ present.astype(np.float64))
        low, high = percentile_interval(boot[:, None], level)
        value = float(kept.sum() / present.sum()) if present.any() else np.nan
        rows.append(_row(component, "depth_spearman", None, value, float(low[0]), float(high[0]),
                         int(present.sum())))

    flat = coordinates.reshape(n_prompts, n_layers * n_components)  # column = layer * K + component
    if len(names) >= 2:
        chance = (len(names) - 1) / (n_prompts - 1)
        observed = _category_share(everyone, flat, members)[0]
        low, high = percentile_interval(_category_share(draws, flat, members), level)
        for component in range(n_components):
            for position, layer in enumerate(layer_list):
                column = position * n_components + component
                rows.append(_row(component, "category_share", layer, observed[column], low[column], high[column],
                                 n_prompts, chance))

    if axis_scores is not None:
        scores = checked(axis_scores, "[prompts, layers]", "axis scores")
        if scores.shape[0] != n_prompts:
            raise ValueError(f"got axis scores for {scores.shape[0]} prompts, the projection has {n_prompts}")
        covered = [(position, layer) for position, layer in enumerate(layer_list) if layer < scores.shape[1]]
        scored = np.isfinite(scores).all(axis=1)
        if covered and scored.sum() >= 3:
            positions = [position for position, _ in covered]
            x = coordinates[scored][:, positions, :].reshape(int(scored.sum()), -1)
            y = np.repeat(scores[scored][:, [layer for _, layer in covered]], n_components, axis=1)
            scored_draws = resample_counts(labels[scored].tolist(), n_boot, seed)
            observed = _correlation(np.ones((1, x.shape[0])), x, y)[0]
            low, high = percentile_interval(_correlation(scored_draws, x, y), level)
            for component in range(n_components):
                for index, (_, layer) in enumerate(covered):
                    column = index * n_components + component
                    rows.append(_row(component, "axis_correlation", layer, observed[column], low[column],
                                     high[column], int(scored.sum())))
    return rows
