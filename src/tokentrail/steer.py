"""Steering: push a prompt's residual stream along a direction at chosen layers and measure what it does.

The experiment (`run_steering`) asks the seed's open question: math word problems sit nearer to story prompts
than to pure math inside the model; does moving their state toward the pure-math region raise accuracy?

Vectors. A steering direction at layer l comes from a traced run: the difference of two category means
(`mean-diff`, target minus source), the first principal component of all the run's states at that layer
(`pca`, signed to point from source to target), or a file (`.npy` / `.safetensors`, shape [H] or [L+1, H]).
The direction is normalised to unit length and scaled by the median norm of the run's states at that
layer, so `alpha` reads as "this many typical residual norms": alpha = 0.5 adds a vector half as long as a
typical state at that layer, whatever the model's scale. The scale comes from the run's traced prompts
(the states the vector was made from), not from the problems being steered.

Hooks. Steering at layer l adds `alpha * scale * unit` to the output of block l (`parts.blocks[l - 1]`),
which is exactly the trace's `states[:, l]`. Which token positions receive it: `last` (the last prompt token
only), `prompt` (every prompt token) or `all` (every prompt token and every generated token). Hooks are
removed when the `Steering` context exits, also on error.

Generation is a greedy loop with a KV cache over left-padded batches, so alpha = 0 runs the very same
arithmetic as no steering and gives bit-identical tokens and logits (tested).
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokentrail.core.trace import Trace, TraceOptions
from tokentrail.errors import TokentrailError
from tokentrail.models.loading import LoadedModel
from tokentrail.tracing import Tracer

if TYPE_CHECKING:
    from typing_extensions import Self

POSITIONS = ("last", "prompt", "all")
METHODS = ("mean-diff", "pca")
DEFAULT_ALPHAS = (0.25, 0.5, 1.0)
DEFAULT_SOURCE = "word-problems"
DEFAULT_TARGET = "pure-math"
DEFAULT_PRESET = "seed-spectrum"
DEFAULT_MAX_NEW_TOKENS = 16  # room for an echoed two-step equation: ' 32 + 28 + 4 = 64'
Z95 = 1.959963984540054


# ------------------------------------------------------------------------------------------------ vectors


@dataclass(frozen=True)
class SteeringVector:
    """A unit direction at one layer and the residual norm it is scaled by."""

    layer: int
    direction: np.ndarray  # float32 [H], unit norm
    scale: float
    method: str

    def delta(self, alpha: float) -> np.ndarray:
        """What the hook adds: alpha * scale * direction."""
        return (np.float32(alpha) * np.float32(self.scale) * self.direction).astype(np.float32)


def _unit(vector: np.ndarray, what: str) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm) or norm == 0.0:
        raise TokentrailError(f"{what} has zero or non-finite length; it gives no direction to steer along")
    return (vector / norm).astype(np.float32)


def _check_layer(trace: Trace, layer: int) -> None:
    if not 1 <= layer <= trace.n_layers:
        raise TokentrailError(
            f"layer {layer} cannot be steered: use 1..{trace.n_layers} (layer l is the output of block l)"
        )


def _category_rows(trace: Trace, category: str) -> np.ndarray:
    rows = np.flatnonzero(np.asarray(trace.categories) == category)
    if rows.size == 0:
        known = ", ".join(sorted(set(trace.categories)))
        raise TokentrailError(f"category {category!r} is not in this run; its categories are: {known}")
    return rows


def residual_scale(trace: Trace, layer: int) -> float:
    """Median L2 norm of the run's states at `layer`: the unit alpha is measured in."""
    return float(np.median(np.linalg.norm(trace.states[:, layer].astype(np.float64), axis=-1)))


def centroids(trace: Trace, layer: int, source: str, target: str) -> tuple[np.ndarray, np.ndarray]:
    states = trace.states[:, layer].astype(np.float64)
    return states[_category_rows(trace, source)].mean(0), states[_category_rows(trace, target)].mean(0)


def _load_vector_file(path: Path, layer: int, hidden: int) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise TokentrailError(f"steering vector file {path} not found")
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1 and "vector" not in tensors:
            raise TokentrailError(f"{path} holds {len(tensors)} tensors; name the steering one 'vector'")
        array = tensors.get("vector", next(iter(tensors.values())))
    else:
        raise TokentrailError(f"steering vector file {path} must be .npy or .safetensors")
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2 and array.shape[1] == hidden and 0 <= layer < array.shape[0]:
        return array[layer]
    if array.shape == (hidden,):
        return array
    raise TokentrailError(
        f"{path} has shape {list(array.shape)}; a steering vector must be [{hidden}] or [layers + 1, {hidden}]"
    )


