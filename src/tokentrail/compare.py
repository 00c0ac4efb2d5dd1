"""Compare runs of one prompt set on several models, aligned by depth: `compare_runs(run_dirs, out_dir)`.

Models differ in depth and width, so everything here is put on a shared footing first:

* depth is normalised, layer / L (0 = embeddings, 1 = the last block's raw output), so a 30-layer and an
  18-layer model can be drawn on one axis;
* representations are compared through linear CKA (`tokentrail.analysis.similarity`), which works on the
  prompts' Gram matrices and so needs no shared hidden size; every CKA matrix comes with a permutation null
  (prompts shuffled on one side), because with ~20 prompts and hundreds of units unrelated representations
  already score well above 0;
* every run is analysed with the same options (kNN k, permutations, seed, sustain), so separation and
  bifurcation numbers differ only because the models do. Only the analyses the comparison needs are run
  (not the projections), straight from each run's store.

The seed's reading ("word problems sit nearer to stories than to math", "story < word problems < math/code"
along the natural-vs-formal direction) is checked with `axis_score`: on the line from the natural category's
centroid (0) to a formal category's centroid (1), where does the middle category's mean sit? The two ends are
0 and 1 by construction, so the tests are whether the middle lies strictly between them, below 0.5, and below
every formal category (the chain natural < middle < formal ends).

Output:
    OUT/compare.json      models, options, every summary number and verdict, warnings, file list
    OUT/tables/*.csv      separation by depth, CKA per pair, bifurcations, ordering
    OUT/figures/*.png|svg separation vs depth, CKA heat map per pair, ordering bars and ordering vs depth
    OUT/report.html       one offline page (the run report's machinery, prompt text escaped)
"""

from __future__ import annotations

import csv
import io
import itertools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tokentrail._version import __version__
from tokentrail.analysis.bifurcation import bifurcation_layers
from tokentrail.analysis.pipeline import default_axis
from tokentrail.analysis.separation import axis_score, best_separation_layer, separation_by_layer
from tokentrail.analysis.similarity import cka_matrix, cka_permutation_null, standardize_features
from tokentrail.atomic import atomic_write_bytes, atomic_write_json
from tokentrail.core.jsonable import json_ready
from tokentrail.core.trace import Trace
from tokentrail.errors import TokentrailError
from tokentrail.metrics import format_cell

__all__ = [
    "CompareOptions",
    "ComparisonResult",
    "ModelRun",
    "compare_runs",
    "load_model_runs",
    "ordering_plan",
    "verdict_sentences",
]

SIGNIFICANCE = 0.05
# With three prompts per category, a mean this close to 0.5 says "half way", not "nearer one end".
MIDPOINT_TIE = 0.05
# Words that name the formal ends and the "in between" category of the seed's spectrum (whole words of the
# category name, as in `analysis.pipeline.default_axis`).
_CODE_WORDS = ("code", "programming", "program")
_MATH_WORDS = ("math", "maths", "mathematics", "arithmetic")
_MIDDLE_WORDS = (("word", "problem"), ("word", "problems"))


@dataclass
class CompareOptions:
    """How runs are compared; the defaults are those of `tokentrail analyze`.

    `knn_k`, `permutations` (label shuffles per layer) and `sustain` go to the separation and bifurcation
    analyses of every run alike; `cka_permutations` prompt shuffles give the CKA null; `top_prompts`
    bifurcation rows go into the report (the CSV has all); `axes` overrides the natural-vs-formal axes as
    (natural, formal) pairs and `middle` the category expected between the ends. `cka_standardize` z-scores
    every hidden unit across the prompts before CKA, so that a few massive-activation units cannot dominate it.
    """

    sustain: int = 2
    knn_k: int = 3
    permutations: int = 200
    cka_permutations: int = 200
    cka_standardize: bool = False
    top_prompts: int = 10
    axes: list[tuple[str, str]] | None = None
    middle: str | None = None
    seed: int = 0


