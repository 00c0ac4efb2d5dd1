"""Load-time self-check: the tracer is compared with the model's own forward pass before anything is traced.

A tracer that hooks the wrong module, reads the wrong readout or lets padding leak into a recurrence gives
numbers that look fine and are wrong. So every load traces a few short prompts of different lengths in one
padded batch and compares, for each prompt, against an unpadded forward pass of the model alone:

    states[0..L-1]   == output_hidden_states[0..L-1]         (embedding output and block outputs)
    final_states     == output_hidden_states[L]              (the final-normed state)
    readout(final)   == the model's next-token logits
    lens at layer L  == the model's next-token logits       (final norm + head on the last block's raw output)

It also decides how prompts of different lengths may share a batch: left padding when that is exact, else
right padding, else only prompts of equal length (recurrent models whose left padding feeds pad tokens
through their state). When the unpadded trace itself disagrees, the model is refused with one line naming
what differed and where.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from tokentrail.errors import ArchitectureError, TokentrailError
from tokentrail.models import LoadedModel, _Chain

# Three lengths, so that a padded batch has rows padded by different amounts.
CHECK_PROMPTS = (
    "The capital of France is",
    "def add(a, b):\n    return a + b\n\nprint(add(2,",
    "Once",
)
# Largest relative difference accepted, for states and for next-token log-probabilities alike:
# max |traced - reference| / max |reference - mean| per layer. Half precision runs other kernels batched than
# alone; a wrong hook, norm or padding shows as a difference of order one either way.
TOLERANCE = {"float32": 1e-3, "half": 5e-2}


@dataclass(frozen=True)
class SelfCheckReport:
    padding: str
    head: str
    max_state_error: float
    max_readout_error: float
    final_norm: str | None
    forward_passes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Reference:
    # Every token of the prompt, flattened per token: a padding leak often shows first at early positions.
    states: list[np.ndarray]  # output_hidden_states, [T, D] each, L+1 of them
    embedding: np.ndarray  # get_input_embeddings()(ids), [T, H]
    last_raw: np.ndarray  # the last block's raw output, [T, D]
    log_probs: np.ndarray  # next-token log-probabilities [V]


class _ShapeMismatch(Exception):
    pass


def _relative(traced: np.ndarray, reference: np.ndarray) -> float:
    if traced.shape != reference.shape:  # e.g. a reversible model whose blocks carry two streams side by side
        raise _ShapeMismatch(f"has shape {traced.shape}, the model's own {reference.shape}")
    if not np.all(np.isfinite(traced)):
        return float("inf")
    # Per token, against that token's own scale: one token with massive activations (an attention sink)
    # must not hide an error at another.
    traced, reference = np.atleast_2d(traced), np.atleast_2d(reference)
    scale = np.max(np.abs(reference), axis=-1)
    scale[scale == 0] = 1.0
    return float(np.max(np.max(np.abs(traced - reference), axis=-1) / scale))


def _encode(loaded: LoadedModel) -> list[list[int]]:
    from tokentrail.trace import Tracer

    tracer = Tracer(loaded, padding_side="none")
    encoded = tracer.encode(list(CHECK_PROMPTS))
    if len({len(ids) for ids in encoded}) < 2:  # a tokenizer that maps them to equal lengths: make them differ
        encoded[-1] = encoded[-1][:1]
    return encoded


def _after_blocks_candidates(loaded: LoadedModel) -> list[tuple[str, torch.nn.Module]]:
    """Children of the blocks' parent and of its ancestors below the model itself, except the block list's
    containers: where the final norm, or a stream collapse before it, lives."""
    parts = loaded.parts
    path = parts.blocks_path.rsplit(".", 1)[0] if "." in parts.blocks_path else ""
    found = []
    while path:
        owner = loaded.model.get_submodule(path)
        for name, child in owner.named_children():
            if not any(module is parts.blocks[0] for module in child.modules()):
                found.append((f"{path}.{name}", child))
        path = path.rsplit(".", 1)[0] if "." in path else ""
    return found


@torch.inference_mode()
def _references(loaded: LoadedModel, encoded: list[list[int]],
                ) -> tuple[list[_Reference], list[tuple[str, torch.nn.Module]]]:
    """The model's own unpadded forward of each prompt, and the modules it ran after its last block, in order."""
    from tokentrail.trace import _first_tensor

    parts = loaded.parts
    device = next(loaded.model.parameters()).device
    captured: dict[str, torch.Tensor] = {}
    after: list[tuple[str, torch.nn.Module]] = []

    ran_blocks: set[int] = set()

    def keep_output(number: int):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            ran_blocks.add(number)
            if number == max_block:  # the last block that runs: its output is where the readout starts
                captured["raw"] = _first_tensor(output)
        return hook

    def ran(path: str):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            per_token = isinstance(_first_tensor(output), torch.Tensor) and _first_tensor(output).ndim >= 3
            # A pooler (BERT-style, one vector per prompt) runs after the blocks too, but no readout passes it.
            if "raw" in captured and per_token and all(module is not known for _, known in after):
                after.append((path, module))
        return hook

    references = []
    # Which blocks a plain forward pass runs: a block it skips (a cross-attention layer without an image) keeps
    # the residual state unchanged, and the tracer records it so; a skipped last block moves the readout's start.
    max_block = parts.n_layers
    handles = [block.register_forward_hook(keep_output(number)) for number, block in enumerate(parts.blocks, 1)]
    try:
        loaded.model(input_ids=torch.tensor([encoded[0]], device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    parts.skipped_blocks = tuple(number for number in range(1, parts.n_layers + 1) if number not in ran_blocks)
    max_block = max(ran_blocks) if ran_blocks else parts.n_layers
    captured.clear()
    handles = [parts.blocks[max_block - 1].register_forward_hook(keep_output(max_block))]
    handles += [module.register_forward_hook(ran(path)) for path, module in _after_blocks_candidates(loaded)]
    try:
        for ids in encoded:
            captured.clear()
            output = loaded.model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True,
                                  use_cache=False)
            hidden = getattr(output, "hidden_states", None)
            if hidden is None or len(hidden) != parts.n_layers + 1 - len(parts.skipped_blocks):
                count = "no hidden states" if hidden is None else f"{len(hidden)} hidden states"
                raise ArchitectureError(
                    f"{loaded.name}: self-check impossible: output_hidden_states gives {count} for "
                    f"{parts.n_layers - len(parts.skipped_blocks)} blocks that run, so tokentrail cannot prove its "
                    "states on this architecture "
                    "(--no-self-check traces anyway, at your own risk)"
                )
            if "raw" not in captured:
                raise ArchitectureError(f"{loaded.name}: self-check failed: the last block did not run")
            raw = captured["raw"]
            if not isinstance(raw, torch.Tensor) or raw.ndim < 3 or tuple(raw.shape[:2]) != (1, len(ids)):
                shape = tuple(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
                raise ArchitectureError(
                    f"self-check failed: block {max_block} returns {shape} for one prompt of {len(ids)} tokens, not "
                    f"[1, {len(ids)}, ...]: its residual stream is not laid out one state per prompt token "
                    "(sequence-first, extra tokens, or streams first), so tokentrail cannot trace it"
                )
            # The state of one token as the blocks carry it: (H,), or (S, H) for parallel residual streams.
            parts.stream_shape = tuple(raw.shape[2:])
            if len(encoded) > 1:
                handles, first_handles = handles[:1], handles[1:]
                for handle in first_handles:  # the chain is known after the first prompt
                    handle.remove()
            logits = output.logits[0, -1].to(torch.float32)
            embed = loaded.model.get_input_embeddings()(torch.tensor([ids], device=device))
            n_tokens = len(ids)
            references.append(_Reference(
                states=[h[0].reshape(n_tokens, -1).to(torch.float32).cpu().numpy() for h in hidden],
                embedding=embed[0].reshape(n_tokens, -1).to(torch.float32).cpu().numpy(),
                last_raw=captured["raw"][0].reshape(n_tokens, -1).to(torch.float32).cpu().numpy(),
                log_probs=torch.log_softmax(logits, -1).cpu().numpy(),
            ))
    finally:
        for handle in handles:
            handle.remove()
    return references, after


def _state_mismatch(arrays: dict[str, Any], references: list[_Reference], tolerance: float,
                    ) -> tuple[str | None, float]:
    """The first state that differs from the reference (as words), and the largest error seen.

    Models report output_hidden_states in one of two ways, and either proves the states: most list the input
    of every block and then the final-normed state; Mamba-style models list every block's output, then the
    normed one, and their layer 0 is proven against the input embeddings instead. A model whose last entry is
    the raw last state, not the normed one, has its final state proven by the readout check instead.
    """
    tokens, finals = arrays["token_states"], arrays["final_states"]  # tokens: [T, L+1, D] per prompt
    best: tuple[str | None, float] = ("", float("inf"))
    for shifted in (False, True):
        worst, problem = 0.0, None
        for row, reference in enumerate(references):
            # Blocks the forward pass skips (Mllama's cross-attention layers without an image) have no entry.
            kept = [0] + [layer for layer in range(1, arrays["n_layers"] + 1) if layer not in arrays["skipped"]]
            n_layers = len(reference.states) - 1
            for index, layer in enumerate(kept):
                if index == n_layers:
                    expected, what = reference.last_raw, "the last block's output"
                elif shifted:
                    expected = reference.embedding if index == 0 else reference.states[index - 1]
                    what = "the input embeddings" if index == 0 else "the model's output_hidden_states"
                else:
                    expected, what = reference.states[index], "the model's output_hidden_states"
                try:
                    error = _relative(tokens[row][:, layer], expected)
                except _ShapeMismatch as exc:
                    where = "the embedding output (layer 0)" if layer == 0 else f"layer {layer}"
                    return f"{where} {exc}", float("inf")
                worst = max(worst, error)
                if error > tolerance and problem is None:
                    where = "the embedding output (layer 0)" if layer == 0 else f"layer {layer}"
                    problem = f"{where} differs from {what} by {error:.2g}"
            try:
                final_error = _relative(finals[row], reference.states[n_layers][-1])
            except _ShapeMismatch as exc:
                return f"the final-normed state {exc}", float("inf")
            reports_raw = (reference.states[n_layers].shape == reference.last_raw.shape
                           and _relative(reference.states[n_layers][-1], reference.last_raw[-1]) <= tolerance)
            if final_error > tolerance and reports_raw:
                final_error = 0.0  # the model reports its raw last state; the readout check proves the final one
            worst = max(worst, final_error)
            if final_error > tolerance and problem is None:
                problem = f"the final-normed state differs from output_hidden_states[-1] by {final_error:.2g}"
        if problem is None:
            return None, worst
        if worst < best[1] or best[0] == "":
            best = (problem, worst) if not shifted or best[0] == "" else best
    return best


@torch.inference_mode()
def _readout_error(loaded: LoadedModel, arrays: dict[str, Any], references: list[_Reference], head: Any) -> float:
    """Largest relative difference of next-token log-probabilities, read out from the final state and from layer L."""
    parts = loaded.parts
    weight = parts.unembed.weight
    worst = 0.0
    saved = parts.head
    parts.head = head
    try:
        for row, reference in enumerate(references):
            final = torch.from_numpy(arrays["final_states"][row]).to(device=weight.device, dtype=weight.dtype)
            raw = torch.from_numpy(arrays["states"][row, -1]).to(device=weight.device, dtype=weight.dtype)
            expected = reference.log_probs
            scale = float(np.max(np.abs(expected - expected.mean()))) or 1.0
            for logits in (parts.logits(final[None]), parts.logits(parts.normed(raw[None]))):
                log_probs = torch.log_softmax(logits, -1)[0].cpu().numpy()
                if log_probs.shape != expected.shape:
                    return float("inf")
                worst = max(worst, float(np.max(np.abs(log_probs - expected))) / scale)
    finally:
        parts.head = saved
    return worst


def _attempt(loaded: LoadedModel, encoded: list[list[int]], references: list[_Reference], tolerance: float,
             ) -> tuple[dict[str, tuple[str | None, float, dict[str, Any]]], int]:
    """Trace the check prompts with left padding, then unpadded and right-padded while they disagree."""
    from tokentrail.trace import TraceOptions, Tracer

    options = TraceOptions(position="all", top_k=1, logit_lens=False)
    attempts: dict[str, tuple[str | None, float, dict[str, Any]]] = {}
    passes = 0
    for padding in ("left", "none", "right"):
        tracer = Tracer(loaded, options, batch_size=len(encoded), padding_side=padding)
        try:
            arrays = tracer.trace_ids(encoded)
        except TokentrailError as exc:  # a block that did not run once, a final norm that never ran
            problem, worst, arrays = str(exc).split(": ", 1)[-1], float("inf"), {}
        except Exception as exc:  # noqa: BLE001 - the model's own forward failed on this batch: in one line
            problem, worst, arrays = _first_line(exc), float("inf"), {}
        else:
            arrays["n_layers"], arrays["skipped"] = loaded.parts.n_layers, loaded.parts.skipped_blocks
            problem, worst = _state_mismatch(arrays, references, tolerance)
        passes += tracer.n_forward_passes
        attempts[padding] = (problem, worst, arrays)
        if padding == "left" and problem is None:
            break
        if padding == "none" and problem is not None:
            break  # the unpadded trace disagrees already: padding is not the problem
        if padding == "right" and problem is None:
            break
    return attempts, passes


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def self_check(loaded: LoadedModel) -> SelfCheckReport:
    """Prove the tracer on this model, choose how it batches, and refuse it with one line if it cannot."""
    started = time.perf_counter()
    tolerance = TOLERANCE["float32" if loaded.model.dtype == torch.float32 else "half"]
    parts = loaded.parts
    encoded = _encode(loaded)
    failures: list[str] = []
    passes = len(encoded)
    try:
        references, after_blocks = _references(loaded, encoded)
        candidates = list(parts.norm_candidates or [(parts.final_norm_path, parts.final_norm)])
        if len(after_blocks) == 1 and all(after_blocks[0][1] is not norm for _, norm in candidates[:1]):
            candidates.insert(0, after_blocks[0])
        elif len(after_blocks) > 1:  # e.g. DeepSeek-V4: collapse the residual streams, then the norm
            candidates.insert(0, ("+".join(path for path, _ in after_blocks),
                                  _Chain([module for _, module in after_blocks])))
        for norm_path, norm in candidates:
            parts.final_norm, parts.final_norm_path = norm, norm_path
            attempts, used = _attempt(loaded, encoded, references, tolerance)
            passes += used
            unpadded = attempts.get("none")
            if unpadded is not None and unpadded[0] is not None:
                failures.append(unpadded[0])
                continue  # another final-norm candidate (or none) may be the right one
            padding = next(side for side in ("left", "right", "none") if side in attempts and attempts[side][0] is None)
            _, state_error, arrays = attempts[padding]
            errors = []
            for head_path, head in parts.head_candidates or [(parts.head_path, parts.head)]:
                try:
                    errors.append(_readout_error(loaded, arrays, references, head))
                except Exception:  # noqa: BLE001 - this norm and head do not even compose: not the readout
                    errors.append(float("inf"))
                if errors[-1] <= tolerance:
                    parts.head, parts.head_path, parts.padding = head, head_path, padding
                    return SelfCheckReport(padding=padding, head=head_path, max_state_error=state_error,
                                           max_readout_error=errors[-1], final_norm=norm_path or None,
                                           forward_passes=passes, seconds=time.perf_counter() - started)
            failures.append(
                f"the readout (final norm {norm_path or 'none'}, head {parts.head_path}) gives next-token "
                f"log-probabilities that differ from the model's by {min(errors):.2g} (relative)"
            )
    except ArchitectureError as exc:
        message = str(exc)
        raise ArchitectureError(message if message.startswith(loaded.name) else f"{loaded.name}: {message}") from None
    except Exception as exc:  # noqa: BLE001 - any failure of the model's own forward is a refusal, in one line
        raise ArchitectureError(f"{loaded.name}: self-check failed: {_first_line(exc)}") from None
    # The most telling failure: not a norm candidate that never ran after the last block.
    telling = ([failure for failure in failures if "final" not in failure]
               or [failure for failure in failures if "ran 0 times" not in failure] or failures)
    raise ArchitectureError(
        f"{loaded.name}: self-check failed: {telling[0]} on a prompt traced alone; tokentrail refuses to trace "
        "this model (--no-self-check traces anyway, at your own risk)"
    )
