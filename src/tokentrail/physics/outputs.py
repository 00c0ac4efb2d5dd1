"""What `tokentrail physics` writes: tables, the headline readings in `physics/summary.json`, and figures.

The readings answer the seed's questions with the statistic that answers them, and say when the run is too small
for an answer: does the attention energy fall with depth (Spearman's rho between the layer and the mean energy
over prompts), is it lower for the formal than for the natural category of the run's axis (Mann-Whitney U over
prompts, two-sided), do the tokens cluster with depth (the mean pairwise cosine and the cluster count at the first
block against the last), where the clustering pauses (plateaus), and whether a small perturbation grows or
shrinks (the sign of the mean expansion rate per layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from tokentrail.atomic import atomic_write_json
from tokentrail.core.jsonable import json_ready
from tokentrail.metrics import write_rows
from tokentrail.physics.measures import PhysicsOptions, PhysicsResult
from tokentrail.viz import FigureMeta
from tokentrail.viz.static.dynamics import Panel, draw_panels
from tokentrail.viz.static.style import save_drawn

__all__ = ["FIGURES", "physics_summary", "write_physics"]

FIGURES = ("physics_energy", "physics_clustering", "physics_ode", "physics_geometry")


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    counts = np.isfinite(values).sum(axis=axis)
    sums = np.where(np.isfinite(values), values, 0.0).sum(axis=axis)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _trend(series: np.ndarray) -> dict[str, Any]:
    """Spearman's rho (and its p) between the layer and `series`, over the finite entries."""
    series = np.asarray(series, dtype=np.float64)
    layers = np.arange(len(series))
    keep = np.isfinite(series)
    if keep.sum() < 3 or np.ptp(series[keep]) == 0:
        return {"rho": None, "p": None}
    rho, p = stats.spearmanr(layers[keep], series[keep])
    return {"rho": float(rho), "p": float(p)}


def _compare_groups(values: np.ndarray, categories: Sequence[str], axis: tuple[str, str] | None) -> dict[str, Any]:
    """Per-prompt `values` of the axis's natural category A against its formal category B (Mann-Whitney U)."""
    if axis is None:
        return {"axis": None}
    labels = np.asarray(list(categories), dtype=object)
    a, b = values[labels == axis[0]], values[labels == axis[1]]
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    out: dict[str, Any] = {"axis": list(axis), "n": [int(a.size), int(b.size)],
                           "mean": [float(a.mean()) if a.size else None, float(b.mean()) if b.size else None]}
    if a.size and b.size:
        test = stats.mannwhitneyu(b, a, alternative="two-sided")
        out.update(difference=float(b.mean() - a.mean()), p=float(test.pvalue))
    return out


