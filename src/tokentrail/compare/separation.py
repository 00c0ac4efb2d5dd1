"""Category separation on a normalised depth axis: every run's silhouette, kNN accuracy and permutation p per
layer as rows, and one summary per model (best layer, first significant layer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tokentrail.analysis.separation import best_separation_layer
from tokentrail.compare.alignment import ModelRun

__all__ = ["SIGNIFICANCE", "separation_tables"]

SIGNIFICANCE = 0.05


def separation_tables(runs: Sequence[ModelRun]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows per model and layer on normalised depth, and one summary per model."""
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for model in runs:
        sep = model.separation
        if sep is None:
            summary.append({"model": model.label, "layers": model.n_layers, "best layer": None})
            continue
        for layer, depth in enumerate(model.depth):
            rows.append({
                "model": model.label, "layer": layer, "depth": float(depth),
                "silhouette": float(sep["silhouette"][layer]), "knn_accuracy": float(sep["knn_accuracy"][layer]),
                "p_value": float(sep["p_value"][layer]), "chance": float(sep["chance"]),
            })
        best = best_separation_layer(sep)
        significant = np.flatnonzero(np.asarray(sep["p_value"]) <= SIGNIFICANCE)
        first_sig = int(significant[0]) if significant.size else None
        summary.append({
            "model": model.label,
            "layers": model.n_layers,
            "best layer": best,
            "best depth": best / model.n_layers,
            "best silhouette": float(sep["silhouette"][best]),
            "kNN accuracy there": float(sep["knn_accuracy"][best]),
            "p there": float(sep["p_value"][best]),
            "chance": float(sep["chance"]),
            "first significant layer": first_sig,
            "first significant depth": None if first_sig is None else first_sig / model.n_layers,
            "silhouette at last layer": float(sep["silhouette"][-1]),
        })
    return rows, summary
