"""Gather the evidence of docs/claims.md: every seed claim read off real runs, with 95 % bootstrap intervals.

Each run directory is what `tokentrail trace --preset PRESET --model MODEL --out DIR` writes (or `tokentrail run`).
The readings come from `tokentrail.api.Run.analyze`, the same computation `tokentrail analyze` writes into
metrics/ and summary.json; the options are those docs/claims.md gives in each row's command: the seed presets
as the seed analysed them (no hold-out), the large presets with `--holdout`.

    python benchmarks/claims.py --runs runs            # expects runs/{default,gemma3-270m}-{preset}/
    python benchmarks/claims.py --runs runs --out benchmarks/results/claims.json
    python benchmarks/claims.py --write-pairs docs/claims/claim-pairs.yaml   # the paired prompt set (shipped)

The paired set tests the seed's prompt-15 and prompt-17 readings with everything else held equal: the same
docstring prose with and without the triple quotes of prompt 15, and the same pseudocode line with its numbers
as digits (prompt 17's "10") or as words (prompt 18's "zero", "one"). It is built from spectrum-large, with 100
pure-story, pure-code and pure-math prompts as the axes' ends; its run is runs/MODEL-claim-pairs.

Writes one JSON document with every reading, and prints it as markdown for checking against the doc.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from tokentrail.analysis.category_intervals import category_intervals
from tokentrail.analysis.separation import best_separation_layer
from tokentrail.api import open_run
from tokentrail.core.jsonable import json_ready

MODELS = ("default", "gemma3-270m")
PRESETS = ("seed-categories", "seed-spectrum", "categories-large", "spectrum-large", "claim-pairs")
_UNITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
# Prompt 15's docstring quotes, around prose of the same kind as prompt 13.
QUOTES = "'" * 3
PAIR_SUFFIXES = {"docstring-plain": "plain", "docstring-quoted": "quoted", "pseudocode-digits": "digits",
                 "pseudocode-words": "words"}


def number_words(number: int) -> str:
    """0..999 in English words ("forty-two"), as pseudocode spells prompt 18's "zero" and "one"."""
    if number < 20:
        return _UNITS[number]
    if number < 100:
        return _TENS[number // 10] + ("" if number % 10 == 0 else "-" + _UNITS[number % 10])
    rest = number % 100
    return f"{_UNITS[number // 100]} hundred" + ("" if rest == 0 else " and " + number_words(rest))


def pair_prompts() -> list[dict[str, str]]:
    """The paired prompt set of the module docstring, in a fixed order."""
    from tokentrail.prompts import load_preset

    spectrum = load_preset("spectrum-large")
    by_category: dict[str, list[str]] = {}
    for text, category in zip(spectrum.texts, spectrum.categories):
        by_category.setdefault(category, []).append(text)
    prompts = [{"id": f"{category}-{n:03d}", "category": category, "text": text}
               for category in ("pure-story", "pure-code", "pure-math")
               for n, text in enumerate(by_category[category][:100])]
    prose = [text for text in by_category["docstrings"] if not text.lstrip().startswith("#")]
    for n, text in enumerate(prose):
        prompts.append({"id": f"docstring-{n:03d}-plain", "category": "docstring-plain", "text": text})
        prompts.append({"id": f"docstring-{n:03d}-quoted", "category": "docstring-quoted",
                        "text": f"{QUOTES} {text} {QUOTES}"})
    with_digits = [text for text in by_category["pseudocode"] if re.search(r"\d", text)]
    for n, text in enumerate(with_digits):
        prompts.append({"id": f"pseudocode-{n:03d}-digits", "category": "pseudocode-digits", "text": text})
        prompts.append({"id": f"pseudocode-{n:03d}-words", "category": "pseudocode-words",
                        "text": re.sub(r"\d+", lambda match: number_words(int(match.group())), text)})
    return prompts


def write_pairs(path: Path) -> None:
    import yaml

    document = {"name": "claim-pairs",
                "description": "Paired prompts for the seed's prompt-15 (triple quotes) and prompt-17 (digits) "
                               "readings, built from spectrum-large by benchmarks/claims.py --write-pairs",
                "prompts": pair_prompts()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=1000), encoding="utf-8")


