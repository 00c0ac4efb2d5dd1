"""The `tokentrail` command. Thin: every command parses options and calls into the library."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from tokentrail._version import __version__
from tokentrail.errors import TokentrailError, first_line
from tokentrail.terminal import SafeConsole, VisibleFormatter, visible, warning_text

app = typer.Typer(
    name="tokentrail",
    help="Trace how a prompt's next-token state moves through a transformer's layers.",
    no_args_is_help=False,
    add_completion=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Every line tokentrail prints goes through these: user text is shown, never read as markup or terminal control.
out = SafeConsole()
err = SafeConsole(stderr=True)

DEFAULT_OUT = Path("tokentrail-out")
INTERRUPTED = "interrupted; rerun the same command to resume (traced shards are kept)"
DEFAULT_PRESET = "seed-categories"

# --- shared options --------------------------------------------------------------------------------------------
PromptsFile = Annotated[
    Path | None, typer.Argument(help="Prompts file (.yaml, .json, .csv, .txt). Default: --preset.", show_default=False)
]
PresetOpt = Annotated[str | None, typer.Option("--preset", "-p", help="Built-in prompt set (see `tokentrail presets`).")]
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="`default`, an embedded model name, a .gguf file, a local directory or a hub id.")
]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")]
DtypeOpt = Annotated[str, typer.Option(
    help="float32, bfloat16, float16, or auto: bfloat16 where the device computes it natively (a CUDA GPU of "
         "compute capability 8+, a CPU with AVX512_BF16 or AMX), float32 elsewhere. run.json records the one used.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, mps or auto.")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a model's own Python code to run.")]
DeviceMapOpt = Annotated[str | None, typer.Option("--device-map", help="Spread a large model over devices, e.g. auto.")]
SelfCheckOpt = Annotated[bool, typer.Option(
    "--self-check/--no-self-check",
    help="Check the tracer against the model's own output_hidden_states and logits before tracing (on by default; "
         "off also batches only prompts of equal length).")]
ChatOpt = Annotated[bool, typer.Option("--chat", help="Wrap each prompt in the tokenizer's chat template.")]
PositionOpt = Annotated[str, typer.Option(help="Token position to trace: last, all, or an index (0, -2, ...).")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="How many next-token candidates to keep.")]
LensOpt = Annotated[bool, typer.Option("--logit-lens/--no-logit-lens", help="Read out every layer through the final norm and unembedding.")]
TruncateOpt = Annotated[bool, typer.Option("--truncate", help="Keep the last tokens of a prompt longer than the context.")]
BatchOpt = Annotated[str, typer.Option("--batch-size", help="Prompts per forward pass, or auto: as many as padding and the memory budget allow.")]
ShardOpt = Annotated[int, typer.Option("--shard-size", help="Prompts per store shard (the unit of resumption).")]
EngineOpt = Annotated[str, typer.Option("--engine", help="local, or ray (pip install 'tokentrail[ray]').")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Ray actors, one model copy each.")]
RayAddressOpt = Annotated[str | None, typer.Option("--ray-address", help="Join an existing Ray cluster.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Run directory.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
LayersOpt = Annotated[
    str | None, typer.Option("--layers", help="Layers to project: all, a:b (python slice, L = last block), or 0,5,10. "
                                              "The projection only: dynamics, separation and bifurcations use every "
                                              "layer (summary.json: analysis_layers).")
]
FinalOpt = Annotated[bool | None, typer.Option("--include-final/--no-include-final", help="Add the final-normed state.")]
ComponentsOpt = Annotated[int | None, typer.Option("--components", help="PCA components: 2 or 3.")]
NormalizeOpt = Annotated[str | None, typer.Option("--normalize", help="none, rms or unit.")]
CenterOpt = Annotated[str | None, typer.Option("--center", help="global or per-layer.")]
FitOnOpt = Annotated[str | None, typer.Option("--fit-on", help="Comma-separated categories to fit the PCA on.")]
AxisOpt = Annotated[str | None, typer.Option("--axis", help="Two categories A,B: axis score 0 at A, 1 at B.")]
SustainOpt = Annotated[int | None, typer.Option("--sustain", help="Layers a prompt must stay outside its category.")]
PermOpt = Annotated[int | None, typer.Option("--permutations", help="Label permutations for p-values (at least 1).")]
BootstrapOpt = Annotated[int | None, typer.Option(
    "--bootstrap", help="Resamples of the prompts (within categories) for the 95 % intervals; 0: none.")]
HoldoutOpt = Annotated[bool | None, typer.Option(
    "--holdout/--no-holdout", help="Fit the axis on a seeded half of each axis category and score the other half.")]
FpsOpt = Annotated[float, typer.Option("--fps", help="Frames per second of the layer-by-layer GIF.")]
RunDirArg = Annotated[Path, typer.Argument(help="A run directory made by `tokentrail run` or `trace`.")]


def _model_settings(model: str, revision, dtype, device, trust_remote_code, device_map, self_check=True):
    from tokentrail.models.settings import ModelSettings
    from tokentrail.models.sources import check_device_name, dtype_name

    # A typo fails before anything is traced; whether the device is there is asked only when a model loads.
    check_device_name(device)
    dtype_name(dtype, "cpu" if dtype == "auto" and device == "auto" else device, device_map)
    return ModelSettings(spec=model, revision=revision, dtype=dtype, device=device,
                         trust_remote_code=trust_remote_code, device_map=device_map, self_check=self_check)


def _batch_size(value: str) -> int | None:
    if value.strip().lower() == "auto":
        return None
    try:
        count = int(value)
    except ValueError:
        raise TokentrailError(f"--batch-size must be a whole number or auto, got {value!r}") from None
    if count < 1:
        raise TokentrailError(f"--batch-size must be at least 1, got {count}")
    return count


def _blocked(folder: Path) -> tuple[Path, bool] | None:
    """Why nothing can be made inside `folder`: its nearest existing ancestor (itself included) and whether that
    is a file (else: not writable by this user); None when it can."""
    from tokentrail.atomic import nearest_existing

    existing = nearest_existing(folder) or Path(".")
    if not existing.is_dir():
        return existing, True
    if not os.access(existing, os.W_OK | os.X_OK):
        return existing, False
    return None


def _out_dir(path: Path, option: str = "--out") -> Path:
    """Refuse an out directory that cannot be one, before any work: a file, or a place this user cannot write."""
    path = Path(path)
    blocked = _blocked(path)
    if blocked is not None and blocked[1]:
        what = "is a file" if blocked[0] == path else f"cannot be made: {blocked[0]} is a file"
        raise TokentrailError(f"{option} {path} {what}, not a directory; choose another {option}")
    if blocked is not None:
        raise TokentrailError(f"{option} {path}: {blocked[0]} is not writable by you; choose another {option}")
    return path


def _out_file(path: Path, option: str = "--to") -> Path:
    """Refuse a target file that cannot be written, before any work: a directory, a parent that is a file."""
    path = Path(path)
    if path.is_dir():
        raise TokentrailError(f"{option} {path} is a directory; give a file path")
    blocked = _blocked(path.parent)
    if blocked is not None:
        why = "is a file, not a directory" if blocked[1] else "is not writable by you"
        raise TokentrailError(f"{option} {path} cannot be written: {blocked[0]} {why}")
    return path


def _fps(fps: float) -> float:
    from tokentrail.viz.animate import MAX_FPS, frame_duration_ms

    try:
        frame_duration_ms(fps)
    except ValueError:
        raise TokentrailError(f"--fps must be more than 0 and at most {MAX_FPS:g} frames per second, got {fps:g}") from None
    return fps


def _components(components: int | None) -> int | None:
    if components is not None and components not in (2, 3):
        raise TokentrailError(f"--components must be 2 or 3 (the figures draw 2-D and 3-D projections), got {components}")
    return components


def _permutations(value: int | None, option: str = "--permutations") -> int | None:
    # Every command that takes permutations reports a permutation p-value; with none, p would be 1 by
    # construction, a number that looks like a result and is not one.
    if value is not None and value < 1:
        raise TokentrailError(f"{option} must be at least 1 (the p-value is at least 1/({option[2:]} + 1)), got {value}")
    return value


def _bootstrap(value: int | None) -> int | None:
    if value is not None and value < 0:
        raise TokentrailError(f"--bootstrap must be 0 (no intervals) or more resamples, got {value}")
    return value


def _options_from(declared: Callable[..., None], into: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A decorator: the command's parameter `into` becomes the options `declared` lists, in its place, and the
    command receives them as one dict under that name. Commands that share a group of options declare it once."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        shared = list(inspect.signature(declared, eval_str=True).parameters.values())
        merged: list[inspect.Parameter] = []
        for parameter in inspect.signature(command, eval_str=True).parameters.values():
            merged.extend(shared if parameter.name == into else [parameter])
        shared_names = [p.name for p in shared]

        @functools.wraps(command)
        def with_options(**given: Any) -> None:
            group = {name: given.pop(name) for name in shared_names}
            command(**given, **{into: group})

        # Typer reads a command's options from its signature and annotations; these list the merged options.
        with_options.__signature__ = inspect.Signature(merged)  # type: ignore[attr-defined]
        with_options.__annotations__ = {p.name: p.annotation for p in merged}
        return with_options

    return decorate


def _model_option_list(model: ModelOpt = "default", revision: RevisionOpt = None, dtype: DtypeOpt = "float32",
                       device: DeviceOpt = "cpu", trust_remote_code: TrustOpt = False,
                       self_check: SelfCheckOpt = True) -> None:
    """The options of every command that loads a model, declared once (see `_options_from`)."""


# `loaded`: the model options of `_model_option_list` stand there.
@_options_from(_model_option_list, "loaded")
def _trace_options(prompts_file: PromptsFile = None, preset: PresetOpt = None, loaded: Any = None,
                   device_map: DeviceMapOpt = None, chat: ChatOpt = False, position: PositionOpt = "last",
                   top_k: TopKOpt = 5, logit_lens: LensOpt = True, truncate: TruncateOpt = False,
                   batch_size: BatchOpt = "16", shard_size: ShardOpt = 64, engine: EngineOpt = "local",
                   workers: WorkersOpt = 2, ray_address: RayAddressOpt = None, out_dir: OutOpt = DEFAULT_OUT,
                   quiet: QuietOpt = False) -> None:
    """The options `trace` and `run` share, declared once (see `_options_from`)."""


def _analysis_option_list(layers: LayersOpt = None, include_final: FinalOpt = None, components: ComponentsOpt = None,
                          normalize: NormalizeOpt = None, center: CenterOpt = None, fit_on: FitOnOpt = None,
                          axis: AxisOpt = None, sustain: SustainOpt = None, permutations: PermOpt = None,
                          bootstrap: BootstrapOpt = None, holdout: HoldoutOpt = None) -> None:
    """The options `analyze` and `run` share, declared once (see `_options_from`)."""


def _trace(traced: dict[str, Any], prompt_set=None):
    """Trace what the store lacks, with the options of `_trace_options`; returns the run's `TraceOutcome`."""
    from tokentrail.core.settings import BatchSettings, EngineSettings
    from tokentrail.core.trace import TraceOptions, parse_position
    from tokentrail.prompts import resolve_prompts
    from tokentrail.runs import trace_run

    o = SimpleNamespace(**traced)
    if prompt_set is None:
        prompt_set = resolve_prompts(o.prompts_file, o.preset, DEFAULT_PRESET)
    _out_dir(o.out_dir)
    parse_position(o.position)
    options = TraceOptions(position=o.position, chat=o.chat, top_k=o.top_k, logit_lens=o.logit_lens,
                           truncate=o.truncate)
    if o.shard_size < 1:
        raise TokentrailError(f"--shard-size must be at least 1, got {o.shard_size}")
    batch_count = _batch_size(o.batch_size)
    settings = _model_settings(o.model, o.revision, o.dtype, o.device, o.trust_remote_code, o.device_map,
                               o.self_check)
    if o.workers < 1:
        raise TokentrailError(f"--workers must be at least 1, got {o.workers}")
    outcome = trace_run(o.out_dir, prompt_set, settings, options, BatchSettings(batch_count, o.shard_size),
                        show_progress=not o.quiet, engine=EngineSettings(o.engine, o.workers, o.ray_address))
    for problem in outcome.report.problems:
        err.print(warning_text(problem))
    report = outcome.report
    err.print(
        f"traced {report.traced} prompt(s) in {report.forward_passes} forward pass(es), "
        f"{report.reused} read back from the store"
    )
    return outcome


