"""Where a new prompt lands among a run's stored prompts, layer by layer (what `tokentrail explore` shows).

The stored prompts are `stored [prompts, layers, hidden]` with their `categories`; the new prompt is
`live [layers, hidden]`, traced by the same model with the same options. Nothing here refits anything: the new
prompt is measured against the stored cloud as it is, so placing it never moves the stored prompts.

* Nearest stored prompts: cosine similarity at each layer, highest first (ties: the earlier stored prompt).
* kNN vote: the categories of the `k` nearest, counted; the winner is the most frequent, ties going to the
  category whose best neighbour is nearer (then to the earlier category in the run's order).
* Axis score: the run's natural-to-formal axis, as `analysis.separation.axis_score` measures stored prompts: 0 at
  category A's centroid, 1 at B's, the new prompt projected orthogonally onto the line between them.
* Bifurcation: the new prompt's "home" category (given, or the nearest centroid at layer 1, the first block's
  output, since layer 0 is only the last token's embedding) and the layer at which it leaves it, by the rule of
  `analysis.bifurcation` (cosine distance to the category centroids, sustained for `sustain` layers). The home
  centroid is the stored prompts' own: the new prompt is not one of them, so there is nothing to leave out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tokentrail.analysis.bifurcation import prompt_bifurcation
from tokentrail.analysis.separation import axis_score

__all__ = ["Placement", "home_category", "place_prompt"]


@dataclass(frozen=True)
class Placement:
    """A new prompt measured against the stored ones. Per layer 0..L (`n_layers` entries each):

    `neighbours [layers, k]` stored prompt indices, nearest first; `similarity [layers, k]` their cosine;
    `vote` one dict per layer, category -> count among the k nearest; `winner` the vote's category per layer;
    `axis [layers]` the axis score (nan where the run has no axis or the centroids coincide).
    `home`, `layer` (-1: never leaves), `toward` ("" when never): the bifurcation of the module docstring.
    """

    neighbours: np.ndarray
    similarity: np.ndarray
    vote: list[dict[str, int]]
    winner: list[str]
    axis: np.ndarray
    home: str
    layer: int
    toward: str
    sustain: int


def _unit_rows(values: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(values, axis=-1, keepdims=True)
    return values / np.where(norms > 0, norms, 1.0)


def _check(stored: np.ndarray, categories: Sequence[str], live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    stored = np.asarray(stored, dtype=np.float64)
    live = np.asarray(live, dtype=np.float64)
    if stored.ndim != 3:
        raise ValueError(f"stored states must be [prompts, layers, hidden], got shape {stored.shape}")
    if live.shape != stored.shape[1:]:
        raise ValueError(f"the new prompt's states {live.shape} do not match the stored [layers, hidden] "
                         f"{stored.shape[1:]}: traced by another model or with other options")
    if len(categories) != stored.shape[0]:
        raise ValueError(f"got {len(categories)} categories for {stored.shape[0]} stored prompts")
    return stored, live


def home_category(stored: np.ndarray, categories: Sequence[str], live: np.ndarray, layer: int = 1) -> str:
    """The category whose centroid is nearest (cosine) to the new prompt at `layer` (the last, if there are
    fewer layers)."""
    stored, live = _check(stored, categories, live)
    layer = min(layer, stored.shape[1] - 1)
    names = list(dict.fromkeys(categories))
    labels = np.asarray(list(categories), dtype=object)
    centroids = np.stack([stored[labels == name, layer].mean(axis=0) for name in names])  # [C, hidden]
    similarity = _unit_rows(centroids) @ _unit_rows(live[layer])
    return names[int(np.argmax(similarity))]


def place_prompt(
    stored: np.ndarray,
    categories: Sequence[str],
    live: np.ndarray,
    k: int = 5,
    axis: tuple[str, str] | None = None,
    home: str | None = None,
    sustain: int = 2,
) -> Placement:
    """Measure `live [layers, hidden]` against `stored [prompts, layers, hidden]`; see the module docstring."""
    stored, live = _check(stored, categories, live)
    n_prompts, n_layers, _ = stored.shape
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = min(int(k), n_prompts)
    names = list(dict.fromkeys(categories))
    if home is not None and home not in names:
        raise ValueError(f"category {home!r} is not in this run; its categories are: {', '.join(names)}")

    # [layers, prompts]: cosine of every stored prompt with the new one, layer by layer.
    similarity = np.einsum("plh,lh->lp", _unit_rows(stored), _unit_rows(live))
    # A stable sort on the negated similarity keeps the earlier stored prompt first among equals.
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    nearest = np.take_along_axis(similarity, order, axis=1)

    votes: list[dict[str, int]] = []
    winners: list[str] = []
    for layer in range(n_layers):
        counts: dict[str, int] = {}
        first_seen: dict[str, int] = {}
        for rank, prompt in enumerate(order[layer]):
            name = categories[int(prompt)]
            counts[name] = counts.get(name, 0) + 1
            first_seen.setdefault(name, rank)
        votes.append(counts)
        winners.append(min(counts, key=lambda name: (-counts[name], first_seen[name], names.index(name))))

    if axis is None:
        axis_values = np.full(n_layers, np.nan)
    else:
        with_live = np.concatenate([stored, live[None]], axis=0)
        axis_values = axis_score(with_live, [*categories, "\x00new prompt"], axis[0], axis[1])[-1]

    home = home if home is not None else home_category(stored, categories, live)
    explained = prompt_bifurcation(np.concatenate([stored, live[None]], axis=0), [*categories, home], n_prompts,
                                   sustain=sustain)
    return Placement(neighbours=order, similarity=nearest, vote=votes, winner=winners, axis=axis_values,
                     home=home, layer=int(explained["layer"]), toward=str(explained["toward"]), sustain=sustain)
