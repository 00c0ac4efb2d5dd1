"""Run directories: what a run was made from (`run.json`), its store, and the steps that fill it.

    RUN_DIR/run.json      settings, prompts, versions, last trace report
    RUN_DIR/store/        the TraceStore
    RUN_DIR/metrics/      analysis tables (CSV) and RUN_DIR/summary.json
    RUN_DIR/figures/      static, interactive and animated figures
    RUN_DIR/report.html   one offline page with all of it

Each step reads what the previous one wrote, so `analyze`, `plot` and `report` never need the model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import platform
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tokentrail._version import __version__
from tokentrail.atomic import atomic_write_bytes, atomic_write_json
from tokentrail.core.npz import npz_bytes
from tokentrail.core.settings import BatchSettings, EngineSettings
from tokentrail.core.trace import Trace, TraceOptions
from tokentrail.engines.local import TraceReport, trace_into_store
from tokentrail.errors import StoreError, TokentrailError
from tokentrail.models.settings import ModelSettings
from tokentrail.prompts import Prompt, PromptSet
from tokentrail.store import TraceStore

if TYPE_CHECKING:  # loading a model imports torch; reading a run must not
    from tokentrail.models.loading import LoadedModel
    from tokentrail.tracing import Tracer

RUN_FILE = "run.json"


@dataclass
class RunOutcome:
    run_dir: Path
    report: TraceReport
    trace: Trace
    files: dict[str, list[Path]] = field(default_factory=dict)


def versions() -> dict[str, str]:
    """The versions that shape the numbers, read from package metadata: recording them imports nothing."""
    from importlib import metadata

    def installed(distribution: str) -> str:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "tokentrail": __version__,
        "python": platform.python_version(),
        "torch": installed("torch"),
        "transformers": installed("transformers"),
        "numpy": np.__version__,
        "scikit-learn": installed("scikit-learn"),
        "platform": platform.platform(),
    }


def read_run(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    if not Path(run_dir).is_dir():
        raise TokentrailError(f"{run_dir}: no such run directory; make one with `tokentrail run --out {run_dir}`")
    if not path.exists():
        raise TokentrailError(f"{run_dir}: not a tokentrail run (no {RUN_FILE}); make one with `tokentrail run`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokentrailError(f"{path}: unreadable ({exc.msg} at line {exc.lineno}); rerun `tokentrail trace`") from None


def prompt_set_of(run: dict[str, Any]) -> PromptSet:
    items = run["prompts"]["items"]
    return PromptSet(
        name=run["prompts"]["name"],
        prompts=[Prompt(id=p["id"], text=p["text"], category=p["category"], label=p.get("label", "")) for p in items],
        source=run["prompts"]["source"],
    )


def trace_run(
    run_dir: Path,
    prompt_set: PromptSet,
    model: ModelSettings | LoadedModel,
    options: TraceOptions,
    batching: BatchSettings = BatchSettings(),
    show_progress: bool = True,
    extra_settings: dict[str, Any] | None = None,
    engine: EngineSettings = EngineSettings(),
    loaded: LoadedModel | None = None,
) -> RunOutcome:
    """Trace what the run's store lacks and record how the run was made.

    `model` is either settings (loaded only if something must be traced) or a model already in memory. With
    settings, `loaded` may be the model those settings already loaded (`tokentrail explore` holds one), so that
    run.json still records the settings and nothing is loaded twice.
    """
    run_dir = Path(run_dir)
    made: list[Tracer] = []  # the tracer, if a model had to be loaded: its self-check goes into run.json
    # The tracer (and torch with it) is imported only when something must be traced.
    if not isinstance(model, ModelSettings):  # a model already in memory
        fp = model.fingerprint
        model_settings: dict[str, Any] = {"spec": model.name, "in_memory": True}

        def make_tracer() -> Tracer:
            from tokentrail.tracing import Tracer

            return Tracer(model, options, batch_size=batching.batch_size, padding_side=batching.padding_side)
    else:
        fp = model.fingerprint()
        model_settings = asdict(model)

        def make_tracer() -> Tracer:
            from tokentrail.tracing import Tracer

            tracer = Tracer(loaded if loaded is not None else model.load(), options, batch_size=batching.batch_size,
                            padding_side=batching.padding_side)
            made.append(tracer)
            return tracer

    if engine.engine not in ("local", "ray"):
        raise TokentrailError(f"unknown engine {engine.engine!r}; use local or ray")
    if engine.engine == "ray" and not isinstance(model, ModelSettings):
        raise TokentrailError("the ray engine loads the model in each worker: pass model settings, not a loaded model")
    if engine.engine == "local" and not TraceStore.exists(run_dir / "store"):
        # A new store: every prompt needs the model, so load it first; one that fails to load (or a --top-k it
        # cannot give) then leaves nothing behind in --out.
        tracer = make_tracer()

        def make_tracer() -> Tracer:
            return tracer
    store = TraceStore.open(run_dir / "store", model=fp, options=options.to_dict())
    if engine.engine == "ray":
        from tokentrail.engines.ray import trace_into_store_ray

        report = trace_into_store_ray(store, prompt_set.texts, model, options, batching.batch_size,
                                      batching.shard_size, n_workers=engine.workers, address=engine.ray_address,
                                      show_progress=show_progress)
    else:
        report = trace_into_store(store, prompt_set.texts, make_tracer, shard_size=batching.shard_size,
                                  show_progress=show_progress)
    store.save_index()
    with run_file_lock(run_dir):
        _record_trace(run_dir, prompt_set, model_settings, fp, options, batching, engine, report, made, model,
                      extra_settings)
    trace = store.load(prompt_set.texts, prompt_ids=prompt_set.ids, categories=prompt_set.categories,
                       labels=prompt_set.labels)
    return RunOutcome(run_dir=run_dir, report=report, trace=trace)


@contextlib.contextmanager
def run_file_lock(run_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write updates of run.json between processes (two traces, a trace and an analysis):
    each sees the other's fields instead of overwriting them. Not on any hot path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".run.json.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _record_trace(run_dir, prompt_set, model_settings, fp, options, batching, engine, report, made, model,
                  extra_settings) -> None:
    previous = read_run(run_dir) if (run_dir / RUN_FILE).exists() else {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run = {
        **previous,
        "tool": "tokentrail",
        "created": previous.get("created", now),
        "updated": now,
        "command": sys.argv,
        "model": {**model_settings, "fingerprint": fp},
        "trace_options": options.to_dict(),
        "batching": asdict(batching),
        "engine": asdict(engine),
        "prompts": {"name": prompt_set.name, "source": prompt_set.source, "items": prompt_set.to_records()},
        "versions": versions(),
        "last_trace": asdict(report),
        "self_check": (made[0].loaded.self_check if made else model.self_check if not isinstance(model, ModelSettings)
                       else previous.get("self_check")),
        **(extra_settings or {}),
    }
    atomic_write_json(run_dir / RUN_FILE, run)


def update_run(run_dir: Path, **fields: Any) -> dict[str, Any]:
    with run_file_lock(run_dir):
        run = read_run(run_dir)
        run.update(fields)
        atomic_write_json(Path(run_dir) / RUN_FILE, run)
    return run


def traced_run(run_dir: Path, verify: bool) -> tuple[dict[str, Any], PromptSet, TraceStore]:
    """The run, its prompts and its store, refused unless every prompt is traced.

    `verify` checks every shard's checksum first (one read of the whole store); without it a bad shard is
    found when it is read.
    """
    run = read_run(run_dir)
    prompt_set = prompt_set_of(run)
    store = TraceStore.open(Path(run_dir) / "store")
    if verify:
        problems = store.verify(prompt_set.texts)
        if problems:
            raise StoreError(f"{run_dir}: {problems[0]}; rerun `tokentrail trace` on this run to recompute")
    missing = sum(not held for held in store.holds(prompt_set.texts))  # one lookup for all, not one per prompt
    if missing:
        raise StoreError(f"{run_dir}: {missing} prompt(s) are not traced yet; rerun `tokentrail trace`")
    return run, prompt_set, store


def load_trace(run_dir: Path) -> tuple[dict[str, Any], Trace]:
    """The run's settings and its prompts' traces, read from the store; no model needed."""
    run, prompt_set, store = traced_run(run_dir, verify=True)
    return run, store.load(prompt_set.texts, prompt_ids=prompt_set.ids, categories=prompt_set.categories,
                           labels=prompt_set.labels)


def project_run(run_dir: Path, options=None, to: Path | None = None,
                batch_prompts: int = 1024) -> tuple[Path, dict[str, np.ndarray]]:
    """The trajectory PCA of a run fitted and applied shard by shard, for stores too big to load.

    Uses the same layers, normalisation, centring and fit categories as `analyze` (the run's saved analysis
    options unless `options` is given) and gives the same projection, but never holds more than about
    `batch_prompts` prompts' states plus a hidden x hidden matrix: the store is read once for the layer
    means when centring per layer, once to fit and once to project. Writes an .npz (default
    RUN_DIR/projection.npz) and returns its path and arrays.
    """
    from tokentrail.analysis.pipeline import projection_fit_mask, projection_layers, projection_stack
    from tokentrail.analysis.projection import TrajectoryPCA

    if int(batch_prompts) != batch_prompts or batch_prompts < 1:
        raise TokentrailError(f"--batch-prompts must be a positive integer, got {batch_prompts}")
    to = Path(to) if to is not None else Path(run_dir) / "projection.npz"
    if to.suffix != ".npz":
        raise TokentrailError(f"projection target {to} must end in .npz")
    run, prompt_set, store = traced_run(run_dir, verify=False)  # each shard is checked as it is read
    options = options or analysis_options(run)
    n_layers = store.header.get("n_layers")
    if n_layers is None:
        raise StoreError(f"{run_dir}: the store holds no traced prompt yet; rerun `tokentrail trace`")
    categories = np.asarray(prompt_set.categories, dtype=str)
    try:
        options.validate(list(categories))
        layers = projection_layers(options, n_layers + 1)
        pca = TrajectoryPCA(options.n_components, options.normalize, options.center)
    except ValueError as exc:
        raise TokentrailError(f"cannot project {run_dir}: {exc}") from None
    fit_mask = projection_fit_mask(options, prompt_set.categories)

    def stacks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for positions, states, final_states in store.iter_states(prompt_set.texts, batch_prompts):
            yield positions, projection_stack(states, final_states, layers)

    def fit_batches() -> Iterator[np.ndarray]:
        for positions, stack in stacks():
            selected = fit_mask[positions]
            yield stack if selected.all() else stack[selected]

    try:
        pca.fit_stream(fit_batches)
    except ValueError as exc:
        raise TokentrailError(f"cannot project {run_dir}: {exc}") from None
    projection = np.zeros((len(categories), len(layers), options.n_components), dtype=np.float32)
    for positions, stack in stacks():
        projection[positions] = pca.transform(stack)
    arrays = {
        "projection": projection,
        "projection_layers": layers.astype(np.int64),
        "explained_variance_ratio": pca.explained_variance_ratio_,
        "explained_variance": pca.explained_variance_,
        "components": pca.components_.astype(np.float32),
        "mean": pca.mean_,
        "prompt_ids": np.asarray(prompt_set.ids, dtype=str),
        "categories": categories,
        "fit_mask": fit_mask,
    }
    if pca.layer_means_ is not None:
        arrays["layer_means"] = pca.layer_means_.astype(np.float32)
    atomic_write_bytes(to, npz_bytes(arrays))
    return to, arrays


def _dtype_text(run: dict[str, Any]) -> str:
    """The dtype the run was traced in, and the request it came from when that was `--dtype auto`."""
    used = run["model"]["fingerprint"]["dtype"]
    requested = run["model"].get("dtype_requested")
    return f"{used} (chosen by --dtype {requested})" if requested and requested != used else str(used)


def run_info(run_dir: Path) -> dict[str, Any]:
    run = read_run(run_dir)
    store = TraceStore.open(Path(run_dir) / "store")
    items = run["prompts"]["items"]
    categories: dict[str, int] = {}
    for item in items:
        categories[item["category"]] = categories.get(item["category"], 0) + 1
    files = sorted(p for p in Path(run_dir).rglob("*") if p.is_file())
    return {
        "run_dir": str(run_dir),
        "model": run["model"]["fingerprint"]["name"],
        "model_kind": run["model"]["fingerprint"]["kind"],
        "weights_sha256": run["model"]["fingerprint"]["weights_sha256"][:16],
        "dtype": _dtype_text(run),
        "n_layers": store.header.get("n_layers"),
        "hidden_size": store.header.get("hidden_size"),
        "prompts": len(items),
        "prompt_set": run["prompts"]["name"],
        "categories": categories,
        "trace_options": run["trace_options"],
        "stored_prompts": len(store),
        "shards": len(store.shards),
        "store_bytes": store.size_bytes(),
        "run_bytes": sum(p.stat().st_size for p in files),
        "updated": run.get("updated"),
        "last_trace": run.get("last_trace"),
        # What the load-time self-check proved when the model was last loaded for this run (None: skipped, or
        # nothing needed tracing since).
        "self_check": _self_check_summary(run.get("self_check")),
    }


def _self_check_summary(report: dict[str, Any] | None) -> str:
    if not report:
        return "not run (--no-self-check, or no model was loaded)"
    return (f"passed: {report['padding']} padding, final norm {report.get('final_norm') or 'none'}, head "
            f"{report['head']}, largest state error {report['max_state_error']:.1e}, "
            f"{report['forward_passes']} forward passes in {report['seconds']:.2f} s")



def run_model_settings(run: dict[str, Any]) -> ModelSettings:
    """The settings the run's model was loaded with (run.json), refused for a run traced from a model in memory."""
    model = dict(run.get("model") or {})
    if model.get("in_memory"):
        raise TokentrailError("this run was traced with a model held in memory (tt.trace_run with a loaded model), "
                              "so there are no settings to load it from")
    known = set(ModelSettings.__dataclass_fields__)
    return ModelSettings(**{key: value for key, value in model.items() if key in known})


