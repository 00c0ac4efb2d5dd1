"""The parts of an unmodified HF model that tracing addresses, found without a per-architecture table: the
decoder blocks, the final norm (or the chain of modules the model runs after its last block), the readout head,
and what the architecture does to its logits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokentrail.errors import ArchitectureError


@dataclass
class ModelParts:
    """The modules of an unmodified HF model that tracing addresses, and how its logits are read out.

    The readout maps a residual state to logits exactly as the model's own forward does after its last block:
    `final_norm` (None for post-norm models that have none: the identity), then `head` (the module the model
    calls on the normed state: `lm_head`, or a prediction head such as BERT's `cls`), then the scalings some
    architectures apply to the logits. The load-time self-check proves the readout on the model itself.
    """

    blocks: list[nn.Module]
    final_norm: Any  # a module, a _Chain of modules (DeepSeek-V4: stream collapse, then norm) or None
    unembed: nn.Module
    blocks_path: str
    final_norm_path: str
    head: Any = None
    head_path: str = ""
    # Other readouts and final norms discovery found plausible (None: no final norm); the self-check keeps the
    # first pair the model's own states and logits prove.
    head_candidates: list[tuple[str, Any]] = field(default_factory=list)
    norm_candidates: list[tuple[str, nn.Module | None]] = field(default_factory=list)
    logit_softcap: float | None = None
    # logits = head(normed * hidden_scale)[:vocab_limit] * logit_scale + logit_bias, then the soft cap.
    hidden_scale: float | None = None
    vocab_limit: int | None = None
    logit_scale: float | None = None
    logit_bias: torch.Tensor | None = None
    # How prompts of different lengths may share a forward pass: "left" or "right" padding, or "none" (only
    # prompts of equal length share one). Decided by the self-check; "none" is right for every causal model.
    padding: str = "left"
    # Trailing shape of one token's residual state as the blocks pass it on: (H,) usually, (S, H) for models
    # that carry S parallel streams (hyper-connections). States are stored flattened; the readout restores it.
    stream_shape: tuple[int, ...] | None = None
    # Blocks (1-based) a plain forward pass never runs, found by the self-check (Mllama's cross-attention layers
    # without an image): the state after such a block is the state before it, exactly.
    skipped_blocks: tuple[int, ...] = ()
    # How the blocks lay out their output, found by the self-check: "batch" [B, T, ...] (almost every model),
    # "sequence" [T, B, H] (XLNet) or "streams" [S, B, T, H] (Gemma-3n's AltUp streams stacked in front).
    layout: str = "batch"
    # Tokens the blocks carry ahead of the prompt's own (CPM-Ant's prompt-tuning tokens): the prompt's states
    # are the last T positions of a longer sequence.
    extra_leading_tokens: bool = False
    # Whether a prompt's states depend on tokens after it (bidirectional attention over the input: XLNet and
    # CPM-Ant as causal LMs). The self-check then proves a padded prompt against its own forward pass.
    bidirectional: bool = False
    # Where layer 0 is read: the input of this module (the first block's, or of the first module of a layer
    # whose parts sit in parallel lists, as in XLM).
    entry: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.head is None:
            self.head = self.unembed
        if self.entry is None:
            self.entry = self.blocks[0]

    def why_not_steerable(self) -> str | None:
        """Why steering, which adds one vector to one block's [batch, tokens, hidden] output, cannot work here."""
        if len(set(self.blocks)) < len(self.blocks):
            return "it runs the same block at several layers (shared or looped blocks)"
        if self.layout != "batch":
            return f"its blocks pass on {self.layout}-first states"
        if self.extra_leading_tokens:
            return "its blocks carry extra tokens ahead of the prompt"
        if self.stream_shape is not None and len(self.stream_shape) > 1:
            return f"its blocks pass on {self.stream_shape[0]} parallel residual streams"
        return None

    def batch_first(self, hidden: Any, n_rows: int, width: int, layout: str | None = None) -> torch.Tensor | None:
        """A block's (or the final norm's) output as `[n_rows, width, *stream]`, or None if it is not laid out
        as the self-check found: the tracer then refuses the forward pass rather than read the wrong axis."""
        return to_batch_first(hidden, n_rows, width, layout or self.layout, self.extra_leading_tokens)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return int(self.unembed.weight.shape[1])

    @property
    def vocab_size(self) -> int:
        """Tokens the readout can name: the unembedding's rows, less any padding rows past `vocab_limit`."""
        rows = int(self.unembed.weight.shape[0])
        return rows if self.vocab_limit is None else min(rows, int(self.vocab_limit))

    @property
    def final_capture(self) -> nn.Module | None:
        """The module whose output is the final-normed state: the norm, or the last module of a chain."""
        return self.final_norm.modules[-1] if isinstance(self.final_norm, _Chain) else self.final_norm

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm (and any stream collapse before it) of flattened states `[..., D]`, as `[..., H]`."""
        if self.final_norm is None:
            return hidden
        shape = self.stream_shape or (hidden.shape[-1],)
        rows = hidden.reshape(-1, 1, *shape)  # [N, 1, *stream]: the modules expect [batch, tokens, ...]
        return self.final_norm(rows).reshape(*hidden.shape[:-1], -1)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """float32 logits of final-normed states `[..., H]`, as the model computes them."""
        if self.hidden_scale is not None:
            normed = normed * self.hidden_scale
        logits = self.head(normed).to(torch.float32)
        if self.vocab_limit is not None:
            logits = logits[..., : self.vocab_limit]
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logit_bias is not None:
            logits = logits + self.logit_bias.to(device=logits.device, dtype=torch.float32)
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


def to_batch_first(hidden: Any, n_rows: int, width: int, layout: str, extra_leading_tokens: bool,
                   ) -> torch.Tensor | None:
    """`hidden` laid out as `layout` ("batch", "sequence" [T, B, H] or "streams" [S, B, T, H]) as
    `[n_rows, width, ...]`, keeping the last `width` positions where extra tokens lead; None if it does not fit."""
    if not isinstance(hidden, torch.Tensor):
        return None
    if layout == "sequence" and hidden.ndim == 3:
        hidden = hidden.transpose(0, 1)
    elif layout == "streams" and hidden.ndim == 4:
        hidden = hidden.permute(1, 2, 0, 3)
    if hidden.ndim < 3 or hidden.shape[0] != n_rows:
        return None
    if extra_leading_tokens and hidden.shape[1] > width:
        hidden = hidden[:, -width:]
    return hidden if hidden.shape[1] == width else None


# Names a final norm goes by, beside the block list. A post-norm model (BERT and its kin as decoders, OpenAI-GPT,
# BART's decoder) has none; its readout starts at the head, and the self-check proves that too.
_NORM_NAMES = ("norm", "ln_f", "ln", "final_layer_norm", "final_layernorm", "final_norm", "norm_f", "layer_norm",
               "layernorm", "ln_out", "output_layernorm", "final_ln", "norm_out", "ln_final")
_DEPTH_NAMES = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")


def config_value(config: Any, name: str, default: Any = None) -> Any:
    """A config attribute, or `default`; some configs raise on attributes that vary per layer."""
    try:
        value = getattr(config, name, default)
    except Exception:  # noqa: BLE001 - e.g. transformers' AmbiguousGlobalPerLayerAttributeError
        return default
    return default if value is None else value


def text_config_of(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return config
    try:
        return config.get_text_config(decoder=True)
    except Exception:  # noqa: BLE001 - ambiguous text configs (several candidates): the decoder's own
        return config


def _module_path(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _readout_scalings(model: nn.Module, text_config: Any) -> dict[str, Any]:
    """What the model's forward does between its head and the logits it returns, read from its attributes.

    Each entry mirrors an architecture's forward: Gemma's soft cap, Cohere's `logit_scale`, Granite's
    `logits_scaling`, Falcon-H1's `lm_head_multiplier`, Inkling's muP width divisor and padded vocabulary, and
    BART-style `final_logits_bias`. An architecture with a scaling not listed here fails the self-check, loudly.
    """
    found: dict[str, Any] = {}
    softcap = (config_value(text_config, "final_logit_softcapping") or config_value(text_config, "logits_soft_cap")
               or config_value(text_config, "output_logit_soft_cap"))
    if softcap:
        found["logit_softcap"] = float(softcap)
    scale = 1.0
    own_scale = getattr(model, "logit_scale", None)
    if isinstance(own_scale, (int, float, torch.Tensor)) and not isinstance(own_scale, bool):
        scale *= float(own_scale)
    elif config_value(text_config, "logit_scale") not in (None, 1, 1.0):
        scale *= float(config_value(text_config, "logit_scale"))
    if config_value(text_config, "logits_scaling") not in (None, 1, 1.0):
        scale /= float(config_value(text_config, "logits_scaling"))
    inner = getattr(model, "model", None)
    multiplier = getattr(inner, "lm_head_multiplier", None) if inner is not None else None
    if multiplier is None:
        multiplier = config_value(text_config, "lm_head_multiplier")
    if isinstance(multiplier, (int, float)) and multiplier != 1:
        scale *= float(multiplier)
    if scale != 1.0:
        found["logit_scale"] = scale
    width = config_value(text_config, "logits_mup_width_multiplier")
    if isinstance(width, (int, float)) and width != 1:
        found["hidden_scale"] = 1.0 / float(width)
    unpadded = config_value(text_config, "unpadded_vocab_size")
    if isinstance(unpadded, int) and unpadded > 0:
        found["vocab_limit"] = unpadded
    bias = getattr(model, "final_logits_bias", None)
    if isinstance(bias, torch.Tensor):
        found["logit_bias"] = bias
    return found


def contains(owner: nn.Module, module: nn.Module) -> bool:
    return any(inner is module for inner in owner.modules())


def modules_around_blocks(model: nn.Module, blocks_path: str, include_model: bool = True,
                          ) -> list[tuple[str, nn.Module]]:
    """Children of the block list's parent and of each ancestor above it (the model's own with `include_model`),
    except those holding the blocks: where a final norm, or a stream collapse before it, lives."""
    first_block = model.get_submodule(blocks_path)[0]
    path = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    found: list[tuple[str, nn.Module]] = []
    while True:
        if path or include_model:
            owner = model.get_submodule(path) if path else model
            found += [(f"{path}.{name}" if path else name, child) for name, child in owner.named_children()
                      if not contains(child, first_block)]
        if not path:
            return found
        path = path.rsplit(".", 1)[0] if "." in path else ""


class _Chain:
    """Modules applied one after another; a plain callable, so the user's model gains no submodule."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        for module in self.modules:
            hidden = module(hidden)
        return hidden


