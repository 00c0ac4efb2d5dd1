"""The notebook face of tokentrail, what `import tokentrail as tt` offers:

    loaded = tt.load_model("default")                 # any causal LM, self-checked (see tokentrail.models)
    trace = tt.trace(["The capital of France is"], loaded)   # a Trace: states [P, L+1, H], next tokens, lens
    run = tt.trace_run("runs/mine", prompts, loaded)  # traced into a run directory (resumable), as a Run
    run = tt.open_run("runs/spectrum")                # a run directory made by `tokentrail run` or `trace`
    run.trace                                         # its Trace, read from the store (no model, no torch)
    result = run.analyze(normalize="rms")             # AnalysisResult; nothing is written
    run.tables(result)                                # {name: pandas.DataFrame}, the tables `analyze` writes
    run.figures(result)                               # {name: figure}: plotly trajectories, matplotlib panels
    run.report()                                      # writes RUN_DIR/report.html, returns its path

The command line does the same through `tokentrail.runs`; these functions add no numbers of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokentrail.core.trace import Trace, TraceOptions
from tokentrail.errors import TokentrailError
from tokentrail.prompts import PromptSet, load_prompt_file, prompt_set_from_data

if TYPE_CHECKING:
    from tokentrail.analysis.pipeline import AnalysisResult
    from tokentrail.explore import ExploreSession
    from tokentrail.models.loading import LoadedModel


def load_model(spec: str = "default", **options: Any) -> LoadedModel:
    """Load and self-check a model: `default`, an embedded name, a .gguf file, a model folder or a cached hub id.
    Options as `tokentrail.models.load_model`: revision, dtype ("float32", "bfloat16", "float16", "auto"),
    device, trust_remote_code, device_map, self_check."""
    from tokentrail.models import load_model as load

    return load(spec, **options)


def _prompt_set(prompts: Any) -> PromptSet:
    if isinstance(prompts, PromptSet):
        return prompts
    if isinstance(prompts, Path) or (isinstance(prompts, str) and Path(prompts).suffix
                                     and Path(prompts).is_file()):
        return load_prompt_file(prompts)
    return prompt_set_from_data(prompts)


def trace(
    prompts: Any,
    model: LoadedModel | str = "default",
    *,
    position: str | int = "last",
    top_k: int = 5,
    logit_lens: bool = True,
    chat: bool = False,
    truncate: bool = False,
    batch_size: int | None = 16,
) -> Trace:
    """Trace `prompts` through `model` and return the Trace.

    `prompts`: a list of texts, `{category: [texts]}`, a list of `{text, category, id, label}`, a PromptSet, or
    the path of a prompt file. `model`: a loaded model or a spec for `load_model`. The options are the CLI's
    (`--position`, `--top-k`, `--logit-lens`, `--chat`, `--truncate`, `--batch-size`; None sizes batches
    automatically). Nothing is stored: `tokentrail.runs.trace_run` traces into a run directory.
    """
    from tokentrail.tracing import Tracer

    prompt_set = _prompt_set(prompts)
    loaded = load_model(model) if isinstance(model, str) else model
    options = TraceOptions(position=str(position), top_k=top_k, logit_lens=logit_lens, chat=chat, truncate=truncate)
    tracer = Tracer(loaded, options, batch_size=batch_size)
    return tracer.trace(prompt_set.texts, prompt_ids=prompt_set.ids, categories=prompt_set.categories,
                        labels=prompt_set.labels)


@dataclass
class Run:
    """A run directory, read without a model. `settings` is its run.json."""

    path: Path
    settings: dict[str, Any] = field(repr=False)

    @cached_property
    def trace(self) -> Trace:
        """Every prompt's trace, read from the store once."""
        from tokentrail.runs import load_trace

        return load_trace(self.path)[1]

    def analyze(self, **options: Any) -> AnalysisResult:
        """The analysis with the run's saved options and `options` on top (the names of
        `tokentrail.analysis.AnalysisOptions`: layers, include_final, n_components, normalize, center, fit_on,
        axis, holdout, sustain, knn_k, n_permutations, n_bootstrap, seed). Nothing is written; `tokentrail
        analyze` writes the tables."""
        from tokentrail.analysis.pipeline import AnalysisOptions, analyze_states
        from tokentrail.runs import analysis_options, check_analysable

        unknown = sorted(set(options) - set(AnalysisOptions.__dataclass_fields__))
        if unknown:
            raise TokentrailError(f"unknown analysis option {unknown[0]!r}; use "
                                  f"{', '.join(AnalysisOptions.__dataclass_fields__)}")
        chosen = analysis_options(self.settings, **options)
        check_analysable(self.trace, self.path)
        try:
            return analyze_states(self.trace.states, self.trace.final_states, self.trace.categories, chosen,
                                  token_states=self.trace.token_states)
        except ValueError as exc:
            raise TokentrailError(f"cannot analyse {self.path}: {exc}") from None

    def tables(self, result: AnalysisResult | None = None) -> dict[str, Any]:
        """The analysis tables as pandas DataFrames, named as `analyze` names its CSV files (without `.csv`)."""
        try:
            import pandas as pd
        except ImportError:
            raise TokentrailError("tables as DataFrames need pandas: pip install pandas") from None
        from tokentrail.metrics import metric_tables

        result = result if result is not None else self.analyze()
        tables = metric_tables(result, self.trace.prompt_ids, self.trace.categories)
        return {name.removesuffix(".csv"): pd.DataFrame(rows, columns=header)
                for name, (header, rows) in tables.items()}

    def figures(self, result: AnalysisResult | None = None) -> dict[str, Any]:
        """The run's figures as objects a notebook shows inline: `trajectories_2d` and `trajectories_3d` (plotly,
        interactive), `trajectories`, `depth`, `dynamics`, `separation`, `intervals` and `logit_lens`
        (matplotlib; the last three only when the run has them). Nothing is written."""
        from tokentrail.runs import figure_meta
        from tokentrail.viz import interactive, static

        result = result if result is not None else self.analyze()
        meta = figure_meta(self.settings, self.trace)
        figures: dict[str, Any] = {"trajectories_2d": interactive.trajectories_figure(result, meta, 2)}
        if result.projection.shape[-1] >= 3:
            figures["trajectories_3d"] = interactive.trajectories_figure(result, meta, 3)
        with static.figure_style():
            drawn = {
                "trajectories": static.draw_trajectories(result, meta),
                "depth": static.draw_depth(result, meta),
                "dynamics": static.draw_dynamics(result, meta),
                "separation": static.draw_separation(result, meta),
                "intervals": static.draw_intervals(result, meta),
                "logit_lens": static.draw_logit_lens(meta),
            }
        figures.update({name: figure for name, figure in drawn.items() if figure is not None})
        return figures

    def report(self, fps: float = 4.0) -> Path:
        """Write RUN_DIR/report.html (figures, tables, prompts) as `tokentrail report` does; returns its path."""
        from tokentrail.runs import report_run

        return report_run(self.path, fps=fps)

    def physics(self, **options: Any) -> dict[str, Any]:
        """Run `tokentrail physics` on this run (options: those of `tokentrail.physics.PhysicsOptions`, e.g.
        `threshold=0.9, energy=False`); writes RUN_DIR/physics/ and returns its summary."""
        from tokentrail.physics import PhysicsOptions, physics_run

        return physics_run(self.path, PhysicsOptions(**options))


