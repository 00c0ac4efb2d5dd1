"""Steering directions: where a vector comes from and how long it is.

A steering direction at layer l comes from a traced run: the difference of two category means (`mean-diff`,
target minus source), the first principal component of all the run's states at that layer (`pca`, signed to
point from source to target), or a file (`.npy` / `.safetensors`, shape [H] or [L+1, H]). The direction is
normalised to unit length and scaled by the median norm of the run's states at that layer, so `alpha` reads as
"this many typical residual norms": alpha = 0.5 adds a vector half as long as a typical state at that layer,
whatever the model's scale. The scale comes from the run's traced prompts (the states the vector was made
from), not from the problems being steered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokentrail.core.trace import Trace
from tokentrail.errors import TokentrailError

METHODS = ("mean-diff", "pca")
DEFAULT_SOURCE = "word-problems"
DEFAULT_TARGET = "pure-math"


@dataclass(frozen=True)
class SteeringVector:
    """A unit direction at one layer and the residual norm it is scaled by."""

    layer: int
    direction: np.ndarray  # float32 [H], unit norm
    scale: float
    method: str

    def delta(self, alpha: float) -> np.ndarray:
        """What the hook adds: alpha * scale * direction."""
        return (np.float32(alpha) * np.float32(self.scale) * self.direction).astype(np.float32)


def unit(vector: np.ndarray, what: str) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm) or norm == 0.0:
        raise TokentrailError(f"{what} has zero or non-finite length; it gives no direction to steer along")
    return (vector / norm).astype(np.float32)


def _check_layer(trace: Trace, layer: int) -> None:
    if not 1 <= layer <= trace.n_layers:
        raise TokentrailError(
            f"layer {layer} cannot be steered: use 1..{trace.n_layers} (layer l is the output of block l)"
        )


def _category_rows(trace: Trace, category: str) -> np.ndarray:
    rows = np.flatnonzero(np.asarray(trace.categories) == category)
    if rows.size == 0:
        known = ", ".join(sorted(set(trace.categories)))
        raise TokentrailError(f"category {category!r} is not in this run; its categories are: {known}")
    return rows


def residual_scale(trace: Trace, layer: int) -> float:
    """Median L2 norm of the run's states at `layer`: the unit alpha is measured in."""
    return float(np.median(np.linalg.norm(trace.states[:, layer].astype(np.float64), axis=-1)))


def centroids(trace: Trace, layer: int, source: str, target: str) -> tuple[np.ndarray, np.ndarray]:
    states = trace.states[:, layer].astype(np.float64)
    return states[_category_rows(trace, source)].mean(0), states[_category_rows(trace, target)].mean(0)


def _load_vector_file(path: Path, layer: int, hidden: int) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise TokentrailError(f"steering vector file {path} not found")
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1 and "vector" not in tensors:
            raise TokentrailError(f"{path} holds {len(tensors)} tensors; name the steering one 'vector'")
        array = tensors.get("vector", next(iter(tensors.values())))
    else:
        raise TokentrailError(f"steering vector file {path} must be .npy or .safetensors")
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2 and array.shape[1] == hidden and 0 <= layer < array.shape[0]:
        return array[layer]
    if array.shape == (hidden,):
        return array
    raise TokentrailError(
        f"{path} has shape {list(array.shape)}; a steering vector must be [{hidden}] or [layers + 1, {hidden}]"
    )


def steering_vector(
    trace: Trace,
    layer: int,
    method: str | Path = "mean-diff",
    source: str = DEFAULT_SOURCE,
    target: str = DEFAULT_TARGET,
) -> SteeringVector:
    """The steering direction at `layer` by `method` (`mean-diff`, `pca` or a vector file)."""
    _check_layer(trace, layer)
    scale = residual_scale(trace, layer)
    if str(method) == "mean-diff":
        a, b = centroids(trace, layer, source, target)
        return SteeringVector(layer, unit(b - a, f"{target} minus {source} at layer {layer}"), scale, "mean-diff")
    if str(method) == "pca":
        states = trace.states[:, layer].astype(np.float64)
        centred = states - states.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        direction = vt[0]
        a, b = centroids(trace, layer, source, target)
        # A principal component has no sign; point it from the source region to the target region.
        if float(direction @ (b - a)) < 0:
            direction = -direction
        return SteeringVector(layer, unit(direction, f"first principal component at layer {layer}"), scale, "pca")
    vector = _load_vector_file(Path(method), layer, trace.hidden_size)
    return SteeringVector(layer, unit(vector, f"vector in {method}"), scale, f"file:{Path(method).name}")


def random_vector(like: SteeringVector, seed: int, draw: int = 0) -> SteeringVector:
    """A random unit direction with the same layer and scale: the control for "any push of this size".

    Seeded by (seed, layer, draw), so every draw of every layer is its own and reproducible."""
    rng = np.random.default_rng([seed, like.layer, draw])
    direction = rng.standard_normal(like.direction.shape[0])
    return SteeringVector(like.layer, unit(direction, "random direction"), like.scale, f"random:{seed}:{draw}")


def random_vectors(like: SteeringVector, seed: int, count: int) -> list[SteeringVector]:
    """`count` random directions for the null distribution at `like`'s layer, draws 0..count-1."""
    return [random_vector(like, seed, draw) for draw in range(count)]


def paired_direction(first: np.ndarray, second: np.ndarray, layer: int) -> SteeringVector:
    """The direction from `first` toward `second` estimated from paired states `[P, H]` (each row the same
    problem, e.g. as a word problem and as pure math): the mean of the paired differences, scaled by the
    median norm of all the states it came from."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.shape != second.shape or first.ndim != 2 or len(first) < 1:
        raise TokentrailError(f"paired states must be two [P, H] arrays of one shape, got {first.shape} and "
                              f"{second.shape}")
    direction = unit((second - first).mean(axis=0), f"mean paired difference at layer {layer}")
    scale = float(np.median(np.linalg.norm(np.concatenate([first, second]), axis=-1)))
    return SteeringVector(layer, direction, scale, "paired-mean-diff")


def axis_score(states: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Position of each state along the line from centroid `a` (0) to centroid `b` (1)."""
    axis = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    denominator = float(axis @ axis)
    if denominator == 0.0:
        return np.full(len(states), np.nan)
    return (np.asarray(states, dtype=np.float64) - a) @ axis / denominator
