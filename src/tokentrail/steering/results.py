"""What a steering experiment measured: one `Condition` per arm, the table of rows, and the files written
(results.csv, problems.csv, summary.json, the gain heat map)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokentrail.core.trace import Trace
from tokentrail.steering.statistics import mcnemar_p, wilson_interval
from tokentrail.steering.vectors import axis_score, centroids


@dataclass
class Condition:
    """One arm of the experiment and what it produced on every problem."""

    name: str  # baseline, steer, random, pure-math
    layer: int | None
    alpha: float | None
    generations: list[str]
    extracted: list[float | None]
    correct: np.ndarray  # bool [N]
    states: np.ndarray  # float32 [N, L+1, H], last prompt token
    seconds: float


@dataclass
class SteeringResult:
    """Everything `run_steering` measured; `rows` is results.csv, `files` what was written."""

    run_dir: Path
    rows: list[dict[str, Any]]
    settings: dict[str, Any]
    axis_profiles: dict[str, list[float]]
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    def row(self, condition: str, layer: int | None = None, alpha: float | None = None) -> dict[str, Any]:
        for row in self.rows:
            if row["condition"] == condition and row["layer"] == layer and row["alpha"] == alpha:
                return row
        raise KeyError((condition, layer, alpha))

    def summary_text(self) -> str:
        base = self.row("baseline")
        ceiling = self.row("pure-math")
        steered = [r for r in self.rows if r["condition"] == "steer"]
        text = (
            f"{base['n']} generated word problems, greedy decoding. Baseline accuracy {_pct(base['accuracy'])} "
            f"[{_pct(base['ci_low'])}, {_pct(base['ci_high'])}]; the same problems written as pure math: "
            f"{_pct(ceiling['accuracy'])} [{_pct(ceiling['ci_low'])}, {_pct(ceiling['ci_high'])}]."
        )
        if steered:
            best = max(steered, key=lambda r: (r["gain"], -r["layer"], -r["alpha"]))
            control = self.row("random", best["layer"], best["alpha"])
            text += (
                f" Best steering cell: layer {best['layer']}, alpha {best['alpha']:g}: {_pct(best['accuracy'])} "
                f"(gain {best['gain'] * 100:+.1f} points, McNemar p = {best['p_vs_baseline']:.3g}); a random "
                f"direction of the same norm there: {_pct(control['accuracy'])} ({control['gain'] * 100:+.1f})."
                f" {len(steered)} cells were tested, so a single p < 0.05 is expected by chance about "
                f"{0.05 * len(steered):.1f} times."
            )
        return text

    def section(self) -> dict[str, Any]:
        """The report's extra section: title, a one-paragraph reading, the heat map and the table."""
        figures = [self.files[k] for k in ("heatmap_png",) if k in self.files]
        columns = ("condition", "layer", "alpha", "accuracy", "ci_low", "ci_high", "gain", "p_vs_baseline",
                   "changed", "no_answer", "axis_shift_layer", "axis_shift_last")
        table = [{c: _rounded(row[c]) for c in columns} for row in self.rows]
        return {"title": "Steering experiment", "text": self.summary_text(), "html_figures": figures,
                "table": table}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    return value


def condition_label(condition: Condition) -> str:
    return condition.name if condition.layer is None else f"{condition.name}@{condition.layer}x{condition.alpha:g}"