@dataclass
class ModelRun:
    """One run, its prompts put in the order of the first run, and the analyses the comparison uses.

    `separation` and the bifurcation arrays are in the run's own prompt order; `order` maps the first run's
    prompts to this run's indices.
    """

    label: str
    run_dir: Path
    run: dict[str, Any]
    trace: Trace
    order: np.ndarray
    separation: dict[str, Any] | None
    bifurcation_layer: np.ndarray
    bifurcation_toward: list[str]
    warnings: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return self.trace.n_layers

    @property
    def states(self) -> np.ndarray:
        return self.trace.states[self.order]

    @property
    def categories(self) -> list[str]:
        return [self.trace.categories[i] for i in self.order]

    @property
    def depth(self) -> np.ndarray:
        return np.arange(self.n_layers + 1) / self.n_layers


@dataclass
class ComparisonResult:
    """Everything `compare_runs` computed and wrote; `cka` is keyed by (label of A, label of B) and holds the
    matrices (`cka`, `debiased`, `null_mean`, `null_p95`, `p_value`), `alignment` rows and a `summary`."""

    out_dir: Path
    models: list[dict[str, Any]]
    separation: list[dict[str, Any]]
    cka: dict[tuple[str, str], dict[str, Any]]
    bifurcation: list[dict[str, Any]]
    ordering: list[dict[str, Any]]
    ordering_verdicts: list[dict[str, Any]]
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    files: dict[str, list[Path]] = field(default_factory=dict)
    report: Path | None = None


# --------------------------------------------------------------------------------------------- loading


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _first_difference(dir_a: Path, texts_a: Sequence[str], ids_a: Sequence[str], dir_b: Path,
                      texts_b: Sequence[str]) -> str | None:
    """A one-line description of the first prompt one run has (more often) and the other lacks, or None."""
    count_a, count_b = Counter(texts_a), Counter(texts_b)
    for text, prompt_id in zip(texts_a, ids_a):
        if count_a[text] > count_b[text]:
            return f"{dir_a} has prompt {prompt_id} {_short(text)}, which {dir_b} lacks"
    for text in texts_b:
        if count_b[text] > count_a[text]:
            return f"{dir_b} has prompt {_short(text)}, which {dir_a} lacks"
    return None


def _labels(runs: Sequence[dict[str, Any]], run_dirs: Sequence[Path]) -> list[str]:
    """Each run's model name; a name shared by several runs gets its run directory's name added."""
    names = [str(run["model"]["fingerprint"]["name"]) for run in runs]
    labels = []
    for name, run_dir in zip(names, run_dirs):
        labels.append(name if names.count(name) == 1 else f"{name} ({Path(run_dir).name})")
    if len(set(labels)) < len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return labels


def load_model_runs(run_dirs: Sequence[Path], options: CompareOptions | None = None) -> list[ModelRun]:
    """Read and analyse every run; the prompts must be the same texts (in any order) in all of them."""
    from tokentrail.runs import load_trace

    if len(run_dirs) < 2:
        raise TokentrailError(f"compare needs at least 2 runs, got {len(run_dirs)}")
    options = options or CompareOptions()
    loaded = []
    for run_dir in run_dirs:
        run, trace = load_trace(Path(run_dir))
        loaded.append((Path(run_dir), run, trace))
    first_dir, _, first = loaded[0]
    for run_dir, _, trace in loaded[1:]:
        difference = _first_difference(first_dir, first.prompts, first.prompt_ids, run_dir, trace.prompts)
        if difference is not None:
            raise TokentrailError(f"cannot compare runs of different prompts: {difference}")
    labels = _labels([item[1] for item in loaded], [item[0] for item in loaded])
    model_runs = []
    for label, (run_dir, run, trace) in zip(labels, loaded):
        # A text may appear twice (in two categories); its occurrences pair up in order.
        slots: dict[str, list[int]] = {}
        for i, text in enumerate(trace.prompts):
            slots.setdefault(text, []).append(i)
        order = np.array([slots[text].pop(0) for text in first.prompts], dtype=int)
        model_runs.append(_analysed(label, run_dir, run, trace, order, options))
    return model_runs


