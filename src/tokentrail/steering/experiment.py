"""The seed's follow-up experiment: steer word problems toward the pure-math region and measure accuracy.

Math word problems sit nearer to story prompts than to pure math inside the model; does moving their state
toward the pure-math region raise accuracy? `run_steering` sweeps layers x alphas on generated problems with
a random-direction control and the pure-math rendering as a ceiling, and writes `run_dir/steer/`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokentrail.core.trace import Trace, TraceOptions
from tokentrail.errors import TokentrailError
from tokentrail.models.loading import LoadedModel
from tokentrail.steering.generation import DEFAULT_MAX_NEW_TOKENS, encode_prompts, generate
from tokentrail.steering.hooks import POSITIONS, Steering
from tokentrail.steering.results import Condition, SteeringResult, condition_label, result_rows, write_outputs
from tokentrail.steering.vectors import (
    DEFAULT_SOURCE,
    DEFAULT_TARGET,
    METHODS,
    axis_score,
    centroids,
    random_vector,
    steering_vector,
    unit,
)
from tokentrail.terminal import progress_bar

DEFAULT_ALPHAS = (0.25, 0.5, 1.0)
DEFAULT_PRESET = "seed-spectrum"


def default_layers(n_layers: int) -> list[int]:
    """About a third and half-way through the depth: past the embedding-like early layers, before the last
    layers that mostly prepare the output, where the seed saw categories separate."""
    return sorted({max(1, round(n_layers / 3)), max(1, round(n_layers / 2))})


def prepare_run(
    run_dir: Path,
    model: LoadedModel | Any,
    preset: str = DEFAULT_PRESET,
    show_progress: bool = True,
) -> tuple[dict[str, Any], Trace, LoadedModel]:
    """The run's settings, its trace and the loaded model; a directory without a run gets `preset` traced.

    `model` is a `LoadedModel` or `runs.ModelSettings`. The run must have been traced with this very model:
    a direction from another model's residual stream means nothing here.
    """
    from tokentrail.prompts import load_preset
    from tokentrail.runs import RUN_FILE, load_trace, trace_run, update_run

    run_dir = Path(run_dir)
    loaded = model if isinstance(model, LoadedModel) else model.load()
    if not (run_dir / RUN_FILE).exists():
        trace_run(run_dir, load_preset(preset), loaded, TraceOptions(), show_progress=show_progress)
        if not isinstance(model, LoadedModel):
            update_run(run_dir, model={**asdict(model), "fingerprint": loaded.fingerprint})
    run, trace = load_trace(run_dir)
    traced_with = run.get("model", {}).get("fingerprint", {})
    if traced_with.get("weights_sha256") != loaded.fingerprint.get("weights_sha256"):
        raise TokentrailError(
            f"{run_dir} was traced with model {traced_with.get('name')!r}, not {loaded.name!r}; steering "
            "vectors only make sense in the model they came from: pass the same --model or a new run directory"
        )
    if run.get("trace_options", {}).get("position", "last") not in ("last", "all"):
        raise TokentrailError(
            f"{run_dir} traced position {run['trace_options']['position']!r}; steering vectors are built from "
            "last-token states: use a run traced with --position last"
        )
    return run, trace, loaded


def _check_settings(alphas: Sequence[float], n_problems: int, position: str, method: str | Path) -> None:
    if not alphas:
        raise TokentrailError("give at least one alpha")
    if not all(math.isfinite(float(a)) for a in alphas):
        raise TokentrailError(f"alphas must be finite numbers, got {list(alphas)}")
    if n_problems < 1:
        raise TokentrailError(f"need at least one problem, got {n_problems}")
    if position not in POSITIONS:
        raise TokentrailError(f"unknown steering position {position!r}; use one of {', '.join(POSITIONS)}")
    if str(method) not in METHODS and not Path(method).is_file():
        raise TokentrailError(f"unknown method {str(method)!r}: use mean-diff, pca or an existing .npy/.safetensors file")


def run_steering(
    run_dir: Path,
    model: LoadedModel | Any,
    layers: Sequence[int] | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    n_problems: int = 200,
    seed: int = 0,
    source: str = DEFAULT_SOURCE,
    target: str = DEFAULT_TARGET,
    position: str = "last",
    method: str | Path = "mean-diff",
    batch_size: int = 32,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    chat: bool = False,
    word_format: str | None = None,
    math_format: str | None = None,
    preset: str = DEFAULT_PRESET,
    show_progress: bool = True,
) -> SteeringResult:
    """Sweep layers x alphas on generated word problems and write `run_dir/steer/`.

    Conditions, all on the same problems in the same batches: `baseline` (word problem, no steering),
    `pure-math` (the same problem as an expression, no steering: the ceiling), and per layer and alpha
    `steer` (the direction from `source` to `target`) and `random` (a random direction of the same norm).
    """
    from tokentrail.tasks import MATH_FORMAT, WORD_FORMAT, extract_answer, generate_problems, is_correct

    started, cpu_started = time.perf_counter(), time.process_time()
    _check_settings(alphas, n_problems, position, method)
    run, trace, loaded = prepare_run(run_dir, model, preset, show_progress)
    run_dir = Path(run_dir)
    layers = default_layers(trace.n_layers) if layers is None else sorted({int(x) for x in layers})
    vectors = {layer: steering_vector(trace, layer, method, source, target) for layer in layers}
    controls = {layer: random_vector(vectors[layer], seed) for layer in layers}
    word_format = word_format or WORD_FORMAT
    math_format = math_format or MATH_FORMAT
    problems = generate_problems(n_problems, seed)
    word_ids = encode_prompts(loaded, [p.word_prompt(word_format) for p in problems], chat)
    math_ids = encode_prompts(loaded, [p.math_prompt(math_format) for p in problems], chat)
    answers = [p.answer for p in problems]

    plan: list[tuple[str, int | None, float | None]] = [("baseline", None, None), ("pure-math", None, None)]
    for layer in layers:
        for alpha in alphas:
            plan += [("steer", layer, float(alpha)), ("random", layer, float(alpha))]
    conditions: list[Condition] = []
    with progress_bar("steering", "problems", disable=not show_progress) as progress:
        task = progress.add_task("", total=len(plan) * len(problems))
        for name, layer, alpha in plan:
            label = name if layer is None else f"{name} layer {layer} alpha {alpha:g}"
            progress.update(task, description=label)
            steering = None
            if layer is not None:
                vector = vectors[layer] if name == "steer" else controls[layer]
                steering = Steering(loaded, [vector], alpha, position)
            tick = time.perf_counter()
            out = generate(loaded, math_ids if name == "pure-math" else word_ids, max_new_tokens, batch_size,
                           steering=steering, capture_states=True,
                           on_batch=lambda k: progress.advance(task, k))
            extracted = [extract_answer(text) for text in out.texts]
            correct = np.array([is_correct(e, a) for e, a in zip(extracted, answers)], dtype=bool)
            assert out.states is not None
            conditions.append(Condition(name, layer, alpha, out.texts, extracted, correct, out.states,
                                        time.perf_counter() - tick))

    axis_profiles = _axis_profiles(trace, conditions, source, target)
    rows = result_rows(conditions, problems, trace, source, target, method, position)
    settings = {
        "run_dir": str(run_dir),
        "model": loaded.fingerprint,
        "prompt_set": run["prompts"]["name"],
        "source": source,
        "target": target,
        "method": str(method),
        "position": position,
        "layers": layers,
        "alphas": [float(a) for a in alphas],
        "n_problems": n_problems,
        "seed": seed,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "chat": chat,
        "word_format": word_format,
        "math_format": math_format,
        "scale_rule": "alpha * median L2 norm of the run's states at the layer (all traced prompts)",
        "scales": {str(layer): vectors[layer].scale for layer in layers},
        "centroid_distance": {
            str(layer): float(np.linalg.norm(np.subtract(*centroids(trace, layer, target, source))))
            for layer in layers
        },
        "cosine_to_mean_diff": {
            str(layer): float(vectors[layer].direction @ unit(np.subtract(*centroids(trace, layer, target, source)),
                                                               "mean difference"))
            for layer in layers
        },
    }
    result = SteeringResult(run_dir=run_dir, rows=rows, settings=settings, axis_profiles=axis_profiles)
    result.seconds = time.perf_counter() - started
    settings["seconds"] = round(result.seconds, 1)
    # Wall time depends on what else the machine runs; CPU time is the work itself.
    settings["cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    settings["torch_threads"] = torch.get_num_threads()
    settings["seconds_per_condition"] = {condition_label(c): round(c.seconds, 2) for c in conditions}
    result.files = write_outputs(result, conditions, problems)
    return result


def _axis_profiles(trace: Trace, conditions: Sequence[Condition], source: str, target: str) -> dict[str, list[float]]:
    """Mean axis score at every layer for the unsteered conditions: where word problems and their
    pure-math renderings sit between the run's source (0) and target (1) centroids."""
    profiles: dict[str, list[float]] = {}
    for condition in conditions:
        if condition.layer is not None:
            continue
        scores = []
        for layer in range(trace.n_layers + 1):
            a, b = centroids(trace, layer, source, target)
            scores.append(float(np.nanmean(axis_score(condition.states[:, layer], a, b))))
        profiles[condition.name] = scores
    return profiles
