"""The separation figure: how well the categories separate at each layer (silhouette, kNN accuracy, chance)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tokentrail.viz import OKABE_ITO, FigureMeta, category_order
from tokentrail.viz.static.style import figure_style, figure_title, save_drawn

__all__ = ["OKABE_BLUE", "OKABE_VERMILLION", "draw_separation", "plot_separation"]

OKABE_BLUE = OKABE_ITO[0]
OKABE_VERMILLION = OKABE_ITO[1]


def draw_separation(result: Any, meta: FigureMeta) -> Figure | None:
    """How well the categories separate at each layer: silhouette and kNN accuracy against chance."""
    sep = getattr(result, "separation", None)
    if not sep:
        return None
    silhouette = np.asarray(sep.get("silhouette", []), dtype=float)
    knn = np.asarray(sep.get("knn_accuracy", []), dtype=float)
    p_value = sep.get("p_value")
    p_value = None if p_value is None else np.asarray(p_value, dtype=float)
    chance = sep.get("chance")
    with figure_style():
        fig = Figure(figsize=(12, 4.4), layout="constrained")
        ax_s, ax_k = fig.subplots(1, 2)

        def significance(ax: Axes, values: np.ndarray, color: str) -> None:
            if p_value is None or p_value.shape != values.shape:
                return
            sig = p_value < 0.05
            xs = np.arange(values.size)
            ax.plot(
                xs[sig],
                values[sig],
                marker="o",
                color=color,
                linestyle="none",
                markersize=5,
                label="p < 0.05 (permutation)",
            )
            ax.plot(
                xs[~sig],
                values[~sig],
                marker="o",
                markerfacecolor="white",
                markeredgecolor=color,
                linestyle="none",
                markersize=5,
                label="not significant",
            )

        for ax, name, colour in ((ax_s, "silhouette", OKABE_BLUE), (ax_k, "knn_accuracy", OKABE_VERMILLION)):
            if f"{name}_low" in sep:  # the 95 % bootstrap interval over prompts, as a band
                low, high = (np.asarray(sep[f"{name}_{end}"], dtype=float) for end in ("low", "high"))
                ax.fill_between(np.arange(low.size), low, high, color=colour, alpha=0.18, linewidth=0,
                                gid=f"{name}-interval", label="95 % interval (bootstrap over prompts)")
        if silhouette.size:
            ax_s.plot(np.arange(silhouette.size), silhouette, color=OKABE_BLUE, linewidth=2, gid="silhouette")
            significance(ax_s, silhouette, OKABE_BLUE)
            ax_s.axhline(0.0, color="0.5", linewidth=0.8)
        ax_s.set_title("silhouette of the categories", loc="left")
        ax_s.set_xlabel("layer (0 = embeddings)")
        ax_s.set_ylabel("silhouette (−1 … 1)")
        if knn.size:
            ax_k.plot(np.arange(knn.size), knn, color=OKABE_VERMILLION, linewidth=2, gid="knn_accuracy")
            significance(ax_k, knn, OKABE_VERMILLION)
        if chance is not None:
            ax_k.axhline(
                float(chance),
                color="0.3",
                linestyle="--",
                linewidth=1.2,
                label=f"chance ({chance:.2f})",
                gid="chance",
            )
        ax_k.set_ylim(-0.02, 1.02)
        ax_k.set_title("leave-one-out kNN accuracy", loc="left")
        ax_k.set_xlabel("layer (0 = embeddings)")
        ax_k.set_ylabel("accuracy")
        for ax in (ax_s, ax_k):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best")
        fig.suptitle(
            figure_title(
                meta, f"category separation by layer ({len(category_order(meta.categories))} categories)"
            ),
            x=0.01,
            ha="left",
        )
        return fig


def plot_separation(result: Any, meta: FigureMeta, out_base: Path) -> list[Path]:
    """Write silhouette and kNN accuracy by layer; nothing (empty list) when separation was not computed."""
    return save_drawn(lambda: draw_separation(result, meta), out_base)