class _AltUpCollapse:
    """Gemma-3n's readout of its AltUp streams `[..., S, H]` into one state `[..., H]`, as its text model does
    after the last block: every stream but the first is projected back, rescaled to the first stream's RMS
    magnitude, and the S streams are averaged. That code is inline in the model's forward, not a module, so
    tokentrail restates it here; the load-time self-check proves it against the model's own logits."""

    def __init__(self, projections: nn.ModuleList) -> None:
        self.projections = projections

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        first = hidden[..., 0, :]
        target = torch.mean(first**2, dim=-1, keepdim=True) ** 0.5
        streams = [first]
        for index, projection in enumerate(self.projections, start=1):
            projected = projection(hidden[..., index, :]).to(first.dtype)
            magnitude = torch.sqrt(torch.mean(projected**2, dim=-1, keepdim=True).clamp(min=1e-5))
            streams.append(projected * target / magnitude)
        return torch.stack(streams).mean(dim=0)


def _head_candidates(model: nn.Module, unembed: nn.Module, first_block: nn.Module) -> list[tuple[str, Any]]:
    """Readouts from the normed state to logits, most likely first.

    Usually the model's own child holding the output embeddings (`lm_head`, or BERT's `cls` prediction head); a
    model that runs a transform head and then a separate decoder (ModernBERT's decoder) needs the chain of its
    children beside the base model, in order.
    """
    unembed_path = _module_path(model, unembed) or ""
    top_name = unembed_path.split(".")[0]
    top = getattr(model, top_name, None) if top_name else None
    found: list[tuple[str, Any]] = []
    if isinstance(top, nn.Module) and not isinstance(top, nn.ModuleList) and not contains(top, first_block):
        found.append((top_name, top))
    if unembed_path and unembed_path != top_name:
        found.append((unembed_path, unembed))
    others = [(name, child) for name, child in model.named_children() if not contains(child, first_block)]
    if len(others) > 1 and any(child is top for _, child in others):
        found.append(("+".join(name for name, _ in others), _Chain([child for _, child in others])))
    if not found:
        found.append((unembed_path, unembed))
    return found


