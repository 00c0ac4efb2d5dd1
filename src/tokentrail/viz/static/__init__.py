"""Static figures (PNG + SVG) drawn with matplotlib's Agg backend.

`plot_*` functions write files; the matching `draw_*` functions return the `Figure` itself (tests and
notebooks inspect it).

Figures are built as bare `Figure` objects, never through pyplot, so drawing neither opens a window nor
touches pyplot's global state (safe in threads and in a user's notebook).

Each public function writes `<out_base>.png` and `<out_base>.svg` and returns those paths. Text is kept as
text in the SVG (not outlined) so the figures stay searchable and small; matplotlib XML-escapes it.

One figure per module: `trajectories` (PC1/PC2 plane), `depth` (layer on x), `dynamics`, `separation`,
`intervals` (category readings with bootstrap intervals) and `logit_lens`. Below them, `prompt_lines` holds
what the two one-line-per-prompt figures share, `labels` the non-overlapping end labels, and `style` what every
figure shares (rc style, literal text, the PNG + SVG writer; the compare, steering and animation figures use it
too). Every public name is re-exported here.
"""

from __future__ import annotations

from tokentrail.viz.static.depth import draw_depth, plot_depth
from tokentrail.viz.static.dynamics import draw_dynamics, plot_dynamics
from tokentrail.viz.static.intervals import draw_intervals, plot_intervals
from tokentrail.viz.static.logit_lens import draw_logit_lens, lens_cell_text, plot_logit_lens
from tokentrail.viz.static.separation import OKABE_BLUE, OKABE_VERMILLION, draw_separation, plot_separation
from tokentrail.viz.static.style import PNG_DPI, figure_style, mpl_text, save_figure, write_figure
from tokentrail.viz.static.trajectories import draw_trajectories, plot_trajectories

__all__ = [
    "OKABE_BLUE",
    "OKABE_VERMILLION",
    "PNG_DPI",
    "draw_depth",
    "draw_dynamics",
    "draw_intervals",
    "draw_logit_lens",
    "draw_separation",
    "draw_trajectories",
    "figure_style",
    "lens_cell_text",
    "mpl_text",
    "plot_depth",
    "plot_dynamics",
    "plot_intervals",
    "plot_logit_lens",
    "plot_separation",
    "plot_trajectories",
    "save_figure",
    "write_figure",
]
