"""Figures of a model comparison (`tokentrail.compare`): separation against normalised depth, CKA heat maps,
the natural-vs-formal ordering as bars and the middle category's position against depth.

The functions only draw numbers computed in `tokentrail.compare`; each writes `<out_base>.png` and `.svg` and
returns the paths (an empty list when there is nothing to draw). Bare `Figure` objects on the Agg canvas, never
pyplot, so drawing opens no window and leaves global state alone. Models get the Okabe-Ito colours in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tokentrail.viz import OKABE_ITO
from tokentrail.viz.static.style import figure_style, mpl_text, save_figure

__all__ = [
    "draw_cka",
    "draw_ordering",
    "draw_ordering_depth",
    "draw_separation_depth",
    "plot_cka",
    "plot_ordering",
    "plot_ordering_depth",
    "plot_separation_depth",
]

PNG_DPI = 130  # the docs keep each PNG under 300 KB


def _colour(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


def _save(fig: Figure | None, out_base: Path) -> list[Path]:
    if fig is None:
        return []
    with figure_style():  # its svg.hashsalt makes the SVG's ids the same on every run
        return save_figure(fig, out_base, dpi=PNG_DPI)


def draw_separation_depth(curves: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Silhouette and kNN accuracy against layer / L, one line per model.

    Each curve: `label`, `depth`, `silhouette`, `knn_accuracy`, `p_value` (arrays over layers) and `chance`.
    Filled markers are significant (p < 0.05), open ones are not.
    """
    if not curves:
        return None
    with figure_style():
        fig = Figure(figsize=(12, 4.4), layout="constrained")
        ax_s, ax_k = fig.subplots(1, 2, sharex=True)
        for i, curve in enumerate(curves):
            colour = _colour(i)
            depth = np.asarray(curve["depth"], dtype=float)
            significant = np.asarray(curve["p_value"], dtype=float) < 0.05
            for ax, key in ((ax_s, "silhouette"), (ax_k, "knn_accuracy")):
                values = np.asarray(curve[key], dtype=float)
                ax.plot(depth, values, color=colour, linewidth=2, label=mpl_text(curve["label"]))
                ax.plot(depth[significant], values[significant], "o", color=colour, markersize=4)
                ax.plot(depth[~significant], values[~significant], "o", markerfacecolor="white",
                        markeredgecolor=colour, markersize=4)
        chances = sorted({round(float(c["chance"]), 6) for c in curves})
        for chance in chances:
            ax_k.axhline(chance, color="0.3", linestyle="--", linewidth=1.1, label=f"chance ({chance:.2f})")
        ax_s.axhline(0.0, color="0.5", linewidth=0.8)
        ax_s.set_title("silhouette of the categories (cosine)", loc="left")
        ax_s.set_ylabel("silhouette (−1 … 1)")
        ax_k.set_title("leave-one-out kNN accuracy", loc="left")
        ax_k.set_ylabel("accuracy")
        ax_k.set_ylim(-0.02, 1.02)
        for ax in (ax_s, ax_k):
            ax.set_xlabel("normalised depth (layer / L; 0 = embeddings)")
            ax.set_xlim(-0.02, 1.02)
            ax.legend(loc="best")
        fig.suptitle("category separation by normalised depth (filled: permutation p < 0.05)", x=0.01, ha="left")
        return fig


def plot_separation_depth(curves: Sequence[Mapping[str, Any]], out_base: Path) -> list[Path]:
    return _save(draw_separation_depth(curves), out_base)


# --------------------------------------------------------------------------------------------- CKA


def draw_cka(pair: Mapping[str, Any], label_a: str, label_b: str, n_layers_a: int, n_layers_b: int) -> Figure:
    """Two heat maps (linear CKA, debiased CKA), rows = layers of A, columns = layers of B.

    Dots mark B's best-matching layer for each layer of A; the dashed line is equal normalised depth.
    """
    cka = np.asarray(pair["cka"], dtype=float)
    debiased = np.asarray(pair["debiased"], dtype=float)
    best = np.nanargmax(np.where(np.isnan(cka), -np.inf, cka), axis=1)
    summary = pair.get("summary", {})
    null_mean = summary.get("null mean (all cells)")
    null_p95 = summary.get("null 95% (median cell)")
    rows = np.arange(cka.shape[0])
    width = 4.2 + 0.26 * cka.shape[1] * 2
    height = 2.2 + 0.22 * cka.shape[0]
    with figure_style():
        fig = Figure(figsize=(min(width, 16), min(height, 11)), layout="constrained")
        axes = fig.subplots(1, 2, sharey=True)
        limit = max(float(np.nanmax(np.abs(debiased))) if np.isfinite(debiased).any() else 1.0, 0.05)
        panels = (
            (axes[0], cka, "viridis", 0.0, 1.0, "linear CKA"),
            (axes[1], debiased, "RdBu_r", -limit, limit, "debiased linear CKA"),
        )
        for ax, values, cmap, lo, hi, title in panels:
            image = ax.imshow(values, origin="lower", aspect="auto", cmap=cmap, vmin=lo, vmax=hi,
                              interpolation="nearest")
            ax.plot(best, rows, "o", color="white", markeredgecolor="black", markersize=4,
                    label=f"best {mpl_text(label_b)} layer")
            ax.plot([0, n_layers_b], [0, n_layers_a], "--", color="0.85" if cmap == "viridis" else "0.3",
                    linewidth=1.2, label="equal depth")
            ax.set_xlabel(f"layer of {mpl_text(label_b)} (L = {n_layers_b})")
            ax.set_title(title, loc="left")
            ax.grid(False)
            fig.colorbar(image, ax=ax, shrink=0.85)
        axes[0].set_ylabel(f"layer of {mpl_text(label_a)} (L = {n_layers_a})")
        axes[0].legend(loc="upper left", fontsize=8)
        note = ""
        if null_mean is not None and null_p95 is not None:
            note = f"; prompts shuffled: mean {null_mean:.2f}, 95th pct {null_p95:.2f}"
        fig.suptitle(mpl_text(f"{label_a} vs {label_b}: similarity of last-token states{note}"), x=0.01,
                     ha="left")
        return fig


