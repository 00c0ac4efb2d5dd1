"""Figures for a tokentrail run: static (matplotlib), interactive (plotly), animated (GIF) and the HTML report.

Everything here only *reads* an analysis result; no projection or statistic is computed in the drawing code,
so a figure always shows exactly the numbers that `analyze` reported.

The drawing modules import matplotlib/plotly lazily (inside `make_all_figures`) so that importing
`tokentrail.viz` for `FigureMeta` stays cheap for the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the analysis module is written in parallel; only its shape matters here
    from tokentrail.analysis.pipeline import AnalysisResult  # noqa: F401

__all__ = [
    "CategoryStyle",
    "FigureMeta",
    "category_order",
    "category_styles",
    "display_labels",
    "final_layer_index",
    "layer_name",
    "make_all_figures",
]

# Okabe & Ito's colour-blind-safe palette, reordered so that the colours that read worst as thin lines on
# white (yellow, then black which hides the grid) come last.
OKABE_ITO: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#000000",  # black
    "#B8A200",  # Okabe-Ito yellow (#F0E442) darkened: the original vanishes on white
)
# Beyond eight categories colour alone repeats, so the line style and marker change with each cycle.
_DASHES_MPL: tuple[Any, ...] = ("-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)))
_DASHES_PLOTLY: tuple[str, ...] = ("solid", "dash", "dot", "dashdot")
_MARKERS_MPL: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*")
_MARKERS_PLOTLY: tuple[str, ...] = (
    "circle",
    "square",
    "triangle-up",
    "diamond",
    "triangle-down",
    "cross",
    "x",
    "star",
)
# Scatter3d knows only a few symbols.
_MARKERS_PLOTLY_3D: tuple[str, ...] = (
    "circle",
    "square",
    "diamond",
    "cross",
    "x",
    "circle-open",
    "square-open",
    "diamond-open",
)


@dataclass
class FigureMeta:
    """Per-prompt metadata the figures need beside the analysis arrays (one entry per prompt, same order)."""

    prompt_ids: list[str]
    prompts: list[str]  # untrusted text: every renderer escapes it
    categories: list[str]
    labels: list[str]
    model_name: str
    lens_tokens: list[list[str]] | None = None  # [P][L+1] top-1 logit-lens token per layer
    lens_probs: np.ndarray | None = None  # [P, L+1]

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        for name in ("prompts", "categories", "labels"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"FigureMeta.{name} has {len(getattr(self, name))} entries, expected {n}")
        if self.lens_tokens is not None and len(self.lens_tokens) != n:
            raise ValueError(f"FigureMeta.lens_tokens has {len(self.lens_tokens)} rows, expected {n}")
        if self.lens_probs is not None:
            self.lens_probs = np.asarray(self.lens_probs, dtype=float)
            if self.lens_probs.shape[0] != n:
                raise ValueError(f"FigureMeta.lens_probs has {self.lens_probs.shape[0]} rows, expected {n}")

    @property
    def n_prompts(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class CategoryStyle:
    color: str
    linestyle: Any  # matplotlib linestyle
    dash: str  # plotly dash name
    marker: str  # matplotlib marker
    symbol: str  # plotly 2-D symbol
    symbol_3d: str  # plotly 3-D symbol


def category_order(categories: Sequence[str]) -> list[str]:
    """Categories in order of first appearance, which is the order the prompt file listed them."""
    return list(dict.fromkeys(categories))


def category_styles(categories: Sequence[str]) -> dict[str, CategoryStyle]:
    styles: dict[str, CategoryStyle] = {}
    for i, cat in enumerate(category_order(categories)):
        cycle = i // len(OKABE_ITO)
        styles[cat] = CategoryStyle(
            color=OKABE_ITO[i % len(OKABE_ITO)],
            linestyle=_DASHES_MPL[cycle % len(_DASHES_MPL)],
            dash=_DASHES_PLOTLY[cycle % len(_DASHES_PLOTLY)],
            marker=_MARKERS_MPL[i % len(_MARKERS_MPL)],
            symbol=_MARKERS_PLOTLY[i % len(_MARKERS_PLOTLY)],
            symbol_3d=_MARKERS_PLOTLY_3D[i % len(_MARKERS_PLOTLY_3D)],
        )
    return styles


def display_labels(meta: FigureMeta) -> list[str]:
    """The text drawn at each line's end: the prompt's own label, else its 1-based number.

    A number (rather than nothing) keeps every line identifiable; the report's prompt table maps numbers
    back to prompts, which are never drawn into static figures because they are long and untrusted.
    """
    return [lab if lab else str(i + 1) for i, lab in enumerate(meta.labels)]


def final_layer_index(result: Any) -> int:
    """Index used for the final-normed state (L+1), derived from the depth projection's L+1 raw layers."""
    return int(np.asarray(result.depth_projection).shape[1])


def layer_name(result: Any, layer: int) -> str:
    layer = int(layer)
    if layer == final_layer_index(result):
        return "final norm"
    if layer == 0:
        return "0 (embeddings)"
    return str(layer)


def make_all_figures(result: Any, meta: FigureMeta, out_dir: Path, fps: float = 4) -> dict[str, list[Path]]:
    """Write every figure of a run into `out_dir/figures/` and return them by name (for the report)."""
    from tokentrail.viz import animate, interactive, static

    fig_dir = Path(out_dir) / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[Path]] = {
        "trajectories": static.plot_trajectories(result, meta, fig_dir / "trajectories"),
        "depth": static.plot_depth(result, meta, fig_dir / "depth"),
        "dynamics": static.plot_dynamics(result, meta, fig_dir / "dynamics"),
        "separation": static.plot_separation(result, meta, fig_dir / "separation"),
        "intervals": static.plot_intervals(result, meta, fig_dir / "intervals"),
        "logit_lens": static.plot_logit_lens(meta, fig_dir / "logit_lens"),
        "trajectories_2d": [
            interactive.trajectories_html(result, meta, fig_dir / "trajectories_2d.html", dims=2)
        ],
    }
    if np.asarray(result.projection).shape[-1] >= 3:
        figures["trajectories_3d"] = [
            interactive.trajectories_html(result, meta, fig_dir / "trajectories_3d.html", dims=3)
        ]
    figures["thought_evolution"] = [
        animate.trajectory_gif(result, meta, fig_dir / "thought_evolution.gif", fps=fps)
    ]
    return {name: paths for name, paths in figures.items() if paths}
