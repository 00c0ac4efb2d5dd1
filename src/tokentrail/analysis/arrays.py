"""The one check every analysis makes of the arrays it is given: float64, the right number of axes, not empty,
and (where a nan would silently spread) finite; refused with one line naming the array and its expected layout."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["checked"]


def checked(values: Any, layout: str, what: str, finite: bool = False, min_length: int = 1) -> np.ndarray:
    """`values` as float64 with as many axes as `layout` names (e.g. "[tokens, layers, hidden]"), at least
    `min_length` entries along the first, and only finite numbers when `finite`."""
    array = np.asarray(values, dtype=np.float64)
    axes = layout.count(",") + 1
    if array.ndim != axes:
        raise ValueError(f"{what} must be {layout}, got shape {array.shape}")
    if array.shape[0] < min_length:
        first = layout.strip("[]").split(",")[0].strip()  # "tokens" in "[tokens, layers, hidden]"
        held = "no" if array.shape[0] == 0 else str(array.shape[0])
        raise ValueError(f"{what} hold {held} {first}, need at least {min_length}")
    if finite and not np.all(np.isfinite(array)):
        raise ValueError(f"{what} contain nan or inf")
    return array
