"""The dynamics figure: per-category mean and spread of each layer-by-layer quantity (step size, speed in the
PC plane, norms, transport, axis score), plus per-prompt scalars such as arc length."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from tokentrail.viz import CategoryStyle, FigureMeta, category_styles, final_layer_index
from tokentrail.viz.static.style import figure_style, figure_title, mpl_text, save_drawn

__all__ = ["Panel", "draw_dynamics", "draw_panels", "plot_dynamics"]


@dataclass
class Panel:
    """One layer-by-layer quantity: `values [P, T]` per prompt (drawn as each category's mean and spread), or
    with `overall`, `values [1, T]`: one measure of the whole run, drawn as one line. `spans` shades layer ranges
    (plateaus, say) with `span_label` in the legend."""

    key: str
    title: str
    ylabel: str
    values: np.ndarray  # [P, T]
    xs: np.ndarray  # [T]
    xlabel: str = "layer"
    robust_ylim: bool = False
    hline: float | None = None
    overall: bool = False
    spans: list[tuple[float, float]] | None = None
    span_label: str = ""
    # category -> (low [T], high [T]): draw this interval of the category mean as its band instead of the
    # +-1 s.d. spread of its prompts (the title must say so).
    bands: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    @classmethod
    def run_wide(cls, key: str, title: str, ylabel: str, values: Any, xs: np.ndarray, **extra: Any) -> Panel:
        """One measure of the whole run, `values [T]`, drawn as one line."""
        return cls(key, title, ylabel, np.asarray(values, dtype=float)[None], xs, overall=True, **extra)


def _overall_line(ax: Axes, panel: Panel) -> None:
    ax.plot(panel.xs, np.asarray(panel.values, dtype=float)[0], color="0.35", linestyle="--", linewidth=1.8,
            marker=".", gid=f"overall-{panel.key}")


def _per_category_band(ax: Axes, panel: Panel, meta: FigureMeta, styles: dict[str, CategoryStyle]) -> None:
    for number, (start, end) in enumerate(panel.spans or []):
        ax.axvspan(start - 0.5, end + 0.5, color="0.85", zorder=0,
                   label=mpl_text(panel.span_label) if number == 0 and panel.span_label else None)
    if panel.spans and panel.span_label:
        ax.legend(loc="best", fontsize=8)
    if panel.overall:
        _overall_line(ax, panel)
        _finish(ax, panel)
        return
    values = np.where(np.isfinite(panel.values), panel.values, np.nan)
    cats = np.asarray(meta.categories)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are legitimate (e.g. dPC1 = 0)
        for cat, s in styles.items():
            rows = values[cats == cat]
            if rows.size == 0:
                continue
            mean = np.nanmean(rows, axis=0)
            ax.plot(panel.xs, mean, color=s.color, linestyle=s.linestyle, linewidth=1.8, gid=f"mean-{cat}")
            if panel.bands is not None and cat in panel.bands:
                low, high = panel.bands[cat]
                ax.fill_between(panel.xs, low, high, color=s.color, alpha=0.15, linewidth=0, gid=f"interval-{cat}")
            elif panel.bands is None and rows.shape[0] > 1:
                spread = np.nanstd(rows, axis=0)
                ax.fill_between(
                    panel.xs, mean - spread, mean + spread, color=s.color, alpha=0.15, linewidth=0
                )
        if panel.robust_ylim and np.isfinite(values).any():
            # A ratio such as dPC2/dPC1 explodes wherever dPC1 is near zero; the bulk is what matters.
            lo, hi = np.nanpercentile(values, [2, 98])
            if np.isfinite(lo) and np.isfinite(hi) and hi > lo:
                margin = 0.15 * (hi - lo)
                ax.set_ylim(lo - margin, hi + margin)
    _finish(ax, panel)


def _finish(ax: Axes, panel: Panel) -> None:
    if panel.hline is not None:
        ax.axhline(panel.hline, color="0.5", linewidth=0.8)
    ax.set_title(panel.title, loc="left", fontsize=11)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)


def _per_category_strip(
    ax: Axes, title: str, values: np.ndarray, meta: FigureMeta, styles: dict[str, CategoryStyle]
) -> None:
    """One dot per prompt for a per-prompt scalar, categories side by side, with the category mean as a bar."""
    cats = np.asarray(meta.categories)
    rng = np.random.default_rng(0)  # deterministic jitter: figures must be reproducible
    for k, (cat, s) in enumerate(styles.items()):
        rows = np.asarray(values, dtype=float)[cats == cat]
        rows = rows[np.isfinite(rows)]
        if rows.size == 0:
            continue
        jitter = rng.uniform(-0.18, 0.18, rows.size)
        ax.plot(k + jitter, rows, marker=s.marker, color=s.color, linestyle="none", markersize=5, alpha=0.85)
        ax.plot([k - 0.3, k + 0.3], [rows.mean()] * 2, color=s.color, linewidth=2)
    ax.set_xticks(range(len(styles)))
    ax.set_xticklabels([mpl_text(c) for c in styles], rotation=35, ha="right", fontsize=8)
    ax.grid(axis="x", visible=False)
    ax.set_title(title, loc="left", fontsize=11)


def draw_dynamics(result: Any, meta: FigureMeta) -> Figure:
    """Per-category mean (line) and ±1 s.d. (band) of each dynamic quantity by layer; the axis score's band is
    the 95 % bootstrap interval of the mean where the analysis computed one."""
    dyn: dict[str, Any] = dict(getattr(result, "dynamics", None) or {})
    projected: dict[str, Any] = dict(getattr(result, "projected", None) or {})
    layers = np.asarray(result.layers).astype(int)
    final = final_layer_index(result)
    n_raw = final  # raw layers are 0..L, i.e. L+1 of them

    def arr(source: dict[str, Any], key: str) -> np.ndarray | None:
        value = source.get(key)
        return None if value is None else np.asarray(value, dtype=float)

    def x_for(width: int, start: int) -> np.ndarray:
        return np.arange(start, start + width)

    panels: list[Panel] = []
    specs: list[tuple[str, str, str, int]] = [
        ("step_size", "step size ‖h(l) − h(l−1)‖", "L2 distance", 1),
        ("relative_step", "relative step", "‖Δh‖ / ‖h(l−1)‖", 1),
        ("cosine_successive", "cosine between successive states", "cos(h(l−1), h(l))", 1),
        ("norm", "state norm ‖h(l)‖", "L2 norm", 0),
        ("turning_angle", "turning angle between successive steps", "angle", 1),
    ]
    for key, title, ylabel, start in specs:
        values = arr(dyn, key)
        if values is not None and values.ndim == 2:
            panels.append(Panel(key, title, ylabel, values, x_for(values.shape[1], start)))
    proj_x = layers[1:]
    for key, title, ylabel, robust in [
        ("speed", "speed in the PC1/PC2 plane", "projected step length", False),
        ("velocity_pc2_pc1", "dPC2 / dPC1 (seed's 'velocity')", "ΔPC2 / ΔPC1", True),
    ]:
        values = arr(projected, key)
        if values is not None and values.ndim == 2 and values.shape[1] == len(proj_x):
            xs = proj_x.astype(float)
            if len(xs) and xs[-1] == final:
                # The final-norm step sits half a layer past the last block, so it is not read as a layer.
                xs[-1] = n_raw - 0.5
                title += " (last point: final norm)"
            panels.append(
                Panel(key, title, ylabel, values, xs, robust_ylim=robust, hline=0.0 if robust else None)
            )
    # Token-cloud panels, present only for runs that kept every token: (attribute, title, y label, first layer).
    for key, title, ylabel, first in (
        ("wasserstein", "Wasserstein distance of the token cloud per step", "W(layer l−1, l)", 1),
        ("token_cosine", "mean cosine among the prompt's tokens", "cosine", 0),
    ):
        found = getattr(result, key, None)
        if found is not None:
            values = np.asarray(found, dtype=float)
            panels.append(Panel(key, title, ylabel, values, x_for(values.shape[1], first)))
    axis = getattr(result, "axis", None)
    axis_score = getattr(result, "axis_score", None)
    if axis is not None and axis_score is not None:
        values = np.asarray(axis_score, dtype=float)
        intervals = getattr(result, "axis_intervals", None)
        bands = None if intervals is None else {
            name: (intervals.low[c], intervals.high[c]) for c, name in enumerate(intervals.names)}
        title = f"axis score: {axis[0]} → {axis[1]}" + ("\n(band: 95 % interval of the mean)" if bands else "")
        panels.append(Panel("axis_score", mpl_text(title), "score", values, x_for(values.shape[1], 0), hline=0.0,
                            bands=bands))
    # The seed's two headline quantities first.
    priority = ["step_size", "velocity_pc2_pc1", "speed", "relative_step", "cosine_successive", "norm"]
    panels.sort(key=lambda p: priority.index(p.key) if p.key in priority else len(priority))
    scalars = [
        (key, title)
        for key, title in [
            ("arc_length", "arc length per prompt"),
            ("total_curvature", "total curvature per prompt"),
        ]
        if arr(dyn, key) is not None
    ]

    strips = [(title, arr(dyn, key)) for key, title in scalars]
    return draw_panels(panels, meta, "layer-by-layer dynamics of the last-token state",
                       "no dynamics were computed for this run", strips)


def draw_panels(panels: list[Panel], meta: FigureMeta, what: str, empty: str,
                strips: list[tuple[str, Any]] | None = None) -> Figure:
    """A grid of `panels` (per-category mean and ±1 s.d. by layer, or one run-wide line) and `strips` (per-prompt
    scalars by category), with one category legend; `what` titles the figure, `empty` stands in for no panel."""
    strips = strips or []
    styles = category_styles(meta.categories)
    n = len(panels) + len(strips)
    with figure_style():
        if n == 0:
            fig = Figure(figsize=(6, 2))
            ax = fig.subplots()
            ax.axis("off")
            ax.text(0.5, 0.5, empty, ha="center", va="center")
            return fig
        ncols = 3 if n > 4 else min(n, 2)
        nrows = -(-n // ncols)
        fig = Figure(figsize=(5.2 * ncols, 3.7 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        flat = list(axes.ravel())
        for ax, panel in zip(flat, panels):
            _per_category_band(ax, panel, meta, styles)
        for ax, (title, values) in zip(flat[len(panels) :], strips):
            _per_category_strip(ax, title, values, meta, styles)
        for ax in flat[n:]:
            ax.axis("off")
        handles = [
            Line2D([], [], color=s.color, linestyle=s.linestyle, linewidth=2, label=mpl_text(c))
            for c, s in styles.items()
        ]
        if any(panel.overall for panel in panels):
            handles.append(Line2D([], [], color="0.35", linestyle="--", linewidth=2, marker=".",
                                  label="the whole run"))
        title = "category\nline = mean, band = ±1 s.d.\nacross its prompts"
        if len(flat) > n:
            # An empty grid cell is the closest place to the panels it explains.
            legend = flat[n].legend(
                handles=handles, loc="upper left", title=title, ncols=1 if len(handles) <= 10 else 2
            )
        else:
            legend = fig.legend(
                handles=handles,
                loc="outside lower center",
                ncols=min(len(handles), 6),
                title=title.replace("\n", " "),
            )
        legend.set_gid("category-legend")
        fig.suptitle(figure_title(meta, what), x=0.01, ha="left")
        return fig


def plot_dynamics(result: Any, meta: FigureMeta, out_base: Path) -> list[Path]:
    """Write the per-category dynamics panels; see `draw_dynamics`."""
    return save_drawn(lambda: draw_dynamics(result, meta), out_base)
