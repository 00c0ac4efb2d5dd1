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

__all__ = ["DEFAULT_BOOTSTRAP", "percentile_interval", "resample_counts", "stratified_bootstrap_mean"]

DEFAULT_BOOTSTRAP = 1000


def stratified_bootstrap_mean(values: np.ndarray, strata: Sequence[str], n_boot: int = DEFAULT_BOOTSTRAP,
                              level: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(low, high), each `[columns]`: the percentile interval at `level` of the mean over prompts of
    `values [prompts, columns]`, from `n_boot` resamples of the prompts within each stratum."""
    array = checked(values, "[prompts, columns]", "per-prompt values")
    if len(strata) != array.shape[0]:
        raise ValueError(f"got {len(strata)} strata for {array.shape[0]} prompts")
    means = resample_counts(strata, n_boot, seed) @ array / array.shape[0]  # [n_boot, columns]
    return percentile_interval(means, level)


def resample_counts(strata: Sequence[str], n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """`[n_boot, prompts]`: how often each resample draws each prompt, every stratum drawn with replacement
    from itself (so each resample keeps the strata sizes). Counts rather than indices, so that any statistic
    that is a sum over prompts is one matrix product, whatever its number of columns."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    labels = np.asarray(list(strata), dtype=object)
    rng = np.random.default_rng(seed)
    draws = np.zeros((n_boot, labels.size))
    for name in dict.fromkeys(labels.tolist()):
        rows = np.flatnonzero(labels == name)
        draws[:, rows] = rng.multinomial(rows.size, np.full(rows.size, 1.0 / rows.size), size=n_boot)
    return draws


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(low, high): the percentile interval at `level` over axis 0 of `samples [n_boot, ...]`, ignoring nan
    (a statistic a resample cannot define, such as a mean over none of its prompts); nan where every resample is
    nan."""
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    values = np.asarray(samples, dtype=np.float64)
    tail = (1 - level) / 2
    defined = np.isfinite(values).any(axis=0)
    filled = np.where(defined[None], values, 0.0)  # all-nan columns: nanquantile would warn, the answer is nan
    low, high = np.nanquantile(filled, tail, axis=0), np.nanquantile(filled, 1 - tail, axis=0)
    return np.where(defined, low, np.nan), np.where(defined, high, np.nan)
