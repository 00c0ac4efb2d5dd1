"""When a prompt leaves its category, and when two prompts part ways.

Leaving a category: at each layer a prompt's state is compared with the centroid of its own category and with
the centroids of every other category. Its own centroid is computed leave-one-out (without the prompt itself),
otherwise a prompt would always pull its own centroid towards itself and small categories could never be left.
The prompt is "out" at a layer when some other centroid is strictly closer than its own, and "with" its category
otherwise. Its bifurcation layer is the first layer l such that it was with its category at some layer before l
and is out at layers l .. l + sustain - 1; a run of out-layers cut short by the end of the trajectory does not
count. The category it went toward is the nearest other one at layer l.

To leave, a prompt must first have been with its category: near the embeddings the states mostly encode the last
token, so a prompt can start out nearer another category by accident, and counting that as a bifurcation at layer
0 would drown the real ones. A prompt never with its category, or alone in it (no own centroid), gets -1;
`prompt_bifurcation` shows its per-layer distances.

Distances: "cosine" (1 - cos, insensitive to the norm growth with depth; the default) or "euclidean".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial.distance import pdist, squareform

METRICS = ("cosine", "euclidean")
# Distance changes this small (relative above 1) are rounding, e.g. between two identical prompts.
_ROUNDING = 1e-9


def _check_inputs(states: np.ndarray, categories: Sequence[str] | None, metric: str) -> np.ndarray:
    values = np.asarray(states, dtype=np.float64)
    if values.ndim != 3:
        raise ValueError(f"states must be [prompts, layers, hidden], got shape {values.shape}")
    if categories is not None and len(categories) != values.shape[0]:
        raise ValueError(f"got {len(categories)} categories for {values.shape[0]} prompts")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, not {metric!r}")
    return values


def _distance(points: np.ndarray, targets: np.ndarray, metric: str) -> np.ndarray:
    """Distance along the last axis between broadcastable arrays of vectors."""
    if metric == "euclidean":
        return np.linalg.norm(points - targets, axis=-1)
    norms = np.linalg.norm(points, axis=-1) * np.linalg.norm(targets, axis=-1)
    cosine = np.sum(points * targets, axis=-1) / np.where(norms > 0, norms, 1.0)
    return 1.0 - np.clip(np.where(norms > 0, cosine, 0.0), -1.0, 1.0)


class _Centroids:
    """Per-category sums, so that every prompt's leave-one-out centroids cost one subtraction."""

    def __init__(self, values: np.ndarray, categories: Sequence[str]) -> None:
        self.values = values
        self.names = list(dict.fromkeys(categories))
        index = {name: i for i, name in enumerate(self.names)}
        self.codes = np.array([index[c] for c in categories], dtype=int)
        self.counts = np.bincount(self.codes, minlength=len(self.names))
        self.sums = np.stack([values[self.codes == c].sum(axis=0) for c in range(len(self.names))])

    def distances(self, prompt: int, metric: str) -> np.ndarray:
        """`[n_layers, n_categories]` distances from one prompt to every centroid (own: leave-one-out)."""
        own = self.codes[prompt]
        sums = self.sums.copy()
        counts = self.counts.astype(np.float64)
        sums[own] -= self.values[prompt]
        counts[own] -= 1
        distances = np.full((self.values.shape[1], len(self.names)), np.nan)
        present = counts > 0
        centroids = sums[present] / counts[present][:, None, None]  # [C', n_layers, hidden]
        distances[:, present] = _distance(self.values[prompt][None], centroids, metric).T
        return distances