def load_run_model(run_dir: Path, run: dict[str, Any] | None = None) -> tuple[ModelSettings, LoadedModel]:
    """Load the run's own model with its settings and prove it is the model its store was traced with (the
    store's rule: weights, dtype, config and tokenizer), or refuse with one line."""
    run = run if run is not None else read_run(run_dir)
    settings = run_model_settings(run)
    loaded = settings.load()
    TraceStore.open(Path(run_dir) / "store", model=loaded.fingerprint, options=run["trace_options"])
    return settings, loaded


# --- analysis, figures, report: all from the store, no model -------------------------------------------------
def analysis_options(run: dict[str, Any], **overrides: Any):
    """The run's saved analysis options with the given ones (those not None) on top."""
    from tokentrail.analysis.pipeline import AnalysisOptions

    saved = dict(run.get("analysis") or {})
    saved.update({k: v for k, v in overrides.items() if v is not None})
    known = set(AnalysisOptions.__dataclass_fields__)
    return AnalysisOptions(**{k: v for k, v in saved.items() if k in known})


def check_analysable(trace: Trace, run_dir: Path) -> None:
    """Refuse prompt sets the analyses cannot read honestly, before anything is written."""
    if len(trace) < 2:
        raise TokentrailError(f"{run_dir}: a projection needs at least 2 prompts, the run has {len(trace)}; add prompts")
    counts: dict[str, int] = {}
    for category in trace.categories:
        counts[category] = counts.get(category, 0) + 1
    lone = [name for name, count in counts.items() if count < 2]
    if lone and len(counts) > 1:
        raise TokentrailError(
            f"{run_dir}: category {lone[0]!r} has one prompt; separation by layer needs at least 2 per category: "
            "add a prompt to it or merge it into another category"
        )


