"""Bifurcations across models: the normalised depth at which each prompt leaves its category in every model,
ranked by how much those depths differ."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokentrail.compare.alignment import ModelRun

__all__ = ["bifurcation_rows"]


def bifurcation_rows(runs: Sequence[ModelRun]) -> list[dict[str, Any]]:
    """Per prompt and model the normalised bifurcation depth; the spread across models ranks the rows.

    A prompt that never leaves its category counts as depth 1 for the spread (it stays to the end), so "leaves
    early in one model, never in the other" ranks high, as it should.
    """
    first = runs[0]
    rows = []
    for p in range(len(first.order)):
        source = first.order[p]
        row: dict[str, Any] = {
            "prompt": first.trace.labels[source] or str(p + 1),
            "id": first.trace.prompt_ids[source],
            "category": first.categories[p],
            "text": first.trace.prompts[source],
        }
        depths = []
        for model in runs:
            layer = int(model.bifurcation_layer[model.order[p]])
            toward = model.bifurcation_toward[model.order[p]]
            row[f"{model.label} layer"] = layer if layer >= 0 else None
            row[f"{model.label} depth"] = layer / model.n_layers if layer >= 0 else None
            row[f"{model.label} toward"] = toward or "never"
            depths.append(layer / model.n_layers if layer >= 0 else 1.0)
        row["depth spread"] = float(max(depths) - min(depths))
        rows.append(row)
    rows.sort(key=lambda r: -r["depth spread"])
    return rows