def _explain(centroids: _Centroids, prompt: int, sustain: int, metric: str) -> dict[str, Any]:
    distances = centroids.distances(prompt, metric)
    own = centroids.codes[prompt]
    n_layers = distances.shape[0]
    others = distances.copy()
    others[:, own] = np.inf
    others[np.isnan(others)] = np.inf
    nearest = others.argmin(axis=1)
    nearest_distance = others[np.arange(n_layers), nearest]
    own_distance = distances[:, own]
    out = nearest_distance < own_distance  # False wherever the own centroid or any other is missing
    layer = -1
    been_with_category = False
    for start in range(n_layers):
        if not out[start]:
            been_with_category = True
        elif been_with_category and out[start : start + sustain].all() and start + sustain <= n_layers:
            layer = start
            break
    has_other = np.isfinite(nearest_distance)
    return {
        "index": int(prompt),
        "category": centroids.names[own],
        "layer": layer,
        "toward": centroids.names[nearest[layer]] if layer >= 0 else "",
        "metric": metric,
        "sustain": sustain,
        "distance_own": own_distance,
        "distance_nearest_other": np.where(has_other, nearest_distance, np.nan),
        "nearest_other": [centroids.names[n] if ok else "" for n, ok in zip(nearest, has_other)],
        "outside": out,
        "distances": {name: distances[:, i] for i, name in enumerate(centroids.names)},
    }


def _check_sustain(sustain: int) -> int:
    if int(sustain) != sustain or sustain < 1:
        raise ValueError(f"sustain must be a positive number of layers, got {sustain!r}")
    return int(sustain)


def bifurcation_layers(
    states: np.ndarray, categories: Sequence[str], sustain: int = 2, metric: str = "cosine"
) -> tuple[np.ndarray, list[str]]:
    """For each prompt: the layer at which it leaves its category (-1 = never) and the category it went toward
    ("" = never). See the module docstring for the exact rule."""
    values = _check_inputs(states, categories, metric)
    sustain = _check_sustain(sustain)
    centroids = _Centroids(values, categories)
    layers = np.full(values.shape[0], -1, dtype=int)
    toward: list[str] = []
    for prompt in range(values.shape[0]):
        explained = _explain(centroids, prompt, sustain, metric)
        layers[prompt] = explained["layer"]
        toward.append(explained["toward"])
    return layers, toward


def prompt_bifurcation(
    states: np.ndarray, categories: Sequence[str], index: int, sustain: int = 2, metric: str = "cosine"
) -> dict[str, Any]:
    """Why prompt `index` bifurcates when it does ("when does prompt 15 leave the rest of its category?").

    Returns `index`, `category`, `layer` (-1 = never), `toward` ("" = never), `metric`, `sustain`, and per layer
    `distance_own` (to its own leave-one-out centroid), `distance_nearest_other`, `nearest_other` (names),
    `outside` (bool: some other centroid is closer) and `distances` (category -> distance to its centroid).
    """
    values = _check_inputs(states, categories, metric)
    sustain = _check_sustain(sustain)
    if not -values.shape[0] <= index < values.shape[0]:
        raise ValueError(f"prompt index {index} is out of range for {values.shape[0]} prompts")
    return _explain(_Centroids(values, categories), index % values.shape[0], sustain, metric)


def _pairwise_distances(points: np.ndarray, metric: str) -> np.ndarray:
    if metric == "euclidean":
        # pdist computes each difference directly, so identical states are exactly 0 apart (the expansion
        # |x|^2 + |y|^2 - 2xy would leave rounding noise that looks like divergence).
        return squareform(pdist(points, metric="euclidean"))
    norms = np.linalg.norm(points, axis=1, keepdims=True)
    unit = points / np.where(norms > 0, norms, 1.0)
    distances = 1.0 - np.clip(unit @ unit.T, -1.0, 1.0)
    # BLAS need not give x.y and y.x bit-identically; the result must be symmetric.
    return (distances + distances.T) / 2


