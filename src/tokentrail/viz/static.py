"""Static figures (PNG + SVG) drawn with matplotlib's Agg backend.

`plot_*` functions write files; the matching `draw_*` functions return the `Figure` itself (tests and
notebooks inspect it).

Figures are built as bare `Figure` objects, never through pyplot, so drawing neither opens a window nor
touches pyplot's global state (safe in threads and in a user's notebook).

Each public function writes `<out_base>.png` and `<out_base>.svg` and returns those paths. Text is kept as
text in the SVG (not outlined) so the figures stay searchable and small; matplotlib XML-escapes it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from tokentrail.atomic import atomic_write_bytes
from tokentrail.viz import (
    OKABE_ITO,
    CategoryStyle,
    FigureMeta,
    category_order,
    category_styles,
    display_labels,
    final_layer_index,
)

__all__ = [
    "draw_depth",
    "draw_dynamics",
    "draw_logit_lens",
    "draw_separation",
    "draw_trajectories",
    "figure_style",
    "mpl_text",
    "plot_depth",
    "plot_dynamics",
    "plot_logit_lens",
    "plot_separation",
    "plot_trajectories",
]

PNG_DPI = 150
OKABE_BLUE = OKABE_ITO[0]
OKABE_VERMILLION = OKABE_ITO[1]
# A faint white box keeps labels legible where they sit on other prompts' lines. (A stroke path effect would
# look nicer but makes the SVG outline the text, losing it as text.)
_HALO = {"boxstyle": "round,pad=0.08", "facecolor": "white", "edgecolor": "none", "alpha": 0.7}
_RC = {
    "svg.fonttype": "none",
    "svg.hashsalt": "tokentrail",  # stable ids, so reruns give identical SVGs
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 9,
    "legend.framealpha": 0.9,
}


def mpl_text(text: str) -> str:
    """Make arbitrary text print literally: an unescaped `$` pair would switch matplotlib into mathtext."""
    return str(text).replace("$", r"\$")


@contextmanager
def figure_style() -> Iterator[None]:
    with matplotlib.rc_context(_RC), warnings.catch_warnings():
        # Tokens and category names may hold characters (CJK, emoji) that DejaVu Sans lacks; a box is an
        # acceptable rendering, a warning per glyph is just noise.
        warnings.filterwarnings("ignore", message=r".*[Gg]lyph .* missing from.*")
        yield


def save_figure(fig: Figure, out_base: Path, dpi: int = PNG_DPI) -> list[Path]:
    """Write `out_base.png` and `out_base.svg` (SVG without a date, so reruns give the same bytes)."""
    out_base = Path(out_base)
    out_base.parent.mkdir(parents=True, exist_ok=True)
    # Appending (not with_suffix) keeps names such as "run.v2/trajectories" intact.
    png = out_base.parent / f"{out_base.name}.png"
    svg = out_base.parent / f"{out_base.name}.svg"
    write_figure(fig, png, dpi=dpi, bbox_inches="tight", metadata={"Software": "tokentrail"})
    write_figure(fig, svg, bbox_inches="tight", metadata={"Date": None, "Creator": "tokentrail"})
    return [png, svg]


def write_figure(fig: Figure, path: Path, **savefig_kwargs: Any) -> Path:
    """Render `fig` in memory, then write it atomically: a full disk or a killed process never leaves half an
    image where the last good one was."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip("."), **savefig_kwargs)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _variance_label(name: str, ratio: Any, i: int) -> str:
    ratio = np.asarray(ratio, dtype=float).ravel()
    if i < ratio.size and np.isfinite(ratio[i]):
        return f"{name}{i + 1} ({100 * ratio[i]:.1f}% of variance)"
    return f"{name}{i + 1}"


def _title(meta: FigureMeta, what: str) -> str:
    return mpl_text(f"{meta.model_name}: {what}" if meta.model_name else what)


def _category_legend(ax: Axes, meta: FigureMeta, styles: dict[str, CategoryStyle], **kwargs: Any) -> Any:
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


@dataclass
class _Label:
    index: int
    x: float
    y: float
    text: str
    color: str