@app.command(epilog="Example: `tokentrail trace --preset seed-spectrum --out runs/spectrum`")
@_options_from(_trace_options, "traced")
def trace(traced: dict[str, Any]) -> None:
    """Trace prompts into a run directory's store (only those not traced before)."""
    _trace(traced)
    out.print(f"store: {traced['out_dir'] / 'store'}")


@app.command(epilog="Example: `tokentrail run` (embedded model, seed-categories, ./tokentrail-out/)")
@_options_from(_trace_options, "traced")
@_options_from(_analysis_option_list, "analysed")
def run(traced: dict[str, Any], analysed: dict[str, Any], fps: FpsOpt = 4.0) -> None:
    """Trace what is missing, then run every analysis and figure, and say where the results are."""
    from tokentrail.prompts import resolve_prompts
    from tokentrail.runs import compute_analysis, report_run

    # Every option is checked before the model loads: a typo in an analysis option must not cost a trace.
    out_dir = traced["out_dir"]
    prompt_set = resolve_prompts(traced["prompts_file"], traced["preset"], DEFAULT_PRESET)
    _out_dir(out_dir)
    _fps(fps)
    options = _analysis_options(out_dir, prompt_set.categories, analysed)
    outcome = _trace(traced, prompt_set)
    trace_result = outcome.trace
    table = Table(title="next token per prompt", show_lines=False)
    for column in ("id", "category", "prompt", "top-1", "p"):
        table.add_column(column)
    for i in range(len(trace_result)):
        table.add_row(visible(trace_result.prompt_ids[i]), visible(trace_result.categories[i]),
                      visible(trace_result.prompts[i][:50]), repr(trace_result.next_tokens[i][0]),
                      f"{trace_result.next_token_probs[i][0]:.3f}")
    out.print(table)
    # One analysis for the tables, the figures and the report.
    computed = compute_analysis(out_dir, options)
    _analysis(out_dir, options, computed)
    report_path = report_run(out_dir, fps=fps, computed=computed)
    out.print(f"figures: {out_dir / 'figures'}")
    out.print(f"report: {report_path}")
    out.print(f"results: {out_dir.resolve()}")


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