def plot_cka(pair: Mapping[str, Any], label_a: str, label_b: str, n_layers_a: int, n_layers_b: int,
             out_base: Path) -> list[Path]:
    return _save(draw_cka(pair, label_a, label_b, n_layers_a, n_layers_b), out_base)


# --------------------------------------------------------------------------------------------- ordering


def _axis_categories(rows: Sequence[Mapping[str, Any]], axis: Mapping[str, Any]) -> list[str]:
    """Categories of one axis, natural end first, the middle next, the formal end last, the rest by mean."""
    names = list(dict.fromkeys(r["category"] for r in rows))
    ends = [axis["natural"], *([axis["middle"]] if axis.get("middle") else []), axis["formal"]]
    others = [n for n in names if n not in ends]
    mean_of = {n: np.nanmean([r["mean"] for r in rows if r["category"] == n]) for n in others}
    others.sort(key=lambda n: mean_of[n])
    return [ends[0], *([ends[1]] if len(ends) == 3 else []), *others, ends[-1]]


def draw_ordering(means: Sequence[Mapping[str, Any]], plan: Sequence[Mapping[str, Any]],
                  at: str = "last layer") -> Figure | None:
    """Mean axis score per category and model (bars, ±1 sd), one panel per natural-vs-formal axis."""
    if not plan or not means:
        return None
    models = list(dict.fromkeys(r["model"] for r in means))
    with figure_style():
        fig = Figure(figsize=(12, 3.6 * len(plan) + 0.6), layout="constrained")
        axes = np.atleast_1d(fig.subplots(len(plan), 1, squeeze=False)[:, 0])
        for ax, axis in zip(axes, plan):
            name = f"{axis['natural']} → {axis['formal']}"
            rows = [r for r in means if r["axis"] == name and r["at"] == at]
            if not rows:
                continue
            categories = _axis_categories(rows, axis)
            width = 0.8 / len(models)
            for m, model in enumerate(models):
                lookup = {r["category"]: r for r in rows if r["model"] == model}
                xs = np.arange(len(categories)) + (m - (len(models) - 1) / 2) * width
                values = [lookup[c]["mean"] if c in lookup else np.nan for c in categories]
                errors = [lookup[c]["sd"] if c in lookup and lookup[c]["sd"] is not None else 0 for c in categories]
                layer = next(iter(lookup.values()))["layer"] if lookup else "?"
                ax.bar(xs, values, width=width * 0.95, color=_colour(m), yerr=errors, capsize=2,
                       error_kw={"elinewidth": 0.8, "ecolor": "0.3"},
                       label=mpl_text(f"{model} (layer {layer})"))
            for level, style in ((0.0, "-"), (0.5, ":"), (1.0, "-")):
                ax.axhline(level, color="0.4", linestyle=style, linewidth=0.9)
            ax.set_xticks(np.arange(len(categories)))
            ax.set_xticklabels([mpl_text(c) for c in categories], rotation=15, ha="right")
            middle = f"; expected between: {axis['middle']}" if axis.get("middle") else ""
            ax.set_title(mpl_text(f"axis {name} (0 = {axis['natural']}, 1 = {axis['formal']}{middle})"),
                         loc="left")
            ax.set_ylabel("mean axis score (±1 sd)")
            ax.legend(loc="best", fontsize=8)
        fig.suptitle(f"where the categories sit between natural and formal language, {at}", x=0.01, ha="left")
        return fig


def plot_ordering(means: Sequence[Mapping[str, Any]], plan: Sequence[Mapping[str, Any]], out_base: Path,
                  at: str = "last layer") -> list[Path]:
    return _save(draw_ordering(means, plan, at), out_base)


def draw_ordering_depth(curves: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Figure | None:
    """The middle category's mean axis score against normalised depth, one panel per axis, one line per model.

    `curves[axis][model]` holds `depth`, `middle` (arrays) and `middle_name`. The band between 0 and 1 is
    "between the ends", the dotted line at 0.5 the midpoint the seed's claim is about.
    """
    if not curves:
        return None
    with figure_style():
        fig = Figure(figsize=(6.2 * len(curves), 4.2), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(curves), squeeze=False)[0])
        for ax, (axis_name, by_model) in zip(axes, curves.items()):
            middle_name = ""
            for m, (model, curve) in enumerate(by_model.items()):
                middle_name = curve["middle_name"]
                ax.plot(curve["depth"], curve["middle"], color=_colour(m), linewidth=2, marker="o", markersize=3,
                        label=mpl_text(model))
            ax.axhspan(0.0, 1.0, color="0.92", zorder=0)
            ax.axhline(0.5, color="0.4", linestyle=":", linewidth=1)
            ax.set_xlabel("normalised depth (layer / L)")
            ax.set_ylabel(mpl_text(f"mean score of {middle_name}"))
            ax.set_title(mpl_text(f"{middle_name} on {axis_name}"), loc="left")
            ax.set_xlim(-0.02, 1.02)
            ax.legend(loc="best", fontsize=8)
        fig.suptitle("the middle category between the natural (0) and formal (1) ends, by depth", x=0.01,
                     ha="left")
        return fig


def plot_ordering_depth(curves: Mapping[str, Mapping[str, Mapping[str, Any]]], out_base: Path) -> list[Path]:
    return _save(draw_ordering_depth(curves), out_base)
