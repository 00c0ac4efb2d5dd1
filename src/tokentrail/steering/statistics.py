"""Statistics of an accuracy experiment scored on the same problems under several conditions.

Every test and interval comes from SciPy's tested implementations; what is written here is only which one
applies and how its inputs are formed:

- `wilson_interval`: Wilson score interval of one accuracy (`binomtest(...).proportion_ci(method="wilson")`);
  unlike the normal interval it stays in [0, 1] and is not degenerate at 0 correct.
- `mcnemar_p`: exact McNemar test of two conditions on the same problems, which is the two-sided binomial test
  of the discordant pairs (gained vs lost) at 1/2.
- `paired_interval`: 95 % interval of a mean gain from per-problem differences (t interval of the paired
  differences, `ttest_1samp(...).confidence_interval()`).
- `exchangeable_p`: exact paired test of the steered direction against the random directions' answers, problem
  by problem (is the steered direction just one more random draw?).
- `empirical_p`: where an observed gain falls in a null distribution of gains (random directions): the share of
  null gains at least as large, counting the observed one, so it is never 0.
- `holm`: Holm's step-down adjustment across a family of p-values (every steered cell of a grid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for `k` successes in `n` trials; (nan, nan) for no trials."""
    if n <= 0:
        return (float("nan"), float("nan"))
    interval = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(interval.low), float(interval.high))


def mcnemar_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar test on the discordant pairs of two conditions scored on the same problems."""
    n = int(gained) + int(lost)
    if n == 0:
        return 1.0
    return float(stats.binomtest(int(gained), n, 0.5).pvalue)


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Interval of the mean of per-problem differences (e.g. steered minus baseline correctness, in -1/0/1)."""
    values = np.asarray(differences, dtype=np.float64)
    if len(values) < 2:
        return (float("nan"), float("nan"))
    if np.all(values == values[0]):  # no spread: the t interval is undefined, the mean is exact
        return (float(values[0]), float(values[0]))
    interval = stats.ttest_1samp(values, 0.0).confidence_interval(confidence_level=confidence)
    return (float(interval.low), float(interval.high))


def exchangeable_p(steered: Sequence[bool], draws: np.ndarray) -> float:
    """Exact one-sided test that the steered direction does better than random directions, problem by problem.

    Under the null hypothesis the steered direction is one more random draw: on each problem its answer is
    exchangeable with the R random directions' answers, so it is correct with probability k_i / (R + 1), where
    k_i counts the correct answers among all R + 1 on that problem. The number of problems the steered direction
    gets right is then a sum of independent Bernoulli(k_i / (R + 1)); p is the exact probability that this sum
    reaches the observed count (its distribution computed by convolution). `draws` is bool [R, N].
    """
    steered = np.asarray(steered, dtype=bool)
    draws = np.asarray(draws, dtype=bool)
    if draws.ndim != 2 or draws.shape[1] != len(steered) or len(draws) == 0:
        raise ValueError(f"draws must be [R, {len(steered)}], got {draws.shape}")
    chance = (steered.astype(np.float64) + draws.sum(axis=0)) / (len(draws) + 1)
    distribution = np.zeros(len(steered) + 1)
    distribution[0] = 1.0
    for p in chance:  # add one problem: either it is right (shift by one) or not
        distribution[1:] = distribution[1:] * (1 - p) + distribution[:-1] * p
        distribution[0] *= 1 - p
    return float(min(1.0, distribution[int(steered.sum()):].sum()))


def empirical_p(observed: float, null: Sequence[float]) -> float:
    """One-sided empirical p of `observed` against `null` draws: (1 + #{null >= observed}) / (1 + len(null))."""
    draws = np.asarray(null, dtype=np.float64)
    if len(draws) == 0 or not math.isfinite(observed):
        return float("nan")
    # A tiny tolerance: gains are counts divided by n, and equal counts must compare equal.
    return float((1 + np.sum(draws >= observed - 1e-12)) / (1 + len(draws)))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values, in the order given; NaNs stay NaN and do not count in the family."""
    values = np.asarray(pvalues, dtype=np.float64)
    adjusted = np.full(values.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(values))
    if len(finite) == 0:
        return adjusted
    order = finite[np.argsort(values[finite], kind="stable")]
    m = len(order)
    stepped = np.maximum.accumulate((m - np.arange(m)) * values[order])
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted
