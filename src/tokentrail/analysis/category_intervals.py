"""Per-category readings with 95 % bootstrap intervals: a category's mean by layer, where it ranks among the
categories, whether its place in the order survives resampling, and how often and when its prompts bifurcate.

"Word problems sit between story and math" is a statement about category means and their order. Each reading
here is recomputed on `n_boot` resamples of the prompts drawn with replacement within each category
(`analysis.intervals.resample_counts`); the per-prompt values (an axis score, a silhouette, a bifurcation layer)
are held fixed, so an interval is the spread due to which prompts the set holds, not due to refitting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from tokentrail.analysis.arrays import checked
from tokentrail.analysis.intervals import DEFAULT_BOOTSTRAP, percentile_interval, resample_counts

__all__ = ["BifurcationIntervals", "CategoryIntervals", "bifurcation_intervals", "category_intervals"]


@dataclass(frozen=True)
class CategoryIntervals:
    """Each category's mean of a per-prompt reading by layer, with intervals, ranks and order checks.

    Categories are in first-seen order. `rank` is 1 for the lowest mean at a layer; `rank_low`/`rank_high` are
    the 2.5 and 97.5 percentiles of the rank over resamples. `next_category[c, l]` is the category ranked just
    above c at layer l ("" for the highest) and `order_holds[c, l]` the share of resamples in which c's mean
    stays below it (nan for the highest): near 1, the order of the two is not an accident of the sample.
    """

    names: list[str]
    counts: np.ndarray  # [C] prompts with a reading at every layer
    mean: np.ndarray  # [C, L]
    low: np.ndarray  # [C, L]
    high: np.ndarray  # [C, L]
    rank: np.ndarray  # [C, L] int
    rank_low: np.ndarray  # [C, L] int
    rank_high: np.ndarray  # [C, L] int
    next_category: np.ndarray  # [C, L] str
    order_holds: np.ndarray  # [C, L]
    n_boot: int

    def rows(self) -> list[dict[str, object]]:
        """One row per category and layer, in table order."""
        return [
            {"category": name, "layer": layer, "prompts": int(self.counts[c]), "mean": self.mean[c, layer],
             "low": self.low[c, layer], "high": self.high[c, layer], "rank": int(self.rank[c, layer]),
             "rank_low": int(self.rank_low[c, layer]), "rank_high": int(self.rank_high[c, layer]),
             "next_category": str(self.next_category[c, layer]), "order_holds": self.order_holds[c, layer]}
            for c, name in enumerate(self.names) for layer in range(self.mean.shape[1])
        ]

    def at_layer(self, layer: int) -> dict[str, dict[str, object]]:
        """category -> its mean, interval, rank and rank interval at one layer (for summaries)."""
        return {name: {"mean": float(self.mean[c, layer]),
                       "interval": [float(self.low[c, layer]), float(self.high[c, layer])],
                       "rank": int(self.rank[c, layer]),
                       "rank_interval": [int(self.rank_low[c, layer]), int(self.rank_high[c, layer])]}
                for c, name in enumerate(self.names)}


def _ranks(means: np.ndarray, axis: int) -> np.ndarray:
    """1-based ranks along `axis` (ties broken by category order, as a stable sort does)."""
    return np.argsort(np.argsort(means, axis=axis, kind="stable"), axis=axis, kind="stable") + 1


def category_intervals(values: np.ndarray, categories: Sequence[str], n_boot: int = DEFAULT_BOOTSTRAP,
                       level: float = 0.95, seed: int = 0) -> CategoryIntervals | None:
    """Intervals for each category's mean of `values [prompts, layers]` (one reading per prompt and layer).

    Prompts with a nan at any layer have no reading (with --holdout, the prompts that fitted an axis) and are
    left out; so are categories with fewer than 2 prompts left, which no resample can vary. None when fewer than
    one category remains.
    """
    array = checked(values, "[prompts, layers]", "per-prompt readings")
    if len(categories) != array.shape[0]:
        raise ValueError(f"got {len(categories)} categories for {array.shape[0]} prompts")
    labels = np.asarray([str(c) for c in categories], dtype=object)
    usable = np.isfinite(array).all(axis=1)
    names = [name for name in dict.fromkeys(labels.tolist()) if np.sum(usable & (labels == name)) >= 2]
    if not names:
        return None
    kept = usable & np.isin(labels, names)
    rows, kept_labels = array[kept], labels[kept]
    members = [np.flatnonzero(kept_labels == name) for name in names]
    counts = np.array([m.size for m in members])
    draws = resample_counts(kept_labels.tolist(), n_boot, seed)  # [n_boot, kept prompts]
    # [n_boot, C, L]: each category's mean in each resample (its prompts' columns of the draws sum to its size)
    boot = np.stack([draws[:, m] @ rows[m] / m.size for m in members], axis=1)
    mean = np.stack([rows[m].mean(axis=0) for m in members])  # [C, L]
    low, high = percentile_interval(boot, level)
    rank = _ranks(mean, axis=0)
    boot_rank = _ranks(boot, axis=1)
    tail = (1 - level) / 2
    rank_low = np.quantile(boot_rank, tail, axis=0, method="lower")
    rank_high = np.quantile(boot_rank, 1 - tail, axis=0, method="higher")
    next_category = np.full(mean.shape, "", dtype=object)
    order_holds = np.full(mean.shape, np.nan)
    for layer in range(mean.shape[1]):
        order = np.argsort(mean[:, layer], kind="stable")
        for below, above in pairwise(order):
            next_category[below, layer] = names[above]
            order_holds[below, layer] = np.mean(boot[:, below, layer] < boot[:, above, layer])
    return CategoryIntervals(names, counts, mean, low, high, rank, rank_low, rank_high, next_category,
                             order_holds, int(n_boot))


@dataclass(frozen=True)
class BifurcationIntervals:
    """Per category: how many of its prompts bifurcate (`share`) and at which mean layer, with intervals.

    `mean_layer` averages the bifurcating prompts only; its interval comes from the resamples that hold at least
    one bifurcating prompt, and `defined_share` says what share of the resamples that is (near 1 for a reading
    worth quoting). All entries `[C]`; nan where no prompt of the category bifurcates.
    """

    names: list[str]
    prompts: np.ndarray
    bifurcating: np.ndarray
    share: np.ndarray
    share_low: np.ndarray
    share_high: np.ndarray
    mean_layer: np.ndarray
    mean_layer_low: np.ndarray
    mean_layer_high: np.ndarray
    defined_share: np.ndarray
    n_boot: int

    def rows(self) -> list[dict[str, object]]:
        return [{"category": name, "prompts": int(self.prompts[c]), "bifurcating": int(self.bifurcating[c]),
                 "share": self.share[c], "share_low": self.share_low[c], "share_high": self.share_high[c],
                 "mean_layer": self.mean_layer[c], "mean_layer_low": self.mean_layer_low[c],
                 "mean_layer_high": self.mean_layer_high[c], "resamples_with_a_layer": self.defined_share[c]}
                for c, name in enumerate(self.names)]


def bifurcation_intervals(layers: np.ndarray, categories: Sequence[str], n_boot: int = DEFAULT_BOOTSTRAP,
                          level: float = 0.95, seed: int = 0) -> BifurcationIntervals:
    """Intervals for each category's bifurcation share and mean bifurcation layer, from `layers [prompts]`
    (-1 = never; see `analysis.bifurcation.bifurcation_layers`)."""
    found = np.asarray(layers)
    if found.ndim != 1 or len(categories) != found.size:
        raise ValueError(f"need one bifurcation layer per prompt: got shape {found.shape} for "
                         f"{len(categories)} prompts")
    labels = np.asarray([str(c) for c in categories], dtype=object)
    names = list(dict.fromkeys(labels.tolist()))
    left = (found >= 0).astype(np.float64)
    at = np.where(found >= 0, found, 0).astype(np.float64)
    draws = resample_counts(labels.tolist(), n_boot, seed)
    columns: dict[str, list[float]] = {key: [] for key in ("share", "share_low", "share_high", "mean_layer",
                                                           "mean_layer_low", "mean_layer_high", "defined")}
    for name in names:
        rows = np.flatnonzero(labels == name)
        boot_left = draws[:, rows] @ left[rows]  # [n_boot]: bifurcating prompts drawn
        boot_share = boot_left / rows.size
        with np.errstate(invalid="ignore", divide="ignore"):
            boot_layer = np.where(boot_left > 0, (draws[:, rows] @ (at[rows] * left[rows])) / boot_left, np.nan)
        share_low, share_high = percentile_interval(boot_share[:, None], level)
        layer_low, layer_high = percentile_interval(boot_layer[:, None], level)
        n_left = left[rows].sum()
        columns["share"].append(n_left / rows.size)
        columns["share_low"].append(float(share_low[0]))
        columns["share_high"].append(float(share_high[0]))
        columns["mean_layer"].append(float((at[rows] * left[rows]).sum() / n_left) if n_left else np.nan)
        columns["mean_layer_low"].append(float(layer_low[0]) if n_left else np.nan)
        columns["mean_layer_high"].append(float(layer_high[0]) if n_left else np.nan)
        columns["defined"].append(float(np.mean(boot_left > 0)))
    return BifurcationIntervals(
        names=names,
        prompts=np.array([np.sum(labels == n) for n in names]),
        bifurcating=np.array([int(left[labels == n].sum()) for n in names]),
        share=np.array(columns["share"]), share_low=np.array(columns["share_low"]),
        share_high=np.array(columns["share_high"]), mean_layer=np.array(columns["mean_layer"]),
        mean_layer_low=np.array(columns["mean_layer_low"]), mean_layer_high=np.array(columns["mean_layer_high"]),
        defined_share=np.array(columns["defined"]), n_boot=int(n_boot),
    )
