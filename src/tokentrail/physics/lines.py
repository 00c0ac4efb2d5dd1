"""`tokentrail lines-of-thought`: the Lines-of-Thought replication (arXiv 2410.01545) on any model.

Many pseudo-sentences (`tasks.pseudo_sentences`) are traced into a run directory like any prompt set (resumable),
and their last tokens' trajectories over layers 1..L (the embedding left out, and layer L taken before the final
norm, as the paper does) are measured by `analysis.lines_of_thought`: singular directions per layer, the linear
drift, the residuals' statistics and lambda, reported beside the paper's GPT-2 medium figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tokentrail.analysis.lines_of_thought import PAPER_LAMBDA, directions_needed, drift_residuals, fit_lambda
from tokentrail.atomic import atomic_write_json
from tokentrail.core.jsonable import json_ready
from tokentrail.core.settings import BatchSettings
from tokentrail.core.trace import TraceOptions
from tokentrail.errors import TokentrailError
from tokentrail.metrics import write_rows
from tokentrail.prompts import Prompt, PromptSet
from tokentrail.runs import figure_meta, load_trace, trace_run
from tokentrail.tasks.pseudo_sentences import CATEGORY, pseudo_sentences
from tokentrail.viz.static.dynamics import Panel, draw_panels
from tokentrail.viz.static.style import save_drawn

if TYPE_CHECKING:  # annotations only
    from tokentrail.models.settings import ModelSettings

__all__ = ["lines_of_thought_run"]

ENERGY = 0.9


def lines_of_thought_run(out_dir: str | Path, model: ModelSettings, sentences: int = 500, words: int = 30,
                         batching: BatchSettings = BatchSettings(), show_progress: bool = True) -> dict[str, Any]:
    """Trace `sentences` pseudo-sentences of `words` words into `out_dir` (what is not there yet), measure them,
    write `lines_of_thought/` and `figures/lines_of_thought.png`, and return the summary."""
    try:
        made = pseudo_sentences(sentences, words)
    except ValueError as exc:
        raise TokentrailError(str(exc)) from None
    prompt_set = PromptSet(name="lines-of-thought", description=made.description, source=made.source,
                           prompts=[Prompt(id=f"lot-{i:05d}", text=text, category=CATEGORY)
                                    for i, text in enumerate(made.texts)])
    out_dir = Path(out_dir)
    outcome = trace_run(out_dir, prompt_set, model, TraceOptions(position="last", top_k=1, logit_lens=False),
                        batching, show_progress=show_progress)
    run, trace = load_trace(out_dir)
    states = np.asarray(trace.states, dtype=np.float64)[:, 1:]  # [N, L, H]: layers 1..L
    n_layers, hidden = states.shape[1], states.shape[2]
    counts, fractions = directions_needed(states, ENERGY)
    centred_counts, centred_fractions = directions_needed(states, ENERGY, centred=True)
    residuals = drift_residuals(states)
    lam, alpha = fit_lambda(residuals)
    ends = np.arange(n_layers)
    by_end = {key: np.array([np.nanmean(values[residuals.end == end]) if np.any(residuals.end == end) else np.nan
                             for end in ends])
              for key, values in (("variance", residuals.variance), ("kurtosis", residuals.excess_kurtosis),
                                  ("mean_over_sd", residuals.mean_over_sd))}
    layers = [{"layer": int(end) + 1, "directions_90": int(counts[end]), "fraction_90": float(fractions[end]),
               "centred_directions_90": int(centred_counts[end]), "centred_fraction_90": float(centred_fractions[end]),
               "residual_variance": by_end["variance"][end], "ln_residual_variance": np.log(by_end["variance"][end]),
               "residual_excess_kurtosis": by_end["kurtosis"][end], "residual_mean_over_sd": by_end["mean_over_sd"][end]}
              for end in ends]
    pairs = [{"start_layer": int(s) + 1, "end_layer": int(e) + 1, "residual_variance": v, "mean_over_sd": r,
              "excess_kurtosis": k}
             for s, e, v, r, k in zip(residuals.start, residuals.end, residuals.variance, residuals.mean_over_sd,
                                      residuals.excess_kurtosis)]
    folder = out_dir / "lines_of_thought"
    written = [write_rows(folder / "layers.csv", layers), write_rows(folder / "pairs.csv", pairs)]
    paper = {name: {"lambda_per_layer": value, "layers": depth, "lambda_per_unit_depth": value * depth}
             for name, (value, depth) in PAPER_LAMBDA.items()}
    summary = {
        "model": run["model"]["fingerprint"]["name"], "sentences": len(trace), "words": words,
        "source": prompt_set.source, "layers": n_layers, "hidden": hidden, "energy": ENERGY,
        "fraction_90_median": float(np.median(fractions)), "directions_90": counts,
        "centred_fraction_90_median": float(np.median(centred_fractions)), "centred_directions_90": centred_counts,
        # The end layer counts from layer 1 in the tables; the fit's slope does not depend on that offset.
        "lambda_per_layer": lam, "lambda_per_unit_depth": lam * n_layers, "alpha": alpha,
        "residual_excess_kurtosis_median": float(np.nanmedian(residuals.excess_kurtosis)),
        "residual_mean_over_sd_median": float(np.nanmedian(residuals.mean_over_sd)),
        "paper": paper, "traced": outcome.report.traced, "reused": outcome.report.reused,
    }
    summary["text"] = (
        f"{summary['model']}: {len(trace)} pseudo-sentences; {ENERGY:.0%} of each layer's ensemble takes a median "
        f"{summary['fraction_90_median']:.1%} of the {hidden} directions ({summary['centred_fraction_90_median']:.1%} "
        f"of its variance, centred); residuals around the linear drift have a "
        f"median excess kurtosis of {summary['residual_excess_kurtosis_median']:.2f} and a variance growing as "
        f"exp({lam:.3f} x layer) ({lam * n_layers:.2f} per unit depth over {n_layers} layers; GPT-2 medium in the "
        f"paper: 0.18 per layer, {paper['gpt2-medium']['lambda_per_unit_depth']:.2f} per unit depth).")
    xs = np.arange(1, n_layers + 1)

    panels = [
        Panel.run_wide("fraction", f"share of directions holding {ENERGY:.0%} of the ensemble (uncentred)",
                       "fraction of hidden", fractions, xs),
        Panel.run_wide("centred_fraction", f"the same for {ENERGY:.0%} of its variance (centred)",
                       "fraction of hidden", centred_fractions, xs),
        Panel.run_wide("variance", f"ln residual variance around the linear drift (slope lambda = {lam:.3f})",
                       "ln variance", np.log(by_end["variance"]), xs),
        Panel.run_wide("kurtosis", "residual excess kurtosis (0: Gaussian)", "excess kurtosis", by_end["kurtosis"],
                       xs, hline=0.0),
    ]
    figures = save_drawn(lambda: draw_panels(panels, figure_meta(run, trace), "lines of thought", ""),
                         out_dir / "figures" / "lines_of_thought")
    summary["files"] = [str(path.relative_to(out_dir)) for path in [*written, *figures]]
    atomic_write_json(folder / "summary.json", json_ready(summary))
    return json_ready(summary)