def physics_summary(result: PhysicsResult, categories: Sequence[str], axis: tuple[str, str] | None,
                    options: PhysicsOptions) -> dict[str, Any]:
    """The headline readings (see the module docstring), JSON-ready."""
    probed = _probed(categories, result)
    summary: dict[str, Any] = {"options": options.__dict__, "notes": result.notes, "seconds": result.seconds,
                               "prompts": len(categories), "probed_prompts": result.probed,
                               "probed_by_category": {name: probed.count(name) for name in dict.fromkeys(categories)}}
    relative = _nanmean(result.relative_step, 0)
    summary["ode"] = {
        "median_relative_step": float(np.nanmedian(result.relative_step)),
        "largest_relative_step_layer": int(np.nanargmax(relative)) + 1,
        "largest_relative_step": float(np.nanmax(relative)),
        "linearity_median_r2": None if result.linearity is None else float(np.nanmedian(result.linearity)),
        "linearity_r2": None if result.linearity is None else result.linearity,
    }
    geometry = result.geometry
    dimension = np.asarray(geometry["intrinsic_dimension"], dtype=np.float64)
    summary["geometry"] = {
        "intrinsic_dimension": dimension,
        "max_intrinsic_dimension_layer": int(np.nanargmax(dimension)) if np.isfinite(dimension).any() else None,
        "top_pc_share": geometry["top_pc_share"],
        "effective_rank": geometry["effective_rank"],
    }
    if result.energy_weighted is not None and result.energy_log_partition is not None:
        total = result.energy_weighted.sum(axis=2)  # [P', L]
        partition = result.energy_log_partition.sum(axis=2)
        summary["energy"] = {
            "implementation": result.energy_implementation,
            "mean_by_layer": total.mean(axis=0), "log_partition_mean_by_layer": partition.mean(axis=0),
            "depth_trend": _trend(total.mean(axis=0)),
            "log_partition_depth_trend": _trend(partition.mean(axis=0)),
            "formal_vs_natural": _compare_groups(total.mean(axis=1), probed, axis),
        }
    if result.expansion is not None:
        rates = result.expansion.mean(axis=0)
        relative = (result.relative_expansion if result.relative_expansion is not None
                    else np.full_like(result.expansion, np.nan)).mean(axis=0)
        summary["expansion"] = {
            "mean_rate_by_layer": rates,
            "expanding_layers": [int(layer) + 1 for layer in np.flatnonzero(rates > 0)],
            "mean_rate": float(rates.mean()),
            "relative_rate_by_layer": relative,
            "relatively_expanding_layers": [int(layer) + 1 for layer in np.flatnonzero(relative > 0)],
            "mean_relative_rate": float(np.nanmean(relative)),
            "directions": options.directions, "epsilon": options.epsilon,
        }
    if result.clustering is not None:
        cosine = _nanmean(result.clustering["mean_cosine"], 0)
        clusters = _nanmean(result.clustering["clusters"], 0)
        summary["clustering"] = {
            "threshold": options.threshold,
            "mean_cosine_by_layer": cosine, "mean_clusters_by_layer": clusters,
            "mean_cosine_first_block": float(cosine[1]), "mean_cosine_last": float(cosine[-1]),
            "mean_clusters_first_block": float(clusters[1]), "mean_clusters_last": float(clusters[-1]),
            "cosine_depth_trend": _trend(cosine[1:]),
            "plateaus": [list(span) for span in result.plateaus],
        }
    summary["text"] = _sentences(summary)
    return json_ready(summary)


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def _sentences(summary: dict[str, Any]) -> str:
    parts = []
    energy = summary.get("energy")
    if energy:
        trend = energy["depth_trend"]
        if trend["rho"] is not None:
            direction = "falls" if trend["rho"] < 0 else "rises"
            parts.append(f"Attention energy (summed over heads, per token) {direction} with depth: Spearman rho "
                         f"{trend['rho']:+.2f} (p {_p(trend['p'])}) over the layer means.")
        groups = energy["formal_vs_natural"]
        if groups.get("difference") is not None:
            a, b = groups["axis"]
            lower = "lower" if groups["difference"] < 0 else "higher"
            parts.append(f"{b} prompts have {lower} energy than {a} prompts ({groups['difference']:+.3g}, "
                         f"Mann-Whitney p {_p(groups['p'])}, n = {groups['n'][1]} and {groups['n'][0]}).")
    clustering = summary.get("clustering")
    if clustering:
        plateaus = ", ".join(f"{start}-{end}" for start, end in clustering["plateaus"]) or "none"
        cosine = (clustering["mean_cosine_first_block"], clustering["mean_cosine_last"])
        clusters = (clustering["mean_clusters_first_block"], clustering["mean_clusters_last"])
        parts.append(f"Tokens' mean pairwise cosine goes from {cosine[0]:.2f} after the first block to {cosine[1]:.2f} "
                     f"at the last layer; clusters at cosine {clustering['threshold']}: {clusters[0]:.1f} to "
                     f"{clusters[1]:.1f} per prompt; plateaus: {plateaus}.")
    expansion = summary.get("expansion")
    if expansion:
        growing = (len(expansion["expanding_layers"]), len(expansion["relatively_expanding_layers"]))
        blocks = len(expansion["mean_rate_by_layer"])
        parts.append(f"A perturbation of the embedding grows at {growing[0]} of {blocks} blocks (mean rate "
                     f"{expansion['mean_rate']:+.3f} per layer); relative to the state's norm, at {growing[1]} "
                     f"(mean {expansion['mean_relative_rate']:+.3f}).")
    ode = summary["ode"]
    parts.append(f"The median block moves the state by {ode['median_relative_step']:.2f} of its norm (largest "
                 f"at block {ode['largest_relative_step_layer']}).")
    if ode["linearity_median_r2"] is not None:
        parts.append(f"A linear map explains a median {ode['linearity_median_r2']:.2f} of a block's update out of "
                     "sample.")
    return " ".join(parts)


