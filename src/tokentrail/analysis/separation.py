"""How well the categories separate at each layer, and where prompts sit between two categories.

Per layer, on cosine distances between the prompts' states:

* silhouette of the category labels (as sklearn's `silhouette_score(metric="cosine")`);
* leave-one-out k-nearest-neighbour accuracy: each prompt is classified by a majority vote of its k nearest
  other prompts; a tied vote goes to the category whose name sorts first, as sklearn's KNeighborsClassifier
  does;
* permutation tests: the labels are shuffled `n_permutations` times (the same seeded shuffles at every layer)
  and p = (1 + #{shuffled statistic >= observed}) / (1 + n_permutations). `p_value` tests the silhouette (a
  continuous statistic, so fewer ties than accuracy); `knn_p_value` tests the kNN accuracy. The smallest p a test
  can give is its floor, 1 / (1 + n_permutations): a p at the floor means no shuffle reached the observed value,
  and the true p is at most that. The default 1,000 shuffles put the floor (0.001) below 0.05 / 31, so a reading
  survives a Bonferroni correction over a 30-block model's layers;
* chance: the fraction of the largest category, what always guessing it would score.

Both statistics are computed here in vectorised form so that hundreds of permutations cost little; the tests
check them against sklearn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tokentrail.analysis.intervals import stratified_bootstrap_mean

# Shuffled statistics that equal the observed one up to rounding must count as ">=".
_TIE_TOLERANCE = 1e-12
DEFAULT_PERMUTATIONS = 1000


def _check_categories(categories: Sequence[str], n_prompts: int) -> tuple[np.ndarray, np.ndarray]:
    if len(categories) != n_prompts:
        raise ValueError(f"got {len(categories)} categories for {n_prompts} prompts")
    names, codes = np.unique(np.asarray(list(categories), dtype=str), return_inverse=True)
    counts = np.bincount(codes, minlength=len(names))
    if len(names) < 2:
        raise ValueError(f"separation needs at least 2 categories, got {len(names)}")
    if counts.min() < 2:
        small = ", ".join(str(n) for n, c in zip(names, counts) if c < 2)
        raise ValueError(f"separation needs at least 2 prompts in every category; too few in: {small}")
    return codes, counts


def cosine_distance_matrix(points: np.ndarray) -> np.ndarray:
    """1 - cos between rows, symmetric with a zero diagonal; a zero row is at distance 1 from everything."""
    values = np.asarray(points, dtype=np.float64)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    unit = values / np.where(norms > 0, norms, 1.0)
    distances = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    distances = (distances + distances.T) / 2
    np.fill_diagonal(distances, 0.0)
    return distances


def _silhouettes(distances: np.ndarray, label_sets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean silhouette for each row of `label_sets [n_sets, P]`, all sharing the class sizes `counts`."""
    return _silhouette_scores(distances, label_sets, counts).mean(axis=1)


