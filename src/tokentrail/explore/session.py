"""A run opened for exploring: its stored map, and the run's own model for prompts typed live.

`ExploreSession(run_dir)` reads the run's store and fits the run's projection exactly as `tokentrail analyze`
does (the run's saved options, the same solver and sign rule, so the map's numbers are the run's
`metrics/projection.csv`), once; a live prompt is projected into that fit and never enters it. The model is
loaded with the run's own settings, in the background (`start_loading`), and must be the model the store was
traced with (the store's fingerprint rule): when it cannot be loaded, or is another model, the session stays
read-only, the stored map still works, and `model_problem` says why.

The model serves one call at a time (`ModelGate`): callers queue, and beyond `max_waiting` of them a new one is
refused at once with `ExploreBusy`, so a burst of requests never piles up unbounded work.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tokentrail.analysis.bifurcation import bifurcation_sentence
from tokentrail.analysis.pipeline import default_axis, fit_projections
from tokentrail.analysis.placement import Placement, place_prompt
from tokentrail.core.jsonable import json_ready
from tokentrail.core.settings import BatchSettings
from tokentrail.core.trace import Trace, TraceOptions
from tokentrail.errors import TokentrailError, first_line
from tokentrail.explore.schemas import MAX_PROMPT_TOKENS, Continuation, SteerResponse
from tokentrail.prompts import prompt_set_from_data
from tokentrail.runs import (
    RUN_FILE,
    analysis_options,
    check_analysable,
    load_run_model,
    load_trace,
    prompt_set_of,
    read_run,
    trace_run,
)

if TYPE_CHECKING:  # annotations only
    from tokentrail.models.loading import LoadedModel
    from tokentrail.tracing import Tracer

__all__ = ["AlreadyStored", "ExploreBusy", "ExploreSession", "LivePrompt", "ModelGate", "ModelUnavailable"]

# The map shows three components whatever the run was analysed with: the first two are the run's own (a PCA's
# leading components do not depend on how many are kept), the third makes the 3-D view possible.
MAP_COMPONENTS = 3
LENS_TOP_K = 5
VECTOR_SUFFIXES = (".npy", ".safetensors")


class ExploreBusy(TokentrailError):
    """Too many requests already wait for the model."""


class ModelUnavailable(TokentrailError):
    """The run's model is not loaded (yet, or at all): live tracing, steering and adding are off."""


class AlreadyStored(TokentrailError):
    """The prompt is already one of the run's."""


class ModelGate:
    """One model call at a time, at most `max_waiting` callers waiting; the next is refused with `ExploreBusy`."""

    def __init__(self, max_waiting: int = 8) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be 0 or more, got {max_waiting}")
        self.max_waiting = max_waiting
        self._model = threading.Lock()
        self._count = threading.Lock()
        self.waiting = 0
        self.running = False

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        with self._count:
            if self.running and self.waiting >= self.max_waiting:
                raise ExploreBusy(f"busy: the model is serving one request and {self.waiting} more are waiting; "
                                  "try again in a moment")
            self.waiting += 1
        try:
            self._model.acquire()
        except BaseException:
            with self._count:
                self.waiting -= 1
            raise
        # Admission reads `running` and `waiting` together under the count lock, so both change under it.
        with self._count:
            self.waiting -= 1
            self.running = True
        try:
            yield
        finally:
            with self._count:
                self.running = False
            self._model.release()


@dataclass(frozen=True)
class LivePrompt:
    """A prompt traced live and placed on the stored map. `projection [layers, 3]` in the run's fit (its layers:
    `ExploreSession.map_layers`), `depth [L+1, 3]` in the depth view's fit, `lens_*` the logit lens's top-5 per
    layer 0..L, `next_*` the model's own next-token top-5."""

    prompt: str
    tokens: list[str]
    projection: np.ndarray
    depth: np.ndarray
    placement: Placement
    lens_tokens: list[list[str]]
    lens_probs: np.ndarray
    next_tokens: list[str]
    next_probs: np.ndarray
    seconds: float


def _rounded(values: np.ndarray) -> list:
    return json_ready(np.round(np.asarray(values, dtype=np.float64), 6))