def steering_vector(
    trace: Trace,
    layer: int,
    method: str | Path = "mean-diff",
    source: str = DEFAULT_SOURCE,
    target: str = DEFAULT_TARGET,
) -> SteeringVector:
    """The steering direction at `layer` by `method` (`mean-diff`, `pca` or a vector file)."""
    _check_layer(trace, layer)
    scale = residual_scale(trace, layer)
    if str(method) == "mean-diff":
        a, b = centroids(trace, layer, source, target)
        return SteeringVector(layer, _unit(b - a, f"{target} minus {source} at layer {layer}"), scale, "mean-diff")
    if str(method) == "pca":
        states = trace.states[:, layer].astype(np.float64)
        centred = states - states.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        direction = vt[0]
        a, b = centroids(trace, layer, source, target)
        # A principal component has no sign; point it from the source region to the target region.
        if float(direction @ (b - a)) < 0:
            direction = -direction
        return SteeringVector(layer, _unit(direction, f"first principal component at layer {layer}"), scale, "pca")
    vector = _load_vector_file(Path(method), layer, trace.hidden_size)
    return SteeringVector(layer, _unit(vector, f"vector in {method}"), scale, f"file:{Path(method).name}")


def random_vector(like: SteeringVector, seed: int) -> SteeringVector:
    """A random unit direction with the same layer and scale: the control for "any push of this size"."""
    rng = np.random.default_rng([seed, like.layer])
    direction = rng.standard_normal(like.direction.shape[0])
    return SteeringVector(like.layer, _unit(direction, "random direction"), like.scale, "random")


