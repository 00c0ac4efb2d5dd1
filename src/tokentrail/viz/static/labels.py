"""Labels at the ends of many lines, spread so that none overlap, tied to their line ends by leader lines."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes

from tokentrail.viz.static.style import mpl_text

__all__ = ["EndLabel", "place_end_labels"]

# A faint white box keeps labels legible where they sit on other prompts' lines. (A stroke path effect would
# look nicer but makes the SVG outline the text, losing it as text.)
_HALO = {"boxstyle": "round,pad=0.08", "facecolor": "white", "edgecolor": "none", "alpha": 0.7}


@dataclass
class EndLabel:
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


def place_end_labels(ax: Axes, labels: Sequence[EndLabel], fontsize: float = 9.0) -> None:
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