def find_parts(model: nn.Module) -> ModelParts:
    """Find decoder blocks, final norm and readout head without a per-architecture table.

    The blocks are the shallowest ModuleList whose length equals the config's layer count; the final norm is a
    sibling of that list with a conventional name, or none (post-norm models); the head is the model's own child
    that holds its output embeddings. This covers almost every decoder in transformers (docs/models.md lists
    them); what it gets wrong the load-time self-check refuses, so a wrong guess never reaches a number.
    """
    text_config = text_config_of(model)
    # The config's depth, under the first name it uses that a block list of the model has: encoder-decoder
    # families give their decoder-only causal LM `decoder_layers` beside an encoder's `num_hidden_layers`.
    depths = [value for value in (config_value(text_config, attr) for attr in _DEPTH_NAMES)
              if isinstance(value, int) and not isinstance(value, bool) and value > 0]
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 0]
    n_layers = next((depth for depth in depths if any(len(module) == depth for _, module in lists)),
                    depths[0] if depths else None)
    candidates = [(name, module) for name, module in lists if n_layers is None or len(module) == n_layers]
    # The language model's blocks sit under the same parent as its input embeddings; a vision or audio tower's
    # lists do not. Among equals, the shallowest list wins.
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embed_path = (_module_path(model, embed) or "") if isinstance(embed, nn.Module) else ""

    def shared_depth(path: str) -> int:
        depth = 0
        for mine, theirs in zip(path.split("."), embed_path.split(".")):
            if mine != theirs:
                break
            depth += 1
        return depth

    candidates.sort(key=lambda item: (-shared_depth(item[0]), item[0].count(".")))
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(unembed, nn.ModuleList):
        # One head per codebook (MusicGen): one codebook is a plain LM; several put that many tokens at each
        # position, and a trajectory per position would mix them.
        if len(unembed) != 1:
            raise ArchitectureError(
                f"unsupported architecture {type(model).__name__}: it predicts {len(unembed)} codebooks at once "
                "(one token each per position), and tokentrail traces one token per position; a one-codebook "
                "config traces"
            )
        unembed = unembed[0]
    if not isinstance(getattr(unembed, "weight", None), torch.Tensor) or unembed.weight.ndim != 2:
        raise ArchitectureError(
            f"unsupported architecture {type(model).__name__}: get_output_embeddings() gives no [vocab, hidden] "
            "unembedding matrix, so there is no logit readout to trace"
        )
    if not candidates:
        # Only lists shorter than the depth: e.g. stacks run in cycles that hand more than one state between them
        # (HRM's high- and low-level modules), with no single residual stream to trace.
        found = ", ".join(f"{name} ({len(module)})" for name, module in lists[:3])
        raise ArchitectureError(
            f"unsupported architecture {type(model).__name__}: looked for a ModuleList of {n_layers} decoder blocks "
            f"(the config's layer count); none found"
            + (f", only {found}: no list holds one block per layer, so there is no stack of blocks to trace "
               "(stacks run in cycles, as in HRM, hand more than one state between them)" if found else "")
        )
    blocks_path, blocks = candidates[0]
    parent_path = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    parent = model.get_submodule(parent_path) if parent_path else model
    siblings = [name for name, child in parent.named_children()
                if isinstance(child, nn.ModuleList) and len(child) == len(blocks)]
    entry = None
    if len(siblings) > 1 and any(part in name for name in siblings for part in ("ffn", "mlp", "feed_forward")):
        # XLM keeps each layer's attention, norms and feed-forward in parallel lists, declared in the order they
        # run: a layer starts at its module in the first list and its output is that of the last list. The
        # self-check proves the guess against output_hidden_states.
        entry = getattr(parent, siblings[0])[0]
        blocks_path = f"{parent_path}.{siblings[-1]}" if parent_path else siblings[-1]
        blocks = getattr(parent, siblings[-1])
    norms: list[tuple[str, nn.Module | None]] = []
    for norm_name in _NORM_NAMES:
        norm = getattr(parent, norm_name, None)
        if isinstance(norm, nn.Module) and all(norm is not known for _, known in norms):
            norms.append((f"{parent_path}.{norm_name}" if parent_path else norm_name, norm))
    # Any other norm-like child of the blocks' parent (LFM2 calls its final norm `embedding_norm`) or of its
    # ancestors (RoBERTa-PreLayerNorm keeps it beside the encoder), then none.
    for path, child in modules_around_blocks(model, blocks_path):
        if ("norm" in path.rsplit(".", 1)[-1].lower() and all(child is not known for _, known in norms)
                and not isinstance(child, nn.ModuleList)):
            norms.append((path, child))
    projections = getattr(parent, "altup_unembed_projections", None)
    if isinstance(projections, nn.ModuleList) and norms and norms[0][1] is not None:
        # Gemma-3n carries AltUp streams [S, B, T, H] through its blocks and collapses them before its norm.
        norm_path, norm = norms[0]
        collapse_path = f"{parent_path}.altup_unembed_projections" if parent_path else "altup_unembed_projections"
        norms.insert(0, (f"{collapse_path}+{norm_path}", _Chain([_AltUpCollapse(projections), norm])))
    norms.append(("", None))
    final_norm_path, final_norm = norms[0]
    candidates_heads = _head_candidates(model, unembed, blocks[0])
    head_name, head = candidates_heads[0]
    return ModelParts(blocks=list(blocks), blocks_path=blocks_path, entry=entry, unembed=unembed,
                      final_norm=final_norm, final_norm_path=final_norm_path, norm_candidates=norms,
                      head=head, head_path=head_name, head_candidates=candidates_heads,
                      **_readout_scalings(model, text_config))


