"""Tracer: record one token position's residual-stream state after every layer, plus next-token readouts.

Forward hooks slice the chosen positions out of each block's output as it passes, so memory holds
`[batch, layers, hidden]` rather than every layer's full sequence. Layer 0 is the input of the first block
(the embedding output, including any scaling or position embeddings the model adds), layer l the raw output of
block l. The final-normed state is kept separately: `output_hidden_states` puts it in place of the last block's
raw output, which silently changes the last point of every trajectory.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from tokentrail.errors import TokentrailError
from tokentrail.models import LoadedModel

PADDING_SIDES = ("left", "right")


def parse_position(position: str | int) -> str | int:
    """`last`, `all`, or an integer token index (negative counts from the end of the prompt)."""
    if isinstance(position, int):
        return position
    text = str(position).strip().lower()
    if text in ("last", "all"):
        return text
    try:
        return int(text)
    except ValueError:
        raise TokentrailError(f"unknown position {position!r}; use last, all, or a token index like 0 or -2") from None


@dataclass(frozen=True)
class TraceOptions:
    """Everything that changes what is recorded; batching choices are absent because they must not."""

    position: str = "last"
    chat: bool = False
    top_k: int = 5
    logit_lens: bool = True
    truncate: bool = False

    def __post_init__(self) -> None:
        parse_position(self.position)
        if self.top_k < 1:
            raise TokentrailError(f"--top-k must be at least 1, got {self.top_k}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Trace:
    """Traced prompts. Shapes: P prompts, L decoder blocks, H hidden size, k top tokens.

    states        float32 [P, L+1, H]  layer 0 = embedding output, layer l = raw output of block l
    final_states  float32 [P, H]       final norm applied to block L's output (what the unembedding reads)
    next_token_ids / next_token_probs  [P, k]  the model's own next-token top-k
    lens_token_ids / lens_probs        [P, L+1, k]  logit lens per layer (None when not computed)
    token_states  list of float32 [T_i, L+1, H] per prompt when position="all", else None
    """

    prompt_ids: list[str]
    prompts: list[str]
    categories: list[str]
    labels: list[str]
    states: np.ndarray
    final_states: np.ndarray
    token_ids: list[np.ndarray]
    tokens: list[list[str]]
    next_token_ids: np.ndarray
    next_token_probs: np.ndarray
    next_tokens: list[list[str]]
    lens_token_ids: np.ndarray | None = None
    lens_probs: np.ndarray | None = None
    lens_tokens: list[list[list[str]]] | None = None
    token_states: list[np.ndarray] | None = None
    model: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks L (states hold L+1 layers)."""
        return self.states.shape[1] - 1

    @property
    def hidden_size(self) -> int:
        return self.states.shape[2]

    def __len__(self) -> int:
        return len(self.prompts)


def _supports(module: torch.nn.Module, argument: str) -> bool:
    try:
        return argument in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


