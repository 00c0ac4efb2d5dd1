"""The depth view: layer on the x axis, one per-layer-centred depth component on the y axis, a line per prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tokentrail.viz import FigureMeta
from tokentrail.viz.static import prompt_lines as lines
from tokentrail.viz.static.labels import EndLabel, place_end_labels
from tokentrail.viz.static.style import figure_title, save_drawn

__all__ = ["draw_depth", "plot_depth"]


def draw_depth(result: Any, meta: FigureMeta, component: int = 0) -> Figure:
    """Layer on the x axis, one per-layer-centred component on the y axis: depth is explicit, not PC1's guess."""
    depth = np.asarray(result.depth_projection, dtype=float)
    if not 0 <= component < depth.shape[-1]:
        raise ValueError(f"component {component} not in the depth projection (it has {depth.shape[-1]})")
    n_prompts, n_layers = depth.shape[0], depth.shape[1]
    xs = np.arange(n_layers)
    with lines.prompt_lines_figure(meta, n_prompts, (11, 6.5)) as (fig, ax, styles, names, lw):
        end_labels: list[EndLabel] = []
        for i, category in enumerate(meta.categories[:n_prompts]):
            ys = depth[i, :, component]
            lines.prompt_line(ax, i, xs, ys, styles[category], lw)
            end_labels.append(lines.end_marker(ax, i, float(xs[-1]), float(ys[-1]), styles[category], names[i], size=7))
        bif_count = 0
        for i, b in lines.bifurcation_points(result):
            if 0 <= b < n_layers and i < n_prompts:
                lines.bifurcation_marker(ax, i, b, depth[i, b, component], size=7, edge_width=1.1)
                bif_count += 1
        ax.axhline(0.0, color="0.5", linewidth=0.8, zorder=1)
        ax.set_xlim(-0.3, n_layers - 1 + max(1.0, 0.06 * n_layers))
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel(
            lines.variance_label("depth PC", result.depth_explained_variance_ratio, component)
            + "\nof the RMS-normalised, per-layer-centred state"
        )
        ax.set_title(figure_title(meta, f"depth view: component {component + 1} layer by layer"), loc="left")
        ax.add_artist(lines.category_legend(ax, meta, styles))
        if bif_count:
            ax.legend(
                handles=[lines.bifurcation_key()],
                loc="lower left",
                bbox_to_anchor=(1.01, 0.0),
                borderaxespad=0.0,
            )
        place_end_labels(ax, end_labels)
        return fig


def plot_depth(result: Any, meta: FigureMeta, out_base: Path, component: int = 0) -> list[Path]:
    """Write the depth view (layer on x, a per-layer-centred component on y); see `draw_depth`."""
    return save_drawn(lambda: draw_depth(result, meta, component), out_base)
