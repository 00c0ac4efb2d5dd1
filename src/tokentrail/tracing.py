"""Tracer: record one token position's residual-stream state after every layer, plus next-token readouts.

Forward hooks slice the chosen positions out of each block's output as it passes, so memory holds
`[batch, layers, hidden]` rather than every layer's full sequence. Layer 0 is the input of the first block
(the embedding output, including any scaling or position embeddings the model adds), layer l the raw output of
block l. The final-normed state is kept separately: `output_hidden_states` puts it in place of the last block's
raw output, which silently changes the last point of every trajectory.

Speed: prompts are length-sorted into batches bounded by a prompt count, a padded-token count and an
activation-memory budget; the hooks copy only the traced positions into one preallocated tensor; with left
padding the model's own last-column logits are the next-token readout, so nothing beyond the forward pass
touches a full sequence. benchmarks/run.py measures what is left of the overhead.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokentrail.batching import batch_cost, default_memory_budget, set_sane_threads
from tokentrail.capture import LayerHooks, first_tensor, forward_parameters, layer_hooks, slot_name
from tokentrail.core.trace import PromptNames, Trace, TraceOptions, parse_position
from tokentrail.errors import TokentrailError

if TYPE_CHECKING:  # annotations only: loading sits above tracing
    from typing_extensions import Unpack  # in `typing` from Python 3.11

    from tokentrail.models.loading import LoadedModel

# "none": only prompts of equal length share a forward pass. Right for every causal model; recurrent models
# whose left padding runs pad tokens through the recurrence get it, or right padding, from the self-check.
PADDING_SIDES = ("left", "right", "none")
# Automatic batching (batch_size=None): padded tokens may exceed the real ones by this fraction, and a CPU
# batch holds at most this many padded tokens (measured: larger batches gain nothing per token on a CPU).
AUTO_MAX_PADDING = 0.1
AUTO_CPU_BATCH_TOKENS = 1024


def _supports(module: torch.nn.Module, argument: str) -> bool:
    return argument in forward_parameters(module)


class _Capture:
    """Where the hooks of one forward pass put what they keep; reset for every batch."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self.columns: torch.Tensor | None = None
        # When every row's traced token is in the same column (left padding, last token), a plain slice
        # replaces the gather: no index tensors on the device and one kernel less per layer.
        self.column: int | None = None
        self.n_rows = 0
        self.width = 0  # tokens of the padded batch
        self.layers: torch.Tensor | None = None  # [B, L+1, H] float32, on the model's input device
        self.final: torch.Tensor | None = None
        self.full: list[torch.Tensor | None] = []
        self.keep_all = False
        # How often each slot was written in this forward pass: a block that never ran or ran twice (shared or
        # looped layers) would leave a row uninitialised or overwritten, so the tracer refuses either.
        self.calls: list[int] = []
        self.hooks: LayerHooks | None = None  # the layer hooks of the open trace
        self.norm_calls = 0
        # Off outside the model's own forward pass: the logit lens calls the final norm again.
        self.active = False

    def pick(self, hidden: torch.Tensor) -> torch.Tensor:
        """The traced positions of a `[B, T, H]` tensor, as `[B, H]`."""
        if self.column is not None:
            return hidden[:, self.column]
        rows, columns = self.rows, self.columns
        if hidden.device != rows.device:  # a model spread over devices by --device-map
            rows, columns = rows.to(hidden.device), columns.to(hidden.device)
        return hidden[rows, columns]


