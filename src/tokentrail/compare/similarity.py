"""Linear CKA applied to runs: every layer of one model against every layer of another, with the permutation
null, the debiased estimator and the best match per layer (`tokentrail.analysis.similarity` does the
arithmetic); mutual k-nearest-neighbour alignment over the same layer grid, beside its chance level k / (n - 1);
and the share of the prompts' variance the largest hidden dimensions carry, which says where CKA mostly
compares one dimension."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tokentrail.analysis.similarity import (
    cka_matrix,
    cka_permutation_null,
    mutual_knn_chance,
    mutual_knn_matrix,
    standardize_features,
)
from tokentrail.compare.alignment import ModelRun, matched_layer

__all__ = ["cka_pair", "cka_rows", "dominant_dimensions", "mutual_knn_pair", "mutual_knn_rows"]


def cka_pair(a: ModelRun, b: ModelRun, n_permutations: int, seed: int, standardize: bool) -> dict[str, Any]:
    """CKA of every layer of `a` against every layer of `b`, its null, the best match per layer, a summary."""
    states_a, states_b = a.states, b.states
    if standardize:
        states_a, states_b = standardize_features(states_a), standardize_features(states_b)
    cka = cka_matrix(states_a, states_b)
    debiased = cka_matrix(states_a, states_b, debiased=True) if states_a.shape[0] >= 4 else np.full_like(cka, np.nan)
    null = cka_permutation_null(states_a, states_b, n_permutations=n_permutations, seed=seed)
    null_mean = null.mean(axis=0)
    null_p95 = np.quantile(null, 0.95, axis=0)
    p_value = (1 + np.sum(null >= cka[None] - 1e-12, axis=0)) / (1 + n_permutations)
    diagonal = [(i, matched_layer(i, a.n_layers, b.n_layers)) for i in range(a.n_layers + 1)]
    best_b = np.nanargmax(np.where(np.isnan(cka), -np.inf, cka), axis=1)
    alignment = [
        {"layer": i, "depth": i / a.n_layers, f"best {b.label} layer": int(best_b[i]),
         f"best {b.label} depth": int(best_b[i]) / b.n_layers, "CKA there": float(cka[i, best_b[i]]),
         f"{b.label} layer at same depth": j, "CKA at same depth": float(cka[i, j]),
         "null 95% at same depth": float(null_p95[i, j])}
        for i, j in diagonal
    ]
    diag_values = np.array([cka[i, j] for i, j in diagonal])
    diag_null = np.array([null_p95[i, j] for i, j in diagonal])
    summary = {
        "models": [a.label, b.label],
        "shape": [a.n_layers + 1, b.n_layers + 1],
        "n_prompts": int(states_a.shape[0]),
        "n_permutations": int(n_permutations),
        # The smallest p the null can give: a cell at it beat every shuffle, and its true p is at most this.
        "p_value_floor": 1.0 / (1 + n_permutations),
        "features": "standardised" if standardize else "raw",
        "mean CKA at matched depth": float(np.nanmean(diag_values)),
        "mean null 95% at matched depth": float(np.nanmean(diag_null)),
        "matched-depth layers above null 95%": int(np.sum(diag_values > diag_null)),
        "matched-depth layers": len(diagonal),
        "CKA embeddings (0 vs 0)": float(cka[0, 0]),
        "CKA last layers": float(cka[-1, -1]),
        "null mean (all cells)": float(null_mean.mean()),
        "null 95% (median cell)": float(np.median(null_p95)),
        "cells above null 95%": float(np.mean(cka > null_p95)),
        "mean debiased CKA at matched depth": float(np.nanmean([debiased[i, j] for i, j in diagonal])),
        "mean |depth offset| of best match": float(np.mean(np.abs(best_b / b.n_layers - np.arange(a.n_layers + 1)
                                                                  / a.n_layers))),
    }
    return {"cka": cka, "debiased": debiased, "null_mean": null_mean, "null_p95": null_p95, "p_value": p_value,
            "alignment": alignment, "summary": summary}


def cka_rows(a: ModelRun, b: ModelRun, pair: dict[str, Any]) -> list[dict[str, Any]]:
    """One CSV row per (layer of a, layer of b) cell of a `cka_pair`."""
    rows = []
    for i in range(a.n_layers + 1):
        for j in range(b.n_layers + 1):
            rows.append({
                "layer_a": i, "depth_a": i / a.n_layers, "layer_b": j, "depth_b": j / b.n_layers,
                "cka": pair["cka"][i, j], "cka_debiased": pair["debiased"][i, j],
                "null_mean": pair["null_mean"][i, j], "null_p95": pair["null_p95"][i, j],
                "p_value": pair["p_value"][i, j], "p_value_floor": pair["summary"]["p_value_floor"],
            })
    return rows


def mutual_knn_pair(a: ModelRun, b: ModelRun, k: int, standardize: bool) -> dict[str, Any]:
    """Mutual k-NN alignment of every layer of `a` with every layer of `b`, the best match per layer of `a`,
    and a summary; on the same states as `cka_pair` (standardised units if `standardize`)."""
    states_a, states_b = a.states, b.states
    if standardize:
        states_a, states_b = standardize_features(states_a), standardize_features(states_b)
    n = int(states_a.shape[0])
    matrix = mutual_knn_matrix(states_a, states_b, k=k)
    chance = mutual_knn_chance(n, k)
    diagonal = [(i, matched_layer(i, a.n_layers, b.n_layers)) for i in range(a.n_layers + 1)]
    # nan cells (a layer without neighbour structure) never win; the earliest layer of b wins a tie.
    filled = np.where(np.isnan(matrix), -np.inf, matrix)
    best_b = np.argmax(filled, axis=1)
    alignment = [
        {"layer": i, "depth": i / a.n_layers, f"best {b.label} layer": int(best_b[i]),
         f"best {b.label} depth": int(best_b[i]) / b.n_layers, "mutual kNN there": float(matrix[i, best_b[i]]),
         f"{b.label} layer at same depth": j, "mutual kNN at same depth": float(matrix[i, j]), "chance": chance}
        for i, j in diagonal
    ]
    usable = not np.all(np.isnan(matrix))
    top_a, top_b = np.unravel_index(np.argmax(filled), matrix.shape) if usable else (None, None)
    diag_values = np.array([matrix[i, j] for i, j in diagonal])
    summary = {
        "models": [a.label, b.label],
        "shape": [a.n_layers + 1, b.n_layers + 1],
        "n_prompts": n,
        "k": int(k),
        "features": "standardised" if standardize else "raw",
        "chance k/(n-1)": chance,
        "max mutual kNN": float(matrix[top_a, top_b]) if usable else None,
        f"max at {a.label} layer": int(top_a) if usable else None,
        f"max at {b.label} layer": int(top_b) if usable else None,
        f"max at {a.label} depth": int(top_a) / a.n_layers if usable else None,
        f"max at {b.label} depth": int(top_b) / b.n_layers if usable else None,
        "mean mutual kNN at matched depth": float(np.nanmean(diag_values)) if usable else None,
        "matched-depth layers above chance": int(np.sum(diag_values > chance)),
        "matched-depth layers": len(diagonal),
        "mean mutual kNN (all cells)": float(np.nanmean(matrix)) if usable else None,
        "mutual kNN embeddings (0 vs 0)": float(matrix[0, 0]),
        "mutual kNN last layers": float(matrix[-1, -1]),
    }
    return {"mutual_knn": matrix, "chance": chance, "k": int(k), "alignment": alignment, "summary": summary}


def mutual_knn_rows(a: ModelRun, b: ModelRun, pair: dict[str, Any]) -> list[dict[str, Any]]:
    """One CSV row per (layer of a, layer of b) cell of a `mutual_knn_pair`, with the chance level."""
    rows = []
    for i in range(a.n_layers + 1):
        for j in range(b.n_layers + 1):
            rows.append({
                "model_a": a.label, "model_b": b.label,
                "layer_a": i, "depth_a": i / a.n_layers, "layer_b": j, "depth_b": j / b.n_layers,
                "mutual_knn": pair["mutual_knn"][i, j], "chance": pair["chance"],
            })
    return rows


def dominant_dimensions(runs: Sequence[ModelRun]) -> list[dict[str, Any]]:
    """How much of the prompts' variance the largest single hidden dimensions carry, per layer.

    Linear CKA weighs directions by their variance, so where one "massive activation" dimension carries much
    of it, CKA mostly compares that dimension; this table says where to read the heat maps with that in mind.
    """
    rows = []
    for model in runs:
        states = model.states.astype(np.float64)
        for layer, depth in enumerate(model.depth):
            values = states[:, layer]
            variance = np.var(values, axis=0)
            total = float(variance.sum())
            ranked = np.argsort(variance)[::-1]
            rows.append({
                "model": model.label, "layer": layer, "depth": float(depth),
                "mean norm": float(np.linalg.norm(values, axis=1).mean()),
                "top dimension": int(ranked[0]),
                "top-1 variance share": float(variance[ranked[0]] / total) if total > 0 else None,
                "top-5 variance share": float(variance[ranked[:5]].sum() / total) if total > 0 else None,
            })
    return rows
