"""What a comparison writes and returns: the `ComparisonResult` record, CSV tables, file-name slugs, the table
of runs compared, and the offline report page (the run report's machinery, prompt text escaped).

The report's drawing code is imported inside `write_report`, so importing the comparison stays light.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokentrail.compare.alignment import ModelRun
from tokentrail.compare.options import CompareOptions
from tokentrail.compare.ordering import verdict_sentences

__all__ = ["ComparisonResult", "model_rows", "slug", "write_report"]


@dataclass
class ComparisonResult:
    """Everything `compare_runs` computed and wrote; `cka` is keyed by (label of A, label of B) and holds the
    matrices (`cka`, `debiased`, `null_mean`, `null_p95`, `p_value`), `alignment` rows and a `summary`;
    `mutual_knn`, keyed alike, holds the mutual kNN matrix (`mutual_knn`), its `chance` level, `k`, the best
    match per layer (`alignment`) and a `summary`."""

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
    mutual_knn: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)


def slug(text: str) -> str:
    """A model label as a file-name part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def model_rows(runs: Sequence[ModelRun]) -> list[dict[str, Any]]:
    """One row per run compared: its model, weights, depth, width and prompts."""
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


def write_report(out_dir: Path, runs: Sequence[ModelRun], comparison: ComparisonResult,
                 separation_summary: list[dict[str, Any]], ordering_means: list[dict[str, Any]],
                 options: CompareOptions) -> Path:
    """OUT/report.html: the runs, separation, CKA and mutual kNN per pair, bifurcations and ordering, with their
    figures."""
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
        knn = comparison.mutual_knn.get((label_a, label_b))
        if knn is not None:
            sections.append(_mutual_knn_section(label_a, label_b, knn))
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


def _mutual_knn_section(label_a: str, label_b: str, pair: dict[str, Any]) -> dict[str, Any]:
    """The report section of one pair's mutual kNN alignment: what it measures, its chance level, the maximum."""
    s = pair["summary"]
    if s["max mutual kNN"] is None:
        where = "no layer of either model has neighbour structure (all prompts' states point one way)"
    else:
        where = (f"the highest is {s['max mutual kNN']:.2f}, between {label_a} layer {s[f'max at {label_a} layer']} "
                 f"and {label_b} layer {s[f'max at {label_b} layer']}; at matched depth the mean is "
                 f"{s['mean mutual kNN at matched depth']:.2f}, above chance at "
                 f"{s['matched-depth layers above chance']} of {s['matched-depth layers']} layers")
    return {
        "title": f"Mutual {s['k']}-NN alignment: {label_a} vs {label_b}",
        "text": (
            f"For each prompt, its {s['k']} nearest other prompts by cosine distance in a layer of {label_a} and "
            f"in a layer of {label_b} ({s['features']} hidden units); the alignment is the mean share of those "
            f"neighbours the two models have in common (1: the same neighbours for every prompt). Unrelated "
            f"neighbour sets share k/(n-1) = {s['k']}/{s['n_prompts'] - 1} = {s['chance k/(n-1)']:.2f} on average "
            f"(the chance level, whatever the hidden sizes: unlike plain CKA's baseline it does not rise with "
            f"the number of hidden units); with {s['n_prompts']} prompts values near it are noise. Here {where}. "
            f"Every cell is in tables/mutual_knn_*.csv."
        ),
        "tables": {"summary": [s], "best match by layer": pair["alignment"]},
    }