def _analysis_options(run_dir: Path, categories: list[str] | None, analysed: dict[str, Any]):
    """The analysis options (the run's saved ones with `analysed` on top), checked against `categories` if given."""
    from tokentrail.runs import RUN_FILE, analysis_options, read_run

    o = SimpleNamespace(**analysed)
    axis = o.axis

    axis_pair = _split(axis)
    if axis_pair is not None and len(axis_pair) != 2:
        raise TokentrailError(f"--axis needs two categories A,B, got {axis!r}")
    run = read_run(run_dir) if (Path(run_dir) / RUN_FILE).is_file() else {}
    options = analysis_options(
        run, layers=o.layers, include_final=o.include_final, n_components=_components(o.components),
        normalize=o.normalize, center=o.center, fit_on=_split(o.fit_on), axis=axis_pair, sustain=o.sustain,
        n_permutations=_permutations(o.permutations), n_bootstrap=_bootstrap(o.bootstrap), holdout=o.holdout,
    )
    if categories is not None:
        try:
            options.validate(categories)
        except ValueError as exc:
            raise TokentrailError(f"cannot analyse {run_dir}: {exc}") from None
    return options


def _analysis(run_dir: Path, options, computed=None):
    from tokentrail.runs import analyze_run

    result, _ = analyze_run(run_dir, options, computed)
    summary = result.summary
    for warning in result.warnings:
        err.print(warning_text(warning))
    best = summary.get("best_separation_layer")
    if best is not None:
        interval = summary.get("best_silhouette_interval")
        shown = f" (95 % interval {interval[0]:.3f} to {interval[1]:.3f})" if interval else ""
        # At the floor no shuffle reached the observed value: the p-value is a bound, said as one.
        p_text = (f"p <= {summary['best_p_value']:.4f}, the smallest {summary['options']['n_permutations']} "
                  "permutations can give" if summary.get("best_p_value_at_floor")
                  else f"p = {summary['best_p_value']:.4f}")
        out.print(
            f"best category separation at layer {best}: silhouette {summary['best_silhouette']:.3f}{shown}, "
            f"kNN accuracy {summary['best_knn_accuracy']:.2f} (chance {summary['chance']:.2f}), "
            f"permutation {p_text}"
        )
    evr = ", ".join(f"{v:.3f}" for v in summary["explained_variance_ratio"])
    out.print(f"explained variance ratio: {evr}")
    out.print(f"tables: {Path(run_dir) / 'metrics'}  summary: {Path(run_dir) / 'summary.json'}")
    return result