def _spread_1d(desired: Sequence[float], height: float, lo: float, hi: float) -> list[float]:
    """Centres for labels of equal height, as close to `desired` as possible without overlapping.

    Overlapping neighbours are merged into blocks centred on their members' mean wish (the classic
    pool-adjacent-violators idea), so a cluster spreads symmetrically instead of drifting one way.
    """
    order = sorted(range(len(desired)), key=lambda i: desired[i])
    blocks: list[list[int]] = []
    centres: list[float] = []
    for i in order:
        blocks.append([i])
        centres.append(desired[i])
        while len(blocks) > 1:
            below_top = centres[-2] + len(blocks[-2]) * height / 2
            above_bottom = centres[-1] - len(blocks[-1]) * height / 2
            if below_top <= above_bottom:
                break
            merged = blocks[-2] + blocks.pop()
            centres.pop()
            blocks[-1] = merged
            centres[-1] = float(np.mean([desired[j] for j in merged]))
    out = [0.0] * len(desired)
    for members, centre in zip(blocks, centres):
        half = len(members) * height / 2
        # Keep a block inside the axes when it fits; a taller one starts at the bottom edge.
        centre = min(max(centre, lo + half), max(hi - half, lo + half))
        bottom = centre - half
        for k, i in enumerate(members):
            out[i] = bottom + (k + 0.5) * height
    return out


def _place_end_labels(ax: Axes, labels: Sequence[_Label], fontsize: float = 9.0) -> None:
    """Write each label just right of its line end, spreading labels vertically so none overlap.

    Fifty lines often end in a few tight clusters. Labels whose horizontal extents touch are spread as one
    column (several side-by-side columns when a column would not fit the axes' height); a thin leader line
    ties each moved label to its end point.
    """
    if not labels:
        return
    ax.autoscale_view()
    px_per_pt = ax.figure.dpi / 72.0
    height = fontsize * px_per_pt * 1.2
    pad = 7 * px_per_pt  # clears the end marker
    widths = [max(1, len(lab.text)) * fontsize * px_per_pt * 0.62 for lab in labels]
    ends = ax.transData.transform(np.array([[lab.x, lab.y] for lab in labels], dtype=float))
    box = ax.bbox
    positions = np.column_stack([ends[:, 0] + pad, ends[:, 1]])

    # Group labels whose horizontal spans overlap: only those can collide.
    by_x = sorted(range(len(labels)), key=lambda i: positions[i, 0])
    groups: list[list[int]] = []
    right = -np.inf
    for i in by_x:
        if groups and positions[i, 0] <= right:
            groups[-1].append(i)
            right = max(right, positions[i, 0] + widths[i])
        else:
            groups.append([i])
            right = positions[i, 0] + widths[i]
    for group in groups:
        n_columns = max(1, int(np.ceil(len(group) * height / max(box.height, height))))
        column_width = max(widths[i] for i in group) + pad / 2
        ranked = sorted(group, key=lambda i: ends[i, 1])
        for c in range(n_columns):
            members = ranked[c::n_columns]
            ys = _spread_1d([ends[i, 1] for i in members], height, box.y0, box.y1)
            x0 = min(positions[i, 0] for i in group) + c * column_width
            for i, y in zip(members, ys):
                positions[i] = (x0 if n_columns > 1 else positions[i, 0], y)
    positions_data = ax.transData.inverted().transform(positions)
    for i, lab in enumerate(labels):
        moved = abs(positions[i, 1] - ends[i, 1]) > height * 0.6 or positions[i, 0] - ends[i, 0] > pad * 1.5
        ax.annotate(
            mpl_text(lab.text),
            xy=(lab.x, lab.y),
            xytext=(positions_data[i, 0], positions_data[i, 1]),
            textcoords="data",
            ha="left",
            va="center",
            fontsize=fontsize,
            fontweight="bold",
            color=lab.color,
            annotation_clip=False,
            bbox=_HALO,
            arrowprops=(
                {"arrowstyle": "-", "color": lab.color, "lw": 0.6, "alpha": 0.6, "shrinkA": 0, "shrinkB": 4}
                if moved
                else None
            ),
            gid=f"label-{lab.index}",
        )


def _line_width(n_prompts: int) -> float:
    return 1.8 if n_prompts <= 15 else 1.4 if n_prompts <= 40 else 1.1


def _bifurcation_points(result: Any) -> list[tuple[int, int]]:
    layers = np.asarray(getattr(result, "bifurcation_layer", None) if result is not None else None)
    if layers.ndim != 1:
        return []
    return [(i, int(b)) for i, b in enumerate(layers) if int(b) >= 0]