def compute_analysis(run_dir: Path, options=None):
    """(run, trace, result) with the run's saved options unless `options` is given."""
    from tokentrail.analysis.pipeline import analyze_states

    run, trace = load_trace(run_dir)
    options = options or analysis_options(run)
    check_analysable(trace, run_dir)
    try:
        result = analyze_states(trace.states, trace.final_states, trace.categories, options,
                                token_states=trace.token_states)
    except ValueError as exc:
        raise TokentrailError(f"cannot analyse {run_dir}: {exc}") from None
    return run, trace, result, options


def projection_extras(run_dir: Path) -> dict[str, np.ndarray]:
    """The run's projection arrays for an export (from the in-memory analysis, so the numbers `analyze` gives);
    none for a run too small to project."""
    # The projection does not depend on the permutation tests or the intervals; an export has no use for their
    # cost.
    options = replace(analysis_options(read_run(run_dir)), n_permutations=0, n_bootstrap=0)
    try:
        _, _, result, _ = compute_analysis(run_dir, options)
    except StoreError:
        raise
    except TokentrailError:
        return {}
    return {
        "projection": np.asarray(result.projection, dtype=np.float32),
        "projection_layers": np.asarray(result.layers, dtype=np.int64),
        "explained_variance_ratio": np.asarray(result.explained_variance_ratio, dtype=np.float64),
        "depth_projection": np.asarray(result.depth_projection, dtype=np.float32),
    }


