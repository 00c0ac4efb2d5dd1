"""How a small perturbation of a prompt's embedding grows through the layers (the finite-time expansion).

For each prompt, the last token's input to the first block (its embedding, as the model hands it on) is moved
by `delta = epsilon * ||h_0|| * u` for `n_directions` random unit vectors u, and every layer's state of that
token is compared with the unperturbed pass: `separation [prompts, directions, L+1]` = ||h~_l - h_l||, with
layer 0 the perturbation itself. The perturbed and the unperturbed rows are one batch of identical token ids, so
no padding or batching difference enters the separation. `analysis.ode.expansion_rates` turns separations into
a per-layer rate, log(||delta_{l+1}|| / ||delta_l||), averaged over directions and prompts.

Only the last token is moved, so the separation measures how the model's map from embedding to state stretches
along that token's own trajectory; attention from the earlier tokens is unchanged. The model is never modified:
the hooks exist for the pass only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokentrail.capture import first_parameter, first_tensor, layer_hooks
from tokentrail.errors import TokentrailError

if TYPE_CHECKING:  # annotations only: loading sits above the probes
    from tokentrail.models.loading import LoadedModel

__all__ = ["random_directions", "separations"]

DEFAULT_EPSILON = 1e-3
DEFAULT_DIRECTIONS = 8


def random_directions(n: int, hidden: int, seed: int) -> np.ndarray:
    """`[n, hidden]` unit vectors, uniform on the sphere, from `seed`."""
    vectors = np.random.default_rng(seed).standard_normal((n, hidden))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def separations(loaded: LoadedModel, encoded: Sequence[Sequence[int]], n_directions: int = DEFAULT_DIRECTIONS,
                epsilon: float = DEFAULT_EPSILON, seed: int = 0,
                directions: np.ndarray | None = None) -> np.ndarray:
    """`[prompts, directions, L+1]` separations (see the module docstring). `directions [n, hidden]` overrides
    the seeded random ones (prompt i uses `random_directions(n, hidden, seed + i)` otherwise)."""
    why = loaded.parts.why_not_steerable()
    if why is not None:
        raise TokentrailError(f"{loaded.name}: {why}, so its embedding cannot be perturbed one token at a time")
    if not epsilon > 0:
        raise TokentrailError(f"epsilon must be positive, got {epsilon}")
    if n_directions < 1:
        raise TokentrailError(f"need at least one direction, got {n_directions}")
    hidden = loaded.parts.hidden_size
    out = []
    for index, ids in enumerate(encoded):
        units = directions if directions is not None else random_directions(n_directions, hidden, seed + index)
        units = np.asarray(units, dtype=np.float64)
        if units.ndim != 2 or units.shape[1] != hidden:
            raise TokentrailError(f"directions must be [n, {hidden}], got {units.shape}")
        out.append(_separations_of(loaded, list(ids), units, epsilon))
    return np.stack(out)


def _separations_of(loaded: LoadedModel, ids: list[int], units: np.ndarray, epsilon: float) -> np.ndarray:
    """`[directions, L+1]` for one prompt: one batch, row 0 unperturbed, row r + 1 moved along `units[r]`."""
    parts = loaded.parts
    argument = first_parameter(parts.entry)
    device = next(loaded.model.parameters()).device
    rows = len(units) + 1
    captured: dict[int, torch.Tensor] = {}

    def perturb(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        state = first_tensor(args[0] if args else kwargs[argument])
        scale = float(state[0, -1].double().norm())
        delta = torch.zeros_like(state)
        delta[1:, -1] = torch.from_numpy(epsilon * scale * units).to(device=state.device, dtype=state.dtype)
        if args:
            return (state + delta, *args[1:]), kwargs
        return args, {**kwargs, argument: state + delta}

    def keep(slot: int, state: Any) -> None:
        laid_out = parts.batch_first(state, rows, len(ids))
        if laid_out is None:
            raise TokentrailError(f"{loaded.name}: layer {slot} is not laid out as the self-check found")
        captured[slot] = laid_out[:, -1].double()

    input_ids = torch.tensor([ids] * rows, dtype=torch.long, device=device)
    # Registered before the capture hooks, so that layer 0 is the perturbed input.
    handle = parts.entry.register_forward_pre_hook(perturb, with_kwargs=True)
    try:
        with torch.inference_mode(), layer_hooks(parts, keep):
            loaded.model(input_ids=input_ids)
    finally:
        handle.remove()
    states = torch.stack([captured[slot] for slot in range(parts.n_layers + 1)], dim=1)  # [rows, L+1, H]
    return (states[1:] - states[:1]).norm(dim=-1).cpu().numpy()
