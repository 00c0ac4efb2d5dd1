"""The seed's physics as numbers on a traced run: what each measure is, and computing them all.

From the stored states (no model): the Euler-step view of the residual stream (step size, its ratio to the
state's norm, how linear each block's update is across prompts), the geometry of the last-token cloud per layer
(TwoNN intrinsic dimension, anisotropy, effective rank) and, for runs traced with `--position all`, each
prompt's token cloud: its geometry and its clustering over depth (mean pairwise cosine, cluster counts, metastable
plateaus). With the run's model: the attention energy per layer and head (`probes.energy`) and the
finite-time expansion of a small perturbation of the embedding (`probes.perturbation`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tokentrail.analysis.clustering import clustering_by_prompt, metastable_plateaus
from tokentrail.analysis.geometry import geometry_by_layer, token_geometry
from tokentrail.analysis.ode import euler_steps, expansion_rates, update_linearity
from tokentrail.core.trace import Trace
from tokentrail.errors import TokentrailError

if TYPE_CHECKING:  # annotations only: the model probes import torch when they run
    from tokentrail.models.loading import LoadedModel

__all__ = ["PhysicsOptions", "PhysicsResult", "measure_stored", "measure_with_model", "probe_rows"]


@dataclass(frozen=True)
class PhysicsOptions:
    """`threshold`: cosine similarity at which tokens are one cluster; plateaus: a stretch of at least
    `min_plateau` layers over which the mean cluster count changes by at most `plateau_tolerance` per layer,
    ended by a larger change; `energy`, `expansion`: run the model probes; `directions`, `epsilon`: the
    perturbations (epsilon relative to the embedding's norm); `max_prompts`: the model probes on this many
    prompts only (None: all), taken from the categories in turn (`probe_rows`)."""

    threshold: float = 0.9
    plateau_tolerance: float = 0.25
    min_plateau: int = 3
    energy: bool = True
    expansion: bool = True
    directions: int = 8
    epsilon: float = 1e-3
    max_prompts: int | None = None
    seed: int = 0

    def check(self) -> None:
        """Refuse options that would make a measure meaningless, with the first problem found."""
        rules = [
            (0 < self.threshold < 1, f"--threshold must be between 0 and 1 (a cosine similarity), got {self.threshold}"),
            (self.plateau_tolerance >= 0, f"the plateau tolerance must be 0 or more, got {self.plateau_tolerance}"),
            (self.min_plateau >= 2, f"--min-plateau must be at least 2 layers, got {self.min_plateau}"),
            (self.directions >= 1, f"--directions must be at least 1, got {self.directions}"),
            (0 < self.epsilon < 1, f"--epsilon must be between 0 and 1 (relative to the embedding), got {self.epsilon}"),
            (self.max_prompts is None or self.max_prompts >= 1, f"--max-prompts must be at least 1, got {self.max_prompts}"),
        ]
        for ok, message in rules:
            if not ok:
                raise TokentrailError(message)


@dataclass
class PhysicsResult:
    """Every measure, `None` where it was not computed (`notes` says why). Shapes: P prompts, L blocks."""

    step: np.ndarray  # [P, L] ||h_{l+1} - h_l||
    relative_step: np.ndarray  # [P, L] step / ||h_l||
    linearity: np.ndarray | None  # [L] out-of-sample R^2 of a linear map h_l -> h_{l+1} - h_l
    geometry: dict[str, np.ndarray]  # last-token cloud, each [L+1]
    token_geometry: dict[str, np.ndarray] | None = None  # each [P, L+1]
    clustering: dict[str, np.ndarray] | None = None  # mean_cosine, clusters, spectral_clusters: each [P, L+1]
    plateaus: list[tuple[int, int]] = field(default_factory=list)  # of the mean cluster count over prompts
    energy_weighted: np.ndarray | None = None  # [P', L, heads] E_att, mean over query tokens
    energy_log_partition: np.ndarray | None = None  # [P', L, heads] E_logZ
    energy_implementation: str = ""
    separations: np.ndarray | None = None  # [P', directions, L+1]
    expansion: np.ndarray | None = None  # [P', L] mean over directions of log(|d_{l+1}| / |d_l|)
    # [P', L] the same for |d_l| / |h_l|: growth beyond the growth of the state's own norm with depth
    relative_expansion: np.ndarray | None = None
    probed: int = 0  # P': how many prompts the model probes ran on
    # [P'] the trace rows they ran on, in the order of the probe arrays (`probe_rows`); the row i of an energy or
    # expansion array is the prompt probed_rows[i]
    probed_rows: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def probed_at(self) -> np.ndarray:
        """The trace row of each row of the probe arrays (`probed_rows`; none before the probes ran)."""
        return self.probed_rows if self.probed_rows is not None else np.arange(self.probed)


def measure_stored(trace: Trace, options: PhysicsOptions) -> PhysicsResult:
    """Everything that needs only the stored states."""
    options.check()
    started = time.perf_counter()
    states = np.asarray(trace.states, dtype=np.float64)
    steps = euler_steps(states)
    notes: list[str] = []
    try:
        linearity = update_linearity(states, seed=options.seed)
    except ValueError as exc:
        linearity = None
        notes.append(f"block linearity skipped: {exc}")
    seconds = {"ode": time.perf_counter() - started}
    started = time.perf_counter()
    geometry = geometry_by_layer(states)
    seconds["geometry"] = time.perf_counter() - started
    result = PhysicsResult(step=steps["step"], relative_step=steps["relative_step"], linearity=linearity,
                           geometry=geometry, seconds=seconds, notes=notes)
    if trace.token_states is None:
        notes.append("token clustering and token-cloud geometry need every token: trace with --position all")
        return result
    started = time.perf_counter()
    token_states = [np.asarray(t, dtype=np.float64) for t in trace.token_states]
    result.token_geometry = token_geometry(token_states)
    result.clustering = clustering_by_prompt(token_states, threshold=options.threshold)
    mean_clusters = np.nanmean(result.clustering["clusters"].astype(np.float64), axis=0)
    result.plateaus = metastable_plateaus(mean_clusters, options.plateau_tolerance, options.min_plateau)
    seconds["tokens"] = time.perf_counter() - started
    return result


def probe_rows(categories: Sequence[str], max_prompts: int | None) -> np.ndarray:
    """The rows the model probes run on, in increasing order: all of them, or `max_prompts` taken from the
    categories in turn (each category's first prompts), so that a prompt set stored category by category is
    not probed in its first category only, and a comparison of two categories has prompts of both."""
    n_prompts = len(categories)
    if max_prompts is None or max_prompts >= n_prompts:
        return np.arange(n_prompts)
    labels = np.asarray(list(categories), dtype=object)
    queues = [list(np.flatnonzero(labels == name)) for name in dict.fromkeys(labels.tolist())]
    chosen: list[int] = []
    while len(chosen) < max_prompts:
        for queue in queues:
            if queue and len(chosen) < max_prompts:
                chosen.append(int(queue.pop(0)))
    return np.sort(np.asarray(chosen, dtype=int))


def measure_with_model(loaded: LoadedModel, trace: Trace, options: PhysicsOptions, result: PhysicsResult) -> None:
    """Add the attention energy and the expansion rates, from forward passes of `loaded` on the stored token ids
    of the prompts `probe_rows` chooses. A probe the model does not allow is noted, not fatal."""
    from tokentrail.probes.energy import attention_energy
    from tokentrail.probes.perturbation import separations

    rows = probe_rows(trace.categories, options.max_prompts)
    encoded: list[Any] = [list(map(int, trace.token_ids[row])) for row in rows]
    result.probed = len(rows)
    result.probed_rows = rows
    if options.energy:
        started = time.perf_counter()
        try:
            energy = attention_energy(loaded, encoded)
            result.energy_weighted = energy.weighted
            result.energy_log_partition = energy.log_partition
            result.energy_implementation = energy.implementation
        except TokentrailError as exc:
            result.notes.append(f"attention energy skipped: {exc}")
        result.seconds["energy"] = time.perf_counter() - started
    if options.expansion:
        started = time.perf_counter()
        try:
            result.separations = separations(loaded, encoded, n_directions=options.directions,
                                             epsilon=options.epsilon, seed=options.seed)
            result.expansion = np.stack([expansion_rates(prompt) for prompt in result.separations])
            norms = np.linalg.norm(np.asarray(trace.states[rows], dtype=np.float64), axis=-1)  # [P', L+1]
            result.relative_expansion = np.stack([expansion_rates(prompt / norms[i][None])
                                                  for i, prompt in enumerate(result.separations)])
        except TokentrailError as exc:
            result.notes.append(f"expansion rates skipped: {exc}")
        result.seconds["expansion"] = time.perf_counter() - started
