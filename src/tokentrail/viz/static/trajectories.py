"""The trajectories figure: one line per prompt through the layers in the PC1/PC2 plane."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from tokentrail.viz import FigureMeta, final_layer_index
from tokentrail.viz.static import prompt_lines as lines
from tokentrail.viz.static.labels import EndLabel, place_end_labels
from tokentrail.viz.static.style import figure_title, save_drawn

__all__ = ["draw_trajectories", "plot_trajectories"]


def draw_trajectories(
    result: Any,
    meta: FigureMeta,
    show_bifurcations: bool = True,
    layer_ticks: bool = False,
) -> Figure:
    """One line per prompt through the layers in the PC1/PC2 plane, coloured by category."""
    proj = np.asarray(result.projection, dtype=float)
    layers = np.asarray(result.layers).astype(int)
    n_prompts = proj.shape[0]
    final = final_layer_index(result)
    has_final = bool(len(layers) > 1 and layers[-1] == final)
    n_raw = len(layers) - 1 if has_final else len(layers)
    with lines.prompt_lines_figure(meta, n_prompts, (11, 8.5)) as (fig, ax, styles, names, lw):
        end_labels: list[EndLabel] = []
        for i in range(n_prompts):
            s = styles[meta.categories[i]]
            x, y = proj[i, :, 0], proj[i, :, 1]
            lines.prompt_line(ax, i, x[:n_raw], y[:n_raw], s, lw, marker="." if layer_ticks else None, markersize=3.5)
            if has_final:
                # The final RMS norm rescales the state, so that jump is drawn apart rather than as a layer.
                ax.plot(
                    x[n_raw - 1 :],
                    y[n_raw - 1 :],
                    color=s.color,
                    linestyle=":",
                    linewidth=lw * 0.8,
                    alpha=0.7,
                    gid=f"final-segment-{i}",
                    zorder=2,
                )
            ax.plot(
                x[0],
                y[0],
                marker="o",
                markersize=4.5,
                markerfacecolor="white",
                markeredgecolor=s.color,
                linestyle="none",
                gid=f"start-{i}",
                zorder=3,
            )
            end_labels.append(lines.end_marker(ax, i, float(x[-1]), float(y[-1]), s, names[i], size=7.5))

        if layer_ticks and n_prompts:
            # Numbering every line would bury the plot; one reference line per category is enough to read
            # depth off the dots that every line carries.
            step = max(1, n_raw // 8)
            firsts = [meta.categories.index(c) for c in styles][:4]
            for i in firsts:
                for j in range(0, n_raw, step):
                    ax.annotate(
                        str(layers[j]),
                        (proj[i, j, 0], proj[i, j, 1]),
                        xytext=(3, 3),
                        textcoords="offset points",
                        fontsize=7,
                        color="0.35",
                        gid="layer-tick",
                    )

        bif_count = 0
        if show_bifurcations:
            position = {int(layer): j for j, layer in enumerate(layers)}
            for i, b in lines.bifurcation_points(result):
                j = position.get(b)
                if j is None or i >= n_prompts:
                    continue
                lines.bifurcation_marker(ax, i, proj[i, j, 0], proj[i, j, 1], size=8, edge_width=1.2)
                bif_count += 1

        ax.margins(x=0.06, y=0.05)
        ax.set_xlabel(lines.variance_label("PC", result.explained_variance_ratio, 0))
        ax.set_ylabel(lines.variance_label("PC", result.explained_variance_ratio, 1))
        n_layers = final - 1
        ax.set_title(figure_title(meta, f"last-token trajectories through {n_layers} layers"), loc="left")
        cat_legend = lines.category_legend(ax, meta, styles)
        ax.add_artist(cat_legend)
        keys = [
            Line2D(
                [],
                [],
                marker="o",
                markerfacecolor="white",
                markeredgecolor="0.3",
                linestyle="none",
                label=f"start (layer {layers[0]})",
            ),
            Line2D([], [], marker="o", color="0.3", linestyle="none", label="end, with the prompt's label"),
        ]
        if has_final:
            keys.append(Line2D([], [], color="0.3", linestyle=":", label="final RMS norm step"))
        if bif_count:
            keys.append(lines.bifurcation_key())
        key_legend = ax.legend(
            handles=keys, loc="lower left", bbox_to_anchor=(1.01, 0.0), borderaxespad=0.0, title="markers"
        )
        key_legend.set_gid("marker-legend")
        place_end_labels(ax, end_labels)
        return fig


def plot_trajectories(
    result: Any,
    meta: FigureMeta,
    out_base: Path,
    show_bifurcations: bool = True,
    layer_ticks: bool = False,
) -> list[Path]:
    """Write `<out_base>.png` and `.svg` of the PC1/PC2 trajectories; see `draw_trajectories`."""
    return save_drawn(lambda: draw_trajectories(result, meta, show_bifurcations, layer_ticks), out_base)
