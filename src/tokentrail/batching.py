"""How many prompts may share a forward pass: the CPUs this process may use, the memory a batch may take, and
an estimate of one batch's transient activations from the model's config (mixture-of-experts and per-layer
size lists included). The `Tracer` plans its batches with these; batching never changes what is recorded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tokentrail.models.parts import config_value, text_config_of

if TYPE_CHECKING:  # annotations only: loading sits above tracing
    from tokentrail.models.loading import LoadedModel


def usable_cpus() -> int:
    """CPUs this process may really use: its affinity mask, further limited by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def set_sane_threads() -> int:
    """Never run more torch threads than usable CPUs; returns the thread count in force.

    torch counts the host's cores, which inside a container or a Ray worker may be many more than this
    process is allowed; oversubscribed OpenMP threads spin against each other and a forward pass can take
    several times longer. A lower count set by the user (OMP_NUM_THREADS, set_num_threads) is kept.
    """
    cpus = usable_cpus()
    if torch.get_num_threads() > cpus:
        torch.set_num_threads(cpus)
    return torch.get_num_threads()


def available_memory_bytes(device: torch.device) -> int:
    """Memory a batch may still take on `device`: free GPU memory, or MemAvailable of the machine."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 8 << 30


def default_memory_budget(device: torch.device) -> int:
    """How much transient activation memory one forward pass may use by default.

    Half of what is free on a GPU (the allocator fragments, and other work may share it); on a CPU a quarter
    of available memory, capped at 4 GiB, because larger batches no longer run faster there.
    """
    available = available_memory_bytes(device)
    if device.type == "cuda":
        return max(256 << 20, available // 2)
    return int(min(4 << 30, max(256 << 20, available // 4)))


@dataclass(frozen=True)
class BatchCost:
    """Bytes of transient activations of one forward pass, as `per_token * B * W + per_square * B * W**2`.

    Only one block's activations are alive at a time under inference mode; the squared term covers the
    attention mask and, for eager attention, the score and probability matrices of every head.
    """

    per_token: int
    per_square: int
    per_prompt: int

    def __call__(self, n_prompts: int, width: int) -> int:
        return n_prompts * (self.per_token * width + self.per_square * width * width + self.per_prompt)


def _largest(config: Any, *names: str) -> int | None:
    """The first of `names` the config sets, as one number; per-layer lists count by their largest entry."""
    for name in names:
        value = config_value(config, name)
        if isinstance(value, (list, tuple)):
            value = max((v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)), default=None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return int(value)
    return None


def batch_cost(loaded: LoadedModel) -> BatchCost:
    config = loaded.model.config
    text = text_config_of(loaded.model)
    hidden = loaded.parts.hidden_size
    vocab = int(loaded.parts.unembed.weight.shape[0])  # the head computes every row, padding rows included
    intermediate = _largest(text, "intermediate_size", "n_inner", "ffn_dim", "d_ff") or 4 * hidden
    heads = _largest(text, "num_attention_heads", "n_head", "n_heads") or 1
    param = next(loaded.model.parameters(), None)
    width = param.element_size() if param is not None else 4
    # Mixture of experts: each token runs through its top-k experts (and any shared ones), and the router
    # writes one logit per expert; a dense MLP row is the upper bound when the config says nothing else.
    experts = _largest(text, "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts") or 0
    if experts:
        top_k = _largest(text, "num_experts_per_tok", "moe_topk", "top_k", "moe_k") or 1
        expert_width = _largest(text, "moe_intermediate_size", "expert_intermediate_size") or int(intermediate)
        shared = (_largest(text, "n_shared_experts", "num_shared_experts") or 0) * expert_width
        shared += _largest(text, "shared_expert_intermediate_size") or 0
        intermediate = max(int(intermediate), top_k * expert_width + shared)
    # Residual in and out, normed copy, q/k/v and attention output, plus gate, up and activated MLP rows.
    per_token = width * (7 * hidden + 3 * int(intermediate) + 2 * experts)
    eager = getattr(config, "_attn_implementation", "eager") in (None, "eager")
    per_square = 4 + (2 * heads * width if eager else 0)
    # Next-token logits and their softmax, float32, plus the captured layers.
    per_prompt = 8 * vocab + 4 * hidden * (loaded.parts.n_layers + 2)
    return BatchCost(per_token=per_token, per_square=per_square, per_prompt=per_prompt)