def _probed(categories: Sequence[str], result: PhysicsResult) -> list[str]:
    """The categories of the probed prompts, in the order of the probe arrays."""
    return [categories[row] for row in result.probed_at]


def _padded(values: np.ndarray, result: PhysicsResult, n_prompts: int) -> np.ndarray:
    """Rows for every prompt: the probe arrays' rows placed at the prompts they probed (`probed_rows`), nan for
    the prompts the model probes left out."""
    values = np.asarray(values, dtype=np.float64)
    padded = np.full((n_prompts, *values.shape[1:]), np.nan)
    padded[result.probed_at] = values
    return padded


def _panels(result: PhysicsResult, n_layers: int, n_prompts: int) -> dict[str, list[Panel]]:
    blocks = np.arange(1, n_layers + 1)
    every = np.arange(0, n_layers + 1)

    figures: dict[str, list[Panel]] = {"physics_energy": [], "physics_clustering": []}
    if result.energy_weighted is not None and result.energy_log_partition is not None:
        figures["physics_energy"] = [
            Panel("energy", "attention energy E = -sum A s (sum over heads, per token)", "energy",
                  _padded(result.energy_weighted.sum(axis=2), result, n_prompts), blocks),
            Panel("log_partition", "log-partition form -log sum exp s", "energy",
                  _padded(result.energy_log_partition.sum(axis=2), result, n_prompts), blocks),
        ]
    if result.clustering is not None:
        spans = [(float(s), float(e)) for s, e in result.plateaus]
        figures["physics_clustering"] = [
            Panel("token_cosine", "mean pairwise cosine of the prompt's tokens", "cosine",
                  result.clustering["mean_cosine"], every),
            Panel("clusters", "clusters of tokens (plateaus shaded)", "clusters",
                  result.clustering["clusters"].astype(float), every, spans=spans, span_label="plateau"),
            Panel("spectral_clusters", "clusters from the Gram matrix's spectral gap", "clusters",
                  result.clustering["spectral_clusters"].astype(float), every),
        ]
    ode = [Panel("relative_step", "Euler step relative to the state: |h(l) - h(l-1)| / |h(l-1)|", "ratio",
                 result.relative_step, blocks)]
    if result.linearity is not None:
        ode.append(Panel.run_wide("linearity", "linear share of each block's update (out-of-sample R^2)", "R^2",
                                  result.linearity, blocks, hline=0.0))
    if result.expansion is not None:
        ode.append(Panel("expansion", "expansion rate log(|d(l)| / |d(l-1)|) of a perturbed embedding", "rate",
                         _padded(result.expansion, result, n_prompts), blocks, hline=0.0))
    if result.relative_expansion is not None:
        ode.append(Panel("relative_expansion", "the same for |d(l)| / |h(l)|: beyond the norm's growth", "rate",
                         _padded(result.relative_expansion, result, n_prompts), blocks, hline=0.0))
    figures["physics_ode"] = ode
    geometry = [
        Panel.run_wide("intrinsic_dimension", "intrinsic dimension (TwoNN) of the prompts' last-token cloud",
                       "dimension", result.geometry["intrinsic_dimension"], every),
        Panel.run_wide("top_pc_share", "anisotropy: variance share on the top component", "share",
                       result.geometry["top_pc_share"], every),
        Panel.run_wide("mean_cosine_to_mean", "anisotropy: mean cosine to the mean direction", "cosine",
                       result.geometry["mean_cosine_to_mean"], every),
        Panel.run_wide("effective_rank", "effective rank of the last-token cloud", "rank",
                       result.geometry["effective_rank"], every),
    ]
    if result.token_geometry is not None:
        geometry.append(Panel("token_dimension", "intrinsic dimension of each prompt's token cloud", "dimension",
                              result.token_geometry["intrinsic_dimension"], every))
    figures["physics_geometry"] = geometry
    return figures


