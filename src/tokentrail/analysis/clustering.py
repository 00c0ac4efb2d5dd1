"""Whether a prompt's tokens gather into clusters as depth grows, and where the clustering pauses and jumps.

Rigollet and co-authors model self-attention as interacting particles on the sphere: with depth the tokens
collapse into a few clusters, passing through long metastable phases in which the number of clusters holds
still before it drops. These functions measure that on traced token states `[tokens, n_layers, hidden]`, on
the unit vectors of the states (a zero state stays zero: cosine 0 with everything, cosine distance 1):

* mean_cosine: the mean of cos(x_i, x_j) over the ordered pairs i != j (the diagonal left out); nan for a single
  token;
* clusters: average-linkage (UPGMA) agglomerative clustering on the cosine distances 1 - cos, cut at distance
  1 - threshold (`scipy.cluster.hierarchy.fcluster(criterion="distance")`: two clusters whose mean distance is
  at most 1 - threshold are merged); the number of flat clusters;
* spectral_clusters: from the eigenvalues lambda_1 >= ... >= lambda_T of the cosine Gram matrix G_ij =
  cos(x_i, x_j) (the trace is the number of non-zero tokens, so an eigenvalue counts "tokens' worth" of
  direction). Each eigenvalue is raised to at least SPECTRAL_FLOOR, a virtual lambda_{T+1} = SPECTRAL_FLOOR is
  appended, and the count is the smallest k in 1..T maximising lambda_k / lambda_{k+1}: the number of
  eigenvalues above the largest relative gap. The floor keeps the ratio between two rounding-level eigenvalues
  from posing as a gap; the appended one lets T mutually orthogonal tokens count as T clusters. The Gram matrix
  cannot tell u from -u, so tokens pointing in opposite directions share one spectral cluster (but not one
  agglomerative cluster: their cosine distance is 2).

A single token is one cluster by both counts.

`metastable_plateaus` finds the "flat, then jump" stretches of any per-layer series (e.g. `clusters`): see its
docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from tokentrail.analysis.arrays import checked
from tokentrail.analysis.separation import cosine_distance_matrix

# Eigenvalues of the cosine Gram matrix below a hundredth of one token's worth count as no direction at all.
SPECTRAL_FLOOR = 1e-2

CLUSTERING_KEYS = ("mean_cosine", "clusters", "spectral_clusters")


def _check_tokens(token_states: np.ndarray, name: str = "token states") -> np.ndarray:
    return checked(token_states, "[tokens, layers, hidden]", name, finite=True)


def _unit_rows(points: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(points, axis=1, keepdims=True)
    return points / np.where(norms > 0, norms, 1.0)


def _spectral_count(gram: np.ndarray) -> int:
    eigenvalues = np.linalg.eigvalsh(gram)[::-1]  # descending
    floored = np.append(np.maximum(eigenvalues, SPECTRAL_FLOOR), SPECTRAL_FLOOR)
    ratios = floored[:-1] / floored[1:]
    return int(np.argmax(ratios)) + 1  # argmax takes the first of equal ratios: the smallest k


def _agglomerative_count(points: np.ndarray, threshold: float) -> int:
    condensed = squareform(cosine_distance_matrix(points), checks=False)
    tree = linkage(condensed, method="average")
    return int(fcluster(tree, t=1.0 - threshold, criterion="distance").max())


def token_clustering(token_states: np.ndarray, threshold: float = 0.9) -> dict[str, np.ndarray]:
    """Clustering of one prompt's tokens `[tokens, n_layers, hidden]` at each layer.

    Returns `mean_cosine` (float, `[n_layers]`), `clusters` and `spectral_clusters` (int, `[n_layers]`), as
    defined in the module docstring; `threshold` is the cosine similarity above which clusters merge.
    """
    values = _check_tokens(token_states)
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    n_tokens, n_layers, _ = values.shape
    mean_cosine = np.full(n_layers, np.nan)
    clusters = np.ones(n_layers, dtype=int)
    spectral = np.ones(n_layers, dtype=int)
    if n_tokens < 2:
        return {"mean_cosine": mean_cosine, "clusters": clusters, "spectral_clusters": spectral}
    for layer in range(n_layers):
        unit = _unit_rows(values[:, layer])
        gram = unit @ unit.T
        mean_cosine[layer] = (gram.sum() - np.trace(gram)) / (n_tokens * (n_tokens - 1))
        clusters[layer] = _agglomerative_count(values[:, layer], threshold)
        spectral[layer] = _spectral_count(gram)
    return {"mean_cosine": mean_cosine, "clusters": clusters, "spectral_clusters": spectral}


def clustering_by_prompt(token_states: Sequence[np.ndarray], threshold: float = 0.9) -> dict[str, np.ndarray]:
    """`token_clustering` of every prompt, stacked: each key `[prompts, n_layers]`.

    `token_states` holds one `[tokens, n_layers, hidden]` array per prompt, all with the same number of layers.
    """
    prompts = list(token_states)
    if not prompts:
        raise ValueError("clustering_by_prompt needs at least one prompt's token states")
    checked = [_check_tokens(tokens, f"token states of prompt {index}") for index, tokens in enumerate(prompts)]
    n_layers = checked[0].shape[1]
    for index, tokens in enumerate(checked):
        if tokens.shape[1] != n_layers:
            raise ValueError(f"prompt {index} has {tokens.shape[1]} layers, prompt 0 has {n_layers}")
    results = [token_clustering(tokens, threshold) for tokens in checked]
    return {key: np.stack([result[key] for result in results]) for key in CLUSTERING_KEYS}


def _check_series(series: np.ndarray, tolerance: float) -> np.ndarray:
    values = np.asarray(series, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"series must be one value per layer [n_layers], got shape {values.shape}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be 0 or more, got {tolerance}")
    return values


def jump_layers(series: np.ndarray, tolerance: float) -> np.ndarray:
    """The layers j (1 <= j < n_layers) with |series[j] - series[j - 1]| > tolerance: the layers jumped into.

    A step from or to a nan value is not a jump (nor flat).
    """
    values = _check_series(series, tolerance)
    changes = np.abs(np.diff(values))
    with np.errstate(invalid="ignore"):
        return np.flatnonzero(changes > tolerance) + 1


def metastable_plateaus(series: np.ndarray, tolerance: float, min_length: int = 3) -> list[tuple[int, int]]:
    """The metastable phases of a per-layer series: "flat, then jump".

    A step l -> l + 1 is flat when |series[l + 1] - series[l]| <= tolerance and a jump when it is > tolerance
    (a step from or to nan is neither). A plateau is a maximal run of layers [start, end] (inclusive) joined by
    flat steps that
      * spans at least `min_length` layers (end - start + 1 >= min_length), and
      * ends in a jump: end + 1 is a layer and the step end -> end + 1 is a jump.
    So a flat run that reaches the last layer, or that ends in a nan, is not a plateau: it is not (yet) seen to
    end. Returned in layer order as (start, end) pairs.
    """
    values = _check_series(series, tolerance)
    if min_length < 1:
        raise ValueError(f"min_length must be at least 1, got {min_length}")
    changes = np.abs(np.diff(values))
    with np.errstate(invalid="ignore"):
        flat = changes <= tolerance
        jump = changes > tolerance
    plateaus: list[tuple[int, int]] = []
    start = 0
    for step in range(len(changes)):
        if flat[step]:
            continue
        # Step `step` (from layer `step` to `step + 1`) breaks the run that began at `start`.
        if jump[step] and step - start + 1 >= min_length:
            plateaus.append((start, step))
        start = step + 1
    return plateaus