def explain_bifurcation(run_dir: Path, prompt: str, sustain: int = 2, metric: str = "cosine"):
    """When the run's prompt `prompt` (its id, or its label) leaves its category: (trace, PromptBifurcation)."""
    from tokentrail.analysis.bifurcation import explain_prompt

    _, trace = load_trace(run_dir)
    matches = [i for i, (pid, label) in enumerate(zip(trace.prompt_ids, trace.labels)) if prompt in (pid, label)]
    if not matches:
        raise TokentrailError(f"no prompt with id or label {prompt!r} in {run_dir}; see `tokentrail info {run_dir}`")
    try:
        return trace, explain_prompt(trace.states, trace.categories, matches[0], sustain=sustain, metric=metric)
    except ValueError as exc:
        raise TokentrailError(str(exc)) from None


def analyze_run(run_dir: Path, options=None, computed=None):
    """Recompute every analysis from the store into metrics/*.csv and summary.json. `computed` is what
    `compute_analysis` returned, when the caller already has it (`tokentrail run` analyses once)."""
    from tokentrail.metrics import write_metrics

    _, trace, result, options = computed if computed is not None else compute_analysis(run_dir, options)
    paths = write_metrics(result, trace.prompt_ids, trace.categories, Path(run_dir))
    update_run(run_dir, analysis=asdict(options))
    return result, paths


