"""What the two one-line-per-prompt figures (PC1/PC2 trajectories, depth view) share: line width, end and
bifurcation markers, the category legend and variance axis labels."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from tokentrail.viz import CategoryStyle, FigureMeta, category_styles, display_labels
from tokentrail.viz.static.labels import EndLabel
from tokentrail.viz.static.style import figure_style, mpl_text

__all__ = [
    "bifurcation_key",
    "bifurcation_marker",
    "bifurcation_points",
    "category_legend",
    "end_marker",
    "line_width",
    "prompt_line",
    "prompt_lines_figure",
    "variance_label",
]


def variance_label(name: str, ratio: Any, i: int) -> str:
    ratio = np.asarray(ratio, dtype=float).ravel()
    if i < ratio.size and np.isfinite(ratio[i]):
        return f"{name}{i + 1} ({100 * ratio[i]:.1f}% of variance)"
    return f"{name}{i + 1}"


def category_legend(ax: Axes, meta: FigureMeta, styles: dict[str, CategoryStyle], **kwargs: Any) -> Any:
    counts = {c: meta.categories.count(c) for c in styles}
    handles = [
        Line2D(
            [],
            [],
            color=s.color,
            linestyle=s.linestyle,
            marker=s.marker,
            markersize=6,
            linewidth=2,
            label=mpl_text(f"{cat} ({counts[cat]})"),
        )
        for cat, s in styles.items()
    ]
    kwargs.setdefault("loc", "upper left")
    kwargs.setdefault("bbox_to_anchor", (1.01, 1.0))
    legend = ax.legend(handles=handles, title="category (prompts)", borderaxespad=0.0, **kwargs)
    legend.set_gid("category-legend")
    return legend


def line_width(n_prompts: int) -> float:
    return 1.8 if n_prompts <= 15 else 1.4 if n_prompts <= 40 else 1.1


@contextmanager
def prompt_lines_figure(
    meta: FigureMeta, n_prompts: int, size: tuple[float, float]
) -> Iterator[tuple[Figure, Axes, dict[str, CategoryStyle], list[str], float]]:
    """A one-line-per-prompt figure under the house style: the figure, its axes, each category's style, each
    prompt's display label and the line width for this many prompts."""
    with figure_style():
        fig = Figure(figsize=size)
        yield fig, fig.subplots(), category_styles(meta.categories), display_labels(meta), line_width(n_prompts)


def prompt_line(ax: Axes, i: int, xs: Any, ys: Any, style: CategoryStyle, width: float, **extra: Any) -> None:
    """Prompt `i`'s line, drawn the same way in every one-line-per-prompt figure; its SVG id `trajectory-i` is
    what the report's hover and the figure tests find it by."""
    ax.plot(xs, ys, color=style.color, linestyle=style.linestyle, linewidth=width, alpha=0.85,
            gid=f"trajectory-{i}", zorder=2, **extra)


def bifurcation_points(result: Any) -> list[tuple[int, int]]:
    layers = np.asarray(getattr(result, "bifurcation_layer", None) if result is not None else None)
    if layers.ndim != 1:
        return []
    return [(i, int(b)) for i, b in enumerate(layers) if int(b) >= 0]


def end_marker(ax: Axes, i: int, x: float, y: float, style: CategoryStyle, name: str, size: float) -> EndLabel:
    """The category's marker at a trajectory's last point; returns the label that `place_end_labels` sets."""
    ax.plot(x, y, marker=style.marker, markersize=size, color=style.color, markeredgecolor="white",
            markeredgewidth=0.6, linestyle="none", gid=f"end-{i}", zorder=4)
    return EndLabel(i, x, y, name, style.color)


def bifurcation_marker(ax: Axes, i: int, x: float, y: float, size: float, edge_width: float) -> None:
    ax.plot(x, y, marker="D", markersize=size, markerfacecolor="none", markeredgecolor="black",
            markeredgewidth=edge_width, linestyle="none", gid=f"bifurcation-{i}", zorder=5)


def bifurcation_key() -> Line2D:
    return Line2D([], [], marker="D", markerfacecolor="none", markeredgecolor="black", linestyle="none",
                  label="bifurcation layer")