def _end_marker(ax: Axes, i: int, x: float, y: float, style: CategoryStyle, name: str, size: float) -> _Label:
    """The category's marker at a trajectory's last point; returns the label that `_place_end_labels` sets."""
    ax.plot(x, y, marker=style.marker, markersize=size, color=style.color, markeredgecolor="white",
            markeredgewidth=0.6, linestyle="none", gid=f"end-{i}", zorder=4)
    return _Label(i, x, y, name, style.color)


def _bifurcation_marker(ax: Axes, i: int, x: float, y: float, size: float, edge_width: float) -> None:
    ax.plot(x, y, marker="D", markersize=size, markerfacecolor="none", markeredgecolor="black",
            markeredgewidth=edge_width, linestyle="none", gid=f"bifurcation-{i}", zorder=5)


def _bifurcation_key() -> Line2D:
    return Line2D([], [], marker="D", markerfacecolor="none", markeredgecolor="black", linestyle="none",
                  label="bifurcation layer")


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
    styles = category_styles(meta.categories)
    names = display_labels(meta)
    lw = _line_width(n_prompts)

    with figure_style():
        fig = Figure(figsize=(11, 8.5))
        ax = fig.subplots()
        end_labels: list[_Label] = []
        for i in range(n_prompts):
            s = styles[meta.categories[i]]
            x, y = proj[i, :, 0], proj[i, :, 1]
            ax.plot(
                x[:n_raw],
                y[:n_raw],
                color=s.color,
                linestyle=s.linestyle,
                linewidth=lw,
                alpha=0.85,
                marker="." if layer_ticks else None,
                markersize=3.5,
                gid=f"trajectory-{i}",
                zorder=2,
            )
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
            end_labels.append(_end_marker(ax, i, float(x[-1]), float(y[-1]), s, names[i], size=7.5))

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
            for i, b in _bifurcation_points(result):
                j = position.get(b)
                if j is None or i >= n_prompts:
                    continue
                _bifurcation_marker(ax, i, proj[i, j, 0], proj[i, j, 1], size=8, edge_width=1.2)
                bif_count += 1

        ax.margins(x=0.06, y=0.05)
        ax.set_xlabel(_variance_label("PC", result.explained_variance_ratio, 0))
        ax.set_ylabel(_variance_label("PC", result.explained_variance_ratio, 1))
        n_layers = final - 1
        ax.set_title(_title(meta, f"last-token trajectories through {n_layers} layers"), loc="left")
        cat_legend = _category_legend(ax, meta, styles)
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
            keys.append(_bifurcation_key())
        key_legend = ax.legend(
            handles=keys, loc="lower left", bbox_to_anchor=(1.01, 0.0), borderaxespad=0.0, title="markers"
        )
        key_legend.set_gid("marker-legend")
        _place_end_labels(ax, end_labels)
        return fig


def draw_depth(result: Any, meta: FigureMeta, component: int = 0) -> Figure:
    """Layer on the x axis, one per-layer-centred component on the y axis: depth is explicit, not PC1's guess."""
    depth = np.asarray(result.depth_projection, dtype=float)
    if not 0 <= component < depth.shape[-1]:
        raise ValueError(f"component {component} not in the depth projection (it has {depth.shape[-1]})")
    n_prompts, n_layers = depth.shape[0], depth.shape[1]
    xs = np.arange(n_layers)
    styles = category_styles(meta.categories)
    names = display_labels(meta)
    lw = _line_width(n_prompts)
    with figure_style():
        fig = Figure(figsize=(11, 6.5))
        ax = fig.subplots()
        end_labels: list[_Label] = []
        for i in range(n_prompts):
            s = styles[meta.categories[i]]
            ys = depth[i, :, component]
            ax.plot(
                xs,
                ys,
                color=s.color,
                linestyle=s.linestyle,
                linewidth=lw,
                alpha=0.85,
                gid=f"trajectory-{i}",
                zorder=2,
            )
            end_labels.append(_end_marker(ax, i, float(xs[-1]), float(ys[-1]), s, names[i], size=7))
        bif_count = 0
        for i, b in _bifurcation_points(result):
            if 0 <= b < n_layers and i < n_prompts:
                _bifurcation_marker(ax, i, b, depth[i, b, component], size=7, edge_width=1.1)
                bif_count += 1
        ax.axhline(0.0, color="0.5", linewidth=0.8, zorder=1)
        ax.set_xlim(-0.3, n_layers - 1 + max(1.0, 0.06 * n_layers))
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel(
            _variance_label("depth PC", result.depth_explained_variance_ratio, component)
            + "\nof the RMS-normalised, per-layer-centred state"
        )
        ax.set_title(_title(meta, f"depth view: component {component + 1} layer by layer"), loc="left")
        ax.add_artist(_category_legend(ax, meta, styles))
        if bif_count:
            ax.legend(
                handles=[_bifurcation_key()],
                loc="lower left",
                bbox_to_anchor=(1.01, 0.0),
                borderaxespad=0.0,
            )
        _place_end_labels(ax, end_labels)
        return fig


