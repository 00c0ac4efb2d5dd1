"""The steering experiment's heat map: accuracy gain over the unsteered baseline per layer and alpha.

Two panels share one colour scale: the steering direction and the random direction of the same norm. A gain
only means something when the left panel differs from the right one; both against the same baseline.
Drawn on a bare `Figure` (Agg), never through pyplot, so it neither opens windows nor touches global state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from tokentrail.viz.static.style import write_figure

__all__ = ["draw_gain_heatmap", "plot_gain_heatmap"]

PNG_DPI = 150
_RC = {"svg.fonttype": "none", "svg.hashsalt": "tokentrail", "font.size": 10, "axes.titlesize": 11}
PANELS = (("steer", "steering direction"), ("random", "random directions (mean gain of the draws)"))


def _grid(rows: Sequence[dict[str, Any]], condition: str, layers: list[int], alphas: list[float]) -> tuple:
    gain = np.full((len(layers), len(alphas)), np.nan)
    p = np.full_like(gain, np.nan)
    for row in rows:
        if row["condition"] == condition:
            i, j = layers.index(row["layer"]), alphas.index(row["alpha"])
            gain[i, j] = row["gain"]
            # The Holm-adjusted p across the grid where the experiment computed it, else the raw McNemar p.
            holm = row.get("p_holm")
            p[i, j] = holm if isinstance(holm, (int, float)) and np.isfinite(holm) else row.get("p_vs_baseline", np.nan)
    return gain, p


def draw_gain_heatmap(rows: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """Layer (rows) x alpha (columns), colour = accuracy gain in percentage points; * marks McNemar p < 0.05."""
    swept = [r for r in rows if r["condition"] in ("steer", "random")]
    if not swept:
        raise ValueError("no steered conditions to draw")
    layers = sorted({int(r["layer"]) for r in swept})
    alphas = sorted({float(r["alpha"]) for r in swept})
    baseline = next((r for r in rows if r["condition"] == "baseline"), None)
    ceiling = next((r for r in rows if r["condition"] == "pure-math"), None)
    # A random panel only where random directions were run on these problems (with --confirm they are drawn on
    # the held-out problems instead).
    panels = [(name, label) for name, label in PANELS if any(r["condition"] == name for r in swept)]
    grids = {name: _grid(swept, name, layers, alphas) for name, _ in panels}
    corrected = any(isinstance(r.get("p_holm"), (int, float)) and np.isfinite(r["p_holm"]) for r in swept)
    # One symmetric scale for both panels, at least +-5 points, so small noise does not look saturated.
    limit = max(5.0, float(np.nanmax(np.abs(np.concatenate([g[0].ravel() for g in grids.values()])))) * 100)
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(max(7.5, 3.2 + 1.4 * len(alphas) * len(panels)), 1.9 + 0.55 * len(layers)),
                     layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True, squeeze=False)[0])
        image = None
        for ax, (name, label) in zip(axes, panels):
            gain, p = grids[name]
            image = ax.imshow(gain * 100, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
            for i in range(len(layers)):
                for j in range(len(alphas)):
                    if np.isnan(gain[i, j]):
                        continue
                    star = "*" if p[i, j] < 0.05 else ""
                    colour = "white" if abs(gain[i, j] * 100) > 0.6 * limit else "black"
                    ax.text(j, i, f"{gain[i, j] * 100:+.1f}{star}", ha="center", va="center", color=colour)
            ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
            ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
            ax.set_xlabel("alpha (x median residual norm)")
            ax.set_title(label)
            ax.grid(False)
        axes[0].set_ylabel("steered layer")
        colorbar = fig.colorbar(image, ax=list(axes), shrink=0.9)
        colorbar.set_label("accuracy gain (points)")
        heading = title.replace("$", r"\$")
        if baseline is not None:
            heading += f"\nbaseline {100 * baseline['accuracy']:.1f}% of {baseline['n']} problems"
            if ceiling is not None:
                heading += f", pure-math rendering {100 * ceiling['accuracy']:.1f}%"
            heading += ("\n* McNemar p < 0.05 against baseline, Holm-adjusted over the grid" if corrected
                        else "\n* McNemar p < 0.05 against baseline, uncorrected")
        fig.suptitle(heading.strip())
    return fig


def plot_gain_heatmap(rows: Sequence[dict[str, Any]], out_base: Path, title: str = "") -> list[Path]:
    """Write `<out_base>.png` and `<out_base>.svg`; returns both paths."""
    out_base = Path(out_base)
    out_base.parent.mkdir(parents=True, exist_ok=True)
    fig = draw_gain_heatmap(rows, title)
    png = out_base.parent / f"{out_base.name}.png"
    svg = out_base.parent / f"{out_base.name}.svg"
    with matplotlib.rc_context(_RC):
        write_figure(fig, png, dpi=PNG_DPI, metadata={"Software": "tokentrail"})
        write_figure(fig, svg, metadata={"Date": None, "Creator": "tokentrail"})
    return [png, svg]
