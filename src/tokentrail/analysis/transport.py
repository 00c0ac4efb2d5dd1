"""How the cloud of all of a prompt's token states moves and contracts from layer to layer.

`token_states` for one prompt is `[n_tokens, n_layers, hidden]`: every token position's state at every layer.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import numpy as np

from tokentrail.analysis.arrays import checked

# POT imports every array library it finds (torch first) to offer it as a backend, which would make reading a
# run pay for torch. These functions pass numpy arrays only, so a backend whose library is not imported yet is
# left out; one already imported costs nothing and stays available to the caller.
_POT_BACKENDS = {"torch": "POT_BACKEND_DISABLE_PYTORCH", "jax": "POT_BACKEND_DISABLE_JAX",
                 "cupy": "POT_BACKEND_DISABLE_CUPY", "tensorflow": "POT_BACKEND_DISABLE_TENSORFLOW"}


def _ot() -> Any:
    if "ot" in sys.modules:
        return sys.modules["ot"]
    disabled = [key for library, key in _POT_BACKENDS.items() if library not in sys.modules and key not in os.environ]
    os.environ.update(dict.fromkeys(disabled, "1"))
    try:
        return importlib.import_module("ot")
    finally:
        for key in disabled:
            os.environ.pop(key, None)


def _check_tokens(token_states: np.ndarray) -> np.ndarray:
    return checked(token_states, "[tokens, layers, hidden]", "token states")


def wasserstein_by_layer(token_states: np.ndarray) -> np.ndarray:
    """Wasserstein-2 distance between the token cloud at layer l and at layer l + 1: `[n_layers - 1]`.

    Exact optimal transport (POT's network simplex) between uniform weights on the tokens with the squared
    euclidean cost; W2 = sqrt(total cost). The clouds are matched as sets, so the result does not assume that
    a token stays itself from one layer to the next.
    """
    values = _check_tokens(token_states)
    n_tokens, n_layers, _ = values.shape
    weights = np.full(n_tokens, 1.0 / n_tokens)
    distances = np.empty(max(n_layers - 1, 0))
    for layer in range(n_layers - 1):
        cost = _ot().dist(values[:, layer], values[:, layer + 1], metric="sqeuclidean")
        # Rounding can leave the optimal cost a hair below zero for identical clouds.
        total = float(_ot().emd2(weights, weights, cost, numItermax=max(100_000, 50 * n_tokens * n_tokens)))
        distances[layer] = np.sqrt(max(total, 0.0))
    return distances


def token_cosine_by_layer(token_states: np.ndarray) -> np.ndarray:
    """Mean cosine similarity over all pairs of different tokens, per layer: `[n_layers]`.

    A single token has no pairs, so every layer is nan. A zero vector counts as similarity 0 with everything.
    """
    values = _check_tokens(token_states)
    n_tokens, n_layers, _ = values.shape
    if n_tokens < 2:
        return np.full(n_layers, np.nan)
    norms = np.linalg.norm(values, axis=-1, keepdims=True)
    unit = values / np.where(norms > 0, norms, 1.0)
    per_layer = np.transpose(unit, (1, 0, 2))  # [n_layers, tokens, hidden]
    gram = per_layer @ np.transpose(per_layer, (0, 2, 1))
    off_diagonal_sum = gram.sum(axis=(1, 2)) - np.trace(gram, axis1=1, axis2=2)
    return off_diagonal_sum / (n_tokens * (n_tokens - 1))