@dataclass
class _Panel:
    key: str
    title: str
    ylabel: str
    values: np.ndarray  # [P, T]
    xs: np.ndarray  # [T]
    xlabel: str = "layer"
    robust_ylim: bool = False
    hline: float | None = None


def _per_category_band(ax: Axes, panel: _Panel, meta: FigureMeta, styles: dict[str, CategoryStyle]) -> None:
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
            if rows.shape[0] > 1:
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
    """Per-category mean (line) and ±1 s.d. (band) of each dynamic quantity by layer."""
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

    panels: list[_Panel] = []
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
            panels.append(_Panel(key, title, ylabel, values, x_for(values.shape[1], start)))
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
                _Panel(key, title, ylabel, values, xs, robust_ylim=robust, hline=0.0 if robust else None)
            )
    wasserstein = getattr(result, "wasserstein", None)
    if wasserstein is not None:
        values = np.asarray(wasserstein, dtype=float)
        panels.append(
            _Panel(
                "wasserstein",
                "Wasserstein distance of the token cloud per step",
                "W(layer l−1, l)",
                values,
                x_for(values.shape[1], 1),
            )
        )
    token_cosine = getattr(result, "token_cosine", None)
    if token_cosine is not None:
        values = np.asarray(token_cosine, dtype=float)
        panels.append(
            _Panel(
                "token_cosine",
                "mean cosine among the prompt's tokens",
                "cosine",
                values,
                x_for(values.shape[1], 0),
            )
        )
    axis = getattr(result, "axis", None)
    axis_score = getattr(result, "axis_score", None)
    if axis is not None and axis_score is not None:
        values = np.asarray(axis_score, dtype=float)
        panels.append(
            _Panel(
                "axis_score",
                mpl_text(f"axis score: {axis[0]} → {axis[1]}"),
                "score",
                values,
                x_for(values.shape[1], 0),
                hline=0.0,
            )
        )
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

    styles = category_styles(meta.categories)
    n = len(panels) + len(scalars)
    with figure_style():
        if n == 0:
            fig = Figure(figsize=(6, 2))
            ax = fig.subplots()
            ax.axis("off")
            ax.text(0.5, 0.5, "no dynamics were computed for this run", ha="center", va="center")
            return fig
        ncols = 3 if n > 4 else min(n, 2)
        nrows = -(-n // ncols)
        fig = Figure(figsize=(5.2 * ncols, 3.7 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        flat = list(axes.ravel())
        for ax, panel in zip(flat, panels):
            _per_category_band(ax, panel, meta, styles)
        for ax, (key, title) in zip(flat[len(panels) :], scalars):
            _per_category_strip(ax, title, arr(dyn, key), meta, styles)  # type: ignore[arg-type]
        for ax in flat[n:]:
            ax.axis("off")
        handles = [
            Line2D([], [], color=s.color, linestyle=s.linestyle, linewidth=2, label=mpl_text(c))
            for c, s in styles.items()
        ]
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
        fig.suptitle(_title(meta, "layer-by-layer dynamics of the last-token state"), x=0.01, ha="left")
        return fig


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
            _title(meta, f"category separation by layer ({len(category_order(meta.categories))} categories)"),
            x=0.01,
            ha="left",
        )
        return fig


def lens_cell_text(token: str, limit: int = 8) -> str:
    """A token as it should appear in a small cell: whitespace made visible, long tokens cut."""
    shown = str(token).replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    shown = shown.replace(" ", "␣")
    if len(shown) > limit:
        shown = shown[: limit - 1] + "…"
    return shown


def draw_logit_lens(meta: FigureMeta) -> Figure | None:
    """Prompt × layer grid: each cell shows the logit lens' top-1 token, its colour the token's probability."""
    if meta.lens_tokens is None:
        return None
    tokens = meta.lens_tokens
    n_prompts = len(tokens)
    n_layers = max((len(row) for row in tokens), default=0)
    if n_prompts == 0 or n_layers == 0:
        return None
    probs = np.full((n_prompts, n_layers), np.nan)
    if meta.lens_probs is not None:
        given = np.asarray(meta.lens_probs, dtype=float)
        probs[:, : given.shape[1]] = given[:, :n_layers]
    styles = category_styles(meta.categories)
    names = display_labels(meta)
    cmap = matplotlib.colormaps["viridis"]
    # Narrower text for wide grids keeps each token inside its cell.
    cell_font, cell_chars = (7.0, 7) if n_layers > 24 else (8.0, 8)
    with figure_style():
        fig = Figure(figsize=(2.8 + 0.62 * n_layers, 1.6 + 0.3 * n_prompts))
        ax = fig.subplots()
        image = ax.imshow(
            np.ma.masked_invalid(probs), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest"
        )
        for i, row in enumerate(tokens):
            for j, token in enumerate(row):
                p = probs[i, j]
                # Light text on viridis' dark (low) end, dark text on its bright end.
                color = "white" if not np.isfinite(p) or p < 0.55 else "black"
                ax.text(
                    j,
                    i,
                    mpl_text(lens_cell_text(token, cell_chars)),
                    ha="center",
                    va="center",
                    fontsize=cell_font,
                    color=color,
                    gid=f"cell-{i}-{j}",
                )
        ax.set_xticks(range(n_layers))
        ax.set_xticklabels([str(j) for j in range(n_layers)], fontsize=8)
        ax.set_yticks(range(n_prompts))
        ax.set_yticklabels(
            [mpl_text(f"{names[i]} · {meta.categories[i]}") for i in range(n_prompts)], fontsize=8
        )
        for tick, cat in zip(ax.get_yticklabels(), meta.categories):
            tick.set_color(styles[cat].color)
        ax.grid(False)
        ax.set_xlabel("layer (0 = embeddings)")
        ax.xaxis.set_label_position("top")
        ax.xaxis.tick_top()
        ax.set_title(_title(meta, "logit lens: top-1 next token after each layer"), loc="left", pad=28)
        bar = fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
        bar.set_label("probability of the top token")
        return fig


# ------------------------------------------------------------------------------------ file-writing API


def plot_trajectories(
    result: Any,
    meta: FigureMeta,
    out_base: Path,
    show_bifurcations: bool = True,
    layer_ticks: bool = False,
) -> list[Path]:
    """Write `<out_base>.png` and `.svg` of the PC1/PC2 trajectories; see `draw_trajectories`."""
    return _write(lambda: draw_trajectories(result, meta, show_bifurcations, layer_ticks), out_base)


def plot_depth(result: Any, meta: FigureMeta, out_base: Path, component: int = 0) -> list[Path]:
    """Write the depth view (layer on x, a per-layer-centred component on y); see `draw_depth`."""
    return _write(lambda: draw_depth(result, meta, component), out_base)


def plot_dynamics(result: Any, meta: FigureMeta, out_base: Path) -> list[Path]:
    """Write the per-category dynamics panels; see `draw_dynamics`."""
    return _write(lambda: draw_dynamics(result, meta), out_base)


def plot_separation(result: Any, meta: FigureMeta, out_base: Path) -> list[Path]:
    """Write silhouette and kNN accuracy by layer; nothing (empty list) when separation was not computed."""
    return _write(lambda: draw_separation(result, meta), out_base)


def plot_logit_lens(meta: FigureMeta, out_base: Path) -> list[Path]:
    """Write the logit-lens heat map; nothing (empty list) when the lens was not computed."""
    return _write(lambda: draw_logit_lens(meta), out_base)


def _write(draw: Callable[[], Figure | None], out_base: Path) -> list[Path]:
    # The style must also be active while saving: svg.fonttype is read by the SVG writer.
    with figure_style():
        fig = draw()
        return [] if fig is None else save_figure(fig, out_base)
