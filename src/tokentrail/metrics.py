"""Write an AnalysisResult as CSV tables under `RUN_DIR/metrics/` and a `RUN_DIR/summary.json`.

The output is byte-identical for identical input: floats are written with `%.8g`, nan as an empty cell, rows in a
fixed order, JSON with sorted keys. Each file is written to a temporary file in the same folder and renamed, so a
reader never sees half a table. Tables that a result does not have (no token states, no separation) are not
written, and a stale copy from an earlier analysis is removed so that the folder always describes one result.

Tables (long format, one row per prompt x layer unless said otherwise):
  projection.csv          prompt_id, category, layer, pc1, pc2[, pc3...]   (layer L+1 = final-normed state)
  depth_projection.csv    prompt_id, category, layer, pc1, pc2[, ...]      (rms + per-layer centring)
  dynamics.csv            per prompt x step: from_layer, to_layer, step_size, relative_step, cosine_successive,
                          norm_from, norm_to, norm_growth, turning_angle (bend at from_layer; empty for the
                          first step)
  trajectory.csv          per prompt: arc_length, total_curvature
  projected_dynamics.csv  per prompt x projected step: speed, velocity_pc2_pc1[, heading]
  separation.csv          per layer: silhouette, knn_accuracy (each with its 95 % interval), p_value,
                          knn_p_value, chance, p_value_floor (the smallest p the permutations can give)
  category_separation.csv per category x layer: prompts, the category's own mean silhouette and kNN accuracy,
                          each with its 95 % bootstrap interval
  bifurcation.csv         per prompt: bifurcation_layer (-1 = never), toward
  bifurcation_intervals.csv per category: prompts, bifurcating, share and mean_layer with 95 % intervals
  divergence.csv          per pair of prompts (a before b): layer of fastest divergence (-1 = never)
  axis_score.csv          axis_a, axis_b, score (0 at A's centroid, 1 at B's)
  axis_intervals.csv      per category x layer: prompts, mean axis score, its 95 % bootstrap interval (low, high),
                          rank (1 = nearest axis_a) with its interval, the category ranked next and the share of
                          resamples that keep this one below it (order_holds)
  components.csv          per component x reading [x layer]: value with its 95 % interval (depth_spearman,
                          category_share, axis_correlation; see analysis.component_readings)
  transport.csv           token_cosine, wasserstein_to_next (empty at the last layer)
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tokentrail.atomic import atomic_write_bytes
from tokentrail.core.jsonable import json_ready

if TYPE_CHECKING:
    from tokentrail.analysis.pipeline import AnalysisResult

TABLES = (
    "projection.csv",
    "depth_projection.csv",
    "dynamics.csv",
    "trajectory.csv",
    "projected_dynamics.csv",
    "separation.csv",
    "bifurcation.csv",
    "divergence.csv",
    "axis_score.csv",
    "axis_intervals.csv",
    "category_separation.csv",
    "bifurcation_intervals.csv",
    "components.csv",
    "transport.csv",
)


def format_cell(value: Any) -> str:
    """One CSV cell: integers as integers, floats as %.8g, nan and None as empty, text as is."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isnan(number):
            return ""
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        # -0.0 and 0.0 are the same number; write them the same way.
        return "%.8g" % (number if number != 0 else 0.0)
    return str(value)


