"""The seed's natural-vs-formal ordering: which axes to score and which category should sit between the ends
(`ordering_plan`), the category means on each axis with their verdicts (`score_ordering`), and the verdicts as
plain sentences (`verdict_sentences`).

On the line from the natural category's centroid (0) to a formal category's centroid (1) (`axis_score`), the
ends are 0 and 1 by construction, so the tests are whether the middle category's mean lies strictly between
them, below 0.5, and below every formal category (the chain natural < middle < formal ends). Every category
mean has its 95 % bootstrap interval over the category's prompts (`analysis.category_intervals`), and the
sentences call the middle nearer one end only when its whole interval lies on that side of 0.5.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from tokentrail.analysis.category_intervals import CategoryIntervals, category_intervals
from tokentrail.analysis.intervals import DEFAULT_BOOTSTRAP
from tokentrail.analysis.pipeline import default_axis
from tokentrail.analysis.separation import axis_score, best_separation_layer
from tokentrail.compare.alignment import ModelRun
from tokentrail.errors import TokentrailError

__all__ = ["MIDPOINT_TIE", "ordering_plan", "score_ordering", "verdict_sentences"]

# With three prompts per category, a mean this close to 0.5 says "half way", not "nearer one end".
MIDPOINT_TIE = 0.05
# Words that name the formal ends and the "in between" category of the seed's spectrum (whole words of the
# category name, as in `analysis.pipeline.default_axis`).
_CODE_WORDS = ("code", "programming", "program")
_MATH_WORDS = ("math", "maths", "mathematics", "arithmetic")
_MIDDLE_WORDS = (("word", "problem"), ("word", "problems"))


def _words(name: str) -> set[str]:
    return set(re.split(r"[^a-z]+", name.lower())) - {""}


def ordering_plan(categories: Sequence[str], axes: Sequence[tuple[str, str]] | None = None,
                  middle: str | None = None) -> list[dict[str, Any]]:
    """Which (natural, formal) axes to score and which category should sit between the ends on each.

    Default: the natural end of `default_axis`; one axis to each code-like and each math-like category; the
    middle is a "word problem(s)" category, or (without one, as in seed-categories whose math prompts are word
    problems) the math category on the axis to code. An axis without a middle is still scored, not judged.
    """
    names = list(dict.fromkeys(categories))
    for name in [*(c for axis in (axes or []) for c in axis), *([middle] if middle else [])]:
        if name not in names:
            raise TokentrailError(f"category {name!r} is not among the categories ({', '.join(names)})")
    for natural, formal in axes or []:
        if natural == formal:
            raise TokentrailError(f"an axis needs two different categories, got {natural!r} twice")
    if axes is None:
        found = default_axis(names)
        if found is None:
            return []
        natural = found[0]

        def first_with(words: Sequence[str]) -> str | None:
            return next((n for n in names if _words(n) & set(words) and n != natural), None)

        code, math = first_with(_CODE_WORDS), first_with(_MATH_WORDS)
        axes = [(natural, formal) for formal in (code, math) if formal is not None]
    else:
        code = math = None
    word_problems = next((n for n in names if any(set(ws) <= _words(n) for ws in _MIDDLE_WORDS)), None)
    plan = []
    for natural, formal in axes:
        mid = middle or word_problems
        if mid is None and formal == code and math is not None:
            mid = math
        if mid in (natural, formal):
            mid = None
        plan.append({"natural": natural, "formal": formal, "middle": mid})
    return plan


def score_ordering(
    runs: Sequence[ModelRun], plan: Sequence[dict[str, Any]], warnings: list[str],
    n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Category means on each axis (at the last layer and the best-separation layer) with their 95 % intervals
    from `n_boot` resamples, verdicts, and the middle category's mean at every layer for the depth figure."""
    means_rows: list[dict[str, Any]] = []
    verdicts: list[dict[str, Any]] = []
    prompt_rows: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    for model in runs:
        categories = model.categories
        labels = np.asarray(categories, dtype=object)
        names = list(dict.fromkeys(categories))
        best = best_separation_layer(model.separation) if model.separation is not None else -1
        at_layers = [("last layer", model.n_layers)] + ([("best separation", best)] if best >= 0 else [])
        formal_ends = list(dict.fromkeys(axis["formal"] for axis in plan))
        for axis in plan:
            natural, formal, middle = axis["natural"], axis["formal"], axis["middle"]
            missing = [name for name in (natural, formal, middle) if name is not None and name not in names]
            if missing:
                # Only when runs name their categories differently: the plan comes from the first run.
                warnings.append(f"{model.label}: no category {', '.join(map(repr, missing))}; axis "
                                f"{natural} → {formal} skipped for it")
                continue
            scores = axis_score(model.states, categories, natural, formal)  # [P, L+1]
            means = {name: np.nanmean(scores[labels == name], axis=0) for name in names}  # each [L+1]
            found = category_intervals(scores, categories, n_boot=n_boot, seed=seed) if n_boot else None
            axis_name = f"{natural} → {formal}"
            if middle is not None:
                mid = means[middle]
                curves.setdefault(axis_name, {})[model.label] = {"depth": model.depth, "middle": mid,
                                                                 "middle_name": middle}
                ordered_layers = (mid > 0) & (mid < 1)
                nearer_layers = mid < 0.5
            for which, layer in at_layers:
                for name in names:
                    spread = scores[labels == name, layer]
                    low, high = _interval(found, name, layer) or (None, None)
                    means_rows.append({
                        "model": model.label, "axis": axis_name, "at": which, "layer": layer,
                        "depth": layer / model.n_layers, "category": name, "mean": _snap(means[name][layer]),
                        "sd": float(np.std(spread, ddof=1)) if spread.size > 1 else None, "n": int(spread.size),
                        "low": low, "high": high,
                    })
                if middle is None:
                    continue
                value = _snap(means[middle][layer])
                others = [f for f in formal_ends if f != middle and f in means]
                chain = bool(means[natural][layer] < value < min(means[f][layer] for f in others))
                members = [p for p in range(len(categories)) if categories[p] == middle]
                member_scores = [
                    f"{model.trace.labels[model.order[p]] or model.trace.prompt_ids[model.order[p]]}: "
                    f"{scores[p, layer]:.2f}"
                    for p in members
                ]
                verdicts.append({
                    "model": model.label, "axis": axis_name, "at": which, "layer": layer,
                    "depth": layer / model.n_layers, "middle": middle, "middle mean": value,
                    "middle 95% interval": _interval(found, middle, layer),
                    "ordered (0 < middle < 1)": bool(0 < value < 1),
                    "nearer natural (< 0.5)": bool(value < 0.5),
                    "chain": f"{natural} < {middle} < {' & '.join(others)}",
                    "chain holds": chain,
                    "formal means": ", ".join(f"{f}: {_snap(means[f][layer]):.2f}" for f in others),
                    "middle prompts < 0.5": f"{sum(scores[p, layer] < 0.5 for p in members)}/{len(members)}",
                    "middle prompts": ", ".join(member_scores),
                    "ordered at layers": f"{int(ordered_layers.sum())}/{model.n_layers + 1}",
                    "nearer natural at layers": f"{int(nearer_layers.sum())}/{model.n_layers + 1}",
                })
            for p in range(len(categories)):
                source = model.order[p]
                prompt_rows.append({
                    "model": model.label, "axis": axis_name, "prompt": model.trace.labels[source] or str(p + 1),
                    "id": model.trace.prompt_ids[source], "category": categories[p],
                    "score last layer": float(scores[p, -1]),
                    "score best separation": float(scores[p, best]) if best >= 0 else None,
                })
    return means_rows, verdicts, prompt_rows, curves


