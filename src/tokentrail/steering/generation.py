"""Greedy generation with a KV cache over left-padded batches, optionally inside an open `Steering`.

alpha = 0 runs the very same arithmetic as no steering and gives bit-identical tokens and logits (tested).
Prompts are encoded exactly as the `Tracer` encodes them, so traces and generations agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokentrail.capture import forward_parameters, layer_hooks
from tokentrail.core.trace import TraceOptions
from tokentrail.errors import TokentrailError
from tokentrail.models.loading import LoadedModel
from tokentrail.steering.hooks import Steering, check_steerable
from tokentrail.tracing import Tracer

DEFAULT_MAX_NEW_TOKENS = 16  # room for an echoed two-step equation: ' 32 + 28 + 4 = 64'


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
    repeat: int = 1,
) -> Generated:
    """Greedy decoding with a KV cache over left-padded batches, optionally inside an open `Steering`.

    A row stops at an end-of-sequence token or, with `stop_at_newline`, at the first newline that follows
    some non-space text (a leading newline is let through: some models start an answer on a new line).
    A `steering` context that is not open yet is opened for the call and closed after it.

    `repeat` k > 1 generates every prompt k times, as rows `i * k + a` (a = 0..k-1) of the result, for
    experiments whose conditions differ only in how the last prompt token is steered (`Steering.per_row`
    with position "last"): all but the last token of a prompt are run once and their KV cache is shared by
    its k rows, which then run the last token, each with its own steering, and decode. The tokens are those
    of k separate generations (tested); the cost is one prompt prefix instead of k.
    """
    if max_new_tokens < 1:
        raise TokentrailError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise TokentrailError(f"batch size must be at least 1, got {batch_size}")
    if repeat < 1:
        raise TokentrailError(f"repeat must be at least 1, got {repeat}")
    if repeat > 1 and steering is not None and steering.position != "last":
        raise TokentrailError("a shared prompt prefix needs steering at the last prompt token only (position last)")
    tokenizer = loaded.tokenizer
    parameters = set(forward_parameters(loaded.model))
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    context = _Decoding(loaded, max_new_tokens, steering, capture_states, keep_logits, stop_at_newline, parameters,
                        int(pad), _stop_ids(loaded), len(encoded) * repeat)
    hooks = steering if steering is not None and not steering.is_open else contextlib.nullcontext()
    with hooks:
        if repeat == 1:
            for batch in batch_order(encoded, batch_size, equal_lengths=loaded.parts.padding != "left"):
                context.run_batch([list(encoded[i]) for i in batch], batch)
                if on_batch is not None:
                    on_batch(len(batch))
        else:
            # Whole prompts per batch, as many as fit `batch_size` rows once repeated.
            per_batch = max(1, batch_size // repeat)
            for batch in batch_order(encoded, per_batch, equal_lengths=loaded.parts.padding != "left"):
                context.run_shared_prefix([list(encoded[i]) for i in batch], batch, repeat)
                if on_batch is not None:
                    on_batch(len(batch) * repeat)
    return context.result()


class _Decoding:
    """The state of one `generate` call: outputs by row, and the batched forward passes that fill them."""

    def __init__(self, loaded: LoadedModel, max_new_tokens: int, steering: Steering | None, capture_states: bool,
                 keep_logits: bool, stop_at_newline: bool, parameters: set[str], pad: int, stops: set[int],
                 n_rows: int) -> None:
        self.loaded, self.max_new_tokens, self.steering = loaded, max_new_tokens, steering
        self.capture_states, self.keep_logits, self.stop_at_newline = capture_states, keep_logits, stop_at_newline
        self.pad, self.stops = pad, stops
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"
        self.pass_positions = "position_ids" in parameters
        self.logits_to_keep = "logits_to_keep" in parameters
        self.token_ids: list[list[int]] = [[] for _ in range(n_rows)]
        self.texts = [""] * n_rows
        self.logits_out: list[np.ndarray | None] = [None] * n_rows
        self.states: np.ndarray | None = None
        self.n_rows = n_rows

    def _left_padded(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
            mask[row, width - len(ids):] = 1
        return input_ids, mask

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, cache: Any = None,
                 capture: bool = False) -> tuple[Any, list[torch.Tensor | None] | None]:
        device = self.loaded.device
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                                  "use_cache": True}
        if cache is not None:
            kwargs[self.cache_name] = cache
        if self.pass_positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:].to(device)
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if not capture:
            return self.loaded.model(**kwargs), None
        with _capture_last(self.loaded) as slots:
            output = self.loaded.model(**kwargs)
        return output, slots

    def _steer_prompt(self, rows: np.ndarray, mask: torch.Tensor, prompt_columns: int) -> None:
        """Where the steering acts in a forward pass over `prompt_columns` new prompt tokens."""
        steering = self.steering
        if steering is None:
            return
        if steering.position == "last":
            where = torch.zeros((len(rows), prompt_columns), dtype=torch.bool)
            where[:, -1] = True
        else:
            where = mask[:, -prompt_columns:].bool()
        steering.positions = where
        steering.rows = rows

    def run_batch(self, prompts: list[list[int]], rows: Sequence[int]) -> None:
        input_ids, mask = self._left_padded(prompts)
        rows = np.asarray(rows)
        self._steer_prompt(rows, mask, input_ids.shape[1])
        output, slots = self._forward(input_ids, mask, capture=self.capture_states)
        self._decode(output, slots, mask, rows)

    def run_shared_prefix(self, prompts: list[list[int]], problems: Sequence[int], repeat: int) -> None:
        """Run all but the last token of each prompt once, then the last token and the decoding `repeat` times."""
        prefixes = [ids[:-1] for ids in prompts]
        rows = np.asarray([index * repeat + copy for index in problems for copy in range(repeat)])
        last = torch.tensor([[ids[-1]] for ids in prompts for _ in range(repeat)], dtype=torch.long)
        cache = None
        if any(prefixes):
            # Prompts of one token have an empty prefix: left padding makes them a row of pads, masked out.
            input_ids, mask = self._left_padded([p or [self.pad] for p in prefixes])
            for row, prefix in enumerate(prefixes):
                if not prefix:
                    mask[row] = 0
            if self.steering is not None:
                self.steering.positions = torch.zeros(input_ids.shape, dtype=torch.bool)  # nothing steered
                self.steering.rows = np.asarray(problems) * repeat  # valid rows; nothing is steered here
            prefix_out, _ = self._forward(input_ids, mask)
            cache = _cache_of(prefix_out, self.cache_name)
            if not hasattr(cache, "batch_repeat_interleave"):
                raise TokentrailError(f"{self.loaded.name}: its KV cache cannot be shared between rows; generate "
                                      "without repeat")
            cache.batch_repeat_interleave(repeat)
            mask = mask.repeat_interleave(repeat, dim=0)
        else:
            mask = torch.zeros((len(rows), 0), dtype=torch.long)
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
        self._steer_prompt(rows, mask, 1)
        output, slots = self._forward(last, mask, cache, capture=self.capture_states)
        self._decode(output, slots, mask, rows)

    def _decode(self, output: Any, slots: list[torch.Tensor | None] | None, mask: torch.Tensor,
                rows: np.ndarray) -> None:
        """Greedy steps after a prompt's last token: append tokens until every row stops."""
        tokenizer, steering = self.loaded.tokenizer, self.steering
        if slots is not None:
            stacked = torch.stack(slots, dim=1).numpy()  # [B, L+1, H]
            if self.states is None:
                self.states = np.zeros((self.n_rows, stacked.shape[1], stacked.shape[2]), dtype=np.float32)
            self.states[rows] = stacked
        cache = _cache_of(output, self.cache_name)
        steps: dict[int, list[np.ndarray]] = {int(index): [] for index in rows}
        active = np.asarray(rows)  # the rows still in the batch, in batch order
        done = [False] * len(active)
        can_drop = hasattr(cache, "batch_select_indices")
        next_logits = output.logits[:, -1].to(torch.float32)
        for step in range(self.max_new_tokens):
            chosen = next_logits.argmax(-1)
            for row, index in enumerate(active):
                if done[row]:
                    continue
                token = int(chosen[row])
                if self.keep_logits:
                    steps[int(index)].append(next_logits[row].cpu().numpy().copy())
                if token in self.stops:
                    done[row] = True
                    continue
                self.token_ids[index].append(token)
                if self.stop_at_newline and ends_line(tokenizer.decode(self.token_ids[index], skip_special_tokens=True)):
                    done[row] = True
            if all(done) or step == self.max_new_tokens - 1:
                break
            if any(done) and can_drop:
                # Finished rows leave the batch, so one long answer does not make every short one run on; a
                # cache that cannot drop rows keeps them, and their tokens are ignored.
                keep = [row for row in range(len(active)) if not done[row]]
                cache.batch_select_indices(torch.tensor(keep, dtype=torch.long, device=self.loaded.device))
                active, mask, chosen = active[keep], mask[keep], chosen[torch.tensor(keep, device=chosen.device)]
                done = [False] * len(keep)
                if steering is not None:
                    steering.rows = active
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
            if steering is not None:
                steering.positions = torch.full((len(active), 1), steering.position == "all", dtype=torch.bool)
            output, _ = self._forward(chosen[:, None].cpu(), mask, cache)
            cache = _cache_of(output, self.cache_name)
            next_logits = output.logits[:, -1].to(torch.float32)
        if steering is not None:
            steering.positions = None
        for row, index in enumerate(rows):
            self.texts[index] = tokenizer.decode(self.token_ids[index], skip_special_tokens=True)
            if self.keep_logits:
                kept = steps[int(index)]
                self.logits_out[index] = np.stack(kept) if kept else np.zeros((0, 0), np.float32)

    def result(self) -> Generated:
        return Generated(token_ids=self.token_ids, texts=self.texts, states=self.states,
                         logits=[x for x in self.logits_out if x is not None] if self.keep_logits else None)