def _paired(result, trace, first: str, second: str) -> dict[str, Any]:
    """Per pair (the same number in the ids), the axis score of `second` minus that of `first` at every layer:
    the mean difference with its 95 % bootstrap interval over pairs, at the last layer, and how many layers have
    the whole interval above or below 0."""
    from tokentrail.analysis.intervals import stratified_bootstrap_mean

    index = {pid: i for i, pid in enumerate(trace.prompt_ids)}
    numbers = sorted({pid.rsplit("-", 1)[0] for pid, c in zip(trace.prompt_ids, trace.categories) if c == first})
    scores = result.axis_score
    differences = np.stack([scores[index[f"{n}-{PAIR_SUFFIXES[second]}"]] - scores[index[f"{n}-{PAIR_SUFFIXES[first]}"]]
                            for n in numbers])  # [pairs, layers]
    low, high = stratified_bootstrap_mean(differences, ["pairs"] * len(numbers))
    mean = differences.mean(axis=0)
    return {"pairs": len(numbers), "last": _triple(mean[-1], low[-1], high[-1]),
            "layers_above_zero": int(np.sum(low > 0)), "layers_below_zero": int(np.sum(high < 0)),
            "layers": int(mean.size), "by_layer": [_triple(m, lo, hi) for m, lo, hi in zip(mean, low, high)]}


def gather_pairs(run_dir: Path) -> dict[str, Any]:
    run = open_run(run_dir)
    options = {"holdout": True, "n_permutations": 1000, "n_bootstrap": 1000}
    toward_code = run.analyze(**options, axis=("pure-story", "pure-code"))
    toward_math = run.analyze(**options, axis=("pure-story", "pure-math"))
    return json_ready({
        "run": str(run_dir), "options": options, "prompts": len(run.trace),
        "quotes_story_to_code": _paired(toward_code, run.trace, "docstring-plain", "docstring-quoted"),
        "digits_story_to_math": _paired(toward_math, run.trace, "pseudocode-words", "pseudocode-digits"),
        "digits_story_to_code": _paired(toward_code, run.trace, "pseudocode-words", "pseudocode-digits"),
    })




def _triple(value: float, low: float, high: float) -> list[float]:
    return [float(value), float(low), float(high)]


def _separation(result) -> dict[str, Any]:
    sep = result.separation
    best = best_separation_layer(sep)
    knn = result.category_separation["knn_accuracy"] if result.category_separation else None
    return {
        "n_layers": int(np.asarray(result.depth_projection).shape[1]),
        "best_layer": best,
        "silhouette": _triple(sep["silhouette"][best], sep["silhouette_low"][best], sep["silhouette_high"][best]),
        "knn_accuracy": _triple(sep["knn_accuracy"][best], sep["knn_accuracy_low"][best],
                                sep["knn_accuracy_high"][best]),
        "chance": sep["chance"],
        "p_value": float(sep["p_value"][best]),
        "p_value_floor": sep["p_value_floor"],
        "significant_layers": int(np.sum(np.asarray(sep["p_value"]) <= 0.05)),
        "knn_by_category_at_best": None if knn is None else {
            name: _triple(knn.mean[c, best], knn.low[c, best], knn.high[c, best]) for c, name in enumerate(knn.names)},
    }


def _components(result) -> dict[str, Any]:
    rows = result.component_readings or []
    last = int(np.asarray(result.layers)[-1])
    found: dict[str, Any] = {}
    for row in rows:
        if row["layer"] is None or row["layer"] == last:
            key = row["reading"] if row["layer"] is None else f"{row['reading']}_last_layer"
            found.setdefault(row["component"], {})[key] = _triple(row["value"], row["low"], row["high"])
            if row.get("chance") is not None:
                found[row["component"]]["category_share_chance"] = row["chance"]
    # The layers at which each component's category share lies above chance with its whole interval.
    for component, readings in found.items():
        shares = [r for r in rows if r["reading"] == "category_share" and r["component"] == component]
        readings["layers_category_share_above_chance"] = sum(r["low"] > r["chance"] for r in shares)
        readings["layers"] = len(shares)
    found["explained_variance_ratio"] = [float(v) for v in result.explained_variance_ratio]
    return found


def _order(result, layer: int = -1) -> list[dict[str, Any]]:
    found = result.axis_intervals
    order = np.argsort(found.mean[:, layer], kind="stable")
    return [{"category": found.names[c], "mean": _triple(found.mean[c, layer], found.low[c, layer],
                                                       found.high[c, layer]),
             "rank": [int(found.rank_low[c, layer]), int(found.rank_high[c, layer])],
             "below_next": None if np.isnan(found.order_holds[c, layer]) else float(found.order_holds[c, layer])}
            for c in order]


def _between(result, category: str, threshold: float = 0.5) -> dict[str, Any]:
    """Where a category's mean axis score sits against `threshold` at every layer: how many layers have its whole
    interval below, above, or straddling it, and its last-layer reading."""
    found = result.axis_intervals
    c = found.names.index(category)
    return {"below": int(np.sum(found.high[c] < threshold)), "above": int(np.sum(found.low[c] > threshold)),
            "layers": int(found.mean.shape[1]),
            "below_at": np.flatnonzero(found.high[c] < threshold).tolist(),
            "above_at": np.flatnonzero(found.low[c] > threshold).tolist(),
            "last": _triple(found.mean[c, -1], found.low[c, -1], found.high[c, -1])}


