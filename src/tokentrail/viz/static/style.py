"""What every static figure shares: the matplotlib style, literal text, titles and the PNG + SVG writer.

Text is kept as text in the SVG (not outlined) so the figures stay searchable and small; matplotlib XML-escapes
it. Figures are saved atomically, and reruns give the same bytes.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from tokentrail.atomic import atomic_write_bytes
from tokentrail.viz import FigureMeta

__all__ = ["PNG_DPI", "figure_style", "figure_title", "mpl_text", "save_drawn", "save_figure", "write_figure"]

PNG_DPI = 150
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


def save_drawn(draw: Callable[[], Figure | None], out_base: Path) -> list[Path]:
    """Draw a figure and write `<out_base>.png` and `.svg`; nothing (empty list) when `draw` has nothing."""
    # The style must also be active while saving: svg.fonttype is read by the SVG writer.
    with figure_style():
        fig = draw()
        return [] if fig is None else save_figure(fig, out_base)


def figure_title(meta: FigureMeta, what: str) -> str:
    """A run figure's title: the model's name first, when the run has one."""
    return mpl_text(f"{meta.model_name}: {what}" if meta.model_name else what)