def _rows(result: PhysicsResult, prompt_ids: Sequence[str], categories: Sequence[str],
          n_layers: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    layers, prompts, heads = [], [], []
    for layer in range(n_layers + 1):
        row: dict[str, Any] = {"layer": layer}
        block = layer - 1  # the block whose output is this layer (none for layer 0)
        row["relative_step"] = float(_nanmean(result.relative_step[:, block], 0)) if layer else None
        row["linearity_r2"] = float(result.linearity[block]) if layer and result.linearity is not None else None
        for key, values in result.geometry.items():
            row[key] = float(values[layer])
        if result.energy_weighted is not None and result.energy_log_partition is not None:
            row["energy"] = float(result.energy_weighted[:, block].sum(axis=1).mean()) if layer else None
            row["energy_log_partition"] = (float(result.energy_log_partition[:, block].sum(axis=1).mean())
                                           if layer else None)
        if result.expansion is not None:
            row["expansion_rate"] = float(result.expansion[:, block].mean()) if layer else None
        if result.relative_expansion is not None:
            row["relative_expansion_rate"] = float(result.relative_expansion[:, block].mean()) if layer else None
        if result.clustering is not None:
            for key, values in result.clustering.items():
                row[f"token_{key}"] = float(_nanmean(values[:, layer], 0))
        layers.append(row)
    # trace row -> its row in the probe arrays
    probe_of = {int(row): position for position, row in enumerate(result.probed_at)}
    for i, (prompt_id, category) in enumerate(zip(prompt_ids, categories)):
        probed = probe_of.get(i)
        for layer in range(n_layers + 1):
            block = layer - 1
            row = {"prompt_id": prompt_id, "category": category, "layer": layer,
                   "relative_step": float(result.relative_step[i, block]) if layer else None}
            if probed is not None and result.energy_weighted is not None and result.energy_log_partition is not None:
                row["energy"] = float(result.energy_weighted[probed, block].sum()) if layer else None
                row["energy_log_partition"] = (float(result.energy_log_partition[probed, block].sum()) if layer
                                               else None)
            if probed is not None and result.expansion is not None:
                row["expansion_rate"] = float(result.expansion[probed, block]) if layer else None
            if probed is not None and result.relative_expansion is not None:
                row["relative_expansion_rate"] = float(result.relative_expansion[probed, block]) if layer else None
            if result.clustering is not None:
                for key, values in result.clustering.items():
                    row[f"token_{key}"] = values[i, layer]
            if result.token_geometry is not None:
                for key, values in result.token_geometry.items():
                    row[f"token_{key}"] = float(values[i, layer])
            prompts.append(row)
    if result.energy_weighted is not None and result.energy_log_partition is not None:
        for block in range(result.energy_weighted.shape[1]):
            for head in range(result.energy_weighted.shape[2]):
                heads.append({"layer": block + 1, "head": head,
                              "energy": float(result.energy_weighted[:, block, head].mean()),
                              "energy_log_partition": float(result.energy_log_partition[:, block, head].mean())})
    return layers, prompts, heads


def write_physics(run_dir: Path, result: PhysicsResult, summary: dict[str, Any], prompt_ids: Sequence[str],
                  categories: Sequence[str], n_layers: int, meta: FigureMeta) -> list[Path]:
    """`physics/layers.csv`, `prompts.csv`, `heads.csv` (with the energy), `summary.json` and the figures
    `figures/physics_*.png` (+ .svg); returns the paths written."""
    out = Path(run_dir) / "physics"
    layers, prompts, heads = _rows(result, prompt_ids, categories, n_layers)
    written = [write_rows(out / "layers.csv", layers), write_rows(out / "prompts.csv", prompts)]
    if heads:
        written.append(write_rows(out / "heads.csv", heads))
    elif (out / "heads.csv").exists():
        (out / "heads.csv").unlink()  # from an earlier run with the energy: it would no longer match
    panels = _panels(result, n_layers, len(prompt_ids))
    figures = {}
    for name in FIGURES:
        what = {"physics_energy": "attention energy by layer", "physics_clustering": "token clustering over depth",
                "physics_ode": "the residual stream as an ODE", "physics_geometry": "geometry per layer"}[name]
        if panels.get(name):
            figures[name] = [str(p.relative_to(run_dir)) for p in
                             save_drawn(lambda n=name, w=what: draw_panels(panels[n], meta, w, ""),
                                        Path(run_dir) / "figures" / name)]
            written.extend(Path(run_dir) / p for p in figures[name])
    atomic_write_json(out / "summary.json", {**summary, "figures": figures})
    written.append(out / "summary.json")
    return written
