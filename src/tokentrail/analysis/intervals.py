"""Bootstrap confidence intervals over prompts, resampling within categories.

A reading such as "the categories separate best at layer 30" is a mean over the prompts of the set. Which prompts
were written is a sample: `stratified_bootstrap_mean` resamples them with replacement within each category (so
every resample keeps the category sizes) and takes the percentile interval of the mean over `n_boot` resamples.
The per-prompt values are held fixed (each computed once, against the whole set), so a resampled duplicate never
meets itself as a neighbour; the interval is the spread due to which prompts the set holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tokentrail.analysis.arrays import checked

__all__ = ["DEFAULT_BOOTSTRAP", "stratified_bootstrap_mean"]

DEFAULT_BOOTSTRAP = 1000


def stratified_bootstrap_mean(values: np.ndarray, strata: Sequence[str], n_boot: int = DEFAULT_BOOTSTRAP,
                              level: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(low, high), each `[columns]`: the percentile interval at `level` of the mean over prompts of
    `values [prompts, columns]`, from `n_boot` resamples of the prompts within each stratum."""
    array = checked(values, "[prompts, columns]", "per-prompt values")
    if len(strata) != array.shape[0]:
        raise ValueError(f"got {len(strata)} strata for {array.shape[0]} prompts")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    labels = np.asarray(list(strata), dtype=object)
    rng = np.random.default_rng(seed)
    # [n_boot, prompts]: how often resample b draws each prompt, every stratum drawn with replacement from itself
    # (counts rather than indices, so that memory stays n_boot x prompts whatever the number of columns).
    draws = np.zeros((n_boot, array.shape[0]))
    for name in dict.fromkeys(strata):
        rows = np.flatnonzero(labels == name)
        draws[:, rows] = rng.multinomial(rows.size, np.full(rows.size, 1.0 / rows.size), size=n_boot)
    means = draws @ array / array.shape[0]  # [n_boot, columns]
    tail = (1 - level) / 2
    return np.quantile(means, tail, axis=0), np.quantile(means, 1 - tail, axis=0)