def divergence_layers(states: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """For every pair of prompts, the layer of fastest divergence: `[prompts, prompts]` int.

    That is the layer l + 1 for the largest increase of their distance from layer l to layer l + 1 (the later
    layer, whose block made the jump; the earliest on ties). -1 on the diagonal and for pairs whose distance
    never increases by more than rounding error (1e-9, relative for distances above 1).
    """
    values = _check_inputs(states, None, metric)
    n_prompts, n_layers, _ = values.shape
    if n_layers < 2:
        raise ValueError(f"divergence needs at least 2 layers, got {n_layers}")
    best_increase = np.zeros((n_prompts, n_prompts))
    best_layer = np.full((n_prompts, n_prompts), -1, dtype=int)
    previous = _pairwise_distances(values[:, 0], metric)
    for layer in range(1, n_layers):
        current = _pairwise_distances(values[:, layer], metric)
        increase = current - previous
        noise = _ROUNDING * (1.0 + np.maximum(current, previous))
        better = (increase > best_increase) & (increase > noise)
        best_increase[better] = increase[better]
        best_layer[better] = layer
        previous = current
    np.fill_diagonal(best_layer, -1)
    return best_layer


@dataclass(frozen=True)
class PromptBifurcation:
    """One prompt's way through the layers against its category: what `tokentrail bifurcation` shows.

    Per layer 0..L: `distance_own`, `distance_nearest_other`, `nearest_other`, `outside`, and `step` / `category_step`
    (the norm of the state's change into that layer, for the prompt and the mean over the rest of its category;
    nan at layer 0, and for `category_step` when the prompt is alone in its category).
    """

    index: int
    category: str
    layer: int  # -1: never leaves
    toward: str
    metric: str
    sustain: int
    distance_own: np.ndarray
    distance_nearest_other: np.ndarray
    nearest_other: list[str]
    outside: np.ndarray
    step: np.ndarray
    category_step: np.ndarray

    @property
    def sentence(self) -> str:
        """The finding in words, with how it was measured."""
        return bifurcation_sentence(self.category, self.layer, self.toward, self.metric, self.sustain,
                                    never_with=bool(np.all(self.outside)))


def bifurcation_sentence(category: str, layer: int, toward: str, metric: str, sustain: int,
                         never_with: bool = False) -> str:
    """A bifurcation in words, with how it was measured: for a stored prompt (`PromptBifurcation.sentence`) and a
    live one (`tokentrail explore`) alike. `never_with`: the prompt was nearer another category at every layer."""
    where = f"({metric} distance to leave-one-out centroids, sustained for {sustain} layers)"
    if layer >= 0:
        return f"leaves its category {category!r} at layer {layer} toward {toward!r} {where}"
    if never_with:
        return (f"closer to another category than to its own at every layer, from the embedding on: it never "
                f"sits with {category!r}, so there is nothing to leave {where}")
    return f"never leaves its category {category!r} {where}"


def explain_prompt(states: np.ndarray, categories: Sequence[str], index: int, sustain: int = 2,
                   metric: str = "cosine") -> PromptBifurcation:
    """`prompt_bifurcation` with the step sizes beside it, as one dataclass."""
    explained = prompt_bifurcation(states, categories, index, sustain=sustain, metric=metric)
    values = np.asarray(states, dtype=np.float64)
    steps = np.linalg.norm(np.diff(values, axis=1), axis=-1)  # [P, L]
    index = explained["index"]
    own = [i for i, category in enumerate(categories) if category == explained["category"] and i != index]
    nan = np.array([np.nan])
    return PromptBifurcation(
        index=index, category=explained["category"], layer=int(explained["layer"]), toward=explained["toward"],
        metric=metric, sustain=sustain, distance_own=np.asarray(explained["distance_own"]),
        distance_nearest_other=np.asarray(explained["distance_nearest_other"]),
        nearest_other=list(explained["nearest_other"]), outside=np.asarray(explained["outside"], dtype=bool),
        step=np.concatenate([nan, steps[index]]),
        category_step=np.concatenate([nan, steps[own].mean(axis=0) if own else np.full(steps.shape[1], np.nan)]),
    )