def figure_meta(run: dict[str, Any], trace: Trace):
    from tokentrail.viz import FigureMeta

    lens_tokens = lens_probs = None
    if trace.lens_tokens is not None and trace.lens_probs is not None:
        lens_tokens = [[layer[0] for layer in prompt] for prompt in trace.lens_tokens]
        lens_probs = trace.lens_probs[:, :, 0]
    return FigureMeta(
        prompt_ids=trace.prompt_ids,
        prompts=trace.prompts,
        categories=trace.categories,
        labels=trace.labels,
        model_name=run["model"]["fingerprint"]["name"],
        lens_tokens=lens_tokens,
        lens_probs=lens_probs,
    )


def plot_run(run_dir: Path, fps: float = 4) -> dict[str, list[Path]]:
    from tokentrail.viz import make_all_figures

    run, trace, result, _ = compute_analysis(run_dir)
    try:
        return make_all_figures(result, figure_meta(run, trace), Path(run_dir), fps=fps)
    except ValueError as exc:
        raise TokentrailError(f"cannot draw {run_dir}: {exc}") from None


def _csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))




def _interval_tables(metrics: Path, result) -> dict[str, list[dict[str, str]]]:
    """The report's tables of category readings with 95 % intervals, each at the layer its claim is about."""
    from tokentrail.analysis.separation import best_separation_layer

    last = str(np.asarray(result.depth_projection).shape[1] - 1)
    last_projected = str(int(np.asarray(result.layers)[-1]))
    best = str(best_separation_layer(result.separation)) if result.separation is not None else ""
    order = [row for row in _csv_rows(metrics / "axis_intervals.csv") if row["layer"] == last]
    tables = {
        f"Order of the categories along the axis at layer {last} (rank 1 = nearest {(result.axis or ('',))[0]}; "
        "95 % intervals)": sorted(order, key=lambda row: int(row["rank"])),
        f"Each category's own separation at layer {best}, the best-separating one (95 % intervals)": [
            row for row in _csv_rows(metrics / "category_separation.csv") if row["layer"] == best],
        "Bifurcation by category (95 % intervals)": _csv_rows(metrics / "bifurcation_intervals.csv"),
        f"What the components measure (depth over all layers; the rest at layer {last_projected}; 95 % intervals)": [
            row for row in _csv_rows(metrics / "components.csv") if row["layer"] in ("", last_projected)],
    }
    return {title: rows for title, rows in tables.items() if rows}


