"""The logit-lens figure: a prompt × layer grid of each layer's top-1 next token, coloured by its probability."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from tokentrail.viz import FigureMeta, category_styles, display_labels
from tokentrail.viz.static.style import figure_style, figure_title, mpl_text, save_drawn

__all__ = ["draw_logit_lens", "lens_cell_text", "plot_logit_lens"]


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
        ax.set_title(figure_title(meta, "logit lens: top-1 next token after each layer"), loc="left", pad=28)
        bar = fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
        bar.set_label("probability of the top token")
        return fig


def plot_logit_lens(meta: FigureMeta, out_base: Path) -> list[Path]:
    """Write the logit-lens heat map; nothing (empty list) when the lens was not computed."""
    return save_drawn(lambda: draw_logit_lens(meta), out_base)
