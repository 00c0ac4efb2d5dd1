"""The seed's follow-up experiment: steer word problems toward the pure-math region and measure accuracy.

Math word problems sit nearer to story prompts than to pure math inside the model; does moving their state
toward the pure-math region raise accuracy? The protocol a sceptical reader asks for:

- the direction is estimated from data (`direction_from="data"`): a training set of generated problems,
  disjoint from the evaluation problems, each traced as a word problem and as pure math; the direction is the
  mean of the paired differences at the steered layer. The seed's six-prompt direction stays available
  (`direction_from="seed"`) and the cosine between the two is reported;
- every steered cell (layer x alpha) is compared with `n_random` random directions of the same norm on the
  same problems (the null distribution), with Holm-adjusted p-values across the grid and a paired interval
  for every gain (see `results`);
- prompting conditions beside steering: an instruction before the word problem, and the pure-math rendering;
- `confirm_steering` chooses the best cell on development problems and measures it on fresh test problems.

Conditions are generated together: each batch mixes problems and conditions, every row with its own
steering vector (`Steering.per_row`), so the grid costs about as many forward passes as its rows need.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokentrail.core.trace import Trace, TraceOptions
from tokentrail.errors import TokentrailError
from tokentrail.metrics import write_rows
from tokentrail.models.loading import LoadedModel
from tokentrail.steering.generation import DEFAULT_MAX_NEW_TOKENS, encode_prompts, generate
from tokentrail.steering.hooks import POSITIONS, Steering
from tokentrail.steering.results import (
    Condition,
    SteeringResult,
    condition_label,
    random_answer_rows,
    result_rows,
    rounded,
    write_outputs,
)
from tokentrail.steering.vectors import (
    DEFAULT_SOURCE,
    DEFAULT_TARGET,
    METHODS,
    SteeringVector,
    axis_score,
    centroids,
    paired_direction,
    random_vectors,
    steering_vector,
    unit,
)
from tokentrail.terminal import progress_bar

DEFAULT_ALPHAS = (0.25, 0.5, 1.0)
DEFAULT_PRESET = "seed-spectrum"
DIRECTION_SOURCES = ("data", "seed")
DEFAULT_RANDOM = 20  # random directions per steered cell: the null distribution
DEFAULT_TRAIN = 200  # paired training problems for a direction from data
# Training problems come from another seed; any that also appear among the evaluation problems are dropped.
TRAIN_SEED_OFFSET = 1_000_003


def parse_layers(layers: Sequence[int] | str | None, n_layers: int) -> list[int]:
    """`None`: about L/3 and L/2; "all": every block 1..L (the layer sweep); else the given layers."""
    if layers is None:
        return default_layers(n_layers)
    if isinstance(layers, str):
        if layers != "all":
            raise TokentrailError(f"--layers takes numbers or 'all', got {layers!r}")
        return list(range(1, n_layers + 1))
    chosen = sorted({int(x) for x in layers})
    if not chosen or not all(1 <= layer <= n_layers for layer in chosen):
        raise TokentrailError(f"steered layers must be in 1..{n_layers} (layer l is the output of block l), got "
                              f"{list(layers)}")
    return chosen


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


def _check_settings(alphas: Sequence[float], n_problems: int, position: str, method: str | Path,
                    direction_from: str = "seed", n_random: int = DEFAULT_RANDOM, n_train: int = DEFAULT_TRAIN,
                    instruction_format: str | None = None) -> None:
    if instruction_format is not None and "{question}" not in instruction_format:
        raise TokentrailError("--instruction-format must contain {question}, where the word problem goes")
    if direction_from not in DIRECTION_SOURCES:
        raise TokentrailError(f"--direction-from must be data or seed, got {direction_from!r}")
    if n_random < 1:
        raise TokentrailError(f"--random needs at least 1 random direction per cell, got {n_random}")
    if direction_from == "data" and n_train < 2:
        raise TokentrailError(f"--train needs at least 2 training problems, got {n_train}")
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


def training_problems(evaluation: Sequence[Any], n_train: int, seed: int) -> list[Any]:
    """`n_train` generated problems none of which is among `evaluation` (same question or expression)."""
    from tokentrail.tasks import generate_problems

    taken = {p.question for p in evaluation} | {p.expression for p in evaluation}
    found: list[Any] = []
    batch = 2 * n_train
    for attempt in range(8):
        candidates = generate_problems(batch, seed + TRAIN_SEED_OFFSET + attempt)
        for problem in candidates:
            if problem.question not in taken and problem.expression not in taken:
                taken |= {problem.question, problem.expression}
                found.append(problem)
                if len(found) == n_train:
                    return found
    raise TokentrailError(f"could not generate {n_train} training problems distinct from the {len(evaluation)} "
                          "evaluation problems; ask for fewer")


def data_vectors(loaded: LoadedModel, layers: Sequence[int], problems: Sequence[Any], word_format: str,
                 math_format: str, chat: bool) -> dict[int, SteeringVector]:
    """Directions from data: each training problem traced as a word problem and as pure math (last prompt
    token, the position steering acts on); at each layer the mean of the paired differences, word → math."""
    from tokentrail.tracing import Tracer

    tracer = Tracer(loaded, TraceOptions(chat=chat, logit_lens=False, top_k=1))
    word = tracer.trace([p.word_prompt(word_format) for p in problems]).states
    math_states = tracer.trace([p.math_prompt(math_format) for p in problems]).states
    return {layer: paired_direction(word[:, layer], math_states[:, layer], layer) for layer in layers}


@dataclass(frozen=True)
class Arm:
    """One condition to generate: which prompt, and which vector (if any) at which layer and alpha."""

    name: str  # baseline, instruction, pure-math, steer, random
    prompt: str  # word, instruction or math
    layer: int | None = None
    alpha: float | None = None
    vector: SteeringVector | None = None
    draw: int | None = None


def _generate_arms(
    loaded: LoadedModel,
    arms: Sequence[Arm],
    encoded: dict[str, list[list[int]]],
    position: str,
    batch_size: int,
    max_new_tokens: int,
    keep_states: bool,
    advance: Any,
) -> list[tuple[list[str], np.ndarray | None, float]]:
    """Generate every arm on every problem. Arms that share a prompt are generated together: steering at the
    last prompt token, each problem's prompt prefix is run once and shared by all its arms (`repeat`), each
    row steered by its own arm's vector; otherwise rows (arm, problem) are mixed in batches. Returns per arm
    its generations, its last-prompt-token states (or None) and its share of the time."""
    n_problems = len(next(iter(encoded.values())))
    hidden = loaded.parts.hidden_size
    results: dict[int, tuple[list[str], np.ndarray | None, float]] = {}
    groups: dict[str, list[int]] = {}
    for index, arm in enumerate(arms):
        groups.setdefault(arm.prompt, []).append(index)
    for prompt, members in groups.items():
        k = len(members)
        shared = position == "last" and k > 1
        n_rows = n_problems * k

        def row_of(arm_slot: int, problem: int, shared: bool = shared, k: int = k) -> int:
            return problem * k + arm_slot if shared else arm_slot * n_problems + problem

        deltas: dict[int, np.ndarray] = {}
        for slot, index in enumerate(members):
            arm = arms[index]
            if arm.vector is not None:
                layer_rows = deltas.setdefault(arm.layer, np.zeros((n_rows, hidden), dtype=np.float32))
                layer_rows[[row_of(slot, i) for i in range(n_problems)]] = arm.vector.delta(arm.alpha)
        steering = Steering.per_row(loaded, deltas, position) if deltas else None
        started = time.perf_counter()
        if shared:
            out = generate(loaded, encoded[prompt], max_new_tokens, batch_size, steering=steering,
                           capture_states=keep_states, on_batch=advance, repeat=k)
        else:
            rows = [ids for _ in members for ids in encoded[prompt]]
            out = generate(loaded, rows, max_new_tokens, batch_size, steering=steering, capture_states=keep_states,
                           on_batch=advance)
        share = (time.perf_counter() - started) / k
        for slot, index in enumerate(members):
            picked = [row_of(slot, i) for i in range(n_problems)]
            states = out.states[picked] if keep_states and out.states is not None else None
            results[index] = ([out.texts[row] for row in picked], states, share)
    return [results[index] for index in range(len(arms))]


def _conditions(loaded: LoadedModel, arms: Sequence[Arm], problems: Sequence[Any], encoded: dict[str, Any],
                position: str, batch_size: int, max_new_tokens: int, progress: Any, task: Any) -> list[Condition]:
    """Generate `arms` and score them. States are kept for the non-random arms (axis scores), not for the
    random draws, whose only use is their answers."""
    from tokentrail.tasks import extract_answer, is_correct

    answers = [p.answer for p in problems]
    conditions: list[Condition] = []
    for keep_states in (True, False):
        chosen = [arm for arm in arms if (arm.name != "random") == keep_states]
        if not chosen:
            continue
        progress.update(task, description="conditions" if keep_states else "random directions")
        generated = _generate_arms(loaded, chosen, encoded, position, batch_size, max_new_tokens, keep_states,
                                   lambda k: progress.advance(task, k))
        for arm, (texts, states, seconds) in zip(chosen, generated):
            extracted = [extract_answer(text) for text in texts]
            correct = np.array([is_correct(e, a) for e, a in zip(extracted, answers)], dtype=bool)
            conditions.append(Condition(arm.name, arm.layer, arm.alpha, texts, extracted, correct, states,
                                        seconds, arm.draw))
    by_key = {(c.name, c.layer, c.alpha, c.draw): c for c in conditions}  # back in the order of the plan
    return [by_key[(arm.name, arm.layer, arm.alpha, arm.draw)] for arm in arms]


def _plan(cells: Sequence[tuple[int, float]], vectors: dict[int, SteeringVector], n_random: int, seed: int,
          ) -> list[Arm]:
    arms = [Arm("baseline", "word"), Arm("instruction", "instruction"), Arm("pure-math", "math")]
    for layer, alpha in cells:
        arms.append(Arm("steer", "word", layer, alpha, vectors[layer]))
        arms += [Arm("random", "word", layer, alpha, vector, draw)
                 for draw, vector in enumerate(random_vectors(vectors[layer], seed, n_random))]
    return arms


def _encode_all(loaded: LoadedModel, problems: Sequence[Any], formats: dict[str, str], chat: bool) -> dict[str, Any]:
    return {
        "word": encode_prompts(loaded, [p.word_prompt(formats["word"]) for p in problems], chat),
        "instruction": encode_prompts(loaded, [p.word_prompt(formats["instruction"]) for p in problems], chat),
        "math": encode_prompts(loaded, [p.math_prompt(formats["math"]) for p in problems], chat),
    }


def run_steering(
    run_dir: Path,
    model: LoadedModel | Any,
    layers: Sequence[int] | str | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    n_problems: int = 200,
    seed: int = 0,
    source: str = DEFAULT_SOURCE,
    target: str = DEFAULT_TARGET,
    position: str = "last",
    method: str | Path = "mean-diff",
    direction_from: str = "data",
    n_random: int = DEFAULT_RANDOM,
    n_train: int = DEFAULT_TRAIN,
    batch_size: int = 64,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    chat: bool = False,
    word_format: str | None = None,
    math_format: str | None = None,
    instruction_format: str | None = None,
    preset: str = DEFAULT_PRESET,
    confirm: bool = False,
    test_seed: int | None = None,
    show_progress: bool = True,
) -> SteeringResult:
    """Sweep layers x alphas on generated word problems and write `run_dir/steer/` (see the module docstring).

    With `confirm`, the grid is the development stage: its best cell (largest gain; ties to the lower layer and
    alpha) is then measured on `n_problems` fresh test problems of `test_seed` (default `seed + 1`), with the
    prompting conditions and the null distribution, and that held-out number is the result to report.
    """
    from tokentrail.tasks import INSTRUCTION_FORMAT, MATH_FORMAT, WORD_FORMAT, generate_problems

    started, cpu_started = time.perf_counter(), time.process_time()
    _check_settings(alphas, n_problems, position, method, direction_from, n_random, n_train, instruction_format)
    run, trace, loaded = prepare_run(run_dir, model, preset, show_progress)
    run_dir = Path(run_dir)
    layers = parse_layers(layers, trace.n_layers)
    formats = {"word": word_format or WORD_FORMAT, "math": math_format or MATH_FORMAT,
               "instruction": instruction_format or INSTRUCTION_FORMAT}
    problems = generate_problems(n_problems, seed)
    seed_vectors = {layer: steering_vector(trace, layer, method, source, target) for layer in layers}
    train: list[Any] = []
    if direction_from == "data":
        train = training_problems(problems, n_train, seed)
        vectors = data_vectors(loaded, layers, train, formats["word"], formats["math"], chat)
    else:
        vectors = seed_vectors
    cells = [(layer, float(alpha)) for layer in layers for alpha in alphas]
    # With --confirm the grid only chooses a cell; the null distribution is measured where the claim is made,
    # on the held-out problems, which keeps the default confirm run to minutes.
    arms = _plan(cells, vectors, 0 if confirm else n_random, seed)
    encoded = _encode_all(loaded, problems, formats, chat)
    with progress_bar("steering", "generations", disable=not show_progress) as progress:
        task = progress.add_task("", total=len(arms) * len(problems))
        conditions = _conditions(loaded, arms, problems, encoded, position, batch_size, max_new_tokens, progress,
                                 task)
    axis_profiles = _axis_profiles(trace, conditions, source, target)
    rows, draws = result_rows(conditions, problems, trace, source, target,
                              "data" if direction_from == "data" else str(method), position)
    settings = {
        "run_dir": str(run_dir),
        "model": loaded.fingerprint,
        "prompt_set": run["prompts"]["name"],
        "source": source,
        "target": target,
        "direction_from": direction_from,
        "method": str(method),
        "position": position,
        "layers": layers,
        "alphas": [float(a) for a in alphas],
        "n_problems": n_problems,
        "seed": seed,
        "n_random": n_random,
        "n_random_in_grid": 0 if confirm else n_random,
        "random_seeds": "numpy default_rng([seed, layer, draw]) for draw 0..n_random-1",
        "n_train": len(train),
        "train_seed": seed + TRAIN_SEED_OFFSET if train else None,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "chat": chat,
        "word_format": formats["word"],
        "math_format": formats["math"],
        "instruction_format": formats["instruction"],
        "scale_rule": ("alpha * median L2 norm at the layer of the states the direction came from (the training "
                       "problems for a direction from data, the run's traced prompts for the seed direction)"),
        "scales": {str(layer): vectors[layer].scale for layer in layers},
        "cosine_data_vs_seed": ({str(layer): float(vectors[layer].direction @ seed_vectors[layer].direction)
                                 for layer in layers} if direction_from == "data" else None),
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
    result = SteeringResult(run_dir=run_dir, rows=rows, settings=settings, axis_profiles=axis_profiles, draws=draws)
    if confirm:
        result.confirm = _confirm(loaded, result, vectors, trace, problems, formats, chat, position, batch_size,
                                  max_new_tokens, n_random, seed, test_seed, source, target, show_progress)
    result.seconds = time.perf_counter() - started
    settings["seconds"] = round(result.seconds, 1)
    # Wall time depends on what else the machine runs; CPU time is the work itself.
    settings["cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    settings["torch_threads"] = torch.get_num_threads()
    settings["generations"] = len(arms) * len(problems) + (result.confirm or {}).get("generations", 0)
    settings["generations_per_second"] = round(settings["generations"] / max(result.seconds, 1e-9), 1)
    settings["seconds_per_condition"] = {condition_label(c): round(c.seconds, 2) for c in conditions
                                         if c.name != "random"}
    result.files = write_outputs(result, conditions, problems)
    return result


def best_cell(rows: Sequence[dict[str, Any]]) -> tuple[int, float]:
    """The steered cell with the largest gain (ties: lower layer, then lower alpha)."""
    steered = [row for row in rows if row["condition"] == "steer"]
    if not steered:
        raise TokentrailError("no steered cell to choose from")
    best = max(steered, key=lambda r: (r["gain"], -r["layer"], -r["alpha"]))
    return int(best["layer"]), float(best["alpha"])


def _confirm(loaded: LoadedModel, development: SteeringResult, vectors: dict[int, SteeringVector], trace: Trace,
             dev_problems: Sequence[Any], formats: dict[str, str], chat: bool, position: str, batch_size: int,
             max_new_tokens: int, n_random: int, seed: int, test_seed: int | None, source: str, target: str,
             show_progress: bool) -> dict[str, Any]:
    """Measure the development set's best cell on fresh test problems. The choice is made from the
    development rows alone, before any test problem is generated."""
    from tokentrail.tasks import generate_problems

    layer, alpha = best_cell(development.rows)
    test_seed = seed + 1 if test_seed is None else test_seed
    if test_seed == seed:
        raise TokentrailError("--test-seed must differ from --seed: the test problems must be fresh")
    seen = {p.question for p in dev_problems} | {p.expression for p in dev_problems}
    candidates = generate_problems(2 * len(dev_problems), test_seed)
    problems = [p for p in candidates if p.question not in seen and p.expression not in seen][:len(dev_problems)]
    if len(problems) < len(dev_problems):
        raise TokentrailError(f"test seed {test_seed} gives only {len(problems)} problems that the development set "
                              f"does not share, not {len(dev_problems)}; pass another --test-seed")
    arms = _plan([(layer, alpha)], vectors, n_random, seed + 2)  # other random draws than the development's
    encoded = _encode_all(loaded, problems, formats, chat)
    with progress_bar("confirming", "generations", disable=not show_progress) as progress:
        task = progress.add_task("", total=len(arms) * len(problems))
        conditions = _conditions(loaded, arms, problems, encoded, position, batch_size, max_new_tokens, progress,
                                 task)
    rows, draws = result_rows(conditions, problems, trace, source, target, development.rows[-1].get("method", ""),
                              position)
    out = development.run_dir / "steer"
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "confirm_random_answers.csv", random_answer_rows(conditions, problems))
    steered = next(row for row in rows if row["condition"] == "steer")
    base = next(row for row in rows if row["condition"] == "baseline")
    by_name = {row["condition"]: row for row in rows if row["layer"] is None}
    verdict = ("the steering gain holds on held-out problems" if steered["p_vs_baseline"] < 0.05
               and steered["null_p"] < 0.05 and steered["gain"] > 0 else
               "no steering effect distinguishable from chance on held-out problems")
    text = (
        f"Held out ({len(problems)} fresh problems, seed {test_seed}): the development set's best cell, layer "
        f"{layer}, alpha {alpha:g}, gives {100 * steered['accuracy']:.1f}% against a baseline of "
        f"{100 * base['accuracy']:.1f}%: gain {100 * steered['gain']:+.1f} points [{100 * steered['gain_low']:+.1f}, "
        f"{100 * steered['gain_high']:+.1f}], McNemar p = {steered['p_vs_baseline']:.3g}, null p against "
        f"{n_random} random directions = {steered['null_p']:.3g}; prompting: instruction "
        f"{100 * by_name['instruction']['accuracy']:.1f}%, pure math {100 * by_name['pure-math']['accuracy']:.1f}%."
        f" Verdict: {verdict}."
    )
    write_rows(out / "confirm_results.csv", rows)
    write_rows(out / "confirm_random_draws.csv", draws)
    return {"layer": layer, "alpha": alpha, "test_seed": test_seed, "n_problems": len(problems),
            "rows": [{k: rounded(v) for k, v in row.items()} for row in rows],
            "verdict": verdict, "text": text, "generations": len(arms) * len(problems)}


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