class Tracer:
    """Traces texts through a loaded model. Parameters are fixed at construction, like an estimator.

    `padding_side` None takes what the model's load-time self-check proved (`loaded.parts.padding`).
    Batches are length-sorted and bounded three ways: at most `batch_size` prompts (None: no fixed count),
    at most `max_batch_tokens` padded tokens (None: no fixed count), and an estimated activation memory of at
    most `memory_budget` bytes (None: a default from the free memory of the device). Batching never changes
    what is recorded, only how fast.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        options: TraceOptions | None = None,
        batch_size: int | None = 16,
        max_batch_tokens: int | None = None,
        padding_side: str | None = None,
        memory_budget: int | None = None,
    ) -> None:
        padding_side = padding_side or loaded.parts.padding
        if padding_side not in PADDING_SIDES:
            raise TokentrailError(f"unknown padding side {padding_side!r}; use left, right or none")
        if batch_size is not None and batch_size < 1:
            raise TokentrailError(f"--batch-size must be at least 1, got {batch_size}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise TokentrailError(f"max_batch_tokens must be at least 1, got {max_batch_tokens}")
        self.loaded = loaded
        self.options = options or TraceOptions()
        vocab = loaded.parts.vocab_size
        if self.options.top_k > vocab:
            raise TokentrailError(f"--top-k {self.options.top_k} is more than the model's vocabulary of {vocab} "
                                  f"tokens; use at most {vocab}")
        self.position = parse_position(self.options.position)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.padding_side = padding_side
        self.memory_budget = memory_budget if memory_budget is not None else default_memory_budget(loaded.device)
        self.n_forward_passes = 0
        model = loaded.model
        self._pass_position_ids = _supports(model, "position_ids")
        self._logits_to_keep = _supports(model, "logits_to_keep")
        tokenizer = loaded.tokenizer
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self._pad_id = int(pad)
        self._context = self._context_length()
        self._cost = batch_cost(loaded)
        if loaded.device.type == "cpu":
            set_sane_threads()

    def _context_length(self) -> int | None:
        config = self.loaded.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(text_config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        tokenizer = self.loaded.tokenizer
        texts = list(texts)
        if self.options.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise TokentrailError(
                    f"model {self.loaded.name!r} has no chat template; drop --chat to trace raw prompts"
                )
            rendered = [
                tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=False)
                for text in texts
            ]
            all_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"] if texts else []
        else:
            # One call for all texts: a fast tokenizer encodes the list in Rust instead of once per prompt.
            all_ids = tokenizer(texts)["input_ids"] if texts else []
        encoded: list[list[int]] = []
        for text, ids in zip(texts, all_ids):
            if not ids:
                raise TokentrailError(f"prompt {text[:40]!r} encodes to no tokens; give it some text")
            if self._context is not None and len(ids) > self._context:
                if not self.options.truncate:
                    raise TokentrailError(
                        f"prompt {text[:40]!r} has {len(ids)} tokens, more than the model's context of "
                        f"{self._context}; shorten it or pass --truncate"
                    )
                ids = ids[-self._context :]  # keep the end: the traced next-token state lives there
            if isinstance(self.position, int) and not -len(ids) <= self.position < len(ids):
                raise TokentrailError(f"position {self.position} is outside prompt {text[:40]!r} of {len(ids)} tokens")
            encoded.append(list(ids))
        return encoded

    def plan_batches(self, lengths: Sequence[int]) -> list[np.ndarray]:
        """Prompt indices of each forward pass: longest prompts first, so a batch too big fails at once.

        Sorting by length keeps padding small; each batch takes as many prompts as the count, token and
        memory bounds allow at the width of its longest prompt. Without a fixed `batch_size` a batch also
        stops where padding would exceed `AUTO_MAX_PADDING` of its real tokens, and on a CPU at
        `AUTO_CPU_BATCH_TOKENS` padded tokens, past which a CPU runs no faster per token.
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        order = np.lexsort((np.arange(len(lengths)), -lengths))
        auto = self.batch_size is None
        max_count = self.batch_size or len(lengths)
        max_tokens = self.max_batch_tokens
        if auto and self.loaded.device.type == "cpu":
            max_tokens = min(max_tokens or AUTO_CPU_BATCH_TOKENS, AUTO_CPU_BATCH_TOKENS)
        batches: list[np.ndarray] = []
        start = 0
        while start < len(order):
            width = int(lengths[order[start]])
            fit = max_count
            if max_tokens is not None:
                fit = min(fit, max_tokens // width)
            fit = min(fit, self.memory_budget // max(1, self._cost(1, width)))
            if auto and fit > 1:
                real = np.cumsum(lengths[order[start : start + fit]])
                padded = width * np.arange(1, len(real) + 1)
                fit = int(np.flatnonzero(padded <= (1 + AUTO_MAX_PADDING) * real)[-1]) + 1
            if self.padding_side == "none":
                fit = min(fit, int(np.sum(lengths[order[start : start + max(1, fit)]] == width)))
            fit = max(1, int(fit))  # one prompt always goes, even past the budget: there is no smaller batch
            batches.append(order[start : start + fit])
            start += fit
        return batches

    def _selected_index(self, lengths: torch.Tensor, width: int) -> torch.Tensor:
        """Column of the traced token in each padded row."""
        offset = width - lengths if self.padding_side != "right" else torch.zeros_like(lengths)
        if self.position in ("last", "all"):
            return offset + lengths - 1
        assert isinstance(self.position, int)
        if self.position >= 0:
            return offset + self.position
        return offset + lengths + self.position

    def _padded(self, flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids and attention mask of one batch, built with array indexing rather than a loop per prompt."""
        n, width = len(lengths), int(lengths.max())
        rows = np.repeat(np.arange(n), lengths)
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        columns = within + (width - lengths)[rows] if self.padding_side != "right" else within
        input_ids = np.full((n, width), self._pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        input_ids[rows, columns] = flat[np.repeat(starts, lengths) + within]
        mask[rows, columns] = 1
        return torch.from_numpy(input_ids), torch.from_numpy(mask)

    @contextlib.contextmanager
    def _hooks(self, capture: _Capture) -> Iterator[None]:
        """Hooks that copy the chosen positions of every layer into `capture`; always removed, even on error.

        They are registered once per call rather than once per batch, and write each layer's rows straight
        into one preallocated tensor on the model's device, so a GPU is not synchronised once per layer.
        """
        parts = self.loaded.parts

        def keep(slot: int, output: Any) -> None:
            if not capture.active:
                return
            capture.calls[slot] += 1
            hidden = parts.batch_first(output, capture.n_rows, capture.width)
            if hidden is not None and hidden.ndim == 4:
                # Parallel residual streams [B, T, S, H] (hyper-connections): one token's state is all S of them.
                hidden = hidden.flatten(2)
            if hidden is None or hidden.ndim != 3:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise TokentrailError(
                    f"{self.loaded.name}: {slot_name(slot)} gives a residual state of shape {shape}, not "
                    f"[batch {capture.n_rows}, tokens {capture.width}, hidden] as laid out by the self-check "
                    f"({parts.layout}); tokentrail cannot trace this architecture"
                )
            if capture.layers is None:
                capture.layers = torch.empty((capture.n_rows, parts.n_layers + 1, hidden.shape[-1]),
                                             dtype=torch.float32, device=self.loaded.device)
            capture.layers[:, slot].copy_(capture.pick(hidden))
            if capture.keep_all:
                capture.full[slot] = hidden.detach().to(torch.float32).cpu()

        last_running = max((slot for slot in range(1, parts.n_layers + 1) if slot not in parts.skipped_blocks),
                           default=parts.n_layers)

        def after_norm(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            # Only after the last block: some models run the same norm on the embeddings too (nanochat).
            if capture.active and capture.calls[last_running] > 0:
                capture.norm_calls += 1
                # A copy, not a view: a view would keep the whole normed sequence alive until the readout.
                normed = parts.batch_first(first_tensor(output), capture.n_rows, capture.width, layout="batch")
                if normed is None:
                    raise TokentrailError(
                        f"{self.loaded.name}: the final norm {parts.final_norm_path} gives no [batch, tokens, "
                        "hidden] state; tokentrail cannot trace this architecture")
                capture.final = capture.pick(normed).clone()

        handles = []
        try:
            with layer_hooks(parts, keep) as hooks:
                capture.hooks = hooks
                if parts.final_capture is not None:
                    handles.append(parts.final_capture.register_forward_hook(after_norm))
                yield
        finally:
            capture.hooks = None
            for handle in handles:
                handle.remove()

    def _check_calls(self, capture: _Capture) -> None:
        """Refuse a forward pass in which a block did not run exactly once, before its rows are used."""
        skipped = self.loaded.parts.skipped_blocks
        for slot, calls in enumerate(capture.calls):
            if calls == (0 if slot in skipped else 1):
                continue
            if slot in skipped:
                raise TokentrailError(
                    f"{self.loaded.name}: {slot_name(slot)} ran {calls} time(s), though the self-check found that "
                    "the forward pass skips it; tokentrail cannot tell which state is right"
                )
            what = "did not run" if calls == 0 else f"ran {calls} times"
            why = ("(a layer the forward pass skips)" if calls == 0
                   else "(shared or looped layers: its states would overwrite each other)")
            raise TokentrailError(
                f"{self.loaded.name}: {slot_name(slot)} {what} in one forward pass {why}; tokentrail cannot "
                "trace this architecture"
            )
        if self.loaded.parts.final_norm is not None and capture.norm_calls != 1:
            raise TokentrailError(
                f"{self.loaded.name}: the final norm {self.loaded.parts.final_norm_path} ran {capture.norm_calls} "
                "times after the last block in one forward pass, not once; tokentrail cannot tell which is the "
                "final state"
            )

    def _lens(self, layers: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of final norm + unembedding on every layer, all layers of a batch in as few matmuls as fit.

        The rows go through in chunks of bounded size: B x (L+1) rows of vocabulary-wide logits would
        otherwise take more memory than the forward pass itself.
        """
        parts = self.loaded.parts
        # Where and in which dtype the readout runs: the final norm's, or the unembedding's without one.
        norm_param = next(parts.final_capture.parameters(), None) if parts.final_capture is not None else None
        if norm_param is None:
            norm_param = parts.unembed.weight
        device, dtype = norm_param.device, norm_param.dtype
        n, depth, hidden = layers.shape
        flat = layers.reshape(n * depth, hidden)
        vocab = int(parts.unembed.weight.shape[0])
        chunk = max(1, (256 << 20) // (8 * vocab))
        ids, probs = [], []
        for start in range(0, len(flat), chunk):
            rows = flat[start : start + chunk].to(device=device, dtype=dtype)
            top = torch.softmax(parts.logits(parts.normed(rows)), dim=-1).topk(k, dim=-1)
            ids.append(top.indices)
            probs.append(top.values)
        return torch.cat(ids).reshape(n, depth, k), torch.cat(probs).reshape(n, depth, k)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host to GPU without stalling: from pageable memory a copy waits for the GPU to finish its queue."""
        device = self.loaded.device
        if device.type == "cuda":
            return tensor.pin_memory().to(device, non_blocking=True)
        return tensor.to(device)

    @torch.inference_mode()
    def trace_ids(self, encoded: Sequence[Sequence[int]]) -> dict[str, Any]:
        """Trace already-encoded prompts; arrays come back in input order.

        On a GPU the results of a batch are copied to pinned host memory asynchronously and read back two
        batches later, so the GPU never waits for Python and Python never waits for the GPU.
        """
        n = len(encoded)
        parts = self.loaded.parts
        device = self.loaded.device
        model = self.loaded.model
        k = self.options.top_k
        keep_all = self.position == "all"
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=n)
        starts = np.zeros(n, dtype=np.int64)
        starts[1:] = np.cumsum(lengths)[:-1]
        flat = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64, count=int(lengths.sum()))
        # With left padding every row ends at its last token, where the final state is read ("last" and "all"
        # alike), so the model's own last-column logits are the next-token readout and the unembedding need not
        # run a second time.
        model_readout = self.position in ("last", "all") and self.padding_side != "right"
        out: dict[str, np.ndarray | None] = {
            "states": None,
            "final_states": None,
            "next_token_ids": np.zeros((n, k), dtype=np.int64),
            "next_token_probs": np.zeros((n, k), dtype=np.float32),
            "lens_token_ids": np.zeros((n, parts.n_layers + 1, k), dtype=np.int64) if self.options.logit_lens else None,
            "lens_probs": np.zeros((n, parts.n_layers + 1, k), dtype=np.float32) if self.options.logit_lens else None,
        }
        token_states: list[np.ndarray | None] = [None] * n
        pending: collections.deque = collections.deque()

        def settle(keep: int) -> None:
            """Write the results of all but the newest `keep` batches into the output arrays."""
            while len(pending) > keep:
                index, event, results = pending.popleft()
                if event is not None:
                    event.synchronize()
                for name, value in results.items():
                    array = value.numpy()
                    if out[name] is None:
                        out[name] = np.zeros((n, *array.shape[1:]), dtype=array.dtype)
                    out[name][index] = array

        capture = _Capture()
        capture.keep_all = keep_all
        with self._hooks(capture):
            for index in self.plan_batches(lengths):
                batch_lengths = lengths[index]
                width = int(batch_lengths.max())
                input_ids, mask = self._padded(flat, starts[index], batch_lengths)
                columns = self._selected_index(torch.from_numpy(batch_lengths), width)
                capture.n_rows, capture.width = len(index), width
                capture.column = int(columns[0]) if bool((columns == columns[0]).all()) else None
                if capture.column is None:
                    capture.rows = torch.arange(len(index), device=device)
                    capture.columns = columns.to(device)
                capture.layers, capture.final = None, None
                capture.full = [None] * (parts.n_layers + 1)
                capture.calls = [0] * (parts.n_layers + 1)
                capture.hooks.new_pass()
                capture.norm_calls = 0
                mask_on_device = self._to_device(mask)
                kwargs: dict[str, Any] = {"input_ids": self._to_device(input_ids), "attention_mask": mask_on_device,
                                          "use_cache": False}
                if self._pass_position_ids and self.padding_side == "left":
                    # Models with absolute position embeddings (GPT-2, OPT) otherwise number pad tokens too and
                    # shift every left-padded prompt's positions.
                    kwargs["position_ids"] = (mask_on_device.cumsum(-1) - 1).clamp(min=0)
                if self._logits_to_keep:
                    kwargs["logits_to_keep"] = 1  # the readout needs one column at most
                capture.active = True
                try:
                    output = model(**kwargs)
                finally:
                    capture.active = False
                self.n_forward_passes += 1
                self._check_calls(capture)
                for slot in parts.skipped_blocks:  # a block that did not run left the residual state unchanged
                    capture.layers[:, slot] = capture.layers[:, slot - 1]
                    if keep_all:
                        capture.full[slot] = capture.full[slot - 1]
                layers, final = capture.layers, capture.final
                if parts.final_norm is None:  # post-norm model: the last block's output is what the head reads
                    final = layers[:, parts.n_layers].clone()
                logits = output.logits[:, -1].to(torch.float32) if model_readout else parts.logits(final)
                del output
                top = torch.softmax(logits, dim=-1).topk(k, dim=-1)
                results = {"states": layers, "final_states": final.to(torch.float32),
                           "next_token_ids": top.indices, "next_token_probs": top.values}
                if self.options.logit_lens:
                    results["lens_token_ids"], results["lens_probs"] = self._lens(layers, k)
                same_device = all(value.device == device for value in results.values())
                if device.type == "cuda" and same_device and not keep_all:
                    host = {}
                    for name, value in results.items():
                        host[name] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                        host[name].copy_(value, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                    pending.append((index, event, host))
                    settle(keep=2)
                else:
                    pending.append((index, None, {name: value.cpu() for name, value in results.items()}))
                    settle(keep=0)
                if keep_all:
                    full = torch.stack(capture.full, dim=2)  # [B, T, L+1, H]
                    for row, prompt_index in enumerate(index.tolist()):
                        length = int(lengths[prompt_index])
                        span = slice(0, length) if self.padding_side == "right" else slice(width - length, width)
                        token_states[prompt_index] = full[row, span].numpy().copy()
            settle(keep=0)
        assert out["states"] is not None and out["final_states"] is not None
        return {**out, "token_states": token_states if keep_all else None}

    def _token_strings(self, unique_ids: np.ndarray) -> list[str]:
        strings = self.loaded.tokenizer.convert_ids_to_tokens([int(i) for i in unique_ids])
        return [self.loaded.tokenizer.convert_tokens_to_string([s]) if s is not None else "" for s in strings]

    def decode_each(self, ids: np.ndarray) -> list:
        """Token strings with the same nesting as `ids` (one string per id)."""
        array = np.asarray(ids)
        unique, inverse = np.unique(array.reshape(-1), return_inverse=True)
        # Each distinct id is decoded once; a batch repeats the same few thousand tokens many times over.
        texts = np.asarray(self._token_strings(unique), dtype=object)
        return texts[inverse.reshape(-1)].reshape(array.shape).tolist()

    def _decode_prompts(self, encoded: Sequence[Sequence[int]]) -> list[list[str]]:
        """Token strings of every prompt, decoding each distinct id once for all prompts together."""
        if not encoded:
            return []
        lengths = [len(ids) for ids in encoded]
        flat = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64, count=sum(lengths))
        unique, inverse = np.unique(flat, return_inverse=True)
        texts = np.asarray(self._token_strings(unique), dtype=object)[inverse.reshape(-1)].tolist()
        out, start = [], 0
        for length in lengths:
            out.append(texts[start : start + length])
            start += length
        return out

    def trace(self, prompts: Sequence[str], **names: Unpack[PromptNames]) -> Trace:
        """Trace prompt texts into a `Trace` (the notebook entry point); `names` are `prompt_ids`, `categories`
        and `labels`, each one per prompt."""
        prompts = list(prompts)
        encoded = self.encode(prompts)
        arrays = self.trace_ids(encoded)
        return Trace.assemble(
            prompts,
            **names,
            states=arrays["states"],
            final_states=arrays["final_states"],
            token_ids=[np.asarray(ids, dtype=np.int64) for ids in encoded],
            tokens=self._decode_prompts(encoded),
            next_token_ids=arrays["next_token_ids"],
            next_token_probs=arrays["next_token_probs"],
            next_tokens=self.decode_each(arrays["next_token_ids"]),
            lens_token_ids=arrays["lens_token_ids"],
            lens_probs=arrays["lens_probs"],
            lens_tokens=self.decode_each(arrays["lens_token_ids"]) if arrays["lens_token_ids"] is not None else None,
            token_states=arrays["token_states"],
            model=model_info(self.loaded),
            options=self.options.to_dict(),
        )


def model_info(loaded: LoadedModel) -> dict[str, Any]:
    config = loaded.model.config
    return {
        **loaded.fingerprint,
        "architecture": type(loaded.model).__name__,
        "model_type": getattr(config, "model_type", ""),
        "n_layers": loaded.parts.n_layers,
        "hidden_size": loaded.parts.hidden_size,
        "blocks": loaded.parts.blocks_path,
        "final_norm": loaded.parts.final_norm_path or None,
        "head": loaded.parts.head_path,
    }