class Tracer:
    """Traces texts through a loaded model. Parameters are fixed at construction, like an estimator."""

    def __init__(
        self,
        loaded: LoadedModel,
        options: TraceOptions | None = None,
        batch_size: int = 16,
        max_batch_tokens: int = 16384,
        padding_side: str = "left",
    ) -> None:
        if padding_side not in PADDING_SIDES:
            raise TokentrailError(f"unknown padding side {padding_side!r}; use left or right")
        if batch_size < 1:
            raise TokentrailError(f"--batch-size must be at least 1, got {batch_size}")
        self.loaded = loaded
        self.options = options or TraceOptions()
        self.position = parse_position(self.options.position)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.padding_side = padding_side
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
        encoded: list[list[int]] = []
        for text in texts:
            if self.options.chat:
                if not getattr(tokenizer, "chat_template", None):
                    raise TokentrailError(
                        f"model {self.loaded.name!r} has no chat template; drop --chat to trace raw prompts"
                    )
                rendered = tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
                )
                ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer(text)["input_ids"]
            if not ids:
                raise TokentrailError(f"prompt {text[:40]!r} encodes to no tokens; give it some text")
            if self._context is not None and len(ids) > self._context:
                if not self.options.truncate:
                    raise TokentrailError(
                        f"prompt {text[:40]!r} has {len(ids)} tokens, more than the model's context of "
                        f"{self._context}; shorten it or pass --truncate"
                    )
                ids = ids[-self._context :]  # keep the end: the traced next-token state lives there
            if isinstance(self.position, int):
                if not -len(ids) <= self.position < len(ids):
                    raise TokentrailError(
                        f"position {self.position} is outside prompt {text[:40]!r} of {len(ids)} tokens"
                    )
            encoded.append(list(ids))
        return encoded

    def _batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Length-sorted batches bounded by a prompt count and a padded-token budget."""
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        batch: list[int] = []
        for index in order:
            widest = max([lengths[index]] + [lengths[i] for i in batch])
            if batch and (len(batch) >= self.batch_size or widest * (len(batch) + 1) > self.max_batch_tokens):
                yield batch
                batch = []
            batch.append(index)
        if batch:
            yield batch

    def _selected_index(self, lengths: torch.Tensor, width: int) -> torch.Tensor:
        """Column of the traced token in each padded row."""
        offset = width - lengths if self.padding_side == "left" else torch.zeros_like(lengths)
        if self.position in ("last", "all"):
            return offset + lengths - 1
        assert isinstance(self.position, int)
        if self.position >= 0:
            return offset + self.position
        return offset + lengths + self.position

    @contextlib.contextmanager
    def _capture(self, rows: torch.Tensor, columns: torch.Tensor, keep_all: bool) -> Iterator[dict[str, Any]]:
        """Hooks that keep the chosen positions of every layer; always removed, even on error."""
        parts = self.loaded.parts
        captured: dict[str, Any] = {"layers": [None] * (parts.n_layers + 1), "full": [None] * (parts.n_layers + 1)}

        def keep(slot: int, hidden: torch.Tensor) -> None:
            captured["layers"][slot] = hidden[rows, columns].detach().to(torch.float32).cpu()
            if keep_all:
                captured["full"][slot] = hidden.detach().to(torch.float32).cpu()

        def pre_first_block(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            keep(0, hidden)

        def after_block(slot: int):
            def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
                keep(slot, output[0] if isinstance(output, (tuple, list)) else output)

            return hook

        def after_norm(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            captured["final"] = output[rows, columns].detach()

        handles = [parts.blocks[0].register_forward_pre_hook(pre_first_block, with_kwargs=True)]
        try:
            for slot, block in enumerate(parts.blocks, start=1):
                handles.append(block.register_forward_hook(after_block(slot)))
            handles.append(parts.final_norm.register_forward_hook(after_norm))
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def _logits(self, normed: torch.Tensor) -> torch.Tensor:
        parts = self.loaded.parts
        logits = parts.unembed(normed).to(torch.float32)
        if parts.logit_softcap:
            logits = torch.tanh(logits / parts.logit_softcap) * parts.logit_softcap
        return logits

    @torch.inference_mode()
    def trace_ids(self, encoded: Sequence[Sequence[int]]) -> dict[str, Any]:
        """Trace already-encoded prompts; arrays come back in input order."""
        n = len(encoded)
        parts = self.loaded.parts
        device = self.loaded.device
        model = self.loaded.model
        k = self.options.top_k
        keep_all = self.position == "all"
        lengths = [len(ids) for ids in encoded]
        states: np.ndarray | None = None
        final_states: np.ndarray | None = None
        next_ids = np.zeros((n, k), dtype=np.int64)
        next_probs = np.zeros((n, k), dtype=np.float32)
        lens_ids = np.zeros((n, parts.n_layers + 1, k), dtype=np.int64) if self.options.logit_lens else None
        lens_probs = np.zeros((n, parts.n_layers + 1, k), dtype=np.float32) if self.options.logit_lens else None
        token_states: list[np.ndarray | None] = [None] * n
        for batch in self._batches(lengths):
            width = max(lengths[i] for i in batch)
            input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                ids = torch.tensor(encoded[index], dtype=torch.long)
                span = slice(width - len(ids), width) if self.padding_side == "left" else slice(0, len(ids))
                input_ids[row, span] = ids
                mask[row, span] = 1
            batch_lengths = torch.tensor([lengths[i] for i in batch])
            rows = torch.arange(len(batch))
            columns = self._selected_index(batch_lengths, width)
            kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                                      "use_cache": False}
            if self._pass_position_ids:
                # Models with absolute position embeddings (GPT-2, OPT) otherwise number pad tokens too and
                # shift every left-padded prompt's positions.
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
            if self._logits_to_keep:
                kwargs["logits_to_keep"] = 1  # the readout is recomputed from the captured final state
            with self._capture(rows.to(device), columns.to(device), keep_all) as captured:
                model(**kwargs)
            self.n_forward_passes += 1
            stacked = torch.stack(captured["layers"], dim=1)  # [B, L+1, H]
            if states is None:
                states = np.zeros((n, stacked.shape[1], stacked.shape[2]), dtype=np.float32)
                final_states = np.zeros((n, stacked.shape[2]), dtype=np.float32)
            index = np.asarray(batch)
            states[index] = stacked.numpy()
            final = captured["final"]
            final_states[index] = final.to(torch.float32).cpu().numpy()
            probs = torch.softmax(self._logits(final), dim=-1)
            top = probs.topk(k, dim=-1)
            next_ids[index] = top.indices.cpu().numpy()
            next_probs[index] = top.values.cpu().numpy()
            if lens_ids is not None:
                dtype = next(parts.final_norm.parameters(), final).dtype
                for layer in range(stacked.shape[1]):
                    layer_state = stacked[:, layer].to(device=device, dtype=dtype)
                    lens = torch.softmax(self._logits(parts.final_norm(layer_state)), dim=-1).topk(k, dim=-1)
                    lens_ids[index, layer] = lens.indices.cpu().numpy()
                    lens_probs[index, layer] = lens.values.cpu().numpy()
            if keep_all:
                full = torch.stack(captured["full"], dim=2)  # [B, T, L+1, H]
                for row, prompt_index in enumerate(batch):
                    length = lengths[prompt_index]
                    span = slice(width - length, width) if self.padding_side == "left" else slice(0, length)
                    token_states[prompt_index] = full[row, span].numpy().copy()
        assert states is not None and final_states is not None
        return {
            "states": states,
            "final_states": final_states,
            "next_token_ids": next_ids,
            "next_token_probs": next_probs,
            "lens_token_ids": lens_ids,
            "lens_probs": lens_probs,
            "token_states": token_states if keep_all else None,
        }

    def decode_each(self, ids: np.ndarray) -> list:
        """Token strings with the same nesting as `ids` (one string per id)."""
        flat = [int(i) for i in np.asarray(ids).reshape(-1)]
        strings = self.loaded.tokenizer.convert_ids_to_tokens(flat)
        texts = [self.loaded.tokenizer.convert_tokens_to_string([s]) if s is not None else "" for s in strings]
        return np.asarray(texts, dtype=object).reshape(np.asarray(ids).shape).tolist()

    def trace(
        self,
        prompts: Sequence[str],
        prompt_ids: Sequence[str] | None = None,
        categories: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
    ) -> Trace:
        """Trace prompt texts into a `Trace` (the notebook entry point)."""
        prompts = list(prompts)
        encoded = self.encode(prompts)
        arrays = self.trace_ids(encoded)
        n = len(prompts)
        return Trace(
            prompt_ids=list(prompt_ids) if prompt_ids is not None else [f"p{i}" for i in range(n)],
            prompts=prompts,
            categories=list(categories) if categories is not None else ["uncategorized"] * n,
            labels=list(labels) if labels is not None else [""] * n,
            states=arrays["states"],
            final_states=arrays["final_states"],
            token_ids=[np.asarray(ids, dtype=np.int64) for ids in encoded],
            tokens=[self.decode_each(np.asarray(ids)) for ids in encoded],
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
        "hidden_size": int(loaded.parts.unembed.weight.shape[1]),
        "blocks": loaded.parts.blocks_path,
        "final_norm": loaded.parts.final_norm_path,
    }
