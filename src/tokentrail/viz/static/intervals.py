"""The intervals figure: the run's category-level readings, each with its 95 % bootstrap interval over prompts.

Panels (each drawn only when the analysis has it): the categories' order along the axis at the last layer, each
category's own kNN accuracy at the best-separating layer, the share of each category's prompts that bifurcate,
and what the principal components measure (depth correlation; category share by layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tokentrail.analysis.separation import best_separation_layer
from tokentrail.viz import OKABE_ITO, FigureMeta, category_styles
from tokentrail.viz.static.style import figure_style, figure_title, mpl_text, save_drawn

__all__ = ["draw_intervals", "plot_intervals"]


def _forest(ax: Axes, key: str, names: list[str], mean: np.ndarray, low: np.ndarray, high: np.ndarray,
            colors: dict[str, str], title: str, xlabel: str, note: list[str] | None = None) -> None:
    """One row per category, lowest mean at the bottom: the mean as a dot, its interval as a bar (gids
    `{key}-interval-{category}` and `{key}-mean-{category}`)."""
    order = np.argsort(mean, kind="stable")
    for row, index in enumerate(order):
        color = colors.get(names[index], "0.3")
        ax.plot([low[index], high[index]], [row, row], color=color, linewidth=2.5, solid_capstyle="butt",
                gid=f"{key}-interval-{names[index]}")
        ax.plot(mean[index], row, marker="o", color=color, markersize=6, gid=f"{key}-mean-{names[index]}")
    labels = [mpl_text(names[i]) + (f"  {note[i]}" if note else "") for i in order]
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.grid(axis="y", visible=False)
    ax.set_title(title, loc="left", fontsize=11)
    ax.set_xlabel(xlabel)


def _axis_panel(ax: Axes, result: Any, colors: dict[str, str]) -> None:
    found = result.axis_intervals
    note = [f"rank {found.rank_low[c, -1]}–{found.rank_high[c, -1]}" if found.rank_low[c, -1] != found.rank_high[c, -1]
            else f"rank {found.rank[c, -1]}" for c in range(len(found.names))]
    axis = result.axis
    _forest(ax, "axis", found.names, found.mean[:, -1], found.low[:, -1], found.high[:, -1], colors,
            mpl_text(f"order along the axis, last layer\n0 = {axis[0]}, 1 = {axis[1]}"), "mean axis score", note)
    ax.axvline(0.0, color="0.6", linewidth=0.8)
    ax.axvline(1.0, color="0.6", linewidth=0.8)


def _knn_panel(ax: Axes, result: Any, colors: dict[str, str]) -> None:
    knn = result.category_separation["knn_accuracy"]
    layer = best_separation_layer(result.separation)
    _forest(ax, "knn", knn.names, knn.mean[:, layer], knn.low[:, layer], knn.high[:, layer], colors,
            f"each category's kNN accuracy, layer {layer}\n(the best-separating layer)", "share of its prompts "
            "whose neighbours vote for it")
    ax.set_xlim(-0.03, 1.03)


def _bifurcation_panel(ax: Axes, result: Any, colors: dict[str, str]) -> None:
    found = result.bifurcation_intervals
    note = [f"{found.bifurcating[c]}/{found.prompts[c]}" + (
        f", layer {found.mean_layer[c]:.1f} [{found.mean_layer_low[c]:.1f}, {found.mean_layer_high[c]:.1f}]"
        if np.isfinite(found.mean_layer_low[c]) else "") for c in range(len(found.names))]
    _forest(ax, "bifurcation", found.names, found.share, found.share_low, found.share_high, colors,
            "share of prompts that bifurcate\n(label: how many, and their mean layer with its interval)",
            "share (leaves its category for good)", note)
    ax.set_xlim(-0.03, 1.03)


def _component_panel(ax: Axes, rows: list[dict[str, Any]]) -> None:
    shares = [row for row in rows if row["reading"] == "category_share"]
    depth = {row["component"]: row for row in rows if row["reading"] == "depth_spearman"}
    for number, component in enumerate(dict.fromkeys(row["component"] for row in shares)):
        mine = [row for row in shares if row["component"] == component]
        xs = np.array([row["layer"] for row in mine], dtype=float)
        color = OKABE_ITO[number % len(OKABE_ITO)]
        rho = depth.get(component)
        label = component.upper() + (f" (ρ with depth {rho['value']:.2f}, {rho['low']:.2f}…{rho['high']:.2f})"
                                     if rho else "")
        ax.plot(xs, [row["value"] for row in mine], color=color, linewidth=1.8, label=label,
                gid=f"category-share-{component}")
        ax.fill_between(xs, [row["low"] for row in mine], [row["high"] for row in mine], color=color, alpha=0.18,
                        linewidth=0)
    if shares and shares[0].get("chance") is not None:
        ax.axhline(float(shares[0]["chance"]), color="0.3", linestyle="--", linewidth=1.2,
                   label="chance: (categories − 1) / (prompts − 1)")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("what each component measures\nshare of its variance between categories", loc="left",
                 fontsize=11)
    ax.set_xlabel("layer")
    ax.set_ylabel("category share (η²)")
    ax.legend(loc="best", fontsize=8)


def draw_intervals(result: Any, meta: FigureMeta) -> Figure | None:
    """The panels of the module docstring, or None when the analysis computed no interval."""
    colors = {name: style.color for name, style in category_styles(meta.categories).items()}
    panels = []
    if getattr(result, "axis_intervals", None) is not None and getattr(result, "axis", None) is not None:
        panels.append(lambda ax: _axis_panel(ax, result, colors))
    separation = getattr(result, "category_separation", None)
    if separation and separation.get("knn_accuracy") is not None and best_separation_layer(result.separation) >= 0:
        panels.append(lambda ax: _knn_panel(ax, result, colors))
    if getattr(result, "bifurcation_intervals", None) is not None:
        panels.append(lambda ax: _bifurcation_panel(ax, result, colors))
    rows = getattr(result, "component_readings", None)
    if rows and any(row["reading"] == "category_share" for row in rows):
        panels.append(lambda ax: _component_panel(ax, rows))
    if not panels:
        return None
    with figure_style():
        ncols = min(len(panels), 2)
        nrows = -(-len(panels) // ncols)
        fig = Figure(figsize=(6.2 * ncols, 0.6 + 3.9 * nrows), layout="constrained")
        axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
        for ax, draw in zip(axes, panels):
            draw(ax)
        for ax in axes[len(panels):]:
            ax.axis("off")
        fig.suptitle(figure_title(meta, "category readings with 95 % bootstrap intervals over prompts"), x=0.01,
                     ha="left")
        return fig


def plot_intervals(result: Any, meta: FigureMeta, out_base: Path) -> list[Path]:
    """Write the intervals figure (nothing when the analysis computed no interval); see `draw_intervals`."""
    return save_drawn(lambda: draw_intervals(result, meta), out_base)