def _pair_order(result, trace, first: str, second: str) -> dict[str, Any]:
    """At which layers `first`'s mean axis score lies below `second`'s in at least 97.5 % of resamples, and at
    which above."""
    labels = np.asarray(trace.categories)
    rows = np.flatnonzero(np.isin(labels, [first, second]))
    found = category_intervals(result.axis_score[rows], labels[rows].tolist())
    a = found.names.index(first)
    below = [layer for layer in range(found.mean.shape[1])
             if found.rank[a, layer] == 1 and found.order_holds[a, layer] >= 0.975]
    above = [layer for layer in range(found.mean.shape[1])
             if found.rank[a, layer] == 2 and found.order_holds[1 - a, layer] >= 0.975]
    return {"below_at": below, "above_at": above, "layers": int(found.mean.shape[1])}


def _bifurcation(result) -> dict[str, Any]:
    found = result.bifurcation_intervals
    return {name: {"bifurcating": [int(found.bifurcating[c]), int(found.prompts[c])],
                   "share": _triple(found.share[c], found.share_low[c], found.share_high[c]),
                   "mean_layer": _triple(found.mean_layer[c], found.mean_layer_low[c], found.mean_layer_high[c])}
            for c, name in enumerate(found.names)}


def _subgroups(result, trace, category: str, pattern: str, names: tuple[str, str]) -> dict[str, Any]:
    """A category's prompts split by whether their text matches `pattern`; each group's mean axis score at the
    last layer, and how often the first group stays below the second in resamples."""
    labels = np.asarray(trace.categories)
    rows = np.flatnonzero((labels == category) & np.isfinite(result.axis_score).all(axis=1))
    groups = [names[0] if re.search(pattern, trace.prompts[i]) else names[1] for i in rows]
    found = category_intervals(result.axis_score[rows][:, -1:], groups)
    out = {name: {"prompts": int(found.counts[c]), "mean": _triple(found.mean[c, 0], found.low[c, 0],
                                                                   found.high[c, 0])}
           for c, name in enumerate(found.names)}
    lower = int(np.argmin(found.mean[:, 0]))
    out["lower"] = found.names[lower]
    out["lower_in_resamples"] = float(found.order_holds[lower, 0])
    return out


