"""`compare_runs`: checks the options, loads and aligns the runs, runs every comparison (separation, CKA and
mutual kNN alignment per pair, bifurcations, ordering) and writes the tables, figures, compare.json and
report.html.

The figures module is imported inside `compare_runs`, so importing the comparison stays light.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tokentrail._version import __version__
from tokentrail.atomic import atomic_write_json
from tokentrail.compare.alignment import consistency_warnings, load_model_runs
from tokentrail.compare.bifurcation import bifurcation_rows
from tokentrail.compare.options import CompareOptions
from tokentrail.compare.ordering import ordering_plan, score_ordering
from tokentrail.compare.outputs import ComparisonResult, model_rows, slug, write_report
from tokentrail.compare.separation import separation_tables
from tokentrail.compare.similarity import (
    cka_pair,
    cka_rows,
    dominant_dimensions,
    mutual_knn_pair,
    mutual_knn_rows,
)
from tokentrail.core.jsonable import json_ready
from tokentrail.errors import TokentrailError
from tokentrail.metrics import write_rows

__all__ = ["compare_runs"]


def compare_runs(run_dirs: list[Path], out_dir: Path, options: CompareOptions | None = None) -> ComparisonResult:
    """Compare runs of the same prompts on different models; write tables, figures, compare.json, report.html."""
    from tokentrail.viz import compare_figures

    options = options or CompareOptions()
    for name in ("sustain", "knn_k", "cka_permutations", "top_prompts", "mutual_knn_k"):
        if getattr(options, name) < 1:
            raise TokentrailError(f"compare option {name} must be at least 1, got {getattr(options, name)}")
    for name in ("permutations", "n_bootstrap"):
        if getattr(options, name) < 0:
            raise TokentrailError(f"compare option {name} must be 0 or more, got {getattr(options, name)}")
    out_dir = Path(out_dir)
    if (out_dir / "run.json").exists():
        # Its report.html and figures/ would be overwritten by the comparison's.
        raise TokentrailError(f"{out_dir} is a run directory; write the comparison elsewhere (--out)")
    runs = load_model_runs([Path(d) for d in run_dirs], options)
    n_prompts = len(runs[0].order)
    if options.mutual_knn_k >= n_prompts:
        raise TokentrailError(f"compare option mutual_knn_k must be less than the number of prompts ({n_prompts}, "
                              f"so each has {n_prompts - 1} others), got {options.mutual_knn_k}")
    tables_dir, figures_dir = out_dir / "tables", out_dir / "figures"
    warnings = consistency_warnings(runs)
    for model in runs:
        warnings.extend(f"{model.label}: {w}" for w in model.warnings)

    models = model_rows(runs)
    separation_rows, separation_summary = separation_tables(runs)
    cka: dict[tuple[str, str], dict[str, Any]] = {}
    mutual_knn: dict[tuple[str, str], dict[str, Any]] = {}
    files: dict[str, list[Path]] = {"tables": [], "figures": []}
    for a, b in itertools.combinations(runs, 2):
        pair = cka_pair(a, b, options.cka_permutations, options.seed, options.cka_standardize)
        cka[(a.label, b.label)] = pair
        name = f"cka_{slug(a.label)}_vs_{slug(b.label)}"
        files["tables"].append(write_rows(tables_dir / f"{name}.csv", cka_rows(a, b, pair)))
        files["tables"].append(write_rows(tables_dir / f"{name}_alignment.csv", pair["alignment"]))
        knn = mutual_knn_pair(a, b, options.mutual_knn_k, options.cka_standardize)
        mutual_knn[(a.label, b.label)] = knn
        knn_name = f"mutual_knn_{slug(a.label)}_vs_{slug(b.label)}"
        files["tables"].append(write_rows(tables_dir / f"{knn_name}.csv", mutual_knn_rows(a, b, knn)))
        files["tables"].append(write_rows(tables_dir / f"{knn_name}_alignment.csv", knn["alignment"]))
        figure = compare_figures.plot_cka(pair, a.label, b.label, a.n_layers, b.n_layers, figures_dir / name)
        files[f"cka {a.label} {b.label}"] = figure
        files["figures"].extend(figure)
    bifurcation = bifurcation_rows(runs)
    dominant = dominant_dimensions(runs)
    plan = ordering_plan(runs[0].categories, options.axes, options.middle)
    ordering_means, verdicts, prompt_scores, curves = score_ordering(runs, plan, warnings, options.n_bootstrap,
                                                                      options.seed)
    if not plan:
        warnings.append("no natural-vs-formal axis: no category names mark natural and formal language; "
                        "name one with an axis option")

    files["tables"] += [
        write_rows(tables_dir / "models.csv", models),
        write_rows(tables_dir / "separation.csv", separation_rows),
        write_rows(tables_dir / "separation_summary.csv", separation_summary),
        write_rows(tables_dir / "bifurcation.csv", bifurcation),
        write_rows(tables_dir / "dominant_dimensions.csv", dominant),
    ]
    if ordering_means:
        files["tables"] += [
            write_rows(tables_dir / "ordering_means.csv", ordering_means),
            write_rows(tables_dir / "axis_scores.csv", prompt_scores),
        ]
    if verdicts:
        files["tables"].append(write_rows(tables_dir / "ordering_verdicts.csv", verdicts))
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
        "mutual_knn": [pair["summary"] for pair in mutual_knn.values()],
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
        mutual_knn=mutual_knn,
    )
    result.report = write_report(out_dir, runs, result, separation_summary, ordering_means, options)
    summary["files"] = sorted(str(p.relative_to(out_dir)) for p in [*files["tables"], *files["figures"],
                                                                       result.report])
    atomic_write_json(out_dir / "compare.json", json_ready(summary))
    return result
