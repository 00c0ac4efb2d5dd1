"""Greedy generation with a KV cache over left-padded batches, optionally inside an open `Steering`.

alpha = 0 runs the very same arithmetic as no steering and gives bit-identical tokens and logits (tested).
Prompts are encoded exactly as the `Tracer` encodes them, so traces and generations agree.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokentrail.capture import layer_hooks
from tokentrail.core.trace import TraceOptions
from tokentrail.errors import TokentrailError
from tokentrail.models.loading import LoadedModel
from tokentrail.steering.hooks import Steering, check_steerable
from tokentrail.tracing import Tracer

DEFAULT_MAX_NEW_TOKENS = 16  # room for an echoed two-step equation: ' 32 + 28 + 4 = 64'


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
    check_steerable(loaded)
    slots: list[torch.Tensor | None] = [None] * (parts.n_layers + 1)

    def keep(slot: int, hidden: torch.Tensor) -> None:
        slots[slot] = hidden[:, -1].detach().to(torch.float32).cpu()

    with layer_hooks(parts, keep):
        yield slots


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