def _analysed(label: str, run_dir: Path, run: dict[str, Any], trace: Trace, order: np.ndarray,
              options: CompareOptions) -> ModelRun:
    if trace.n_layers < 1:
        raise TokentrailError(f"{run_dir}: the trace has no decoder layers to compare")
    warnings = []
    try:
        separation = separation_by_layer(trace.states, trace.categories, k=options.knn_k,
                                         n_permutations=options.permutations, seed=options.seed)
    except ValueError as exc:
        separation = None
        warnings.append(f"separation by layer skipped: {exc}")
    try:
        layers, toward = bifurcation_layers(trace.states, trace.categories, sustain=options.sustain)
    except ValueError as exc:
        raise TokentrailError(f"cannot analyse {run_dir}: {exc}") from None
    return ModelRun(label, run_dir, run, trace, order, separation, layers, toward, warnings)


def _consistency_warnings(runs: Sequence[ModelRun]) -> list[str]:
    warnings = []
    first = runs[0]
    for other in runs[1:]:
        for key in ("position", "chat", "truncate"):
            a = first.run.get("trace_options", {}).get(key)
            b = other.run.get("trace_options", {}).get(key)
            if a != b:
                warnings.append(f"{first.label} was traced with {key}={a!r}, {other.label} with {key}={b!r}: "
                                "the models did not read the same input")
        renamed = [i for i, (a, b) in enumerate(zip(first.categories, other.categories)) if a != b]
        if renamed:
            i = renamed[0]
            warnings.append(
                f"{len(renamed)} prompt(s) have other categories in {other.label} than in {first.label} "
                f"(first: {first.trace.prompt_ids[first.order[i]]}: {first.categories[i]!r} vs "
                f"{other.categories[i]!r}); each run is analysed with its own categories"
            )
        same = first.run["model"]["fingerprint"].get("weights_sha256") == other.run["model"]["fingerprint"].get(
            "weights_sha256")
        if same:
            warnings.append(f"{first.label} and {other.label} have the same weights: any difference between them "
                            "comes from how they were traced")
    return warnings


# --------------------------------------------------------------------------------------------- separation