def _silhouette_scores(distances: np.ndarray, label_sets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`[n_sets, P]`: every prompt's silhouette under each row of `label_sets`."""
    n_sets, n_prompts = label_sets.shape
    n_classes = len(counts)
    one_hot = np.zeros((n_prompts, n_sets, n_classes))
    one_hot[np.arange(n_prompts)[None, :], np.arange(n_sets)[:, None], label_sets] = 1.0
    # One large matrix product for all label sets at once (a batched product is many times slower).
    sums = (distances @ one_hot.reshape(n_prompts, n_sets * n_classes)).reshape(n_prompts, n_sets, n_classes)
    sums = sums.transpose(1, 0, 2)  # [n_sets, P, C]: summed distance from each prompt to each class
    own_sums = np.take_along_axis(sums, label_sets[..., None], axis=2)[..., 0]
    within = own_sums / (counts[label_sets] - 1)
    mean_to_class = sums / counts
    np.put_along_axis(mean_to_class, label_sets[..., None], np.inf, axis=2)
    nearest_other = mean_to_class.min(axis=2)
    larger = np.maximum(within, nearest_other)
    # sklearn scores a point as 0 when both distances are 0 (identical states), not as 0/0.
    return np.where(larger > 0, (nearest_other - within) / np.where(larger > 0, larger, 1.0), 0.0)


def _knn_accuracies(neighbours: np.ndarray, label_sets: np.ndarray, n_classes: int) -> np.ndarray:
    """Leave-one-out kNN accuracy for each row of `label_sets [n_sets, P]`; `neighbours [P, k]` exclude self."""
    return _knn_hits(neighbours, label_sets, n_classes).mean(axis=1)


def _knn_hits(neighbours: np.ndarray, label_sets: np.ndarray, n_classes: int) -> np.ndarray:
    """`[n_sets, P]`: 1 where a prompt's k nearest others vote for its own category, else 0."""
    neighbour_labels = label_sets[:, neighbours]  # [n_sets, P, k]
    votes = np.eye(n_classes)[neighbour_labels].sum(axis=2)  # [n_sets, P, C]
    predicted = votes.argmax(axis=2)  # argmax takes the first (alphabetically first category) on a tie
    return (predicted == label_sets).astype(np.float64)


def _p_values(observed: float, shuffled: np.ndarray) -> float:
    exceed = int(np.sum(shuffled >= observed - _TIE_TOLERANCE))
    return (1 + exceed) / (1 + len(shuffled))


def separation_by_layer(
    states: np.ndarray,
    categories: Sequence[str],
    k: int = 3,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
    n_bootstrap: int = 0,
) -> dict[str, Any]:
    """Category separation at every layer of `states [prompts, n_layers, hidden]` (cosine metric).

    Returns `silhouette`, `knn_accuracy`, `p_value` (silhouette permutation test), `knn_p_value` (each
    `[n_layers]`), `chance` (float), `k` (the k actually used: at most prompts - 1), `n_permutations`,
    `p_value_floor` (the smallest p the shuffles can give; nan without shuffles), and each prompt's own
    `silhouette_by_prompt` and `knn_hit_by_prompt` (`[prompts, n_layers]`, whose means are the two statistics).
    With `n_bootstrap`, also 95 % intervals over prompts resampled within categories (`analysis.intervals`):
    `silhouette_low`, `silhouette_high`, `knn_accuracy_low`, `knn_accuracy_high`.
    """
    values = np.asarray(states, dtype=np.float64)
    if values.ndim != 3:
        raise ValueError(f"states must be [prompts, layers, hidden], got shape {values.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if n_permutations < 0:
        raise ValueError(f"n_permutations must be 0 or more, got {n_permutations}")
    n_prompts, n_layers, _ = values.shape
    codes, counts = _check_categories(categories, n_prompts)
    k_used = min(int(k), n_prompts - 1)
    rng = np.random.default_rng(seed)
    shuffles = np.array([rng.permutation(codes) for _ in range(n_permutations)], dtype=int).reshape(
        n_permutations, n_prompts
    )
    observed_labels = codes[None, :]

    silhouette = np.empty(n_layers)
    knn_accuracy = np.empty(n_layers)
    per_prompt = {"silhouette": np.empty((n_prompts, n_layers)), "knn_accuracy": np.empty((n_prompts, n_layers))}
    p_value = np.empty(n_layers)
    knn_p_value = np.empty(n_layers)
    for layer in range(n_layers):
        distances = cosine_distance_matrix(values[:, layer])
        excluding_self = distances.copy()
        np.fill_diagonal(excluding_self, np.inf)
        # A stable sort keeps the lower prompt index first among equally distant neighbours.
        neighbours = np.argsort(excluding_self, axis=1, kind="stable")[:, :k_used]
        scores = _silhouette_scores(distances, observed_labels, counts)[0]
        hits = _knn_hits(neighbours, observed_labels, len(counts))[0]
        per_prompt["silhouette"][:, layer], per_prompt["knn_accuracy"][:, layer] = scores, hits
        silhouette[layer], knn_accuracy[layer] = scores.mean(), hits.mean()
        if n_permutations:
            p_value[layer] = _p_values(silhouette[layer], _silhouettes(distances, shuffles, counts))
            knn_p_value[layer] = _p_values(knn_accuracy[layer], _knn_accuracies(neighbours, shuffles, len(counts)))
        else:
            p_value[layer] = knn_p_value[layer] = 1.0
    result = {
        "silhouette": silhouette,
        "knn_accuracy": knn_accuracy,
        "p_value": p_value,
        "knn_p_value": knn_p_value,
        "chance": float(counts.max() / n_prompts),
        "k": k_used,
        "n_permutations": int(n_permutations),
        "p_value_floor": 1.0 / (1 + n_permutations) if n_permutations else float("nan"),
        "n_bootstrap": int(n_bootstrap),
        "silhouette_by_prompt": per_prompt["silhouette"],
        "knn_hit_by_prompt": per_prompt["knn_accuracy"],
    }
    if n_bootstrap:
        for name, values in per_prompt.items():
            result[f"{name}_low"], result[f"{name}_high"] = stratified_bootstrap_mean(
                values, list(categories), n_boot=n_bootstrap, seed=seed)
    return result


def best_separation_layer(result: dict[str, Any]) -> int:
    """The layer with the highest silhouette (the earliest on ties); -1 if no layer has a silhouette."""
    silhouette = np.asarray(result["silhouette"], dtype=np.float64)
    if silhouette.size == 0 or np.all(np.isnan(silhouette)):
        return -1
    return int(np.nanargmax(silhouette))


def holdout_split(categories: Sequence[str], names: Sequence[str], seed: int = 0) -> np.ndarray:
    """`[prompts]` bool: True for the half of each category in `names` that fits an axis or centroid (a seeded
    draw, the larger half when odd), False for the other half, on which it is evaluated, and for every prompt of
    another category. A category of fewer than 2 prompts cannot be split and is refused."""
    labels = np.asarray(list(categories), dtype=object)
    rng = np.random.default_rng(seed)
    fitting = np.zeros(len(labels), dtype=bool)
    for name in names:
        rows = np.flatnonzero(labels == name)
        if rows.size < 2:
            raise ValueError(f"category {name!r} has {rows.size} prompt(s); a held-out fit needs at least 2")
        fitting[rng.permutation(rows)[: (rows.size + 1) // 2]] = True
    return fitting


def axis_score(
    states: np.ndarray, categories: Sequence[str], category_a: str, category_b: str,
    fit_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Position of every prompt on the line from centroid A to centroid B, per layer: `[prompts, n_layers]`.

    The state is projected orthogonally onto the line, so 0 is at A's centroid, 1 at B's, 0.5 half way, and
    values beyond [0, 1] lie past either end. Layers where the two centroids coincide give nan. With `fit_mask`
    (bool per prompt), the centroids are those of the prompts it marks only (see `holdout_split`).
    """
    values = np.asarray(states, dtype=np.float64)
    if values.ndim != 3:
        raise ValueError(f"states must be [prompts, layers, hidden], got shape {values.shape}")
    if len(categories) != values.shape[0]:
        raise ValueError(f"got {len(categories)} categories for {values.shape[0]} prompts")
    if category_a == category_b:
        raise ValueError(f"an axis needs two different categories, got {category_a!r} twice")
    labels = np.asarray(list(categories), dtype=object)
    fitting = np.ones(len(labels), dtype=bool) if fit_mask is None else np.asarray(fit_mask, dtype=bool)
    if fitting.shape != labels.shape:
        raise ValueError(f"fit_mask must have one entry per prompt ({len(labels)}), got shape {fitting.shape}")
    for name in (category_a, category_b):
        if not np.any(labels == name):
            known = ", ".join(dict.fromkeys(categories))
            raise ValueError(f"axis category {name!r} is not among the categories ({known})")
        if not np.any((labels == name) & fitting):
            raise ValueError(f"axis category {name!r} has no prompt to fit its centroid on")
    centroid_a = values[(labels == category_a) & fitting].mean(axis=0)  # [n_layers, hidden]
    centroid_b = values[(labels == category_b) & fitting].mean(axis=0)
    direction = centroid_b - centroid_a
    length_squared = np.sum(direction**2, axis=-1)  # [n_layers]
    along = np.sum((values - centroid_a) * direction, axis=-1)  # [P, n_layers]
    usable = length_squared > 0
    return np.where(usable, along / np.where(usable, length_squared, 1.0), np.nan)