@app.command(epilog="Example: `tokentrail analyze tokentrail-out --normalize rms --center per-layer`")
@_options_from(_analysis_option_list, "analysed")
def analyze(run_dir: RunDirArg, analysed: dict[str, Any]) -> None:
    """Recompute projection, dynamics, separation, bifurcations and transport from the store (no model)."""
    from tokentrail.runs import read_run

    read_run(run_dir)  # a directory that is not a run is refused as such, before any option
    _analysis(run_dir, _analysis_options(run_dir, None, analysed))


@app.command(epilog="Example: `tokentrail plot tokentrail-out --fps 6`")
def plot(run_dir: RunDirArg, fps: FpsOpt = 4.0) -> None:
    """Redraw every figure of a run from its store."""
    from tokentrail.runs import plot_run

    figures = plot_run(run_dir, fps=_fps(fps))
    for name, paths in figures.items():
        out.print(f"{name}: {', '.join(str(p) for p in paths)}")


@app.command(epilog="Example: `tokentrail report tokentrail-out`")
def report(run_dir: RunDirArg, fps: FpsOpt = 4.0) -> None:
    """Write RUN_DIR/report.html: settings, figures, tables and prompts on one offline page."""
    from tokentrail.runs import report_run

    out.print(f"report: {report_run(run_dir, fps=_fps(fps))}")


