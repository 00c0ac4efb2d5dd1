"""Attention energy per layer and head, from the scores the model really computes.

For one head of one layer, with query token i attending to key tokens j (the causal mask, and any sliding window,
decide which), the score is what the model computes before its softmax: `s_ij = <q_i, k_j> * scale` with q and k
after rotary or any other position handling, then the model's soft cap if it has one, plus the mask. With
`A_ij = softmax_j(s_ij)`:

    E_att(i)  = -sum_j A_ij s_ij          the attention-weighted score (the seed's interaction energy)
    E_logZ(i) = -log sum_j exp(s_ij)      the log-partition form (a free energy)

`E_att >= E_logZ` always (the gap is the entropy of row i of A). A layer's energy per head is the mean over the
query tokens of the prompt (normalised per token), and the layer's total is the sum over its heads.

A worked example: one head, two tokens, scale 1, q_1 = k_1 = (1, 0), q_2 = (0, 1), k_2 = (1, 1). Token 1 sees only
itself: s_11 = 1, so E_att(1) = -1 and E_logZ(1) = -1. Token 2 sees both: s_21 = 0, s_22 = 1, A_2 = (1/(1+e),
e/(1+e)) = (0.269, 0.731), E_att(2) = -0.731 and E_logZ(2) = -log(1 + e) = -1.313. Per token: E_att = -0.866,
E_logZ = -1.157 (tests/test_probes_energy.py checks this by hand).

How it is measured: during one forward pass per prompt, the function transformers dispatches attention to (its
`sdpa`, or `eager`, the model file's own) is replaced, for that pass only, by one that computes the scores from
the query, key and mask it is handed. With `sdpa` the original still computes the output and the scores'
output `A V` must agree with it; with `eager` the output is `A V` from those scores. Either way the pass's logits
are then compared with a plain forward pass: a model whose attention is anything other than softmax(scores) V
(attention sinks, a different mask rule, ...) gives different logits, and its energy is refused. The model's
modules are never modified; the dispatch table is restored when the pass ends, also on error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokentrail.errors import TokentrailError

if TYPE_CHECKING:  # annotations only: loading sits above the probes
    from tokentrail.models.loading import LoadedModel

__all__ = ["AttentionEnergy", "attention_energy", "energy_from_scores"]

SUPPORTED = ("sdpa", "eager")
# How far the logits of the measured pass may be from a plain pass, relative to their spread.
LOGIT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class AttentionEnergy:
    """`weighted [prompts, L, heads]` (E_att) and `log_partition [prompts, L, heads]` (E_logZ), each the mean
    over a prompt's query tokens; `tokens [prompts]`; `implementation` the attention function measured."""

    weighted: np.ndarray
    log_partition: np.ndarray
    tokens: np.ndarray
    implementation: str
    max_logit_difference: float