def _separation_rows(runs: Sequence[ModelRun]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for model in runs:
        sep = model.separation
        if sep is None:
            summary.append({"model": model.label, "layers": model.n_layers, "best layer": None})
            continue
        for layer, depth in enumerate(model.depth):
            rows.append({
                "model": model.label, "layer": layer, "depth": float(depth),
                "silhouette": float(sep["silhouette"][layer]), "knn_accuracy": float(sep["knn_accuracy"][layer]),
                "p_value": float(sep["p_value"][layer]), "chance": float(sep["chance"]),
            })
        best = best_separation_layer(sep)
        significant = np.flatnonzero(np.asarray(sep["p_value"]) <= SIGNIFICANCE)
        first_sig = int(significant[0]) if significant.size else None
        summary.append({
            "model": model.label,
            "layers": model.n_layers,
            "best layer": best,
            "best depth": best / model.n_layers,
            "best silhouette": float(sep["silhouette"][best]),
            "kNN accuracy there": float(sep["knn_accuracy"][best]),
            "p there": float(sep["p_value"][best]),
            "chance": float(sep["chance"]),
            "first significant layer": first_sig,
            "first significant depth": None if first_sig is None else first_sig / model.n_layers,
            "silhouette at last layer": float(sep["silhouette"][-1]),
        })
    return rows, summary


# --------------------------------------------------------------------------------------------- CKA


def _matched_layer(layer: int, n_from: int, n_to: int) -> int:
    """The layer of an n_to-layer model at the same normalised depth as `layer` of an n_from-layer model."""
    return round(layer * n_to / n_from)


def _cka_pair(a: ModelRun, b: ModelRun, n_permutations: int, seed: int, standardize: bool) -> dict[str, Any]:
    states_a, states_b = a.states, b.states
    if standardize:
        states_a, states_b = standardize_features(states_a), standardize_features(states_b)
    cka = cka_matrix(states_a, states_b)
    debiased = cka_matrix(states_a, states_b, debiased=True) if states_a.shape[0] >= 4 else np.full_like(cka, np.nan)
    null = cka_permutation_null(states_a, states_b, n_permutations=n_permutations, seed=seed)
    null_mean = null.mean(axis=0)
    null_p95 = np.quantile(null, 0.95, axis=0)
    p_value = (1 + np.sum(null >= cka[None] - 1e-12, axis=0)) / (1 + n_permutations)
    diagonal = [(i, _matched_layer(i, a.n_layers, b.n_layers)) for i in range(a.n_layers + 1)]
    best_b = np.nanargmax(np.where(np.isnan(cka), -np.inf, cka), axis=1)
    alignment = [
        {"layer": i, "depth": i / a.n_layers, f"best {b.label} layer": int(best_b[i]),
         f"best {b.label} depth": int(best_b[i]) / b.n_layers, "CKA there": float(cka[i, best_b[i]]),
         f"{b.label} layer at same depth": j, "CKA at same depth": float(cka[i, j]),
         "null 95% at same depth": float(null_p95[i, j])}
        for i, j in diagonal
    ]
    diag_values = np.array([cka[i, j] for i, j in diagonal])
    diag_null = np.array([null_p95[i, j] for i, j in diagonal])
    summary = {
        "models": [a.label, b.label],
        "shape": [a.n_layers + 1, b.n_layers + 1],
        "n_prompts": int(states_a.shape[0]),
        "n_permutations": int(n_permutations),
        "features": "standardised" if standardize else "raw",
        "mean CKA at matched depth": float(np.nanmean(diag_values)),
        "mean null 95% at matched depth": float(np.nanmean(diag_null)),
        "matched-depth layers above null 95%": int(np.sum(diag_values > diag_null)),
        "matched-depth layers": len(diagonal),
        "CKA embeddings (0 vs 0)": float(cka[0, 0]),
        "CKA last layers": float(cka[-1, -1]),
        "null mean (all cells)": float(null_mean.mean()),
        "null 95% (median cell)": float(np.median(null_p95)),
        "cells above null 95%": float(np.mean(cka > null_p95)),
        "mean debiased CKA at matched depth": float(np.nanmean([debiased[i, j] for i, j in diagonal])),
        "mean |depth offset| of best match": float(np.mean(np.abs(best_b / b.n_layers - np.arange(a.n_layers + 1)
                                                                  / a.n_layers))),
    }
    return {"cka": cka, "debiased": debiased, "null_mean": null_mean, "null_p95": null_p95, "p_value": p_value,
            "alignment": alignment, "summary": summary}


def _cka_rows(a: ModelRun, b: ModelRun, pair: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for i in range(a.n_layers + 1):
        for j in range(b.n_layers + 1):
            rows.append({
                "layer_a": i, "depth_a": i / a.n_layers, "layer_b": j, "depth_b": j / b.n_layers,
                "cka": pair["cka"][i, j], "cka_debiased": pair["debiased"][i, j],
                "null_mean": pair["null_mean"][i, j], "null_p95": pair["null_p95"][i, j],
                "p_value": pair["p_value"][i, j],
            })
    return rows


def _dominant_dimensions(runs: Sequence[ModelRun]) -> list[dict[str, Any]]:
    """How much of the prompts' variance the largest single hidden dimensions carry, per layer.

    Linear CKA weighs directions by their variance, so where one "massive activation" dimension carries much
    of it, CKA mostly compares that dimension; this table says where to read the heat maps with that in mind.
    """
    rows = []
    for model in runs:
        states = model.states.astype(np.float64)
        for layer, depth in enumerate(model.depth):
            values = states[:, layer]
            variance = np.var(values, axis=0)
            total = float(variance.sum())
            ranked = np.argsort(variance)[::-1]
            rows.append({
                "model": model.label, "layer": layer, "depth": float(depth),
                "mean norm": float(np.linalg.norm(values, axis=1).mean()),
                "top dimension": int(ranked[0]),
                "top-1 variance share": float(variance[ranked[0]] / total) if total > 0 else None,
                "top-5 variance share": float(variance[ranked[:5]].sum() / total) if total > 0 else None,
            })
    return rows


# --------------------------------------------------------------------------------------------- bifurcations


def _bifurcation_rows(runs: Sequence[ModelRun]) -> list[dict[str, Any]]:
    """Per prompt and model the normalised bifurcation depth; the spread across models ranks the rows.

    A prompt that never leaves its category counts as depth 1 for the spread (it stays to the end), so "leaves
    early in one model, never in the other" ranks high, as it should.
    """
    first = runs[0]
    rows = []
    for p in range(len(first.order)):
        source = first.order[p]
        row: dict[str, Any] = {
            "prompt": first.trace.labels[source] or str(p + 1),
            "id": first.trace.prompt_ids[source],
            "category": first.categories[p],
            "text": first.trace.prompts[source],
        }
        depths = []
        for model in runs:
            layer = int(model.bifurcation_layer[model.order[p]])
            toward = model.bifurcation_toward[model.order[p]]
            row[f"{model.label} layer"] = layer if layer >= 0 else None
            row[f"{model.label} depth"] = layer / model.n_layers if layer >= 0 else None
            row[f"{model.label} toward"] = toward or "never"
            depths.append(layer / model.n_layers if layer >= 0 else 1.0)
        row["depth spread"] = float(max(depths) - min(depths))
        rows.append(row)
    rows.sort(key=lambda r: -r["depth spread"])
    return rows


# --------------------------------------------------------------------------------------------- ordering


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


def _ordering(runs: Sequence[ModelRun], plan: Sequence[dict[str, Any]], warnings: list[str]
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Category means on each axis (at the last layer and the best-separation layer), verdicts, and the
    middle category's mean at every layer for the depth figure."""
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
                    means_rows.append({
                        "model": model.label, "axis": axis_name, "at": which, "layer": layer,
                        "depth": layer / model.n_layers, "category": name, "mean": _snap(means[name][layer]),
                        "sd": float(np.std(spread, ddof=1)) if spread.size > 1 else None, "n": int(spread.size),
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
        if abs(v["middle mean"] - 0.5) < MIDPOINT_TIE:
            side = f"at the midpoint (within {MIDPOINT_TIE})"
        if not v["ordered (0 < middle < 1)"]:
            side = "below the natural end" if v["middle mean"] <= 0 else "beyond the formal end"
        sentences.append(
            f"{v['model']}, {v['axis']}, {v['at']} (layer {v['layer']}): {v['middle']} at {v['middle mean']:.2f}, "
            f"{where}, {side}; {v['chain']}: {'holds' if v['chain holds'] else 'does not hold'} "
            f"({v['formal means']}); ordered at {v['ordered at layers']} layers, nearer natural at "
            f"{v['nearer natural at layers']}."
        )
    return sentences


# --------------------------------------------------------------------------------------------- output


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    header = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([format_cell(row.get(key)) for key in header])
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))
    return path


def _model_rows(runs: Sequence[ModelRun]) -> list[dict[str, Any]]:
    rows = []
    for model in runs:
        fp = model.run["model"]["fingerprint"]
        rows.append({
            "label": model.label, "run": str(model.run_dir), "model": fp.get("name"),
            "weights sha256": str(fp.get("weights_sha256", ""))[:16], "dtype": fp.get("dtype"),
            "layers (L)": model.n_layers, "hidden size": model.trace.hidden_size,
            "prompts": len(model.order), "prompt set": model.run["prompts"]["name"],
        })
    return rows


def _report(out_dir: Path, runs: Sequence[ModelRun], comparison: ComparisonResult,
            separation_summary: list[dict[str, Any]], ordering_means: list[dict[str, Any]],
            options: CompareOptions) -> Path:
    from tokentrail.viz import FigureMeta
    from tokentrail.viz.report import build_report

    first = runs[0]
    meta = FigureMeta(
        prompt_ids=[first.trace.prompt_ids[i] for i in first.order],
        prompts=[first.trace.prompts[i] for i in first.order],
        categories=first.categories,
        labels=[first.trace.labels[i] for i in first.order],
        model_name=" vs ".join(model.label for model in runs),
    )
    files = comparison.files
    sections: list[dict[str, Any]] = [
        {"title": "Runs compared",
         "text": ("The same prompts through each model. Depth is normalised as layer / L (0 = embeddings, 1 = the "
                  "last block's raw output); every run was analysed with the same options."),
         "table": comparison.models},
        {"title": "Separation by normalised depth",
         "text": ("Silhouette of the categories (cosine) and leave-one-out kNN accuracy at each layer, on a "
                  "normalised depth axis; filled points are significant in the permutation test, dashed lines "
                  "are chance."),
         "figures": [p for p in files.get("separation", []) if p.suffix == ".png"],
         "table": separation_summary},
    ]
    dominant = comparison.summary.get("dominant_dimensions", {})
    heavy = "; ".join(
        f"{label}: up to {row['top-1 variance share']:.0%} at layer {row['layer']}" for label, row in dominant.items()
        if row.get("top-1 variance share") is not None
    )
    for (label_a, label_b), pair in comparison.cka.items():
        s = pair["summary"]
        sections.append({
            "title": f"Linear CKA: {label_a} vs {label_b}",
            "text": (
                f"Linear CKA between every layer of {label_a} (rows) and of {label_b} (columns), on the "
                f"{s['n_prompts']} prompts' last-token states ({s['features']} hidden units); right: the debiased "
                "estimator. With this few prompts CKA is inflated: shuffling the prompts of one side gives "
                f"{s['null mean (all cells)']:.2f} on average (95th percentile of the median cell "
                f"{s['null 95% (median cell)']:.2f}), so only values above the null mean something. Dots mark the "
                f"best {label_b} layer for each {label_a} layer; the dashed line is equal normalised depth. Mean "
                f"CKA at matched depth {s['mean CKA at matched depth']:.2f}; "
                f"{s['matched-depth layers above null 95%']} of {s['matched-depth layers']} matched layers lie "
                "above the null's 95th percentile. Linear CKA weighs directions by variance; the share of the "
                f"prompts' variance carried by the single largest hidden dimension is {heavy} "
                "(tables/dominant_dimensions.csv): where it is large, CKA mostly compares that dimension."
            ),
            "figures": [p for p in files.get(f"cka {label_a} {label_b}", []) if p.suffix == ".png"],
            "tables": {"summary": [s], "best match by layer": pair["alignment"]},
        })
    top = comparison.bifurcation[: options.top_prompts]
    sections.append({
        "title": "Bifurcations that differ most",
        "text": ("The layer at which a prompt leaves its category (cosine distance to leave-one-out category "
                 f"centroids, sustained {options.sustain} layers), as normalised depth in each model; the rows "
                 "whose depths differ most between models come first. \"never\" counts as depth 1 for the spread. "
                 f"The {len(top)} largest of {len(comparison.bifurcation)}; all are in tables/bifurcation.csv."),
        "table": top,
    })
    last_layer = [v for v in comparison.ordering_verdicts if v["at"] == "last layer"]
    verdict_text = " ".join(verdict_sentences(last_layer)) or (
        "No category is expected between the ends of these axes, so only the category means are shown.")
    sections.append({
        "title": "Natural-vs-formal ordering (the seed's spectrum)",
        "text": ("Each prompt's position on the line from the natural category's centroid (0) to the formal "
                 "category's centroid (1), per model, at the last raw layer and at the layer of best separation. "
                 "The ends are 0 and 1 by construction; the question is where the middle category sits. At the "
                 "last layer: " + verdict_text + " The table has the layer of best separation too."),
        "figures": [p for key in ("ordering", "ordering_depth") for p in files.get(key, []) if p.suffix == ".png"],
        "tables": {"verdicts": comparison.ordering_verdicts, "category means": ordering_means},
    })
    if comparison.warnings:
        sections.insert(0, {"title": "Warnings", "text": " ".join(comparison.warnings)})
    info = {
        "compared": [str(model.run_dir) for model in runs],
        "models": {model.label: model.run["model"]["fingerprint"]["name"] for model in runs},
        "options": asdict(options),
        "generated": comparison.summary.get("generated"),
    }
    return build_report(out_dir, info, None, meta, {}, extra_sections=sections)


def compare_runs(run_dirs: list[Path], out_dir: Path, options: CompareOptions | None = None) -> ComparisonResult:
    """Compare runs of the same prompts on different models; write tables, figures, compare.json, report.html."""
    from tokentrail.viz import compare_figures

    options = options or CompareOptions()
    for name in ("sustain", "knn_k", "cka_permutations", "top_prompts"):
        if getattr(options, name) < 1:
            raise TokentrailError(f"compare option {name} must be at least 1, got {getattr(options, name)}")
    if options.permutations < 0:
        raise TokentrailError(f"compare option permutations must be 0 or more, got {options.permutations}")
    out_dir = Path(out_dir)
    if (out_dir / "run.json").exists():
        # Its report.html and figures/ would be overwritten by the comparison's.
        raise TokentrailError(f"{out_dir} is a run directory; write the comparison elsewhere (--out)")
    runs = load_model_runs([Path(d) for d in run_dirs], options)
    tables_dir, figures_dir = out_dir / "tables", out_dir / "figures"
    warnings = _consistency_warnings(runs)
    for model in runs:
        warnings.extend(f"{model.label}: {w}" for w in model.warnings)

    models = _model_rows(runs)
    separation_rows, separation_summary = _separation_rows(runs)
    cka: dict[tuple[str, str], dict[str, Any]] = {}
    files: dict[str, list[Path]] = {"tables": [], "figures": []}
    for a, b in itertools.combinations(runs, 2):
        pair = _cka_pair(a, b, options.cka_permutations, options.seed, options.cka_standardize)
        cka[(a.label, b.label)] = pair
        name = f"cka_{_slug(a.label)}_vs_{_slug(b.label)}"
        files["tables"].append(_write_csv(tables_dir / f"{name}.csv", _cka_rows(a, b, pair)))
        files["tables"].append(_write_csv(tables_dir / f"{name}_alignment.csv", pair["alignment"]))
        figure = compare_figures.plot_cka(pair, a.label, b.label, a.n_layers, b.n_layers, figures_dir / name)
        files[f"cka {a.label} {b.label}"] = figure
        files["figures"].extend(figure)
    bifurcation = _bifurcation_rows(runs)
    dominant = _dominant_dimensions(runs)
    plan = ordering_plan(runs[0].categories, options.axes, options.middle)
    ordering_means, verdicts, prompt_scores, curves = _ordering(runs, plan, warnings)
    if not plan:
        warnings.append("no natural-vs-formal axis: no category names mark natural and formal language; "
                        "name one with an axis option")

    files["tables"] += [
        _write_csv(tables_dir / "models.csv", models),
        _write_csv(tables_dir / "separation.csv", separation_rows),
        _write_csv(tables_dir / "separation_summary.csv", separation_summary),
        _write_csv(tables_dir / "bifurcation.csv", bifurcation),
        _write_csv(tables_dir / "dominant_dimensions.csv", dominant),
    ]
    if ordering_means:
        files["tables"] += [
            _write_csv(tables_dir / "ordering_means.csv", ordering_means),
            _write_csv(tables_dir / "axis_scores.csv", prompt_scores),
        ]
    if verdicts:
        files["tables"].append(_write_csv(tables_dir / "ordering_verdicts.csv", verdicts))
    separation_curves = [
        {"label": model.label, "depth": model.depth, **{key: model.separation[key] for key in
                                                         ("silhouette", "knn_accuracy", "p_value", "chance")}}
        for model in runs if model.separation is not None
    ]
    files["separation"] = compare_figures.plot_separation_depth(separation_curves,
                                                                figures_dir / "separation_by_depth")
    files["ordering"] = compare_figures.plot_ordering(ordering_means, plan, figures_dir / "ordering_last_layer")
    files["ordering_depth"] = compare_figures.plot_ordering_depth(curves, figures_dir / "middle_category_by_depth")
    files["figures"] += files["separation"] + files["ordering"] + files["ordering_depth"]

    summary = {
        "tool": "tokentrail",
        "version": __version__,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": [str(model.run_dir) for model in runs],
        "models": models,
        "options": asdict(options),
        "separation": separation_summary,
        "cka": [pair["summary"] for pair in cka.values()],
        "bifurcation_top": bifurcation[: options.top_prompts],
        "dominant_dimensions": {
            model.label: max((r for r in dominant if r["model"] == model.label),
                             key=lambda r: r["top-1 variance share"] or 0.0)
            for model in runs
        },
        "ordering_plan": plan,
        "ordering_verdicts": verdicts,
        "ordering_means": ordering_means,
        "warnings": warnings,
    }
    result = ComparisonResult(
        out_dir=out_dir, models=models, separation=separation_rows, cka=cka, bifurcation=bifurcation,
        ordering=ordering_means, ordering_verdicts=verdicts, summary=summary, warnings=warnings, files=files,
    )
    result.report = _report(out_dir, runs, result, separation_summary, ordering_means, options)
    summary["files"] = sorted(str(p.relative_to(out_dir)) for p in [*files["tables"], *files["figures"],
                                                                       result.report])
    atomic_write_json(out_dir / "compare.json", json_ready(summary))
    return result