class ExploreSession:
    """The stored map of `run_dir` and, once loaded, its model; see the module docstring."""

    def __init__(self, run_dir: str | Path, k_neighbours: int = 5, max_waiting: int = 8) -> None:
        self.run_dir = Path(run_dir)
        self.k_neighbours = k_neighbours
        self.gate = ModelGate(max_waiting)
        self.run, self.trace = load_trace(self.run_dir)
        check_analysable(self.trace, self.run_dir)
        self.options = analysis_options(self.run)
        categories = list(self.trace.categories)
        try:
            self.options.validate(categories)
            self.fit = fit_projections(self.trace.states, self.trace.final_states, categories,
                                       replace(self.options, n_components=max(self.options.n_components,
                                                                              MAP_COMPONENTS)))
        except ValueError as exc:
            raise TokentrailError(f"cannot explore {self.run_dir}: {exc}") from None
        self.axis = (tuple(self.options.axis) if self.options.axis is not None else default_axis(categories))
        self.trace_options = TraceOptions(**self.run["trace_options"])
        self.model_status = "not loaded"
        self.model_problem: str | None = None
        self.loaded: LoadedModel | None = None
        self._settings_used: Any = None  # the ModelSettings the model was loaded with (recorded when adding)
        self._tracer: Tracer | None = None
        self._loading: threading.Thread | None = None
        self._map: dict[str, Any] | None = None
        # The map holds the prompts it opened with; prompts added since are in the run (and its next analysis).
        self.prompts_in_run = len(self.trace)

    # --- the stored map -------------------------------------------------------------------------------------

    @property
    def map_layers(self) -> list[str]:
        """The projection's layers as labels: block numbers, and "final" for the final-normed state."""
        n_stored = self.trace.states.shape[1]
        return ["final" if int(layer) == n_stored else str(int(layer)) for layer in self.fit.layers]

    def stored_map(self) -> dict[str, Any]:
        """Everything the page draws before any live prompt, JSON-ready (computed once)."""
        if self._map is None:
            trace = self.trace
            stack = self.fit.stack(trace.states, trace.final_states)
            lens_top: list[list[str | None]] | None = None
            lens_prob: list | None = None
            if trace.lens_tokens is not None and trace.lens_probs is not None:
                lens_top = [[layer[0] if layer else None for layer in prompt] for prompt in trace.lens_tokens]
                lens_prob = _rounded(np.asarray(trace.lens_probs)[:, :, 0])
            self._map = {
                "run": self.run_dir.name,
                "prompts": [{"index": i, "id": trace.prompt_ids[i], "text": trace.prompts[i],
                             "category": trace.categories[i], "label": trace.labels[i]} for i in range(len(trace))],
                "categories": list(dict.fromkeys(trace.categories)),
                "layers": self.map_layers,
                "n_layers": trace.n_layers,
                "projection": _rounded(self.fit.trajectory.transform(stack)),
                "explained_variance_ratio": _rounded(self.fit.trajectory.explained_variance_ratio_),
                "depth": _rounded(self.fit.depth.transform(trace.states)),
                "depth_explained_variance_ratio": _rounded(self.fit.depth.explained_variance_ratio_),
                "lens_tokens": lens_top,
                "lens_probs": lens_prob,
                "axis": list(self.axis) if self.axis is not None else None,
                "normalize": self.options.normalize,
                "center": self.options.center,
                "sustain": self.options.sustain,
            }
        return self._map

    def info(self) -> dict[str, Any]:
        model = self.run.get("model", {})
        return {
            "run": self.run_dir.name,
            "model": model.get("fingerprint", {}).get("name") or model.get("spec"),
            "model_status": self.model_status,
            "model_problem": self.model_problem,
            "read_only": self.model_status != "ready",
            "n_prompts": len(self.trace),
            "n_prompts_in_run": self.prompts_in_run,
            "n_layers": self.trace.n_layers,
            "categories": list(dict.fromkeys(self.trace.categories)),
            "axis": list(self.axis) if self.axis is not None else None,
            "trace_options": self.trace_options.to_dict(),
            "busy": self.gate.running,
            "waiting": self.gate.waiting,
            "vector_files": self.vector_files(),
        }

    def vector_files(self) -> list[str]:
        """Steering vector files inside the run directory (not in its store), as paths relative to it."""
        found = []
        # /api/info asks on every poll: the store (thousands of shards in a large run) is never walked.
        for folder, subfolders, names in os.walk(self.run_dir):
            if Path(folder) == self.run_dir and "store" in subfolders:
                subfolders.remove("store")
            found.extend((Path(folder) / name).relative_to(self.run_dir).as_posix() for name in names
                         if Path(name).suffix in VECTOR_SUFFIXES and (Path(folder) / name).is_file())
        return sorted(found)

    # --- the model --------------------------------------------------------------------------------------------

    def load_model(self) -> None:
        """Load the run's model with its own settings and check it is the store's model; never raises: a
        failure leaves the session read-only with `model_problem` set."""
        from tokentrail.tracing import Tracer

        self.model_status = "loading"
        try:
            settings, loaded = load_run_model(self.run_dir, self.run)
            live_options = replace(self.trace_options, logit_lens=True,
                                   top_k=max(self.trace_options.top_k, LENS_TOP_K))
            self._tracer = Tracer(loaded, live_options, batch_size=1)
            self._settings_used = settings
            self.loaded = loaded
            self.model_status = "ready"
        except Exception as exc:  # noqa: BLE001  (any failure to load means read-only with the reason, not a crash)
            self.model_status = "unavailable"
            self.model_problem = first_line(exc) if isinstance(exc, TokentrailError) else \
                f"{type(exc).__name__}: {first_line(exc)}"

    def start_loading(self) -> threading.Thread:
        """Load the model in a background thread (the stored map is usable meanwhile)."""
        if self._loading is None:
            self.model_status = "loading"
            self._loading = threading.Thread(target=self.load_model, name="tokentrail-explore-load", daemon=True)
            self._loading.start()
        return self._loading

    def wait_for_model(self, timeout: float | None = None) -> bool:
        if self._loading is not None:
            self._loading.join(timeout)
        return self.model_status == "ready"

    def _need_model(self) -> tuple[LoadedModel, Tracer]:
        if self.model_status == "loading":
            raise ModelUnavailable("the model is still loading; try again in a moment")
        if self.loaded is None or self._tracer is None:
            reason = self.model_problem or "the model is not loaded"
            raise ModelUnavailable(f"read-only: {reason}")
        return self.loaded, self._tracer

    def _traced(self, tracer: Tracer, prompt: str) -> Trace:
        encoded = tracer.encode([prompt])
        if len(encoded[0]) > MAX_PROMPT_TOKENS:
            raise TokentrailError(f"the prompt is {len(encoded[0])} tokens; explore traces at most "
                                  f"{MAX_PROMPT_TOKENS}")
        return tracer.trace([prompt])

    # --- live prompts -------------------------------------------------------------------------------------------

    def place(self, prompt: str, category: str | None = None) -> LivePrompt:
        """Trace `prompt` with the run's options and place it on the map (nearest prompts, vote, lens, axis
        score, bifurcation from `category` or the nearest one)."""
        start = time.perf_counter()
        categories = list(dict.fromkeys(self.trace.categories))
        if category is not None and category not in categories:
            raise TokentrailError(f"category {category!r} is not in this run; its categories are: "
                                  f"{', '.join(categories)}")
        _, tracer = self._need_model()
        with self.gate.turn():
            traced = self._traced(tracer, prompt)
        states = traced.states[0]
        placement = place_prompt(self.trace.states, self.trace.categories, states, k=self.k_neighbours,
                                 axis=self.axis, home=category, sustain=self.options.sustain)
        stack = self.fit.stack(traced.states, traced.final_states)
        return LivePrompt(
            prompt=prompt, tokens=list(traced.tokens[0]),
            projection=self.fit.trajectory.transform(stack)[0], depth=self.fit.depth.transform(traced.states)[0],
            placement=placement, lens_tokens=[list(layer) for layer in traced.lens_tokens[0]],
            lens_probs=np.asarray(traced.lens_probs[0]), next_tokens=list(traced.next_tokens[0]),
            next_probs=np.asarray(traced.next_token_probs[0]), seconds=time.perf_counter() - start,
        )

    def live_json(self, live: LivePrompt) -> dict[str, Any]:
        """`live` as the API's TraceResponse."""
        p = live.placement
        trace = self.trace
        layers = []
        for layer in range(len(p.vote)):
            layers.append({
                "layer": layer,
                "neighbours": [{"index": int(i), "id": trace.prompt_ids[i], "category": trace.categories[i],
                                "cosine": round(float(c), 6)}
                               for i, c in zip(p.neighbours[layer], p.similarity[layer])],
                "vote": p.vote[layer],
                "winner": p.winner[layer],
                "lens": [{"token": t, "prob": round(float(q), 6)}
                         for t, q in zip(live.lens_tokens[layer][:LENS_TOP_K], live.lens_probs[layer][:LENS_TOP_K])],
                "axis_score": json_ready(round(float(p.axis[layer]), 6)),
            })
        sentence = bifurcation_sentence(p.home, p.layer, p.toward, "cosine", p.sustain)
        return {
            "prompt": live.prompt,
            "tokens": live.tokens,
            "projection": _rounded(live.projection),
            "depth": _rounded(live.depth),
            "layers": layers,
            "bifurcation": {"home": p.home, "layer": p.layer, "toward": p.toward, "sustain": p.sustain,
                            "sentence": sentence},
            "next_tokens": [{"token": t, "prob": round(float(q), 6)}
                            for t, q in zip(live.next_tokens[:LENS_TOP_K], live.next_probs[:LENS_TOP_K])],
            "seconds": round(live.seconds, 4),
        }

    # --- steering -------------------------------------------------------------------------------------------------

    def _vector_path(self, vector_file: str) -> Path:
        root = self.run_dir.resolve()
        path = (root / vector_file).resolve()
        if not path.is_relative_to(root):
            raise TokentrailError(f"vector file {vector_file!r} is outside the run directory; explore reads only "
                                  "files inside it")
        if path.suffix not in VECTOR_SUFFIXES or not path.is_file():
            raise TokentrailError(f"vector file {vector_file!r} is not a .npy or .safetensors file in the run "
                                  "directory")
        return path

    def steer(self, prompt: str, layer: int, alpha: float, source: str | None = None, target: str | None = None,
              vector_file: str | None = None, position: str = "last", max_new_tokens: int = 24) -> SteerResponse:
        """Greedy continuations without and with `alpha` x (median residual norm at `layer`) x a unit direction
        (from category `source` to `target` in the run, or a vector file) added at `layer`, side by side, with both
        trajectories in the map's projection and depth view (the API's answer, `.model_dump()` for a dict)."""
        from tokentrail.steering import Steering, encode_prompts, generate, steering_vector

        start = time.perf_counter()
        if vector_file is not None and (source is not None or target is not None):
            raise TokentrailError("give either two categories (source and target) or a vector file, not both")
        if vector_file is None and (source is None or target is None):
            raise TokentrailError("a direction needs two categories (source and target) or a vector file")
        if vector_file is None and source == target:
            raise TokentrailError(f"source and target are both {source!r}; a direction needs two categories")
        method: str | Path = self._vector_path(vector_file) if vector_file is not None else "mean-diff"
        vector = steering_vector(self.trace, layer, method, source or "", target or "")
        loaded, tracer = self._need_model()
        with self.gate.turn():
            baseline = self._traced(tracer, prompt)
            encoded = encode_prompts(loaded, [prompt], chat=self.trace_options.chat)
            delta = vector.delta(alpha)
            per_row = Steering.per_row(loaded, {layer: np.stack([np.zeros_like(delta), delta])}, position)
            generated = generate(loaded, encoded * 2, max_new_tokens, batch_size=2, steering=per_row)
            with Steering(loaded, [vector], alpha, position):
                steered = tracer.trace([prompt])
        direction = (f"{source} -> {target} (mean difference at layer {layer})" if vector_file is None
                     else f"{vector_file} (layer {layer})")

        def continuation(text: str, traced: Trace) -> Continuation:
            stack = self.fit.stack(traced.states, traced.final_states)
            return Continuation(text=text, projection=_rounded(self.fit.trajectory.transform(stack)[0]),
                                depth=_rounded(self.fit.depth.transform(traced.states)[0]))

        return SteerResponse(prompt=prompt, layer=layer, alpha=float(alpha), position=position, direction=direction,
                             scale=round(vector.scale, 6), baseline=continuation(generated.texts[0], baseline),
                             steered=continuation(generated.texts[1], steered),
                             seconds=round(time.perf_counter() - start, 4))

    # --- adding to the run --------------------------------------------------------------------------------------

    def add(self, prompt: str, category: str, prompt_id: str | None = None, label: str = "") -> dict[str, Any]:
        """Add `prompt` to the run: validated by the prompt-file rules, traced into the store by the run's model
        with the run's options (the store's rules: nothing of another model or options is mixed in), and listed
        in run.json, so `tokentrail analyze` includes it. The open map keeps the fit it started with."""
        loaded, _ = self._need_model()
        with self.gate.turn():
            run = read_run(self.run_dir)
            current = prompt_set_of(run)
            if prompt in current.texts:
                held = current.prompts[current.texts.index(prompt)]
                raise AlreadyStored(f"this prompt is already in the run, as {held.id!r} ({held.category})")
            record = {"text": prompt, "category": category, "label": label}
            if prompt_id is not None:
                record["id"] = prompt_id
            extended = prompt_set_from_data({"name": current.name, "prompts": [*current.to_records(), record]})
            extended.source = current.source
            batching = BatchSettings(**run.get("batching", {}))
            trace_run(self.run_dir, extended, self._settings_used, self.trace_options, batching,
                      show_progress=False, loaded=loaded)
        added = extended.prompts[-1]
        self.prompts_in_run = len(extended)
        return {"id": added.id, "category": added.category, "n_prompts": len(extended),
                "message": f"added to {self.run_dir / RUN_FILE} and its store; `tokentrail analyze` includes it "
                           "(this map keeps the projection it opened with)"}