def _prompt(result, trace, label: str) -> dict[str, Any]:
    from tokentrail.analysis.bifurcation import explain_prompt

    index = trace.labels.index(label)
    explained = explain_prompt(trace.states, trace.categories, index, sustain=2)
    early = slice(1, 1 + (len(explained.step) - 1) // 3)  # the first third of the blocks
    ratio = explained.step[early] / explained.category_step[early]
    return {"text": trace.prompts[index], "bifurcation_layer": explained.layer, "toward": explained.toward,
            "axis_score_last": float(result.axis_score[index, -1]),
            # its step into each early layer over the mean step of the rest of its category: the seed's "large
            # velocity in one or two layers"
            "largest_early_step_ratio": [float(np.max(ratio)), int(np.argmax(ratio)) + 1]}


def gather(run_dir: Path, preset: str) -> dict[str, Any]:
    if preset == "claim-pairs":
        return gather_pairs(run_dir)
    run = open_run(run_dir)
    large = preset.endswith("-large")
    options = {"holdout": large, "n_permutations": 1000, "n_bootstrap": 1000}
    started = time.perf_counter()
    result = run.analyze(**options)
    evidence: dict[str, Any] = {"run": str(run_dir), "options": options, "prompts": len(run.trace),
                                "axis": list(result.axis), "separation": _separation(result),
                                "components": _components(result), "order_last_layer": _order(result),
                                "bifurcation": _bifurcation(result)}
    evidence["seconds_default_analysis"] = round(time.perf_counter() - started, 1)
    if "spectrum" in preset:
        toward_math = run.analyze(**options, axis=("pure-story", "pure-math"))
        evidence["word_problems_story_to_math"] = _between(toward_math, "word-problems")
        evidence["word_story_math_order"] = {
            "word_below_math_on_story_code": _pair_order(result, run.trace, "word-problems", "pure-math"),
            "story_below_word_on_story_code": _pair_order(result, run.trace, "pure-story", "word-problems")}
        evidence["pseudocode_digits_story_to_math"] = _subgroups(
            toward_math, run.trace, "pseudocode", r"\d", ("digits", "number words"))
        evidence["docstrings_comment_story_to_code"] = _subgroups(
            result, run.trace, "docstrings", r"^\s*#", ("comment", "prose"))
        if not large:
            evidence["prompt_15"] = _prompt(result, run.trace, "15")
            evidence["prompt_17"] = _prompt(toward_math, run.trace, "17")
            evidence["prompt_17"]["pseudocode_others_story_to_math"] = [
                float(toward_math.axis_score[run.trace.labels.index(label), -1]) for label in ("16", "18")]
    else:
        evidence["positions_last_layer"] = {name: _between(result, name) for name in result.axis_intervals.names}
        evidence["logic_below_creative"] = _pair_order(result, run.trace, "logic-syllogism", "creative-poetry")
        evidence["logic_below_math"] = _pair_order(result, run.trace, "logic-syllogism", "math")
        evidence["history_below_math"] = _pair_order(result, run.trace, "history-facts", "math")
    return json_ready(evidence)


def _text(value: list[float | None], digits: int = 2) -> str:
    if value[0] is None:
        return "-"
    if value[1] is None:
        return f"{value[0]:.{digits}f}"
    return f"{value[0]:.{digits}f} [{value[1]:.{digits}f}, {value[2]:.{digits}f}]"


def markdown(everything: dict[str, Any]) -> str:
    lines = []
    for key, evidence in everything.items():
        if "separation" not in evidence:
            lines.append(f"## {key} ({evidence['prompts']} prompts)")
            for name in ("quotes_story_to_code", "digits_story_to_math", "digits_story_to_code"):
                found = evidence[name]
                lines.append(f"- {name}: last {_text(found['last'], 3)}; interval above 0 at "
                             f"{found['layers_above_zero']}, below at {found['layers_below_zero']} of "
                             f"{found['layers']} layers ({found['pairs']} pairs)")
            lines.append("")
            continue
        sep = evidence["separation"]
        lines.append(f"## {key} ({evidence['prompts']} prompts, axis {' -> '.join(evidence['axis'])})")
        lines.append(f"- separation: best layer {sep['best_layer']} of {sep['n_layers'] - 1}, silhouette "
                     f"{_text(sep['silhouette'], 3)}, kNN {_text(sep['knn_accuracy'])} (chance {sep['chance']:.2f}), "
                     f"p {sep['p_value']:.4f} (floor {sep['p_value_floor']:.4f}), significant at "
                     f"{sep['significant_layers']} layers")
        lines.append("- kNN by category at best: " + ", ".join(
            f"{name} {_text(v)}" for name, v in sep["knn_by_category_at_best"].items()))
        comp = evidence["components"]
        for pc in ("pc1", "pc2"):
            c = comp[pc]
            lines.append(f"- {pc}: depth rho {_text(c['depth_spearman'])}; category share last "
                         f"{_text(c['category_share_last_layer'])} (chance {c['category_share_chance']:.3f}; above "
                         f"chance at {c['layers_category_share_above_chance']}/{c['layers']} layers); axis r last "
                         f"{_text(c['axis_correlation_last_layer'])}")
        lines.append(f"- explained variance {comp['explained_variance_ratio']}")
        lines.append("- order at last layer: " + " < ".join(
            f"{row['category']} {_text(row['mean'])} r{row['rank'][0]}-{row['rank'][1]}"
            + (f" ({row['below_next']:.3f})" if row["below_next"] is not None else "")
            for row in evidence["order_last_layer"]))
        lines.append("- bifurcation: " + ", ".join(
            f"{name} {v['bifurcating'][0]}/{v['bifurcating'][1]} share {_text(v['share'])} layer "
            f"{_text(v['mean_layer'], 1)}"
            for name, v in evidence["bifurcation"].items()))
        for extra in ("word_problems_story_to_math", "pseudocode_digits_story_to_math",
                      "docstrings_comment_story_to_code", "prompt_15", "prompt_17", "positions_last_layer",
                      "logic_below_creative", "logic_below_math", "history_below_math", "word_story_math_order"):
            if extra in evidence:
                lines.append(f"- {extra}: {json.dumps(evidence[extra])}")
        lines.append(f"- analysis took {evidence['seconds_default_analysis']} s")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, help="folder holding MODEL-PRESET run directories")
    parser.add_argument("--write-pairs", type=Path, help="write the paired prompt set here and stop")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "claims.json")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--presets", default=",".join(PRESETS))
    args = parser.parse_args()
    if args.write_pairs:
        write_pairs(args.write_pairs)
        return
    if args.runs is None:
        parser.error("--runs is required")
    everything = {}
    for model in args.models.split(","):
        for preset in args.presets.split(","):
            run_dir = args.runs / f"{model}-{preset}"
            print(f"[claims] {run_dir}", file=sys.stderr, flush=True)
            everything[f"{model}/{preset}"] = gather(run_dir, preset)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(everything, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(markdown(everything))


if __name__ == "__main__":
    main()