def result_rows(
    conditions: Sequence[Condition],
    problems: Sequence[Any],
    trace: Trace,
    source: str,
    target: str,
    method: str | Path,
    position: str,
) -> list[dict[str, Any]]:
    baseline = conditions[0]
    last = trace.n_layers
    steps = np.array([p.steps for p in problems])
    a_last, b_last = centroids(trace, last, source, target)
    base_last = float(np.mean(axis_score(baseline.states[:, last], a_last, b_last)))
    base_accuracy = float(baseline.correct.mean())
    rows = []
    for condition in conditions:
        n, k = len(condition.correct), int(condition.correct.sum())
        low, high = wilson_interval(k, n)
        gained = int(np.sum(condition.correct & ~baseline.correct))
        lost = int(np.sum(~condition.correct & baseline.correct))
        axis_last = float(np.mean(axis_score(condition.states[:, last], a_last, b_last)))
        row: dict[str, Any] = {
            "condition": condition.name,
            "layer": condition.layer,
            "alpha": condition.alpha,
            "method": "" if condition.layer is None else ("random" if condition.name == "random" else str(method)),
            "position": "" if condition.layer is None else position,
            "n": n,
            "correct": k,
            "accuracy": k / n,
            "ci_low": low,
            "ci_high": high,
            "gain": k / n - base_accuracy,
            "gained": gained,
            "lost": lost,
            "p_vs_baseline": mcnemar_p(gained, lost),
            "accuracy_1step": float(condition.correct[steps == 1].mean()) if np.any(steps == 1) else float("nan"),
            "accuracy_2step": float(condition.correct[steps == 2].mean()) if np.any(steps == 2) else float("nan"),
            "changed": float(np.mean([g != b for g, b in zip(condition.generations, baseline.generations)])),
            "no_answer": float(np.mean([e is None for e in condition.extracted])),
            "axis_layer": float("nan"),
            "axis_layer_baseline": float("nan"),
            "axis_shift_layer": float("nan"),
            "axis_last": axis_last,
            "axis_last_baseline": base_last,
            "axis_shift_last": axis_last - base_last,
            "seconds": round(condition.seconds, 2),
        }
        if condition.layer is not None:
            a, b = centroids(trace, condition.layer, source, target)
            here = float(np.mean(axis_score(condition.states[:, condition.layer], a, b)))
            before = float(np.mean(axis_score(baseline.states[:, condition.layer], a, b)))
            row.update(axis_layer=here, axis_layer_baseline=before, axis_shift_layer=here - before)
        rows.append(row)
    return rows


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return value


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    from tokentrail.store import atomic_write_bytes

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def write_outputs(result: SteeringResult, conditions: Sequence[Condition], problems: Sequence[Any]) -> dict[str, Path]:
    from tokentrail.store import atomic_write_json
    from tokentrail.viz.steer_figures import plot_gain_heatmap

    out = result.run_dir / "steer"
    out.mkdir(parents=True, exist_ok=True)
    files = {"results": out / "results.csv", "problems": out / "problems.csv", "summary": out / "summary.json"}
    _write_csv(files["results"], result.rows)
    long_rows = []
    for condition in conditions:
        for i, problem in enumerate(problems):
            extracted = condition.extracted[i]
            long_rows.append({
                "problem": problem.id, "template": problem.template, "steps": problem.steps,
                "question": problem.question, "expression": problem.expression, "answer": problem.answer,
                "condition": condition.name, "layer": condition.layer, "alpha": condition.alpha,
                "generation": condition.generations[i],
                "extracted": "" if extracted is None else f"{extracted:g}",
                "correct": int(condition.correct[i]),
            })
    _write_csv(files["problems"], long_rows)
    png, svg = plot_gain_heatmap(result.rows, out / "gain_heatmap", title=f"{result.settings['model']['name']}: "
                                 f"steering {result.settings['source']} → {result.settings['target']}")
    files.update(heatmap_png=png, heatmap_svg=svg)
    templates = sorted({p.template for p in problems})
    by_template = {
        condition_label(c): {t: _rounded(float(np.mean([ok for ok, p in zip(c.correct, problems) if p.template == t])))
                    for t in templates}
        for c in conditions
    }
    summary = {
        "settings": result.settings,
        "text": result.summary_text(),
        "rows": [{k: _rounded(v) for k, v in row.items()} for row in result.rows],
        "accuracy_by_template": by_template,
        "axis_profiles": {k: [_rounded(v) for v in values] for k, values in result.axis_profiles.items()},
        "files": {k: str(v.relative_to(result.run_dir)) for k, v in files.items() if k != "summary"},
    }
    atomic_write_json(files["summary"], summary)
    return files
