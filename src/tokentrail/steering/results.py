"""What a steering experiment measured: one `Condition` per arm, the table of rows, and the files written
(results.csv, random_draws.csv, problems.csv, summary.json, the gain heat map).

Rows of the table, all on the same problems:

- `baseline` (the word problem), the prompting conditions (`instruction`: an instruction before the word
  problem; `pure-math`: the same problem written as an expression) and, per steered cell (layer x alpha),
  `steer` (the direction) and `random` (the mean over the cell's random directions of the same norm: the
  null distribution, each draw in random_draws.csv).
- For every row: accuracy with its Wilson interval; the gain over the baseline with a paired 95 % interval
  (per-problem differences) and the exact McNemar p.
- For `steer` rows also: `p_holm` (McNemar p, Holm-adjusted across every steered cell of the grid),
  `null_p` (the share of the cell's random directions that gained at least as much, the steered one counted),
  `null_p_holm`, and `p_vs_random` (exact paired test, problem by problem, that the steered direction does
  better than one more random draw would: `statistics.exchangeable_p`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokentrail.core.trace import Trace
from tokentrail.metrics import write_rows
from tokentrail.steering.statistics import (
    empirical_p,
    exchangeable_p,
    holm,
    mcnemar_p,
    paired_interval,
    wilson_interval,
)
from tokentrail.steering.vectors import axis_score, centroids

# The prompting conditions, in the order they are reported; each rewrites only the prompt.
PROMPT_CONDITIONS = ("baseline", "instruction", "pure-math")
# Columns the report shows (summary.json's report_table, which runs.py reads).
REPORT_COLUMNS = ("condition", "layer", "alpha", "accuracy", "ci_low", "ci_high", "gain", "gain_low", "gain_high",
                  "p_vs_baseline", "p_holm", "null_p", "p_vs_random", "changed", "axis_shift_layer")


@dataclass
class Condition:
    """One arm of the experiment and what it produced on every problem."""

    name: str  # baseline, instruction, pure-math, steer, random
    layer: int | None
    alpha: float | None
    generations: list[str]
    extracted: list[float | None]
    correct: np.ndarray  # bool [N]
    states: np.ndarray | None  # float32 [N, L+1, H], last prompt token; None for random draws (not kept)
    seconds: float
    draw: int | None = None  # which random direction (random arms only)


@dataclass
class SteeringResult:
    """Everything `run_steering` measured; `rows` is results.csv, `files` what was written."""

    run_dir: Path
    rows: list[dict[str, Any]]
    settings: dict[str, Any]
    axis_profiles: dict[str, list[float]]
    draws: list[dict[str, Any]] = field(default_factory=list)
    confirm: dict[str, Any] | None = None
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    def row(self, condition: str, layer: int | None = None, alpha: float | None = None) -> dict[str, Any]:
        for row in self.rows:
            if row["condition"] == condition and row["layer"] == layer and row["alpha"] == alpha:
                return row
        raise KeyError((condition, layer, alpha))

    def summary_text(self) -> str:
        base = self.row("baseline")
        text = (f"{base['n']} generated word problems, greedy decoding. Baseline accuracy {_pct(base['accuracy'])} "
                f"[{_pct(base['ci_low'])}, {_pct(base['ci_high'])}]")
        for name, words in (("instruction", "with an instruction before them"), ("pure-math", "written as pure math")):
            if any(r["condition"] == name for r in self.rows):
                row = self.row(name)
                text += f"; {words}: {_pct(row['accuracy'])} ({_points(row['gain'])})"
        text += "."
        steered = [r for r in self.rows if r["condition"] == "steer"]
        if steered:
            best = max(steered, key=lambda r: (r["gain"], -r["layer"], -r["alpha"]))
            text += (
                f" Best of {len(steered)} steered cell(s): layer {best['layer']}, alpha {best['alpha']:g}: "
                f"{_pct(best['accuracy'])}, gain {_points(best['gain'])} [{_points(best['gain_low'])}, "
                f"{_points(best['gain_high'])}], McNemar p = {best['p_vs_baseline']:.3g} (Holm-adjusted over the "
                f"grid: {best['p_holm']:.3g})"
            )
            draws = self.settings.get("n_random_in_grid", self.settings.get("n_random", 0))
            if draws:
                text += f"; against {draws} random directions of the same norm: null p = {_fmt_p(best['null_p'])}"
            text += (". Chosen and measured on the same problems: only a held-out confirmation (--confirm) says "
                     "whether it holds.")
        if self.confirm:
            text += " " + self.confirm["text"]
        return text

    def section(self) -> dict[str, Any]:
        """The report's extra section: title, a one-paragraph reading, the heat map and the table."""
        figures = [self.files[k] for k in ("heatmap_png",) if k in self.files]
        table = [{c: rounded(row.get(c)) for c in REPORT_COLUMNS} for row in self.rows]
        return {"title": "Steering experiment", "text": self.summary_text(), "html_figures": figures,
                "table": table}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _points(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:+.1f} points"


