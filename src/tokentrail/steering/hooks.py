"""The intervention: add `alpha * scale * unit` to the output of block l while a `Steering` context is open.

Steering at layer l adds to the output of block l (`parts.blocks[l - 1]`), which is exactly the trace's
`states[:, l]`. Which token positions receive it: `last` (the last prompt token only), `prompt` (every prompt
token) or `all` (every prompt token and every generated token). Hooks are removed when the context exits,
also on error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokentrail.capture import first_tensor
from tokentrail.errors import TokentrailError
from tokentrail.models.loading import LoadedModel
from tokentrail.steering.vectors import SteeringVector

if TYPE_CHECKING:
    from typing_extensions import Self

POSITIONS = ("last", "prompt", "all")


def check_steerable(loaded: LoadedModel) -> None:
    why = loaded.parts.why_not_steerable()
    if why is not None:
        raise TokentrailError(f"{loaded.name}: {why}, so tokentrail steers only models whose blocks each pass on "
                              "one [batch, tokens, hidden] state once per forward pass")


class Steering:
    """Context manager that adds `alpha * scale * direction` to block outputs while it is open.

    `positions` selects the token positions of the next forward pass ([batch, seq] bools). When it is None
    the mode decides: `last` steers the last column (the last prompt token under left padding, which is what
    `Tracer` uses), `prompt` and `all` steer every column. Pad columns may be steered too; attention masks
    them out, so no real token sees the difference.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        vectors: Sequence[SteeringVector],
        alpha: float,
        position: str = "last",
    ) -> None:
        if position not in POSITIONS:
            raise TokentrailError(f"unknown steering position {position!r}; use one of {', '.join(POSITIONS)}")
        n_layers = loaded.parts.n_layers
        layers = [v.layer for v in vectors]
        if len(set(layers)) != len(layers):
            raise TokentrailError(f"two steering vectors for the same layer: {sorted(layers)}")
        check_steerable(loaded)
        for vector in vectors:
            if not 1 <= vector.layer <= n_layers:
                raise TokentrailError(f"layer {vector.layer} cannot be steered: this model has layers 1..{n_layers}")
        self.loaded = loaded
        self.vectors = list(vectors)
        self.alpha = float(alpha)
        self.position = position
        self.positions: torch.Tensor | None = None
        # Per-row mode (`per_row`): which prompts (indices into the generated list) the next batch holds.
        self.rows: np.ndarray | None = None
        self._handles: list[Any] = []
        self._deltas = {v.layer: torch.from_numpy(v.delta(self.alpha)) for v in self.vectors}
        self._row_deltas: dict[int, torch.Tensor] = {}
        self._row_active: dict[int, torch.Tensor] = {}

    @classmethod
    def per_row(cls, loaded: LoadedModel, deltas: Mapping[int, np.ndarray], position: str = "last") -> Steering:
        """Steering with its own vector for every prompt: `deltas[layer]` is `[N, H]`, row i added to prompt i of
        the list `generate` is given (a zero row leaves that prompt untouched, bit for bit). One batch can then
        hold many conditions of an experiment: the same problem steered along different directions, or not."""
        vectors = [SteeringVector(layer, np.zeros(loaded.parts.hidden_size, np.float32), 0.0, "per-row")
                   for layer in deltas]
        steering = cls(loaded, vectors, 0.0, position)
        for layer, rows in deltas.items():
            rows = np.asarray(rows, dtype=np.float32)
            if rows.ndim != 2 or rows.shape[1] != loaded.parts.hidden_size:
                raise TokentrailError(f"per-row deltas at layer {layer} must be [prompts, {loaded.parts.hidden_size}], "
                                      f"got {rows.shape}")
            steering._row_deltas[layer] = torch.from_numpy(rows)
            steering._row_active[layer] = torch.from_numpy(np.any(rows != 0, axis=1))
        return steering

    def _where(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.positions is not None:
            return self.positions.to(device=hidden.device, dtype=torch.bool)
        where = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if self.position == "last":
            where[:, -1] = True
        else:
            where[:] = True
        return where

    def _hook(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            hidden = first_tensor(output)
            where = self._where(hidden)
            if layer in self._row_deltas:
                if self.rows is None or len(self.rows) != hidden.shape[0]:
                    raise TokentrailError("per-row steering needs the rows of each batch (generate sets them)")
                rows = torch.from_numpy(np.asarray(self.rows, dtype=np.int64))
                delta = self._row_deltas[layer][rows].to(device=hidden.device, dtype=hidden.dtype)[:, None, :]
                where = where & self._row_active[layer][rows].to(hidden.device)[:, None]
            else:
                delta = self._deltas[layer].to(device=hidden.device, dtype=hidden.dtype)
            # torch.where keeps unselected positions bit-for-bit instead of adding a zero to them.
            steered = torch.where(where[..., None], hidden + delta, hidden)
            if isinstance(output, tuple):
                return (steered, *output[1:])
            if isinstance(output, list):
                return [steered, *output[1:]]
            return steered

        return hook

    @property
    def is_open(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Self:
        if self._handles:
            raise TokentrailError("this Steering context is already open")
        try:
            for vector in self.vectors:
                block = self.loaded.parts.blocks[vector.layer - 1]
                self._handles.append(block.register_forward_hook(self._hook(vector.layer)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.positions = None
        self.rows = None
