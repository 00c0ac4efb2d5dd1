"""The "thought evolution" GIF: every prompt's trajectory growing one layer per frame.

Axes are fixed from the whole run so motion on screen is motion in the projection, not a rescaling.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from tokentrail.atomic import atomic_write_bytes
from tokentrail.viz import FigureMeta, category_styles, display_labels, final_layer_index
from tokentrail.viz.static.prompt_lines import category_legend, variance_label
from tokentrail.viz.static.style import figure_style, mpl_text

__all__ = ["MAX_FPS", "frame_duration_ms", "trajectory_gif"]

# GIF delays are whole centiseconds and browsers slow anything under 20 ms down to 100 ms.
MAX_FPS = 50.0
_SIZE_IN = (9.0, 7.0)
_DPI = 100


def frame_duration_ms(fps: float) -> int:
    if not 0 < fps <= MAX_FPS:
        raise ValueError(f"fps must be in (0, {MAX_FPS:g}], got {fps}")
    # GIF stores delays in 10 ms units; rounding here makes the written delay the one we report.
    return round(100.0 / fps) * 10


def _limits(values: np.ndarray, pad: float = 0.06) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return -1.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    span = hi - lo or 1.0
    return lo - pad * span, hi + pad * span


def _render_frames(result: Any, meta: FigureMeta) -> list[np.ndarray]:
    proj = np.asarray(result.projection, dtype=float)[:, :, :2]
    layers = np.asarray(result.layers).astype(int)
    n_prompts, n_points = proj.shape[0], proj.shape[1]
    final = final_layer_index(result)
    styles = category_styles(meta.categories)
    names = display_labels(meta)
    ratio = np.asarray(result.explained_variance_ratio, dtype=float).ravel()

    frames: list[np.ndarray] = []
    with figure_style():
        fig = Figure(figsize=_SIZE_IN, dpi=_DPI)
        canvas = FigureCanvasAgg(fig)
        # Fixed margins (not tight/constrained layout), so every frame has the same pixel size and placement.
        ax = fig.add_axes((0.09, 0.08, 0.66, 0.84))
        x_lo, x_hi = _limits(proj[:, :, 0])
        y_lo, y_hi = _limits(proj[:, :, 1])
        ax.set_xlim(x_lo, x_hi + 0.04 * (x_hi - x_lo))  # room for the end labels
        ax.set_ylim(y_lo, y_hi)
        ax.set_xlabel(variance_label("PC", ratio, 0))
        ax.set_ylabel(variance_label("PC", ratio, 1))
        title = f"{meta.model_name}: thought evolution" if meta.model_name else "thought evolution"
        ax.set_title(mpl_text(title), loc="left")

        lines, heads, labels = [], [], []
        for i in range(n_prompts):
            s = styles[meta.categories[i]]
            lines.append(ax.plot([], [], color=s.color, linestyle=s.linestyle, linewidth=1.6, alpha=0.85)[0])
            heads.append(
                ax.plot(
                    [],
                    [],
                    marker=s.marker,
                    color=s.color,
                    markeredgecolor="white",
                    markersize=7,
                    linestyle="none",
                )[0]
            )
            labels.append(
                ax.text(
                    np.nan,
                    np.nan,
                    mpl_text(names[i]),
                    color=s.color,
                    fontsize=8,
                    fontweight="bold",
                    ha="left",
                    va="center",
                )
            )
        finals = [
            ax.plot([], [], color=styles[c].color, linestyle=":", linewidth=1.2)[0] for c in meta.categories
        ]
        category_legend(ax, meta, styles, bbox_to_anchor=(1.02, 1.0))
        counter = fig.text(
            0.77, 0.10, "", fontsize=15, fontweight="bold", ha="left", va="bottom", family="monospace"
        )
        has_final = bool(n_points > 1 and layers[-1] == final)
        n_raw = n_points - 1 if has_final else n_points
        offset = 0.012 * (x_hi - x_lo)

        for frame in range(n_points):
            upto = min(frame + 1, n_raw)
            for i in range(n_prompts):
                lines[i].set_data(proj[i, :upto, 0], proj[i, :upto, 1])
                if has_final and frame == n_points - 1:
                    finals[i].set_data(proj[i, n_raw - 1 :, 0], proj[i, n_raw - 1 :, 1])
                hx, hy = proj[i, frame, 0], proj[i, frame, 1]
                heads[i].set_data([hx], [hy])
                labels[i].set_position((hx + offset, hy))
            layer = int(layers[frame])
            name = "final norm" if layer == final else f"layer {layer:>{len(str(final - 1))}d}"
            counter.set_text(f"{name}\n{frame + 1:>{len(str(n_points))}d}/{n_points}")
            canvas.draw()
            frames.append(np.asarray(canvas.buffer_rgba())[:, :, :3].copy())
    return frames


def trajectory_gif(result: Any, meta: FigureMeta, path: Path, fps: float = 4) -> Path:
    """Write an animated GIF with one frame per traced layer, each shown for 1/fps seconds, looping."""
    duration = frame_duration_ms(fps)
    frames = _render_frames(result, meta)
    if not frames:
        raise ValueError("the projection has no layers to animate")
    # One palette for all frames (taken from the fullest, last frame) avoids colours flickering between frames.
    reference = Image.fromarray(frames[-1]).quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    images = [Image.fromarray(f).quantize(palette=reference, dither=Image.Dither.NONE) for f in frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=duration,
        loop=0,
        optimize=False,
        disposal=1,
    )
    atomic_write_bytes(path, buffer.getvalue())  # never half a GIF where the last good one was
    return path