@app.command(epilog="Example: `tokentrail bifurcation runs/spectrum --prompt spectrum-15`")
def bifurcation(
    run_dir: RunDirArg,
    prompt: Annotated[str, typer.Option("--prompt", help="Prompt id or label (e.g. 15 in seed-spectrum).")],
    sustain: Annotated[int, typer.Option(help="Layers it must stay closer to another category.")] = 2,
    metric: Annotated[str, typer.Option(help="cosine or euclidean.")] = "cosine",
) -> None:
    """When does one prompt leave its own category, and toward which? Layer by layer."""
    from tokentrail.runs import explain_bifurcation

    trace_result, found = explain_bifurcation(run_dir, prompt, sustain=sustain, metric=metric)
    index = found.index
    table = Table(title=f"{trace_result.prompt_ids[index]} ({found.category}): {trace_result.prompts[index]!r}")
    for column in ("layer", "to own category", "to nearest other", "nearest other", "outside", "step",
                   "category step"):
        table.add_column(column)
    for layer in range(len(found.distance_own)):
        table.add_row(str(layer), f"{found.distance_own[layer]:.4f}", f"{found.distance_nearest_other[layer]:.4f}",
                      found.nearest_other[layer], "yes" if found.outside[layer] else "",
                      "" if np.isnan(found.step[layer]) else f"{found.step[layer]:.2f}",
                      "" if np.isnan(found.category_step[layer]) else f"{found.category_step[layer]:.2f}")
    out.print(table)
    out.print(found.sentence)


@app.command(epilog="Example: `tokentrail compare runs/smol-spectrum runs/gemma-spectrum --out runs/compare`")
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more runs of the same prompts on different models.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Comparison directory.")] = Path("tokentrail-compare"),
    permutations: Annotated[int | None, typer.Option(
        help="Label permutations for separation p-values (default: as analyze, 1000).")] = None,
    cka_permutations: Annotated[int, typer.Option(help="Shuffled-prompt CKA null samples.")] = 200,
    cka_standardize: Annotated[bool, typer.Option(help="Scale every hidden unit to unit variance before CKA.")] = False,
    sustain: Annotated[int, typer.Option(help="Layers a prompt must stay outside its category.")] = 2,
    knn_k: Annotated[int, typer.Option("--knn-k", help="Neighbours for kNN accuracy.")] = 3,
    mutual_knn_k: Annotated[int, typer.Option(
        "--mutual-knn-k", help="Neighbours per prompt for the mutual kNN alignment beside CKA (less than the prompts; "
                               "chance is k/(prompts-1)).")] = 5,
    top: Annotated[int, typer.Option(help="How many prompts with the most different bifurcations to list.")] = 10,
    axis: Annotated[list[str] | None, typer.Option("--axis", help="NATURAL,FORMAL categories (repeatable).")] = None,
    middle: Annotated[str | None, typer.Option("--middle", help="Category expected between the axis ends.")] = None,
) -> None:
    """Compare runs of the same prompts on different models, aligned by normalised depth (layer / L)."""
    from tokentrail.compare import CompareOptions, compare_runs, verdict_sentences

    if len(run_dirs) < 2:
        raise TokentrailError("compare needs at least two run directories")
    _permutations(permutations)
    _permutations(cka_permutations, "--cka-permutations")
    if mutual_knn_k < 1:
        raise TokentrailError(f"--mutual-knn-k must be at least 1, got {mutual_knn_k}")
    _out_dir(out_dir)
    axes = None
    if axis:
        axes = []
        for pair in axis:
            parts = _split(pair) or []
            if len(parts) != 2:
                raise TokentrailError(f"--axis needs two categories NATURAL,FORMAL, got {pair!r}")
            axes.append((parts[0], parts[1]))
    chosen = {} if permutations is None else {"permutations": permutations}
    result = compare_runs(run_dirs, out_dir, CompareOptions(
        sustain=sustain, knn_k=knn_k, cka_permutations=cka_permutations, cka_standardize=cka_standardize,
        mutual_knn_k=mutual_knn_k, top_prompts=top, axes=axes, middle=middle, **chosen))
    for warning in result.warnings:
        err.print(warning_text(warning))
    for sentence in verdict_sentences([v for v in result.ordering_verdicts if v["at"] == "last layer"]):
        out.print(sentence)
    out.print(f"report: {result.report}")


def _numbers(value: str | None, kind, what: str) -> list | None:
    if value is None:
        return None
    try:
        return [kind(part) for part in _split(value) or []]
    except ValueError:
        raise TokentrailError(f"{what} must be a comma-separated list of numbers, got {value!r}") from None