def _steer_section(run_dir: Path) -> dict[str, Any]:
    """The report's steering section, read from what `tokentrail steer` wrote (its `report_table` holds the
    columns the report shows)."""
    summary = json.loads((run_dir / "steer" / "summary.json").read_text(encoding="utf-8"))
    heatmap = summary.get("files", {}).get("heatmap_png")
    return {
        "title": "Steering experiment",
        "text": summary.get("text", ""),
        "html_figures": [run_dir / heatmap] if heatmap else [],
        "table": summary.get("report_table", []),
    }


def _physics_section(run_dir: Path) -> dict[str, Any]:
    """The report's physics section, from what `tokentrail physics` wrote."""
    summary = json.loads((run_dir / "physics" / "summary.json").read_text(encoding="utf-8"))
    figures = [run_dir / path for paths in summary.get("figures", {}).values() for path in paths
               if path.endswith(".png")]
    notes = " ".join(f"({note})" for note in summary.get("notes", []))
    return {
        "title": "Physics of the residual stream",
        "text": f"{summary.get('text', '')} {notes}".strip(),
        "figures": figures,
        "tables": {"by layer (physics/layers.csv)": _csv_rows(run_dir / "physics" / "layers.csv")},
    }


def report_run(run_dir: Path, fps: float = 4, computed=None) -> Path:
    """Figures, the tables `analyze` wrote and any steering results, on one offline page. `computed` is what
    `compute_analysis` returned with the run's saved options, when the caller already has it."""
    from tokentrail.viz import make_all_figures
    from tokentrail.viz.report import build_report

    run_dir = Path(run_dir)
    computed = computed if computed is not None else compute_analysis(run_dir)
    _, trace, result, _ = computed
    if not (run_dir / "summary.json").exists():
        analyze_run(run_dir, computed=computed)
    run = read_run(run_dir)  # as the analysis left it: its options are shown
    meta = figure_meta(run, trace)
    figures = make_all_figures(result, meta, run_dir, fps=fps)
    tables = {
        "Separation of categories by layer": _csv_rows(run_dir / "metrics" / "separation.csv"),
        **_interval_tables(run_dir / "metrics", result),
        "Bifurcations (layer at which a prompt leaves its category)": _csv_rows(run_dir / "metrics" / "bifurcation.csv"),
        "Next token": [
            {"id": trace.prompt_ids[i], "category": trace.categories[i],
             "top tokens": " | ".join(repr(t) for t in trace.next_tokens[i]),
             "p(top-1)": f"{trace.next_token_probs[i][0]:.3f}"}
            for i in range(len(trace))
        ],
    }
    extra = []
    if (run_dir / "steer" / "summary.json").exists():
        extra.append(_steer_section(run_dir))
    if (run_dir / "physics" / "summary.json").exists():
        extra.append(_physics_section(run_dir))
    info = {
        "model": run["model"]["fingerprint"]["name"],
        "weights sha256": run["model"]["fingerprint"]["weights_sha256"],
        "dtype": _dtype_text(run),
        "prompt set": f"{run['prompts']['name']} ({len(trace)} prompts)",
        "trace options": run["trace_options"],
        "analysis options": run.get("analysis"),
        "versions": run.get("versions"),
        "updated": run.get("updated"),
    }
    return build_report(run_dir, info, result, meta, figures, tables=tables, extra_sections=extra)
