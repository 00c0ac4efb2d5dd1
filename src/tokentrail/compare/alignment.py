"""Runs put on a shared footing: read, their prompts matched to the first run's order, labelled, analysed with
the same options (`ModelRun`), checked for tracing differences, and their layers matched by normalised depth.

Models differ in depth, so a layer is placed at layer / L (0 = embeddings, 1 = the last block's raw output);
`matched_layer` finds the layer of another model at the same normalised depth.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokentrail.analysis.bifurcation import bifurcation_layers
from tokentrail.analysis.separation import separation_by_layer
from tokentrail.compare.options import CompareOptions
from tokentrail.core.trace import Trace
from tokentrail.errors import TokentrailError

__all__ = ["ModelRun", "consistency_warnings", "load_model_runs", "matched_layer"]


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


def consistency_warnings(runs: Sequence[ModelRun]) -> list[str]:
    """Where the runs were not traced alike, categorised alike, or are the same weights twice."""
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


def matched_layer(layer: int, n_from: int, n_to: int) -> int:
    """The layer of an n_to-layer model at the same normalised depth as `layer` of an n_from-layer model."""
    return round(layer * n_to / n_from)
