"""Load-time self-check: the tracer is compared with the model's own forward pass before anything is traced.

A tracer that hooks the wrong module, reads the wrong readout or lets padding leak into a recurrence gives
numbers that look fine and are wrong. So every load runs two forward passes:

1. the model's own plain forward of one short prompt (input ids only, as a user would call it), with
   `output_hidden_states`;
2. the tracer on that prompt and a prefix of it in one padded batch, every token kept.

and compares, at every token and layer:

    tracer states of the prompt              == output_hidden_states   (the blocks are the residual stream)
    tracer states of the padded prefix       == the prompt's first tokens (a causal model's states of a
                                                prefix are the prefix's own), so padding changes nothing
    final-normed states                      == output_hidden_states[-1]
    readout(final), lens at the last layer   == the model's next-token log-probabilities

It also decides how prompts of different lengths may share a batch: left padding when that is exact, else
right padding, else only prompts of equal length (recurrent models whose left padding feeds pad tokens through
their state, position ids counted from a padding index, routing that depends on the batch). When the model
and the tracer disagree even unpadded, the model is refused with one line naming what differed and where.
`make bench` measures the cost against a 200-prompt trace.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokentrail.errors import ArchitectureError, TokentrailError, first_line
from tokentrail.models.parts import _Chain, modules_around_blocks, to_batch_first

if TYPE_CHECKING:  # annotations only: loading sits above tracing
    from tokentrail.models.loading import LoadedModel

CHECK_PROMPT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"
# Largest relative difference accepted, for states and for next-token log-probabilities alike: per token,
# max |traced - reference| / max |reference|. Half precision runs other kernels batched than alone (SmolLM2 in
# bfloat16: 0.03 over 30 layers); a wrong hook, norm or padding shows as a difference of order one either way.
TOLERANCE = {"float32": 1e-3, "half": 1e-1}


@dataclass(frozen=True)
class SelfCheckReport:
    padding: str
    head: str
    final_norm: str | None
    max_state_error: float
    max_readout_error: float
    forward_passes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ShapeMismatch(Exception):
    pass


def _relative(traced: np.ndarray, reference: np.ndarray) -> float:
    """Largest error per token, each against that token's own scale: one token with massive activations (an
    attention sink) must not hide an error at another."""
    if traced.shape != reference.shape:  # e.g. a reversible model whose blocks carry two streams side by side
        raise _ShapeMismatch(f"has shape {traced.shape}, the model's own {reference.shape}")
    if not np.all(np.isfinite(traced)):
        return float("inf")
    traced, reference = np.atleast_2d(traced), np.atleast_2d(reference)
    scale = np.max(np.abs(reference), axis=-1)
    scale[scale == 0] = 1.0
    return float(np.max(np.max(np.abs(traced - reference), axis=-1) / scale))


@dataclass
class _Reference:
    """The model's own plain forward pass of the long prompt alone: input ids only, as a user would call it."""

    hidden: list[np.ndarray]  # output_hidden_states, [T, D] each
    last_raw: np.ndarray  # output of the last block that ran, [T, D]
    embedding: np.ndarray  # the input embeddings [T, H], for Mamba-style models
    log_probs: np.ndarray  # next-token log-probabilities [V]
    ran_blocks: set[int]
    after_blocks: list[tuple[str, torch.nn.Module]]  # modules run after the last block, in order
    stream_shape: tuple[int, ...]


