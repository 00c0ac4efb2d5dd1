"""Every analysis of a traced run in one pure call: `analyze_states(...) -> AnalysisResult`.

The result holds arrays for the figures and tables, plus a JSON-ready `summary`. Nothing here reads or writes
files; `tokentrail.metrics.write_metrics` turns a result into tables.

Which states each part uses:
* `projection`: the layers chosen by `options.layers` (default all raw layers 0..L), with the final-normed state
  appended as layer L+1 when `options.include_final`; PCA with `options.normalize` / `options.center`, fitted on
  the prompts of `options.fit_on` (all by default).
* `depth_projection`: always RMS-normalised, per-layer-centred PCA over the raw layers 0..L (same `fit_on`).
* dynamics, separation, axis score and bifurcations: the raw states 0..L.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from tokentrail.analysis.bifurcation import bifurcation_layers, divergence_layers
from tokentrail.analysis.category_intervals import (
    BifurcationIntervals,
    CategoryIntervals,
    bifurcation_intervals,
    category_intervals,
)
from tokentrail.analysis.component_readings import component_readings
from tokentrail.analysis.dynamics import projected_dynamics, trajectory_dynamics
from tokentrail.analysis.intervals import DEFAULT_BOOTSTRAP
from tokentrail.analysis.projection import CENTER_MODES, NORMALIZE_MODES, TrajectoryPCA, parse_layer_spec
from tokentrail.analysis.separation import (
    DEFAULT_PERMUTATIONS,
    axis_score,
    best_separation_layer,
    holdout_split,
    separation_by_layer,
)
from tokentrail.analysis.transport import token_cosine_by_layer, wasserstein_by_layer
from tokentrail.core.jsonable import json_ready

# Significance level used only for the summary's "first significant layer".
SIGNIFICANCE = 0.05

# Words in category names that mark the two ends of the default axis, in order of preference; a name is split
# on non-letters and must contain one of the words as a whole word (so "pseudocode" is not "code").
NATURAL_WORDS = ("story", "stories", "poetry", "poem", "poems", "prose", "narrative", "fiction", "creative",
                 "natural")
FORMAL_WORDS = ("code", "math", "maths", "formal", "programming", "program")


@dataclass
class AnalysisOptions:
    """What `analyze_states` computes; the defaults reproduce the seed's raw global PCA over layers 0..L.

    `layers` is a `parse_layer_spec` string ("0:L" = the seed's `output_hidden_states[:-1]`); `fit_on` lists the
    categories whose prompts fit the PCA bases; `axis` names the categories at 0 and 1 of the axis score
    (None: `default_axis`); `sustain`, `knn_k`, `n_permutations` and `seed` go to the bifurcation and
    separation analyses.
    """

    layers: str | None = None
    include_final: bool = False
    n_components: int = 2
    normalize: str = "none"
    center: str = "global"
    fit_on: list[str] | None = None
    axis: tuple[str, str] | None = None
    # Fit the axis centroids on a seeded half of each axis category and score only the other half (and every
    # other category), so that no reading comes from the prompts that defined the axis.
    holdout: bool = False
    sustain: int = 2
    knn_k: int = 3
    # Label permutations for p-values; resamples of the prompts (within categories) for the 95 % intervals
    # (0: none); the seed of both and of the holdout split.
    n_permutations: int = DEFAULT_PERMUTATIONS
    n_bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = 0

    def validate(self, categories: Sequence[str]) -> None:
        """Raise ValueError (one line) for options that cannot apply to these categories."""
        if int(self.n_components) != self.n_components or self.n_components < 2:
            raise ValueError(f"n_components must be 2 or more, got {self.n_components!r}")
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, not {self.normalize!r}")
        if self.center not in CENTER_MODES:
            raise ValueError(f"center must be one of {', '.join(CENTER_MODES)}, not {self.center!r}")
        if self.sustain < 1:
            raise ValueError(f"sustain must be at least 1 layer, got {self.sustain}")
        if self.knn_k < 1:
            raise ValueError(f"knn_k must be at least 1, got {self.knn_k}")
        if self.n_permutations < 0:
            raise ValueError(f"n_permutations must be 0 or more, got {self.n_permutations}")
        if self.n_bootstrap < 0:
            raise ValueError(f"n_bootstrap must be 0 or more, got {self.n_bootstrap}")
        known = list(dict.fromkeys(categories))
        for name in list(self.fit_on or []) + list(self.axis or []):
            if name not in known:
                raise ValueError(f"category {name!r} is not among the categories ({', '.join(known)})")
        if self.fit_on is not None and not self.fit_on:
            raise ValueError("fit_on names no category; leave it out to fit on all prompts")
        if self.axis is not None and (len(self.axis) != 2 or self.axis[0] == self.axis[1]):
            raise ValueError(f"axis must name two different categories, got {self.axis!r}")


@dataclass
class AnalysisResult:
    layers: np.ndarray
    projection: np.ndarray
    explained_variance_ratio: np.ndarray
    depth_projection: np.ndarray
    depth_explained_variance_ratio: np.ndarray
    dynamics: dict[str, np.ndarray]
    projected: dict[str, np.ndarray]
    separation: dict[str, Any] | None
    axis: tuple[str, str] | None
    axis_score: np.ndarray | None
    bifurcation_layer: np.ndarray
    bifurcation_toward: list[str]
    divergence_layer: np.ndarray
    wasserstein: np.ndarray | None
    token_cosine: np.ndarray | None
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    axis_fit: np.ndarray | None = None  # [prompts] with --holdout: True where a prompt fitted the axis
    # The 95 % bootstrap intervals (none when n_bootstrap is 0): each category's mean axis score by layer with its
    # rank and order; each category's own silhouette and kNN accuracy by layer ("silhouette", "knn_accuracy");
    # each category's bifurcation share and mean layer; the component readings (analysis.component_readings).
    axis_intervals: CategoryIntervals | None = None
    category_separation: dict[str, CategoryIntervals] | None = None
    bifurcation_intervals: BifurcationIntervals | None = None
    component_readings: list[dict[str, Any]] | None = None


def default_axis(categories: Sequence[str]) -> tuple[str, str] | None:
    """A natural-language category and a formal one, if the names say so; else None.

    For each end, the first word of NATURAL_WORDS / FORMAL_WORDS that some category name contains wins, and
    among names with that word the first in order of appearance; a name with words of both ends is skipped.
    seed-categories gives ("creative-poetry", "code"), seed-spectrum ("pure-story", "pure-code").
    """
    names = list(dict.fromkeys(categories))
    words = {name: set(re.split(r"[^a-z]+", name.lower())) for name in names}

    def pick(wanted: Sequence[str], unwanted: Sequence[str]) -> str | None:
        for word in wanted:
            for name in names:
                if word in words[name] and not words[name] & set(unwanted):
                    return name
        return None

    natural = pick(NATURAL_WORDS, FORMAL_WORDS)
    formal = pick(FORMAL_WORDS, NATURAL_WORDS)
    if natural is None or formal is None:
        return None
    return natural, formal


def _check_inputs(
    states: np.ndarray, final_states: np.ndarray | None, categories: Sequence[str], include_final: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    values = np.asarray(states)
    if values.ndim != 3:
        raise ValueError(f"states must be [prompts, layers, hidden], got shape {values.shape}")
    n_prompts, n_layers, hidden = values.shape
    if n_prompts < 1 or n_layers < 2:
        raise ValueError(f"analysis needs at least 1 prompt and 2 layers, got states of shape {values.shape}")
    if len(categories) != n_prompts:
        raise ValueError(f"got {len(categories)} categories for {n_prompts} prompts")
    final = None if final_states is None else np.asarray(final_states)
    if final is not None and final.shape != (n_prompts, hidden):
        raise ValueError(f"final_states must have shape {(n_prompts, hidden)}, got {final.shape}")
    if include_final and final is None:
        raise ValueError("include_final needs the final-normed states, which were not given")
    return values, final


def _transport(
    token_states: Sequence[np.ndarray], n_prompts: int, n_layers: int, hidden: int
) -> tuple[np.ndarray, np.ndarray]:
    if len(token_states) != n_prompts:
        raise ValueError(f"got token states for {len(token_states)} prompts, expected {n_prompts}")
    wasserstein = np.empty((n_prompts, n_layers - 1))
    cosine = np.empty((n_prompts, n_layers))
    for prompt, tokens in enumerate(token_states):
        tokens = np.asarray(tokens)
        if tokens.ndim != 3 or tokens.shape[1:] != (n_layers, hidden):
            raise ValueError(
                f"token states of prompt {prompt} must be [tokens, {n_layers}, {hidden}], got {tokens.shape}"
            )
        wasserstein[prompt] = wasserstein_by_layer(tokens)
        cosine[prompt] = token_cosine_by_layer(tokens)
    return wasserstein, cosine


def _layer_list(layers: Any, n_stored: int) -> str:
    """The projection's layers in words; index `n_stored` is the final-normed state."""
    values = [int(layer) for layer in np.asarray(layers).ravel()]
    final = values[-1:] == [n_stored]
    raw = values[:-1] if final else values
    if raw and raw == list(range(raw[0], raw[-1] + 1)):
        text = f"layers {raw[0]}..{raw[-1]}"
    else:
        text = "layers " + ", ".join(str(value) for value in raw)
    return text + (" and the final-normed state" if final else "")


def _finite_mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _per_category_mean(values: np.ndarray, categories: Sequence[str]) -> dict[str, float | None]:
    labels = np.asarray(list(categories), dtype=object)
    return {name: _finite_mean(values[labels == name]) for name in dict.fromkeys(categories)}


def _summary(
    result: AnalysisResult,
    states_shape: tuple[int, int, int],
    categories: Sequence[str],
    options: AnalysisOptions,
) -> dict[str, Any]:
    n_prompts, n_layers, hidden = states_shape
    labels = np.asarray(list(categories), dtype=object)
    names = list(dict.fromkeys(categories))
    summary: dict[str, Any] = {
        "n_prompts": n_prompts,
        "n_layers": n_layers,
        "n_blocks": n_layers - 1,
        "hidden_size": hidden,
        "n_categories": len(names),
        "categories": {name: int(np.sum(labels == name)) for name in names},
        "options": asdict(options),
        "projection_layers": result.layers,
        # --layers chooses the projection's layers only; said here so that no reader takes a separation or
        # bifurcation layer for one computed on the projection's subset.
        "analysis_layers": (f"projection: {_layer_list(result.layers, n_layers)}; dynamics, separation, bifurcations, "
                            f"divergence and axis scores: every raw layer 0..{n_layers - 1} (the embedding and "
                            "each block's raw output)"),
        "explained_variance_ratio": result.explained_variance_ratio,
        "explained_variance_total": float(np.sum(result.explained_variance_ratio)),
        "depth_explained_variance_ratio": result.depth_explained_variance_ratio,
        "arc_length_by_category": _per_category_mean(result.dynamics["arc_length"], categories),
        "total_curvature_by_category": _per_category_mean(result.dynamics["total_curvature"], categories),
        "largest_mean_step_layer": int(np.argmax(result.dynamics["step_size"].mean(axis=0))) + 1,
    }

    separation = result.separation
    if separation is not None:
        best = best_separation_layer(separation)
        significant = np.flatnonzero(np.asarray(separation["p_value"]) <= SIGNIFICANCE)
        summary.update(
            best_separation_layer=best,
            best_silhouette=separation["silhouette"][best] if best >= 0 else None,
            best_knn_accuracy=separation["knn_accuracy"][best] if best >= 0 else None,
            best_p_value=separation["p_value"][best] if best >= 0 else None,
            chance=separation["chance"],
            first_significant_layer=int(significant[0]) if significant.size else None,
            knn_k=separation["k"],
            p_value_floor=separation["p_value_floor"],
            # At the floor no shuffle reached the observed value: the true p is at most the floor.
            best_p_value_at_floor=bool(best >= 0 and separation["n_permutations"] > 0
                                       and separation["p_value"][best] <= separation["p_value_floor"] + 1e-15),
        )
        if "silhouette_low" in separation and best >= 0:
            summary["best_silhouette_interval"] = [separation["silhouette_low"][best],
                                                   separation["silhouette_high"][best]]
            summary["best_knn_accuracy_interval"] = [separation["knn_accuracy_low"][best],
                                                     separation["knn_accuracy_high"][best]]
            summary["n_bootstrap"] = separation["n_bootstrap"]
    else:
        summary.update(best_separation_layer=None, best_silhouette=None, best_knn_accuracy=None,
                       best_p_value=None, chance=None, first_significant_layer=None)

    bifurcated = result.bifurcation_layer >= 0
    summary["bifurcation"] = {
        "sustain": options.sustain,
        "n_bifurcating": int(bifurcated.sum()),
        "by_category": {
            name: {
                "n_prompts": int(np.sum(labels == name)),
                "n_bifurcating": int(np.sum(bifurcated & (labels == name))),
                "mean_layer": (
                    float(result.bifurcation_layer[bifurcated & (labels == name)].mean())
                    if np.any(bifurcated & (labels == name))
                    else None
                ),
            }
            for name in names
        },
    }

    summary["axis"] = list(result.axis) if result.axis is not None else None
    if result.axis_fit is not None:
        summary["axis_holdout"] = {"fitted_on": int(result.axis_fit.sum()),
                                   "evaluated_in_axis_categories": int(sum(
                                       c in (result.axis or ()) for c in categories) - result.axis_fit.sum())}
    if result.axis_score is not None:
        summary["axis_score_last_layer_by_category"] = _per_category_mean(result.axis_score[:, -1], categories)
    if result.axis_intervals is not None:
        last = result.axis_intervals.at_layer(-1)
        summary["axis_score_last_layer_interval_by_category"] = {name: row["interval"] for name, row in last.items()}
        summary["axis_order_last_layer"] = _order(result.axis_intervals, -1)
    if result.bifurcation_intervals is not None:
        found = result.bifurcation_intervals
        for index, name in enumerate(found.names):
            summary["bifurcation"]["by_category"][name].update(
                share_interval=[found.share_low[index], found.share_high[index]],
                mean_layer_interval=[found.mean_layer_low[index], found.mean_layer_high[index]])
    if result.component_readings:
        summary["components"] = _component_summary(result.component_readings)
    if result.wasserstein is not None and result.token_cosine is not None:
        finite_w2 = np.where(np.isfinite(result.wasserstein), result.wasserstein, 0.0)
        summary["transport"] = {
            "largest_mean_wasserstein_layer": int(np.argmax(finite_w2.mean(axis=0))) + 1,
            "mean_token_cosine_first_layer": _finite_mean(result.token_cosine[:, 0]),
            "mean_token_cosine_last_layer": _finite_mean(result.token_cosine[:, -1]),
        }
    summary["warnings"] = list(result.warnings)
    return json_ready(summary)


def _order(intervals: CategoryIntervals, layer: int) -> list[dict[str, Any]]:
    """The categories from lowest to highest mean at `layer`, each with the share of resamples that keep it
    below the next one."""
    order = np.argsort(intervals.mean[:, layer], kind="stable")
    return [{"category": intervals.names[c], "mean": intervals.mean[c, layer],
             "rank_interval": [int(intervals.rank_low[c, layer]), int(intervals.rank_high[c, layer])],
             "below_next_in_resamples": intervals.order_holds[c, layer]} for c in order]


def _component_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """component -> its depth reading, and its per-layer readings at the last layer they cover: [value, low,
    high] each."""
    summary: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = row["reading"] if row["layer"] is None else f"{row['reading']}_last_layer"
        summary.setdefault(str(row["component"]), {})[key] = [row["value"], row["low"], row["high"]]
    return summary


def projection_layers(options: AnalysisOptions, n_layers: int) -> np.ndarray:
    """The stored layers (0..n_layers-1) the projection draws, per `options.layers`, then `n_layers` standing
    for the final-normed state when `options.include_final`. Raises ValueError for fewer than 2."""
    layers = parse_layer_spec(options.layers, n_layers)
    if options.include_final:
        layers = np.append(layers, n_layers)
    if len(layers) < 2:
        raise ValueError(f"the projection needs at least 2 layers, the layer spec selects {len(layers)}")
    return layers


def projection_stack(states: np.ndarray, final_states: np.ndarray | None, layers: np.ndarray) -> np.ndarray:
    """`[prompts, len(layers), hidden]`: the states at `layers` (from `projection_layers`), the final-normed
    state where the index is `states.shape[1]`. All layers in order come back without a copy."""
    n_layers = states.shape[1]
    stored = layers[layers < n_layers]
    stack = states if np.array_equal(stored, np.arange(n_layers)) else states[:, stored]
    if len(stored) < len(layers):  # callers check that final_states is there when it is asked for
        stack = np.concatenate([stack, np.asarray(final_states)[:, None, :]], axis=1)
    return stack


def projection_fit_mask(options: AnalysisOptions, categories: Sequence[str]) -> np.ndarray:
    """Which prompts fit the projection: those of `options.fit_on`, or all."""
    labels = np.asarray(categories, dtype=object)
    return np.ones(len(labels), dtype=bool) if options.fit_on is None else np.isin(labels, list(options.fit_on))


@dataclass(frozen=True)
class FittedProjections:
    """A run's two fitted projections: `trajectory` (its options' normalisation, centring and layers, `layers`
    from `projection_layers`) and `depth` (rms, per-layer centred, every raw layer). New prompts are projected
    into them with `trajectory.transform(self.stack(states, final_states))` and `depth.transform(states)`."""

    layers: np.ndarray
    trajectory: TrajectoryPCA
    depth: TrajectoryPCA

    def stack(self, states: np.ndarray, final_states: np.ndarray | None) -> np.ndarray:
        return projection_stack(np.asarray(states), None if final_states is None else np.asarray(final_states),
                                self.layers)


def fit_projections(states: np.ndarray, final_states: np.ndarray | None, categories: Sequence[str],
                    options: AnalysisOptions) -> FittedProjections:
    """Fit the projections `analyze_states` draws, on the prompts `options.fit_on` names (all by default)."""
    values, final = _check_inputs(states, final_states, [str(c) for c in categories], options.include_final)
    layers = projection_layers(options, values.shape[1])
    fit_mask = projection_fit_mask(options, categories)
    return FittedProjections(
        layers=layers,
        trajectory=TrajectoryPCA(options.n_components, options.normalize, options.center).fit(
            projection_stack(values, final, layers), fit_mask),
        depth=TrajectoryPCA(options.n_components, "rms", "per-layer").fit(values, fit_mask),
    )


def analyze_states(
    states: np.ndarray,
    final_states: np.ndarray | None,
    categories: Sequence[str],
    options: AnalysisOptions | None = None,
    token_states: Sequence[np.ndarray] | None = None,
) -> AnalysisResult:
    """Run every analysis on `states [prompts, L+1, hidden]` (raw layers 0..L) and return the result.

    `final_states [prompts, hidden]` is needed only with `options.include_final`. `token_states` (one
    `[tokens, L+1, hidden]` array per prompt) adds the transport measures. Raises ValueError for inconsistent
    inputs or options; analyses that the categories do not allow (separation with a one-prompt category, an
    axis without suitable categories) are skipped with a message in `warnings`.
    """
    options = options or AnalysisOptions()
    # Options may come from JSON or a CLI (lists instead of tuples); work on a normalised copy.
    options = replace(
        options,
        axis=tuple(str(name) for name in options.axis) if options.axis is not None else None,
        fit_on=[str(name) for name in options.fit_on] if options.fit_on is not None else None,
    )
    categories = [str(c) for c in categories]
    options.validate(categories)
    values, final = _check_inputs(states, final_states, categories, options.include_final)
    n_prompts, n_layers, hidden = values.shape
    warnings: list[str] = []

    fitted = fit_projections(values, final, categories, options)
    layers, pca, depth_pca = fitted.layers, fitted.trajectory, fitted.depth
    projection = pca.transform(fitted.stack(values, final))
    depth_projection = depth_pca.transform(values)

    try:
        separation = separation_by_layer(
            values, categories, k=options.knn_k, n_permutations=options.n_permutations, seed=options.seed,
            n_bootstrap=options.n_bootstrap,
        )
    except ValueError as exc:
        separation = None
        warnings.append(f"separation by layer skipped: {exc}")

    axis = (options.axis[0], options.axis[1]) if options.axis is not None else default_axis(categories)
    scores = axis_fit = None
    if axis is not None and options.holdout:
        axis_fit = holdout_split(categories, axis, options.seed)
        scores = axis_score(values, categories, axis[0], axis[1], fit_mask=axis_fit)
        scores[axis_fit] = np.nan  # the prompts that defined the axis get no reading on it
    elif axis is not None:
        scores = axis_score(values, categories, axis[0], axis[1])
    if axis is None and len(set(categories)) >= 2:
        warnings.append("no axis score: no category names mark natural vs formal language; choose an axis")

    bifurcation_layer, bifurcation_toward = bifurcation_layers(values, categories, sustain=options.sustain)
    lone = [name for name in dict.fromkeys(categories) if categories.count(name) < 2]
    if lone:
        warnings.append(f"prompts alone in their category cannot bifurcate: {', '.join(lone)}")
    if len(set(categories)) < 2:
        warnings.append("bifurcations need at least 2 categories; none were detected")

    bootstrap = {"n_boot": options.n_bootstrap, "seed": options.seed}
    axis_intervals = category_separation = found_intervals = readings = None
    if options.n_bootstrap:
        if scores is not None:
            axis_intervals = category_intervals(scores, categories, **bootstrap)
        if separation is not None:
            category_separation = {
                "silhouette": category_intervals(separation["silhouette_by_prompt"], categories, **bootstrap),
                "knn_accuracy": category_intervals(separation["knn_hit_by_prompt"], categories, **bootstrap)}
        found_intervals = bifurcation_intervals(bifurcation_layer, categories, **bootstrap)
        if n_prompts >= 2:
            readings = component_readings(projection, layers, categories, scores, **bootstrap)

    wasserstein = token_cosine = None
    if token_states is not None:
        wasserstein, token_cosine = _transport(token_states, n_prompts, n_layers, hidden)

    result = AnalysisResult(
        layers=np.asarray(layers, dtype=int),
        projection=projection,
        explained_variance_ratio=pca.explained_variance_ratio_,
        depth_projection=depth_projection,
        depth_explained_variance_ratio=depth_pca.explained_variance_ratio_,
        dynamics=trajectory_dynamics(values),
        projected=projected_dynamics(projection),
        separation=separation,
        axis=axis,
        axis_score=scores,
        axis_fit=axis_fit,
        axis_intervals=axis_intervals,
        category_separation=category_separation,
        bifurcation_intervals=found_intervals,
        component_readings=readings,
        bifurcation_layer=bifurcation_layer,
        bifurcation_toward=bifurcation_toward,
        divergence_layer=divergence_layers(values),
        wasserstein=wasserstein,
        token_cosine=token_cosine,
        warnings=warnings,
    )
    result.summary = _summary(result, (n_prompts, n_layers, hidden), categories, options)
    return result
