"""What a run holds, without a model: the trace options and the traced arrays, shapes checked on creation."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

import numpy as np

from tokentrail.errors import TokentrailError


def text_id(text: str) -> str:
    """A prompt's default id: the first 12 hex digits of the SHA-256 of its UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


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


class PromptNames(TypedDict, total=False):
    """What a caller may say about its prompts besides their texts, one entry per prompt; `Trace.assemble` fills
    in what is left out. The tracer and the store take these as keywords (`**names: Unpack[PromptNames]`)."""

    prompt_ids: Sequence[str] | None
    categories: Sequence[str] | None
    labels: Sequence[str] | None


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

    @classmethod
    def assemble(
        cls,
        prompts: Sequence[str],
        prompt_ids: Sequence[str] | None = None,
        categories: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
        **arrays: Any,
    ) -> Trace:
        """The one way a Trace is made from traced or stored arrays (the tracer and the store both call it), so
        that both give the same defaults: a prompt without an id gets the first 12 hex digits of the SHA-256 of
        its text (the same text always gets the same id, in any order), no category is "uncategorized", no
        label is "". `arrays` are the remaining fields; their shapes are checked by `__post_init__`."""
        prompts = list(prompts)
        n = len(prompts)
        return cls(
            prompt_ids=list(prompt_ids) if prompt_ids is not None else [text_id(text) for text in prompts],
            prompts=prompts,
            categories=list(categories) if categories is not None else ["uncategorized"] * n,
            labels=list(labels) if labels is not None else [""] * n,
            **arrays,
        )

    def __post_init__(self) -> None:
        """Refuse arrays that do not fit together: a Trace with a wrong shape would give wrong pictures later."""
        n = len(self.prompts)
        problems = []
        for name in ("prompt_ids", "categories", "labels", "token_ids", "tokens", "next_tokens"):
            if len(getattr(self, name)) != n:
                problems.append(f"{name} has {len(getattr(self, name))} entries for {n} prompts")
        states = np.asarray(self.states)
        if states.ndim != 3 or states.shape[0] != n:
            problems.append(f"states has shape {states.shape}, expected [{n}, layers + 1, hidden]")
        elif np.ndim(self.final_states) != 2 or np.shape(self.final_states)[0] != n:
            # Its width may differ from the states': parallel-stream models store S streams side by side in the
            # states and their collapsed, normed state here.
            problems.append(f"final_states has shape {np.shape(self.final_states)}, expected [{n}, hidden]")
        if np.shape(self.next_token_ids) != np.shape(self.next_token_probs) or np.ndim(self.next_token_ids) != 2 \
                or np.shape(self.next_token_ids)[0] != n:
            problems.append(f"next_token_ids {np.shape(self.next_token_ids)} and next_token_probs "
                            f"{np.shape(self.next_token_probs)} must both be [{n}, k]")
        if (self.lens_token_ids is None) != (self.lens_probs is None):
            problems.append("lens_token_ids and lens_probs come together or not at all")
        elif self.lens_token_ids is not None and states.ndim == 3 and (
                np.shape(self.lens_token_ids) != np.shape(self.lens_probs)
                or np.shape(self.lens_token_ids)[:2] != states.shape[:2]):
            problems.append(f"lens arrays {np.shape(self.lens_token_ids)} must be [{n}, layers + 1, k] like "
                            f"states {states.shape[:2]}")
        if self.token_states is not None:
            if len(self.token_states) != n:
                problems.append(f"token_states has {len(self.token_states)} entries for {n} prompts")
            else:
                for i, (every, ids) in enumerate(zip(self.token_states, self.token_ids)):
                    if np.ndim(every) != 3 or len(every) != len(ids):
                        problems.append(f"token_states[{i}] has shape {np.shape(every)} for {len(ids)} tokens")
                        break
        if problems:
            raise ValueError(f"inconsistent Trace: {problems[0]}")

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks L (states hold L+1 layers)."""
        return self.states.shape[1] - 1

    @property
    def hidden_size(self) -> int:
        return self.states.shape[2]

    def __len__(self) -> int:
        return len(self.prompts)