def trace_run(out_dir: str | Path, prompts: Any, model: LoadedModel | str = "default", *, position: str | int = "last",
              top_k: int = 5, logit_lens: bool = True, chat: bool = False, truncate: bool = False,
              batch_size: int | None = 16) -> Run:
    """Trace what `out_dir`'s store lacks of `prompts` (as `tokentrail trace --out OUT_DIR` does: resumable, a
    rerun traces nothing) and return the run. `model` is a loaded model or a spec, loaded only if needed."""
    from tokentrail.core.settings import BatchSettings
    from tokentrail.models.settings import ModelSettings
    from tokentrail.runs import trace_run as trace_into

    options = TraceOptions(position=str(position), top_k=top_k, logit_lens=logit_lens, chat=chat, truncate=truncate)
    settings = ModelSettings(spec=model) if isinstance(model, str) else model
    trace_into(Path(out_dir), _prompt_set(prompts), settings, options, BatchSettings(batch_size=batch_size),
               show_progress=False)
    return open_run(out_dir)


def open_run(path: str | Path) -> Run:
    """A run directory made by `tokentrail run` or `tokentrail trace`, refused in one line if it is not one."""
    from tokentrail.runs import read_run

    path = Path(path)
    return Run(path=path, settings=read_run(path))


def explore(path: str | Path, load: bool = True) -> ExploreSession:
    """The run at `path` opened as `tokentrail explore` opens it, without a web server: `.place(prompt)` traces a
    prompt live and places it on the run's map (`.live_json(...)` gives the API's answer), `.steer(...)`,
    `.add(...)`, `.stored_map()`. With `load`, the run's own model is loaded first (`.model_problem` says why not)."""
    from tokentrail.explore import ExploreSession

    session = ExploreSession(path)
    if load:
        session.load_model()
    return session
