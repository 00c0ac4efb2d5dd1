"""`tokentrail physics RUN_DIR`: every physics measure on a run, written beside its other results."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokentrail.analysis.pipeline import default_axis
from tokentrail.errors import TokentrailError
from tokentrail.physics.measures import PhysicsOptions, measure_stored, measure_with_model
from tokentrail.physics.outputs import physics_summary, write_physics
from tokentrail.runs import analysis_options, figure_meta, load_run_model, load_trace

if TYPE_CHECKING:  # annotations only
    from tokentrail.models.loading import LoadedModel

__all__ = ["physics_run"]


def physics_run(run_dir: str | Path, options: PhysicsOptions | None = None,
                loaded: LoadedModel | None = None) -> dict[str, Any]:
    """Measure the run (the stored states; with the energy or the expansion asked for, the run's own model too,
    or `loaded`), write `physics/` and the figures, and return the summary. A model that cannot be loaded, or a
    probe it does not allow, is noted in the summary and the rest is still measured."""
    options = options or PhysicsOptions()
    options.check()
    run_dir = Path(run_dir)
    run, trace = load_trace(run_dir)
    result = measure_stored(trace, options)
    if options.energy or options.expansion:
        try:
            model = loaded if loaded is not None else load_run_model(run_dir, run)[1]
        except TokentrailError as exc:
            result.notes.append(f"attention energy and expansion skipped: {exc}")
        else:
            measure_with_model(model, trace, options, result)
    saved = analysis_options(run)
    axis = tuple(saved.axis) if saved.axis is not None else default_axis(trace.categories)
    summary = physics_summary(result, trace.categories, axis, options)
    write_physics(run_dir, result, summary, trace.prompt_ids, trace.categories, trace.n_layers,
                  figure_meta(run, trace))
    return summary