def axis_score(states: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Position of each state along the line from centroid `a` (0) to centroid `b` (1)."""
    axis = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    denominator = float(axis @ axis)
    if denominator == 0.0:
        return np.full(len(states), np.nan)
    return (np.asarray(states, dtype=np.float64) - a) @ axis / denominator


# -------------------------------------------------------------------------------------------------- hooks


def _check_steerable(loaded: LoadedModel) -> None:
    why = loaded.parts.why_not_steerable()
    if why is not None:
        raise TokentrailError(f"{loaded.name}: {why}, so tokentrail steers only models whose blocks each pass on "
                              "one [batch, tokens, hidden] state once per forward pass")


class Steering:
    """Context manager that adds `alpha * scale * direction` to block outputs while it is open.

    `positions` selects the token positions of the next forward pass ([batch, seq] bools). When it is None
    the mode decides: `last` steers the last column (the last prompt token under left padding, which is what
    `Tracer` uses), `prompt` and `all` steer every column. Pad columns may be steered too; attention masks
    them out, so no real token sees the difference.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        vectors: Sequence[SteeringVector],
        alpha: float,
        position: str = "last",
    ) -> None:
        if position not in POSITIONS:
            raise TokentrailError(f"unknown steering position {position!r}; use one of {', '.join(POSITIONS)}")
        n_layers = loaded.parts.n_layers
        layers = [v.layer for v in vectors]
        if len(set(layers)) != len(layers):
            raise TokentrailError(f"two steering vectors for the same layer: {sorted(layers)}")
        _check_steerable(loaded)
        for vector in vectors:
            if not 1 <= vector.layer <= n_layers:
                raise TokentrailError(f"layer {vector.layer} cannot be steered: this model has layers 1..{n_layers}")
        self.loaded = loaded
        self.vectors = list(vectors)
        self.alpha = float(alpha)
        self.position = position
        self.positions: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._deltas = {v.layer: torch.from_numpy(v.delta(self.alpha)) for v in self.vectors}

    def _where(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.positions is not None:
            return self.positions.to(device=hidden.device, dtype=torch.bool)
        where = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if self.position == "last":
            where[:, -1] = True
        else:
            where[:] = True
        return where

    def _hook(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            delta = self._deltas[layer].to(device=hidden.device, dtype=hidden.dtype)
            # torch.where keeps unselected positions bit-for-bit instead of adding a zero to them.
            steered = torch.where(self._where(hidden)[..., None], hidden + delta, hidden)
            if isinstance(output, tuple):
                return (steered, *output[1:])
            if isinstance(output, list):
                return [steered, *output[1:]]
            return steered

        return hook

    @property
    def is_open(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Self:
        if self._handles:
            raise TokentrailError("this Steering context is already open")
        try:
            for vector in self.vectors:
                block = self.loaded.parts.blocks[vector.layer - 1]
                self._handles.append(block.register_forward_hook(self._hook(vector.layer)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.positions = None


# --------------------------------------------------------------------------------------------- generation


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _cache_of(output: Any, name: str) -> Any:
    """The KV cache of a forward's output; transformers renamed `past_key_values` to `cache` in v5."""
    cache = getattr(output, name, None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _stop_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    candidates = [loaded.tokenizer.eos_token_id]
    config = getattr(loaded.model, "generation_config", None)
    if config is not None:
        candidates.append(getattr(config, "eos_token_id", None))
    for item in candidates:
        if isinstance(item, int):
            ids.add(item)
        elif isinstance(item, (list, tuple)):
            ids.update(int(i) for i in item)
    return ids


def ends_line(text: str) -> bool:
    """Whether a generation has finished a line with some text on it: the stop rule for answers."""
    return "\n" in text and bool(text[: text.rindex("\n")].strip())


@dataclass
class Generated:
    """Greedy generations in input order. `states` [N, L+1, H]: last prompt token after every layer."""

    token_ids: list[list[int]]
    texts: list[str]
    states: np.ndarray | None = None
    logits: list[np.ndarray] | None = None  # per prompt [steps, vocab], only when asked for


@contextlib.contextmanager
def _capture_last(loaded: LoadedModel) -> Iterator[list[torch.Tensor | None]]:
    """Keep the last column of the embedding output and of every block output during one forward.

    Registered after the steering hooks, so block outputs are seen as steered: the states the rest of the
    network really received.
    """
    parts = loaded.parts
    _check_steerable(loaded)
    slots: list[torch.Tensor | None] = [None] * (parts.n_layers + 1)

    def before_first(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        slots[0] = hidden[:, -1].detach().to(torch.float32).cpu()

    def after(slot: int):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            slots[slot] = hidden[:, -1].detach().to(torch.float32).cpu()

        return hook

    handles = [parts.entry.register_forward_pre_hook(before_first, with_kwargs=True)]
    try:
        for slot, block in enumerate(parts.blocks, start=1):
            handles.append(block.register_forward_hook(after(slot)))
        yield slots
    finally:
        for handle in handles:
            handle.remove()


def encode_prompts(loaded: LoadedModel, texts: Sequence[str], chat: bool = False) -> list[list[int]]:
    """Token ids exactly as `Tracer` makes them (chat template or not), so traces and generations agree."""
    return Tracer(loaded, TraceOptions(chat=chat)).encode(list(texts))


def batch_order(encoded: Sequence[Sequence[int]], batch_size: int, equal_lengths: bool = False) -> list[list[int]]:
    """Length-sorted batches: little padding, and the same batches for every condition of an experiment.

    `equal_lengths` puts only prompts of equal length together: for models whose load-time self-check found
    that left padding changes their states (recurrent models, positions counted from a padding index).
    """
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    if not equal_lengths:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    for index in order:
        if batches and len(batches[-1]) < batch_size and len(encoded[batches[-1][0]]) == len(encoded[index]):
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    encoded: Sequence[Sequence[int]],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 32,
    steering: Steering | None = None,
    capture_states: bool = False,
    keep_logits: bool = False,
    stop_at_newline: bool = True,
    on_batch: Any = None,
) -> Generated:
    """Greedy decoding with a KV cache over left-padded batches, optionally inside an open `Steering`.

    A row stops at an end-of-sequence token or, with `stop_at_newline`, at the first newline that follows
    some non-space text (a leading newline is let through: some models start an answer on a new line).
    A `steering` context that is not open yet is opened for the call and closed after it.
    """
    if max_new_tokens < 1:
        raise TokentrailError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise TokentrailError(f"batch size must be at least 1, got {batch_size}")
    tokenizer = loaded.tokenizer
    parameters = _forward_parameters(loaded.model)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stops = _stop_ids(loaded)
    hooks = steering if steering is not None and not steering.is_open else contextlib.nullcontext()
    with hooks:
        return _generate(loaded, encoded, max_new_tokens, batch_size, steering, capture_states, keep_logits,
                         stop_at_newline, on_batch, parameters, int(pad), stops)


def _generate(
    loaded: LoadedModel,
    encoded: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    steering: Steering | None,
    capture_states: bool,
    keep_logits: bool,
    stop_at_newline: bool,
    on_batch: Any,
    parameters: set[str],
    pad: int,
    stops: set[int],
) -> Generated:
    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    cache_name = "cache" if "cache" in parameters else "past_key_values"
    pass_positions = "position_ids" in parameters
    n = len(encoded)
    token_ids: list[list[int]] = [[] for _ in range(n)]
    texts = [""] * n
    logits_out: list[np.ndarray | None] = [None] * n
    states: np.ndarray | None = None
    for batch in batch_order(encoded, batch_size, equal_lengths=loaded.parts.padding != "left"):
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids = encoded[index]
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            mask[row, width - len(ids) :] = 1
        if steering is not None:
            if steering.position == "last":
                where = torch.zeros_like(mask, dtype=torch.bool)
                where[:, -1] = True
            else:
                where = mask.bool()
            steering.positions = where
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                                  "use_cache": True}
        if pass_positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        if "logits_to_keep" in parameters:
            kwargs["logits_to_keep"] = 1
        capture = _capture_last(loaded) if capture_states else contextlib.nullcontext()
        with capture as slots:
            output = model(**kwargs)
        if capture_states:
            stacked = torch.stack(slots, dim=1).numpy()  # [B, L+1, H]
            if states is None:
                states = np.zeros((n, stacked.shape[1], stacked.shape[2]), dtype=np.float32)
            states[np.asarray(batch)] = stacked
        cache = _cache_of(output, cache_name)
        done = [False] * len(batch)
        steps: list[list[np.ndarray]] = [[] for _ in batch]
        next_logits = output.logits[:, -1].to(torch.float32)
        for step in range(max_new_tokens):
            chosen = next_logits.argmax(-1)
            for row, index in enumerate(batch):
                if done[row]:
                    continue
                token = int(chosen[row])
                if keep_logits:
                    steps[row].append(next_logits[row].cpu().numpy().copy())
                if token in stops:
                    done[row] = True
                    continue
                token_ids[index].append(token)
                if stop_at_newline and ends_line(tokenizer.decode(token_ids[index], skip_special_tokens=True)):
                    done[row] = True
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=torch.long)], dim=1)
            if steering is not None:
                steering.positions = torch.full((len(batch), 1), steering.position == "all", dtype=torch.bool)
            kwargs = {"input_ids": chosen[:, None].to(device), "attention_mask": mask.to(device),
                      "use_cache": True, cache_name: cache}
            if pass_positions:
                kwargs["position_ids"] = (mask.sum(-1, keepdim=True) - 1).to(device)
            output = model(**kwargs)
            cache = _cache_of(output, cache_name)
            next_logits = output.logits[:, -1].to(torch.float32)
        if steering is not None:
            steering.positions = None
        for row, index in enumerate(batch):
            texts[index] = tokenizer.decode(token_ids[index], skip_special_tokens=True)
            if keep_logits:
                logits_out[index] = np.stack(steps[row]) if steps[row] else np.zeros((0, 0), np.float32)
        if on_batch is not None:
            on_batch(len(batch))
    return Generated(token_ids=token_ids, texts=texts, states=states,
                     logits=[x for x in logits_out if x is not None] if keep_logits else None)


# -------------------------------------------------------------------------------------------- statistics


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; unlike the normal interval it stays in [0, 1]
    and is not degenerate at k = 0, which is where a tiny model's accuracy on these problems sits."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At k = 0 or k = n the bound is exactly 0 or 1; rounding would otherwise leave 3e-17.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


def mcnemar_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar test on the discordant pairs of two conditions scored on the same problems."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


# -------------------------------------------------------------------------------------------- experiment


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


def _progress(show: bool, total: int) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tokentrail.terminal import SafeConsole

    # The description is shown as plain text, never parsed as markup.
    progress = Progress(TextColumn("steering", style="bold"), TextColumn("{task.description}", markup=False),
                        BarColumn(), MofNCompleteColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        console=SafeConsole(stderr=True),
                        disable=not show)
    return progress


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
    with _progress(show_progress, len(plan) * len(problems)) as progress:
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
    rows = _result_rows(conditions, problems, trace, source, target, method, position)
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
            str(layer): float(vectors[layer].direction @ _unit(np.subtract(*centroids(trace, layer, target, source)),
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
    settings["seconds_per_condition"] = {_label(c): round(c.seconds, 2) for c in conditions}
    result.files = _write_outputs(result, conditions, problems)
    return result


def _label(condition: Condition) -> str:
    return condition.name if condition.layer is None else f"{condition.name}@{condition.layer}x{condition.alpha:g}"


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


def _result_rows(
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


def _write_outputs(result: SteeringResult, conditions: Sequence[Condition], problems: Sequence[Any]) -> dict[str, Path]:
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
        _label(c): {t: _rounded(float(np.mean([ok for ok, p in zip(c.correct, problems) if p.template == t])))
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