def _interval(found: CategoryIntervals | None, name: str, layer: int) -> list[float] | None:
    """A category's 95 % interval at `layer`; None for a category of one prompt (no resample can vary it) or
    without resamples."""
    if found is None or name not in found.names:
        return None
    index = found.names.index(name)
    return [float(found.low[index, layer]), float(found.high[index, layer])]


def _snap(value: float) -> float:
    """An axis end is 0 or 1 by construction; print it so, not as 1e-17."""
    value = float(value)
    for end in (0.0, 1.0):
        if abs(value - end) < 1e-9:
            return end
    return value


def verdict_sentences(verdicts: Sequence[dict[str, Any]]) -> list[str]:
    """One plain sentence per ordering verdict (for the report and the command line)."""
    sentences = []
    for v in verdicts:
        where = "between the ends" if v["ordered (0 < middle < 1)"] else "outside the ends"
        side = "nearer the natural end" if v["nearer natural (< 0.5)"] else "nearer the formal end"
        interval = v.get("middle 95% interval")
        if abs(v["middle mean"] - 0.5) < MIDPOINT_TIE:
            side = f"at the midpoint (within {MIDPOINT_TIE})"
        elif interval is not None and interval[0] <= 0.5 <= interval[1]:
            # The mean is on one side, but the prompts the set holds cannot tell which.
            side = "not told apart from the midpoint by its 95 % interval"
        if not v["ordered (0 < middle < 1)"]:
            side = "below the natural end" if v["middle mean"] <= 0 else "beyond the formal end"
        shown = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval is not None else ""
        sentences.append(
            f"{v['model']}, {v['axis']}, {v['at']} (layer {v['layer']}): {v['middle']} at {v['middle mean']:.2f}"
            f"{shown}, "
            f"{where}, {side}; {v['chain']}: {'holds' if v['chain holds'] else 'does not hold'} "
            f"({v['formal means']}); ordered at {v['ordered at layers']} layers, nearer natural at "
            f"{v['nearer natural at layers']}."
        )
    return sentences