def _fmt_p(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3g}"


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    return value


def condition_label(condition: Condition) -> str:
    if condition.layer is None:
        return condition.name
    label = f"{condition.name}@{condition.layer}x{condition.alpha:g}"
    return label if condition.draw is None else f"{label}#{condition.draw}"


def _compare(condition: Condition, baseline: Condition) -> dict[str, Any]:
    """Accuracy, its interval, and the paired comparison with the baseline on the same problems."""
    n, k = len(condition.correct), int(condition.correct.sum())
    low, high = wilson_interval(k, n)
    gained = int(np.sum(condition.correct & ~baseline.correct))
    lost = int(np.sum(~condition.correct & baseline.correct))
    differences = condition.correct.astype(np.float64) - baseline.correct.astype(np.float64)
    gain_low, gain_high = paired_interval(differences)
    return {"n": n, "correct": k, "accuracy": k / n, "ci_low": low, "ci_high": high,
            "gain": k / n - float(baseline.correct.mean()), "gain_low": gain_low, "gain_high": gain_high,
            "gained": gained, "lost": lost, "p_vs_baseline": mcnemar_p(gained, lost)}


def result_rows(
    conditions: Sequence[Condition],
    problems: Sequence[Any],
    trace: Trace,
    source: str,
    target: str,
    method: str,
    position: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The results table (one row per prompting condition, and a steer and a random row per cell) and the
    per-draw rows of the random directions. Axis scores use the run's `source` and `target` centroids."""
    baseline = next(c for c in conditions if c.name == "baseline")
    last = trace.n_layers
    steps = np.array([p.steps for p in problems])
    a_last, b_last = centroids(trace, last, source, target)
    base_last = float(np.mean(axis_score(baseline.states[:, last], a_last, b_last)))
    nan = float("nan")
    draws_by_cell: dict[tuple[int, float], list[Condition]] = {}
    for condition in conditions:
        if condition.name == "random":
            draws_by_cell.setdefault((condition.layer, condition.alpha), []).append(condition)
    rows: list[dict[str, Any]] = []
    draw_rows: list[dict[str, Any]] = []
    for condition in conditions:
        if condition.name == "random":
            continue
        row: dict[str, Any] = {
            "condition": condition.name, "layer": condition.layer, "alpha": condition.alpha,
            "method": "" if condition.layer is None else method,
            "position": "" if condition.layer is None else position,
            **_compare(condition, baseline),
            "p_holm": nan, "null_p": nan, "null_p_holm": nan, "p_vs_random": nan,
            "null_gain_mean": nan, "null_gain_max": nan,
            "accuracy_1step": float(condition.correct[steps == 1].mean()) if np.any(steps == 1) else nan,
            "accuracy_2step": float(condition.correct[steps == 2].mean()) if np.any(steps == 2) else nan,
            "changed": float(np.mean([g != b for g, b in zip(condition.generations, baseline.generations)])),
            "no_answer": float(np.mean([e is None for e in condition.extracted])),
            "axis_layer": nan, "axis_layer_baseline": nan, "axis_shift_layer": nan,
            "axis_last": nan, "axis_last_baseline": base_last, "axis_shift_last": nan,
            "seconds": round(condition.seconds, 2),
        }
        if condition.states is not None:
            axis_last = float(np.mean(axis_score(condition.states[:, last], a_last, b_last)))
            row.update(axis_last=axis_last, axis_shift_last=axis_last - base_last)
        if condition.layer is not None and condition.states is not None:
            a, b = centroids(trace, condition.layer, source, target)
            here = float(np.mean(axis_score(condition.states[:, condition.layer], a, b)))
            before = float(np.mean(axis_score(baseline.states[:, condition.layer], a, b)))
            row.update(axis_layer=here, axis_layer_baseline=before, axis_shift_layer=here - before)
        rows.append(row)
        draws = draws_by_cell.get((condition.layer, condition.alpha), []) if condition.name == "steer" else []
        if draws:
            null_rows = [_compare(draw, baseline) for draw in draws]
            null_gains = [r["gain"] for r in null_rows]
            row.update(null_p=empirical_p(row["gain"], null_gains), null_gain_mean=float(np.mean(null_gains)),
                       null_gain_max=float(np.max(null_gains)),
                       p_vs_random=exchangeable_p(condition.correct, np.stack([draw.correct for draw in draws])))
            changed = [float(np.mean([g != b for g, b in zip(draw.generations, baseline.generations)]))
                       for draw in draws]
            draw_rows += [{"layer": draw.layer, "alpha": draw.alpha, "draw": draw.draw, **compared, "changed": moved}
                          for draw, compared, moved in zip(draws, null_rows, changed)]
            accuracy = float(np.mean([r["accuracy"] for r in null_rows]))
            rows.append({
                **{key: nan for key in row}, "condition": "random", "layer": condition.layer,
                "alpha": condition.alpha, "method": f"random (mean of {len(draws)})", "position": position,
                "n": row["n"], "correct": float(np.mean([r["correct"] for r in null_rows])), "accuracy": accuracy,
                "ci_low": float(np.percentile([r["accuracy"] for r in null_rows], 2.5)),
                "ci_high": float(np.percentile([r["accuracy"] for r in null_rows], 97.5)),
                "gain": float(np.mean(null_gains)), "changed": float(np.mean(changed)),
                "seconds": round(sum(draw.seconds for draw in draws), 2),
            })
    steered = [row for row in rows if row["condition"] == "steer"]
    for key, adjusted in (("p_holm", holm([r["p_vs_baseline"] for r in steered])),
                          ("null_p_holm", holm([r["null_p"] for r in steered]))):
        for row, value in zip(steered, adjusted):
            row[key] = float(value)
    return rows, draw_rows


def problem_rows(conditions: Sequence[Condition], problems: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per problem and non-random condition: the generation, the number read from it, right or not."""
    rows = []
    for condition in conditions:
        if condition.name == "random":
            continue
        for i, problem in enumerate(problems):
            extracted = condition.extracted[i]
            rows.append({
                "problem": problem.id, "template": problem.template, "steps": problem.steps,
                "question": problem.question, "expression": problem.expression, "answer": problem.answer,
                "condition": condition.name, "layer": condition.layer, "alpha": condition.alpha,
                "generation": condition.generations[i],
                "extracted": "" if extracted is None else f"{extracted:g}",
                "correct": int(condition.correct[i]),
            })
    return rows


def random_answer_rows(conditions: Sequence[Condition], problems: Sequence[Any]) -> list[dict[str, Any]]:
    """Every random direction's answer to every problem, so the null distribution can be audited."""
    return [{"layer": c.layer, "alpha": c.alpha, "draw": c.draw, "problem": problem.id,
             "extracted": "" if c.extracted[i] is None else f"{c.extracted[i]:g}", "correct": int(c.correct[i])}
            for c in conditions if c.name == "random" for i, problem in enumerate(problems)]


def write_outputs(result: SteeringResult, conditions: Sequence[Condition], problems: Sequence[Any]) -> dict[str, Path]:
    from tokentrail.store import atomic_write_json
    from tokentrail.viz.steer_figures import plot_gain_heatmap

    out = result.run_dir / "steer"
    out.mkdir(parents=True, exist_ok=True)
    files = {"results": out / "results.csv", "random_draws": out / "random_draws.csv",
             "random_answers": out / "random_answers.csv", "problems": out / "problems.csv",
             "summary": out / "summary.json"}
    write_rows(files["results"], result.rows)
    write_rows(files["random_draws"], result.draws)
    write_rows(files["random_answers"], random_answer_rows(conditions, problems))
    write_rows(files["problems"], problem_rows(conditions, problems))
    if any(row["condition"] == "steer" for row in result.rows):
        png, svg = plot_gain_heatmap(result.rows, out / "gain_heatmap",
                                     title=f"{result.settings['model']['name']}: steering "
                                     f"{result.settings['source']} → {result.settings['target']}")
        files.update(heatmap_png=png, heatmap_svg=svg)
    templates = sorted({p.template for p in problems})
    by_template = {
        condition_label(c): {t: rounded(float(np.mean([ok for ok, p in zip(c.correct, problems) if p.template == t])))
                             for t in templates}
        for c in conditions if c.name != "random"
    }
    summary = {
        "settings": result.settings,
        "text": result.summary_text(),
        "rows": [{k: rounded(v) for k, v in row.items()} for row in result.rows],
        "report_table": result.section()["table"],
        "confirm": result.confirm,
        "accuracy_by_template": by_template,
        "axis_profiles": {k: [rounded(v) for v in values] for k, values in result.axis_profiles.items()},
        "files": {k: str(v.relative_to(result.run_dir)) for k, v in files.items() if k != "summary"},
    }
    atomic_write_json(files["summary"], summary)
    return files