@torch.inference_mode()
def _reference(loaded: LoadedModel, ids: list[int]) -> _Reference:
    from tokentrail.capture import first_tensor
    from tokentrail.tracing import _supports

    parts = loaded.parts
    device = next(loaded.model.parameters()).device
    events: list[tuple[int, str, torch.nn.Module, Any]] = []  # (block number or 0, path, module, output)

    def record(number: int, path: str):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            events.append((number, path, module, first_tensor(output)))
        return hook

    kwargs: dict[str, Any] = {"output_hidden_states": True, "use_cache": False}
    if _supports(loaded.model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1  # only the next-token logits are compared
    input_ids = torch.tensor([ids], device=device)
    distinct = list(dict.fromkeys(parts.blocks))  # a block that runs several times is hooked once
    handles = [block.register_forward_hook(record(number, "")) for number, block in enumerate(distinct, 1)]
    # Below the model itself: its own children are the head and the base model, not what follows the blocks.
    around = modules_around_blocks(loaded.model, parts.blocks_path, include_model=False)
    handles += [module.register_forward_hook(record(0, path)) for path, module in around]
    try:
        output = loaded.model(input_ids=input_ids, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    block_outputs = [(number, value) for number, _, _, value in events if number]
    if not block_outputs:
        raise ArchitectureError("self-check failed: no decoder block ran in a forward pass")
    calls = [number for number, _ in block_outputs]
    if len(set(calls)) < len(calls) or len(distinct) < len(parts.blocks):
        # Shared or looped blocks (Dory's recurrent layers run in loops): the layers of the trajectory are the
        # block calls in the order they ran, each its own slot, so no state overwrites another.
        parts.blocks = [distinct[number - 1] for number in calls]
        block_outputs = [(index, value) for index, (_, value) in enumerate(block_outputs, start=1)]
    max_block, raw = block_outputs[-1]
    n_tokens = len(ids)
    layout = _layout_of(raw, n_tokens)
    if layout is None:
        shape = tuple(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
        raise ArchitectureError(
            f"self-check failed: block {max_block} returns {shape} for one prompt of {n_tokens} tokens: no axis "
            f"holds one state per prompt token (as [1, {n_tokens}, ...], [{n_tokens}, 1, ...] or "
            f"[streams, 1, {n_tokens}, ...]), so tokentrail cannot trace it"
        )
    loaded.parts.layout, loaded.parts.extra_leading_tokens = layout
    raw = loaded.parts.batch_first(raw, 1, n_tokens)
    hidden = getattr(output, "hidden_states", None)
    if hidden is None:
        raise ArchitectureError(
            "self-check impossible: the model gives no output_hidden_states, so tokentrail cannot prove its states "
            "on this architecture (--no-self-check traces anyway, at your own risk)"
        )
    last_event = max(i for i, event in enumerate(events) if event[0])
    after: list[tuple[str, torch.nn.Module]] = []
    # A pooler (BERT-style, one vector per prompt) runs after the blocks too; no readout passes it.
    for _, path, module, value in events[last_event + 1:]:
        if isinstance(value, torch.Tensor) and value.ndim >= 3 and all(module is not known for _, known in after):
            after.append((path, module))

    embed = loaded.model.get_input_embeddings()
    if isinstance(embed, torch.nn.ModuleList) and len(embed) == 1:  # one codebook's embeddings (MusicGen)
        embed = embed[0]

    def rows(tensor: torch.Tensor) -> np.ndarray:
        # output_hidden_states may be laid out otherwise than the blocks (XLNet reports them batch first).
        own = _layout_of(tensor, n_tokens)
        if own is not None:
            tensor = to_batch_first(tensor, 1, n_tokens, *own)
        return tensor[0].reshape(n_tokens, -1).to(torch.float32).cpu().numpy()

    return _Reference(
        hidden=[rows(h) for h in hidden],
        last_raw=rows(raw),
        embedding=rows(embed(input_ids)),
        log_probs=torch.log_softmax(output.logits[0, -1].to(torch.float32), -1).cpu().numpy(),
        ran_blocks={number for number, _ in block_outputs},
        after_blocks=after,
        stream_shape=tuple(raw.shape[2:]),
    )


def _layout_of(output: Any, n_tokens: int) -> tuple[str, bool] | None:
    """How a tensor of one prompt of `n_tokens` tokens lays out its tokens: (layout, extra leading tokens).

    [1, T, ...] is the rule; [T, 1, H] is sequence first, [S, 1, T, H] stacks S streams in front, and [1, T', H]
    with T' > T carries extra tokens ahead of the prompt. A one-token prompt would be ambiguous; the check
    prompt has many.
    """
    if not isinstance(output, torch.Tensor) or output.ndim < 3:
        return None
    shape = tuple(output.shape)
    if shape[:2] == (1, n_tokens):
        return "batch", False
    if output.ndim == 3 and shape[:2] == (n_tokens, 1):
        return "sequence", False
    if output.ndim == 4 and shape[1:3] == (1, n_tokens):
        return "streams", False
    if shape[0] == 1 and shape[1] > n_tokens:
        return "batch", True
    return None


def _traced(loaded: LoadedModel, encoded: list[list[int]], padding: str) -> tuple[dict[str, Any], int]:
    """The tracer's arrays for `encoded` with `padding` (or {"error": why}), and its forward-pass count."""
    from tokentrail.core.trace import TraceOptions
    from tokentrail.tracing import Tracer

    loaded.parts.padding = padding
    tracer = Tracer(loaded, TraceOptions(position="all", top_k=1, logit_lens=False), batch_size=len(encoded),
                    padding_side=padding)
    try:
        return tracer.trace_ids(encoded), tracer.n_forward_passes
    except TokentrailError as exc:  # a block that did not run once, a final norm that never ran
        return {"error": str(exc).split(": ", 1)[-1]}, tracer.n_forward_passes
    except Exception as exc:  # noqa: BLE001 - the model's own forward failed on this batch: in one line
        return {"error": first_line(exc)}, tracer.n_forward_passes


def _state_mismatch(arrays: dict[str, Any], references: list[_Reference], parts: Any, tolerance: float,
                    ) -> tuple[str | None, float, int]:
    """The first state that differs from the model's own (as words), the largest error seen, and the row of
    the first difference (-1: none).

    Row r of the traced batch is compared with `references[r]`, over the row's own length: for a causal
    model both rows are compared with the long prompt's reference (a prefix's states are its first tokens').
    Models report output_hidden_states in one of two ways, and either proves the states: most list the input
    of every block and then the final-normed state; Mamba-style models list every block's output, then the
    normed one, and their layer 0 is proven against the input embeddings instead. A model whose last entry is
    the raw last state, not the normed one, has its final state proven by the readout check instead.
    """
    if "error" in arrays:
        return arrays["error"], float("inf"), 0
    tokens, finals = arrays["token_states"], arrays["final_states"]
    kept = [0] + [layer for layer in range(1, parts.n_layers + 1) if layer not in parts.skipped_blocks]
    if len(references[0].hidden) != len(kept):
        return (f"output_hidden_states gives {len(references[0].hidden)} states for {len(kept) - 1} blocks that run, "
                "so tokentrail cannot prove its states on this architecture"), float("inf"), 0
    best: tuple[str | None, float, int] = ("", float("inf"), 0)
    for shifted in (False, True):
        worst, problem, failed_row = 0.0, None, -1
        for row, reference in enumerate(references):
            hidden, length = reference.hidden, len(tokens[row])
            expected = []
            for index in range(len(kept)):
                if index == len(kept) - 1:
                    expected.append((reference.last_raw, "the last block's output"))
                elif shifted:
                    expected.append((reference.embedding if index == 0 else hidden[index - 1],
                                     "the input embeddings" if index == 0 else "the model's output_hidden_states"))
                else:
                    expected.append((hidden[index], "the model's output_hidden_states"))
            for index, layer in enumerate(kept):
                where = "the embedding output (layer 0)" if layer == 0 else f"layer {layer}"
                if row == 1:
                    where += " of a left-padded prompt" if parts.padding == "left" else " of a batched prompt"
                target, what = expected[index]
                try:
                    error = _relative(tokens[row][:, layer], target[:length])
                except _ShapeMismatch as exc:
                    return f"{where} {exc}", float("inf"), row
                worst = max(worst, error)
                if error > tolerance and problem is None:
                    problem, failed_row = f"{where} differs from {what} by {error:.2g}", row
            normed, raw = hidden[-1][length - 1], reference.last_raw[length - 1]
            if normed.shape == raw.shape and _relative(normed, raw) <= tolerance:
                final_error = 0.0  # the model reports its raw last state; the readout check proves the final one
            else:
                try:
                    final_error = _relative(finals[row], normed)
                except _ShapeMismatch as exc:
                    return f"the final-normed state {exc}", float("inf"), row
            worst = max(worst, final_error)
            if final_error > tolerance and problem is None:
                problem = f"the final-normed state differs from output_hidden_states[-1] by {final_error:.2g}"
                failed_row = row
        if problem is None:
            return None, worst, -1
        if not shifted:
            best = (problem, worst, failed_row)
    return best


@torch.inference_mode()
def _readout_error(loaded: LoadedModel, arrays: dict[str, Any], reference: _Reference, head: Any) -> float:
    """Relative difference of the long prompt's next-token log-probabilities, read out from its final state
    and from its last layer through the final norm, against the model's own."""
    parts = loaded.parts
    weight = parts.unembed.weight
    saved = parts.head
    parts.head = head
    try:
        final = torch.from_numpy(arrays["final_states"][:1]).to(device=weight.device, dtype=weight.dtype)
        raw = torch.from_numpy(arrays["states"][:1, -1]).to(device=weight.device, dtype=weight.dtype)
        expected = reference.log_probs
        scale = float(np.max(np.abs(expected - expected.mean()))) or 1.0
        # Both rows in one readout: the unembedding is read from memory once, not twice.
        log_probs = torch.log_softmax(parts.logits(torch.cat([final, parts.normed(raw)])), -1).cpu().numpy()
        if log_probs.shape[1:] != expected.shape:
            return float("inf")
        return float(np.max(np.abs(log_probs - expected))) / scale
    finally:
        parts.head = saved


def self_check(loaded: LoadedModel) -> SelfCheckReport:
    """Prove the tracer on this model, choose how it batches, and refuse it with one line if it cannot."""
    from tokentrail.tracing import Tracer

    started = time.perf_counter()
    tolerance = TOLERANCE["float32" if loaded.model.dtype == torch.float32 else "half"]
    parts = loaded.parts
    (long_ids,) = Tracer(loaded, padding_side="none").encode([CHECK_PROMPT])
    prefix = max(1, len(long_ids) // 2)
    encoded = [long_ids, long_ids[:prefix]]
    failures: list[str] = []
    try:
        reference = _reference(loaded, long_ids)
        passes = 1
        parts.stream_shape = reference.stream_shape
        parts.skipped_blocks = tuple(n for n in range(1, parts.n_layers + 1) if n not in reference.ran_blocks)
        parts.bidirectional = False
        candidates = list(parts.norm_candidates or [(parts.final_norm_path, parts.final_norm)])
        after = reference.after_blocks
        if after:  # what the model really ran after its last block: e.g. DeepSeek-V4's stream collapse + norm
            chain = after[0] if len(after) == 1 else ("+".join(p for p, _ in after), _Chain([m for _, m in after]))
            if all(chain[1] is not known for _, known in candidates):
                candidates.insert(1, chain)
        prefix_reference: list[_Reference] = []  # computed once, for a model found bidirectional

        def attempt(references: list[_Reference]) -> dict[str, tuple[str | None, float, dict[str, Any], int]]:
            nonlocal passes
            results = {}
            for padding in ("left", "none", "right"):
                arrays, used = _traced(loaded, encoded, padding)
                passes += used
                problem, worst, row = _state_mismatch(arrays, references, parts, tolerance)
                results[padding] = (problem, worst, arrays, row)
                if problem is None and padding in ("left", "right"):
                    break
                if padding == "none" and problem is not None:
                    break  # wrong even unpadded: padding is not the problem
            return results

        for norm_path, norm in candidates:
            parts.final_norm, parts.final_norm_path = norm, norm_path
            parts.bidirectional = False
            results = attempt([reference, reference])
            if "none" in results and results["none"][0] is not None and results["none"][3] == 1:
                # The prompt alone matches its forward pass and its prefix alone does not match the prompt's
                # first tokens: the prefix's states depend on the tokens after it (bidirectional attention).
                # Each prompt is then proven against its own forward pass, at the cost of one more.
                if not prefix_reference:
                    prefix_reference.append(_reference(loaded, long_ids[:prefix]))
                    passes += 1
                parts.bidirectional = True
                results = attempt([reference, prefix_reference[0]])
            usable = [side for side in ("left", "right", "none") if side in results and results[side][0] is None]
            if not usable:
                failures.append(results.get("none", results.get("left", (None,)))[0])
                continue
            padding = usable[0]
            _, state_error, arrays, _ = results[padding]
            errors, unusable = [], []
            for head_path, head in parts.head_candidates or [(parts.head_path, parts.head)]:
                try:
                    errors.append(_readout_error(loaded, arrays, reference, head))
                except Exception as exc:  # noqa: BLE001 - this norm and head do not even compose: not the readout
                    errors.append(float("inf"))
                    unusable.append(first_line(exc))
                if errors[-1] <= tolerance:
                    parts.head, parts.head_path, parts.padding = head, head_path, padding
                    return SelfCheckReport(padding=padding, head=head_path, final_norm=norm_path or None,
                                           max_state_error=state_error, max_readout_error=errors[-1],
                                           forward_passes=passes, seconds=time.perf_counter() - started)
            readout = f"the readout (final norm {norm_path or 'none'}, head {parts.head_path})"
            failures.append(
                f"{readout} cannot be applied to the traced states ({unusable[0]})" if min(errors) == float("inf")
                and unusable else
                f"{readout} gives next-token log-probabilities that differ from the model's by {min(errors):.2g} "
                "(relative)"
            )
    except ArchitectureError as exc:
        message = str(exc)
        raise ArchitectureError(message if message.startswith(loaded.name) else f"{loaded.name}: {message}") from None
    except Exception as exc:  # noqa: BLE001 - any failure of the model's own forward is a refusal, in one line
        raise ArchitectureError(f"{loaded.name}: self-check failed: {first_line(exc)}") from None
    # The most telling failure: one about the blocks, not about a final-norm candidate.
    telling = ([failure for failure in failures if "final" not in failure]
               or [failure for failure in failures if "ran 0 times" not in failure] or failures)
    extra = ("; its blocks carry more positions than the prompt has tokens, and the prompt's were taken to be the "
             "last ones" if parts.extra_leading_tokens else "")
    raise ArchitectureError(
        f"{loaded.name}: self-check failed: {telling[0]}{extra}; tokentrail refuses to trace this model "
        "(--no-self-check traces anyway, at your own risk)"
    )
