"""How runs are compared: `CompareOptions`, the settings every run's analyses and the CKA null share."""

from __future__ import annotations

from dataclasses import dataclass

from tokentrail.analysis.intervals import DEFAULT_BOOTSTRAP
from tokentrail.analysis.separation import DEFAULT_PERMUTATIONS

__all__ = ["CompareOptions"]


@dataclass
class CompareOptions:
    """How runs are compared; the defaults are those of `tokentrail analyze`.

    `knn_k`, `permutations` (label shuffles per layer) and `sustain` go to the separation and bifurcation
    analyses of every run alike; `cka_permutations` prompt shuffles give the CKA null; `top_prompts`
    bifurcation rows go into the report (the CSV has all); `axes` overrides the natural-vs-formal axes as
    (natural, formal) pairs and `middle` the category expected between the ends. `cka_standardize` z-scores
    every hidden unit across the prompts before CKA, so that a few massive-activation units cannot dominate it.
    `mutual_knn_k` is the k of the mutual k-nearest-neighbour alignment computed beside CKA for every pair of
    models (on the same states, standardised with `cka_standardize`); it must be less than the number of
    prompts. It is not `knn_k`, which is the k of each run's kNN classification accuracy. `n_bootstrap` resamples
    of each category's prompts give the 95 % intervals of the category means on each axis (0: none).
    """

    sustain: int = 2
    knn_k: int = 3
    permutations: int = DEFAULT_PERMUTATIONS
    cka_permutations: int = 200
    n_bootstrap: int = DEFAULT_BOOTSTRAP
    cka_standardize: bool = False
    mutual_knn_k: int = 5
    top_prompts: int = 10
    axes: list[tuple[str, str]] | None = None
    middle: str | None = None
    seed: int = 0