def energy_from_scores(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[heads, queries]` E_att and E_logZ from `scores [heads, queries, keys]`, masked entries at -inf."""
    weights = torch.softmax(scores, dim=-1)
    finite = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    weighted = -(weights * finite).sum(dim=-1)
    log_partition = -torch.logsumexp(scores, dim=-1)
    return weighted, log_partition


def _repeat_heads(states: torch.Tensor, groups: int) -> torch.Tensor:
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def _scores(module: Any, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float | None,
            kwargs: dict[str, Any]) -> torch.Tensor:
    """`[batch, heads, queries, keys]` in float64, masked entries at -inf."""
    groups = query.shape[1] // key.shape[1]
    key = _repeat_heads(key, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.double(), key.double().transpose(-1, -2)) * scale
    softcap = kwargs.get("softcap")
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    n_queries, n_keys = scores.shape[-2:]
    if mask is None:
        is_causal = kwargs.get("is_causal")
        if is_causal if is_causal is not None else getattr(module, "is_causal", True):
            allowed = torch.ones(n_queries, n_keys, dtype=torch.bool, device=scores.device).tril(n_keys - n_queries)
            scores = scores.masked_fill(~allowed, float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., :n_keys], float("-inf"))
    else:
        mask = mask[..., :n_keys].double()
        # The model's additive mask uses the dtype's most negative number: treat it as "not attended".
        scores = torch.where(mask <= torch.finfo(torch.float32).min / 2, torch.full_like(scores, float("-inf")),
                             scores + mask)
    return scores


class _Recorder:
    """The replacement attention function: records each call's scores by block, then computes the output."""

    def __init__(self, original: Any, block_of: dict[int, int]) -> None:
        self.original = original
        self.block_of = block_of
        self.calls: list[tuple[int, torch.Tensor]] = []
        self.max_output_difference = 0.0

    def __call__(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
            raise TokentrailError("this model's attention has sinks, which the energy's softmax(scores) leaves out")
        scaling = kwargs.get("scaling", args[1] if len(args) > 1 else None)
        scores = _scores(module, query, key, attention_mask, scaling, kwargs)
        self.calls.append((self.block_of.get(id(module), -1), scores[0]))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        groups = query.shape[1] // value.shape[1]
        ours = torch.matmul(weights, _repeat_heads(value, groups).double()).to(query.dtype).transpose(1, 2)
        if self.original is None:  # eager: the output from these very scores
            return ours.contiguous(), weights.to(query.dtype)
        output, returned = self.original(module, query, key, value, attention_mask, *args, **kwargs)
        spread = float(output.double().abs().max()) or 1.0
        self.max_output_difference = max(self.max_output_difference,
                                         float((output.double() - ours.double()).abs().max()) / spread)
        return output, returned


@contextlib.contextmanager
def _dispatch_to(implementation: str, recorder_for: Any) -> Iterator[_Recorder]:
    from transformers.modeling_utils import AttentionInterface

    table = AttentionInterface._global_mapping
    had = implementation in table
    original = table.get(implementation)
    recorder = recorder_for(original if implementation != "eager" else None)
    table[implementation] = recorder
    try:
        yield recorder
    finally:
        if had:
            table[implementation] = original
        else:
            del table[implementation]


def attention_energy(loaded: LoadedModel, encoded: Sequence[Sequence[int]]) -> AttentionEnergy:
    """E_att and E_logZ per prompt, layer and head for the token ids `encoded` (one forward pass per prompt, and
    one plain pass to prove the measured one computes the model's own logits). Refused with one line for a
    model whose attention does not go through transformers' sdpa or eager dispatch, or computes anything else."""
    model = loaded.model
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in SUPPORTED:
        raise TokentrailError(f"{loaded.name}: attention energy reads the scores of transformers' sdpa or eager "
                              f"attention; this model uses {implementation!r}")
    blocks = loaded.parts.blocks
    block_of = {}
    for index, block in enumerate(blocks, start=1):
        for module in block.modules():
            block_of.setdefault(id(module), index)
    n_layers = len(blocks)
    weighted_rows, partition_rows, counts = [], [], []
    worst_logits = 0.0
    heads = None
    device = next(model.parameters()).device
    for ids in encoded:
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
        with torch.inference_mode():
            plain = model(input_ids=input_ids).logits.double()
            with _dispatch_to(implementation, lambda original: _Recorder(original, block_of)) as recorder:
                measured = model(input_ids=input_ids).logits.double()
        if len(recorder.calls) != n_layers or sorted(b for b, _ in recorder.calls) != list(range(1, n_layers + 1)):
            raise TokentrailError(f"{loaded.name}: {len(recorder.calls)} attention calls went through transformers' "
                                  f"dispatch for {n_layers} blocks; the energy needs exactly one per block")
        spread = float(plain.abs().max()) or 1.0
        difference = float((measured - plain).abs().max()) / spread
        worst_logits = max(worst_logits, difference, recorder.max_output_difference)
        if worst_logits > LOGIT_TOLERANCE:
            raise TokentrailError(
                f"{loaded.name}: its attention is not softmax(q k^T scale + mask) V as the energy assumes (the "
                f"recomputed attention differs by {worst_logits:.1e} relative); attention energy refused")
        per_block = dict(recorder.calls)
        weighted = np.zeros((n_layers, per_block[1].shape[0]))
        partition = np.zeros_like(weighted)
        for block in range(1, n_layers + 1):
            e_att, e_logz = energy_from_scores(per_block[block])
            weighted[block - 1] = e_att.mean(dim=-1).cpu().numpy()
            partition[block - 1] = e_logz.mean(dim=-1).cpu().numpy()
        if heads is not None and weighted.shape[1] != heads:
            raise TokentrailError(f"{loaded.name}: the number of attention heads changes between prompts")
        heads = weighted.shape[1]
        weighted_rows.append(weighted)
        partition_rows.append(partition)
        counts.append(len(ids))
    return AttentionEnergy(weighted=np.stack(weighted_rows), log_partition=np.stack(partition_rows),
                           tokens=np.asarray(counts), implementation=implementation,
                           max_logit_difference=worst_logits)