def _csv_bytes(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([format_cell(value) for value in row])
    return buffer.getvalue().encode("utf-8")


def _dict_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) from dicts: the columns are every key, in first-seen order; a missing key is an empty cell."""
    header = list(dict.fromkeys(key for row in rows for key in row))
    return header, [[row.get(key) for key in header] for row in rows]


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """`rows` as one CSV table (`_dict_table`; cells by `format_cell`), written whole or not at all."""
    atomic_write_bytes(Path(path), _csv_bytes(*_dict_table(rows)))
    return Path(path)


def _layer_table(
    prompt_ids: Sequence[str], categories: Sequence[str], layers: Sequence[int], values: np.ndarray, prefix: str
) -> tuple[list[str], list[list[Any]]]:
    """Long format for `values [prompts, layers, k]`: one row per prompt and layer, columns prefix1..prefixk."""
    header = ["prompt_id", "category", "layer"] + [f"{prefix}{i + 1}" for i in range(values.shape[2])]
    rows = [
        [prompt_ids[p], categories[p], int(layers[j]), *values[p, j]]
        for p in range(values.shape[0])
        for j in range(values.shape[1])
    ]
    return header, rows


def _dynamics_table(
    result: AnalysisResult, prompt_ids: Sequence[str], categories: Sequence[str]
) -> tuple[list[str], list[list[Any]]]:
    dyn = result.dynamics
    step_size = np.asarray(dyn["step_size"])
    turning = np.asarray(dyn["turning_angle"])
    norm = np.asarray(dyn["norm"])
    header = ["prompt_id", "category", "from_layer", "to_layer", "step_size", "relative_step",
              "cosine_successive", "norm_from", "norm_to", "norm_growth", "turning_angle"]
    rows = []
    for p in range(step_size.shape[0]):
        for step in range(step_size.shape[1]):
            rows.append([
                prompt_ids[p], categories[p], step, step + 1,
                step_size[p, step], dyn["relative_step"][p, step], dyn["cosine_successive"][p, step],
                norm[p, step], norm[p, step + 1], dyn["norm_growth"][p, step],
                turning[p, step - 1] if step >= 1 else None,
            ])
    return header, rows


def _projected_table(
    result: AnalysisResult, prompt_ids: Sequence[str], categories: Sequence[str]
) -> tuple[list[str], list[list[Any]]]:
    names = [name for name in ("speed", "velocity_pc2_pc1", "heading") if name in result.projected]
    columns = [np.asarray(result.projected[name]) for name in names]
    layers = np.asarray(result.layers)
    header = ["prompt_id", "category", "from_layer", "to_layer", *names]
    rows = [
        [prompt_ids[p], categories[p], int(layers[s]), int(layers[s + 1]), *(c[p, s] for c in columns)]
        for p in range(columns[0].shape[0])
        for s in range(columns[0].shape[1])
    ]
    return header, rows


def _separation_table(separation: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    names = [n for n in ("silhouette", "silhouette_low", "silhouette_high", "knn_accuracy", "knn_accuracy_low",
                         "knn_accuracy_high", "p_value", "knn_p_value") if n in separation]
    columns = [np.asarray(separation[n]) for n in names]
    header = ["layer", *names, "chance", "p_value_floor"]
    floor = separation.get("p_value_floor")
    rows = [[layer, *(c[layer] for c in columns), float(separation["chance"]), floor]
            for layer in range(len(columns[0]))]
    return header, rows


def _category_separation_table(by_statistic: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    silhouette, knn = by_statistic["silhouette"], by_statistic["knn_accuracy"]
    header = ["category", "layer", "prompts", "silhouette", "silhouette_low", "silhouette_high", "knn_accuracy",
              "knn_accuracy_low", "knn_accuracy_high"]
    rows = [[name, layer, int(silhouette.counts[c]), silhouette.mean[c, layer], silhouette.low[c, layer],
             silhouette.high[c, layer], knn.mean[c, layer], knn.low[c, layer], knn.high[c, layer]]
            for c, name in enumerate(silhouette.names) for layer in range(silhouette.mean.shape[1])]
    return header, rows


def metric_tables(result: AnalysisResult, prompt_ids: list[str], categories: list[str],
                  ) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """Every table of an analysis as (header, rows), keyed by its CSV file name: what `analyze` writes and what
    the notebook API shows as DataFrames."""
    n_prompts = np.asarray(result.projection).shape[0]
    if len(prompt_ids) != n_prompts or len(categories) != n_prompts:
        raise ValueError(
            f"the result has {n_prompts} prompts but got {len(prompt_ids)} prompt ids and {len(categories)} categories"
        )
    prompt_ids = [str(p) for p in prompt_ids]
    categories = [str(c) for c in categories]
    n_raw = np.asarray(result.depth_projection).shape[1]
    tables: dict[str, tuple[list[str], list[list[Any]]]] = {
        "projection.csv": _layer_table(prompt_ids, categories, np.asarray(result.layers),
                                       np.asarray(result.projection), "pc"),
        "depth_projection.csv": _layer_table(prompt_ids, categories, np.arange(n_raw),
                                             np.asarray(result.depth_projection), "pc"),
        "dynamics.csv": _dynamics_table(result, prompt_ids, categories),
        "trajectory.csv": (
            ["prompt_id", "category", "arc_length", "total_curvature"],
            [[prompt_ids[p], categories[p], result.dynamics["arc_length"][p], result.dynamics["total_curvature"][p]]
             for p in range(n_prompts)],
        ),
        "projected_dynamics.csv": _projected_table(result, prompt_ids, categories),
        "bifurcation.csv": (
            ["prompt_id", "category", "bifurcation_layer", "toward"],
            [[prompt_ids[p], categories[p], int(result.bifurcation_layer[p]), result.bifurcation_toward[p]]
             for p in range(n_prompts)],
        ),
    }
    divergence = np.asarray(result.divergence_layer)
    tables["divergence.csv"] = (
        ["prompt_a", "prompt_b", "layer"],
        [[prompt_ids[a], prompt_ids[b], int(divergence[a, b])] for a in range(n_prompts)
         for b in range(a + 1, n_prompts)],
    )
    if result.separation is not None:
        tables["separation.csv"] = _separation_table(result.separation)
    if result.axis is not None and result.axis_score is not None:
        scores = np.asarray(result.axis_score)
        axis_a, axis_b = result.axis
        header = ["prompt_id", "category", "layer", "axis_a", "axis_b", "score"]
        fitted = getattr(result, "axis_fit", None)
        # --holdout: which prompts defined the axis (their score is left empty) and which were scored.
        roles = [[] if fitted is None else ["fit" if fitted[p] else "evaluated"] for p in range(n_prompts)]
        if fitted is not None:
            header.append("axis_role")
        tables["axis_score.csv"] = (header, [
            [prompt_ids[p], categories[p], layer, axis_a, axis_b, scores[p, layer], *roles[p]]
            for p in range(n_prompts) for layer in range(scores.shape[1])])
    if getattr(result, "axis_intervals", None) is not None:
        tables["axis_intervals.csv"] = _dict_table(result.axis_intervals.rows())
    by_statistic = getattr(result, "category_separation", None)
    if by_statistic and all(by_statistic.values()):
        tables["category_separation.csv"] = _category_separation_table(by_statistic)
    if getattr(result, "bifurcation_intervals", None) is not None:
        tables["bifurcation_intervals.csv"] = _dict_table(result.bifurcation_intervals.rows())
    if getattr(result, "component_readings", None):
        tables["components.csv"] = _dict_table(result.component_readings)
    if result.wasserstein is not None and result.token_cosine is not None:
        wasserstein = np.asarray(result.wasserstein)
        token_cosine = np.asarray(result.token_cosine)
        tables["transport.csv"] = (
            ["prompt_id", "category", "layer", "token_cosine", "wasserstein_to_next"],
            [[prompt_ids[p], categories[p], layer, token_cosine[p, layer],
              wasserstein[p, layer] if layer < wasserstein.shape[1] else None]
             for p in range(n_prompts) for layer in range(token_cosine.shape[1])],
        )

    return tables


def write_metrics(
    result: AnalysisResult, prompt_ids: list[str], categories: list[str], out_dir: Path
) -> list[Path]:
    """Write the tables into `out_dir/metrics/` and `out_dir/summary.json`; return the paths written."""
    out_dir = Path(out_dir)
    tables = metric_tables(result, prompt_ids, categories)
    metrics_dir = out_dir / "metrics"
    written: list[Path] = []
    for name in TABLES:
        path = metrics_dir / name
        if name in tables:
            atomic_write_bytes(path, _csv_bytes(*tables[name]))
            written.append(path)
        elif path.exists():
            path.unlink()
    summary_path = out_dir / "summary.json"
    summary = json.dumps(json_ready(result.summary), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    atomic_write_bytes(summary_path, (summary + "\n").encode("utf-8"))
    written.append(summary_path)
    return written