@app.command(epilog="Example: `tokentrail steer --out runs/steer --layers 10,15 --alphas 0.25,0.5,1`")
@_options_from(_model_option_list, "loaded")
def steer(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run directory (seed-spectrum is traced into it if empty).")] = Path("tokentrail-steer"),
    loaded: Any = None,  # the model options of `_model_option_list` stand here
    layers: Annotated[str | None, typer.Option("--layers", help="Layers to steer at, e.g. 10,15, or 'all' for the whole depth (default: ~L/3 and L/2).")] = None,
    alphas: Annotated[str, typer.Option("--alphas", help="Coefficients, in units of the median residual norm at the layer.")] = "0.25,0.5,1",
    problems: Annotated[int, typer.Option("--problems", help="Generated word problems (seeded).")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the (development) problems and of the random directions.")] = 0,
    direction_from: Annotated[str, typer.Option("--direction-from", help="data: mean paired difference (word problem -> pure math) on training problems disjoint from the evaluation ones; seed: the run's category centroids (--method).")] = "data",
    random: Annotated[int, typer.Option("--random", help="Random directions of the same norm per steered cell (the null distribution).")] = 20,
    train: Annotated[int, typer.Option("--train", help="Training problems for a direction from data.")] = 200,
    confirm: Annotated[bool, typer.Option("--confirm", help="Choose the best cell on these problems, then measure it on fresh test problems (--test-seed).")] = False,
    test_seed: Annotated[int | None, typer.Option("--test-seed", help="Seed of the held-out test problems (default: --seed + 1).")] = None,
    instruction_format: Annotated[str | None, typer.Option("--instruction-format", help="The prompting baseline: the word problem asked differently; must contain {question} (default: 'Question: Compute the arithmetic: {question}\\nAnswer:').")] = None,
    source: Annotated[str, typer.Option(help="Category the vector points away from.")] = "word-problems",
    target: Annotated[str, typer.Option(help="Category the vector points toward.")] = "pure-math",
    position: Annotated[str, typer.Option(help="last (last prompt token), prompt (all prompt tokens) or all (also generated).")] = "last",
    method: Annotated[str, typer.Option(help="With --direction-from seed: mean-diff, pca, or a .npy/.safetensors vector file.")] = "mean-diff",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Generations per batch (conditions and problems mixed).")] = 64,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 16,
    chat: ChatOpt = False,
    preset: Annotated[str, typer.Option(help="Prompt set traced into an empty run directory.")] = "seed-spectrum",
    quiet: QuietOpt = False,
) -> None:
    """The seed's follow-up: steer word problems toward the pure-math region and measure accuracy."""
    from tokentrail.runs import report_run
    from tokentrail.steering import run_steering

    settings = _model_settings(device_map=None, **loaded)
    _out_dir(out_dir)
    chosen_layers = "all" if layers is not None and layers.strip() == "all" else _numbers(layers, int, "--layers")
    result = run_steering(
        out_dir, settings, layers=chosen_layers, alphas=_numbers(alphas, float, "--alphas"),
        n_problems=problems, seed=seed, source=source, target=target, position=position, method=method,
        direction_from=direction_from, n_random=random, n_train=train, batch_size=batch_size,
        max_new_tokens=max_new_tokens, chat=chat, preset=preset, confirm=confirm, test_seed=test_seed,
        instruction_format=instruction_format,
        show_progress=not quiet,
    )
    out.print(result.summary_text())
    out.print(f"results: {out_dir / 'steer'}")
    try:
        out.print(f"report: {report_run(out_dir)}")
    except TokentrailError as exc:
        err.print(warning_text(f"report not written: {exc}"))


@app.command(epilog="Example: `tokentrail explore tokentrail-out --open`")
def explore(
    run_dir: RunDirArg,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback is warned about.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8765,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in the default browser.")] = False,
) -> None:
    """Serve a local web page: type a prompt and watch it travel through the layers on the run's stored map."""
    from tokentrail.explore.server import serve

    serve(run_dir, host=host, port=port, open_browser=open_browser, say=out.print,
          warn=lambda text: err.print(warning_text(text)))


@app.command(epilog="Example: `tokentrail physics runs/spectrum-all` (a run traced with --position all)")
def physics(
    run_dir: RunDirArg,
    threshold: Annotated[float, typer.Option(help="Cosine similarity at which two tokens count as one cluster.")] = 0.9,
    min_plateau: Annotated[int, typer.Option("--min-plateau", help="Layers a clustering plateau must last.")] = 3,
    energy: Annotated[bool, typer.Option("--energy/--no-energy", help="Attention energy (forward passes of the run's model).")] = True,
    expansion: Annotated[bool, typer.Option("--expansion/--no-expansion", help="Growth of a perturbed embedding (forward passes).")] = True,
    directions: Annotated[int, typer.Option(help="Random perturbation directions per prompt.")] = 8,
    epsilon: Annotated[float, typer.Option(help="Perturbation size relative to the embedding's norm.")] = 1e-3,
    max_prompts: Annotated[int | None, typer.Option(
        "--max-prompts", help="Run the model probes on N prompts only, the categories taking turns.")] = None,
) -> None:
    """The seed's physics as numbers: attention energy, token clustering, the residual stream as an ODE, geometry."""
    from tokentrail.physics import PhysicsOptions, physics_run
    from tokentrail.runs import read_run

    read_run(run_dir)  # a directory that is not a run is refused as such, before any option
    options = PhysicsOptions(threshold=threshold, min_plateau=min_plateau, energy=energy, expansion=expansion,
                             directions=directions, epsilon=epsilon, max_prompts=max_prompts)
    options.check()
    summary = physics_run(run_dir, options)
    for note in summary["notes"]:
        err.print(warning_text(note))
    out.print(summary["text"])
    out.print(f"tables: {Path(run_dir) / 'physics'}  figures: {Path(run_dir) / 'figures'} (physics_*)")


@app.command("lines-of-thought", epilog="Example: `tokentrail lines-of-thought --out runs/lot --sentences 500`")
@_options_from(_model_option_list, "loaded")
def lines_of_thought(
    loaded: Any = None,  # the model options of `_model_option_list` stand here
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run directory for the pseudo-sentences.")] = Path("tokentrail-lot"),
    sentences: Annotated[int, typer.Option(help="Pseudo-sentences (chunks of standard-library prose).")] = 500,
    words: Annotated[int, typer.Option(help="Words per pseudo-sentence.")] = 30,
    batch_size: BatchOpt = "16",
    quiet: QuietOpt = False,
) -> None:
    """Replicate "Lines of Thought" (arXiv 2410.01545): singular directions, linear drift, Gaussian residuals, lambda."""
    from tokentrail.core.settings import BatchSettings
    from tokentrail.physics.lines import lines_of_thought_run

    settings = _model_settings(device_map=None, **loaded)
    _out_dir(out_dir)
    if sentences < 2 or words < 2:
        raise TokentrailError(f"--sentences and --words must be at least 2, got {sentences} and {words}")
    summary = lines_of_thought_run(out_dir, settings, sentences=sentences, words=words,
                                   batching=BatchSettings(_batch_size(batch_size)), show_progress=not quiet)
    err.print(f"traced {summary['traced']} prompt(s), {summary['reused']} read back from the store")
    out.print(summary["text"])
    out.print(f"results: {out_dir / 'lines_of_thought'}")


@app.command(epilog="Example: `tokentrail export tokentrail-out --to states.npz`")
def export(
    run_dir: RunDirArg,
    to: Annotated[Path, typer.Option("--to", help="Target .npz file.")] = Path("tokentrail-export.npz"),
    projection: Annotated[bool | None, typer.Option(
        "--projection/--no-projection",
        help="Add the run's PCA (default: when the store is at most 2 GiB, the most the in-memory analysis reads).",
        show_default=False)] = None,
) -> None:
    """Write a run's arrays to an .npz that loads with `np.load(path, allow_pickle=False)`, shard by shard."""
    from tokentrail.exports import export_run

    _out_file(to)
    path, notes = export_run(run_dir, to, projection=projection)
    for note in notes:
        err.print(warning_text(note))
    out.print(f"wrote {path}")


@app.command(epilog="Example: `tokentrail project runs/big --normalize rms --center per-layer`")
def project(
    run_dir: RunDirArg,
    to: Annotated[Path | None, typer.Option("--to", help="Target .npz (default RUN_DIR/projection.npz).")] = None,
    layers: LayersOpt = None,
    include_final: FinalOpt = None,
    components: ComponentsOpt = None,
    normalize: NormalizeOpt = None,
    center: CenterOpt = None,
    fit_on: FitOnOpt = None,
    batch_prompts: Annotated[int, typer.Option("--batch-prompts", help="Prompts read from the store at a time.")] = 1024,
) -> None:
    """PCA of every trajectory, fitted shard by shard: for stores too big for `analyze` to load."""
    from tokentrail.runs import analysis_options, project_run, read_run

    if to is not None:
        _out_file(to)
    options = analysis_options(read_run(run_dir), layers=layers, include_final=include_final,
                               n_components=_components(components), normalize=normalize, center=center, fit_on=_split(fit_on))
    path, arrays = project_run(run_dir, options, to=to, batch_prompts=batch_prompts)
    evr = ", ".join(f"{v:.3f}" for v in arrays["explained_variance_ratio"])
    shape = " x ".join(str(n) for n in arrays["projection"].shape)
    out.print(f"explained variance ratio: {evr}")
    out.print(f"wrote {path} (projection {shape}, fitted on {int(arrays['fit_mask'].sum())} prompts)")


@app.command(epilog="Example: `tokentrail info tokentrail-out`")
def info(run_dir: RunDirArg) -> None:
    """What is in a run: model, prompts, layers, options, sizes."""
    from tokentrail.runs import run_info

    details = run_info(run_dir)
    table = Table(show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in details.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        table.add_row(key, str(value))
    out.print(table)


@app.command(epilog="Example: `tokentrail models`")
def models() -> None:
    """List the embedded models and how to name other models."""
    from tokentrail.models.sources import embedded_models

    table = Table(title="embedded models")
    for column in ("name", "aliases", "installed", "description", "path"):
        table.add_column(column, overflow="fold")
    for row in embedded_models():
        table.add_row(row["name"], row["aliases"], "yes" if row["installed"] else "no", row["description"], row["path"])
    out.print(table)
    out.print("Also accepted by --model: a .gguf file, a local model directory, or a hub id in the local HF cache.")


presets_app = typer.Typer(help="The built-in prompt sets: list them, or build the large ones.",
                          rich_markup_mode="markdown", context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(presets_app, name="presets")


@presets_app.callback(invoke_without_command=True, epilog="Example: `tokentrail presets`")
def presets(context: typer.Context) -> None:
    """List the built-in prompt sets (`tokentrail presets build` rebuilds the large ones)."""
    from tokentrail.prompts import load_preset, preset_names

    if context.invoked_subcommand is not None:
        return
    table = Table(title="presets")
    for column in ("name", "prompts", "categories", "description"):
        table.add_column(column, overflow="fold")
    for name in preset_names():
        preset = load_preset(name)
        table.add_row(name, str(len(preset)), str(len(set(preset.categories))), preset.description)
    out.print(table)


@presets_app.command("build", epilog="Example: `tokentrail presets build --out my-presets --seed 1`")
def presets_build(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for NAME.yaml and sources/NAME.yaml.")] = Path("tokentrail-presets"),
    seed: Annotated[int, typer.Option(help="Seed of the templates and of the order prompts are taken in.")] = 0,
    per_category: Annotated[int, typer.Option("--per-category", help="Prompts per category.")] = 200,
) -> None:
    """Build spectrum-large and categories-large offline (standard-library code and docstrings, Debian's fortunes,
    seeded templates); the same seed gives the same files."""
    from tokentrail.tasks.large_presets import write_large_presets

    _out_dir(out_dir)
    if per_category < 2:
        raise TokentrailError(f"--per-category must be at least 2, got {per_category}")
    try:
        written = write_large_presets(out_dir, seed, per_category)
    except (FileNotFoundError, ValueError) as exc:
        raise TokentrailError(str(exc)) from None
    for path in written:
        out.print(f"wrote {path}")


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"tokentrail {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True)] = False,
) -> None:
    # `main` reads --debug itself (it must know before the command runs); nothing else to do here.
    del debug


def _quiet_libraries() -> None:
    """Our own progress and messages only: library progress bars would break the one-line error contract."""
    import logging

    # Environment rather than an import, so that commands that never touch a model stay fast to start.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    logger = logging.getLogger("tokentrail")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(VisibleFormatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


# Typer ships its own copy of click, so click's own exception classes never match what it raises: take the base
# class of its usage errors from the exception Typer exports.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _usage_error(exc: Exception) -> int:
    """A usage error in Typer's usual plain style (usage line, help hint, `Error: ...`), user text inert."""
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        print(visible(ctx.get_usage()), file=sys.stderr)
        if ctx.command.get_help_option(ctx) is not None:
            print(visible(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help."), file=sys.stderr)
        print(file=sys.stderr)
    print(f"Error: {visible(exc.format_message())}", file=sys.stderr)
    code = getattr(exc, "exit_code", 2)
    return 2 if code == 1 else code  # a bad value or option given is always the caller's to fix: exit 2


def _os_error(exc: OSError) -> str:
    """One line for an OS error that no writer turned into a TokentrailError: on reading a path the user gave."""
    where = exc.filename if exc.filename is not None else ""
    reason = (exc.strerror or first_line(exc)).lower()
    return f"{where}: {reason}" if where else reason


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    args = sys.argv[1:] if argv is None else argv
    _quiet_libraries()
    debug = "--debug" in args or os.environ.get("TOKENTRAIL_DEBUG") == "1"
    try:
        code = app(args=args, prog_name="tokentrail", standalone_mode=False)
        if code == 130:  # Typer turns Ctrl-C into this exit code when it is not the one to exit
            err.print(INTERRUPTED)
        return code if isinstance(code, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except _ClickException as exc:
        if debug:
            raise
        return _usage_error(exc)
    except (typer.Abort, KeyboardInterrupt):
        err.print(INTERRUPTED)
        return 130
    except TokentrailError as exc:
        if debug:
            raise
        print(f"error: {visible(first_line(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if debug:
            raise
        print(f"error: {visible(_os_error(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {visible(first_line(exc))} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


def entry() -> None:
    sys.exit(main())
