"""Tiny random models of every causal-LM type that transformers ships, for the coverage suite.

Configs are shrunk generically: each (sub-)config is rebuilt through its own class, with the sizes that make
a model big (widths, depths, expert counts, vocabularies, state sizes) set small wherever the class has them,
so `__post_init__` re-derives all that follows from them (head dims, layer-type patterns, per-layer configs).
Per-layer lists that the class does not derive are cut to the new depth. `OVERRIDES` holds the types whose
configs need more than that; `UNBUILDABLE` the few that cannot be built here at all, `NO_PLAIN_FORWARD` those
that build but cannot run a forward pass from input ids alone.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

VOCAB = 512
HIDDEN = 64
HEADS = 4
HEAD_DIM = 16
LAYERS = 4

# Scalars that set a size, and what they become in a tiny model. Each is applied only where the config has it.
SIZES: dict[str, int] = {
    "vocab_size": VOCAB, "unpadded_vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB,
    # widths
    "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN, "dim": HIDDEN, "n_embed": HIDDEN,
    "embedding_size": HIDDEN, "word_embed_proj_dim": HIDDEN, "emb_dim": HIDDEN, "hidden_size_global": HIDDEN,
    "lru_width": HIDDEN, "input_embedding_size": 32, "output_embedding_size": HIDDEN,
    "hidden_size_per_layer_input": 16, "laurel_rank": 8, "hc_lowrank": 16,
    # depths
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "n_layers": LAYERS, "num_layers": LAYERS,
    "decoder_layers": LAYERS, "encoder_layers": LAYERS, "num_decoder_layers": LAYERS,
    "num_encoder_layers": LAYERS,
    # attention heads
    "num_attention_heads": HEADS, "n_head": HEADS, "n_heads": HEADS, "decoder_attention_heads": HEADS,
    "encoder_attention_heads": HEADS, "swa_num_attention_heads": HEADS,
    "num_key_value_heads": 2, "num_kv_heads": 2, "n_kv_heads": 2, "multi_query_group_num": 2,
    "swa_num_key_value_heads": 2,
    "head_dim": HEAD_DIM, "kv_channels": HEAD_DIM, "attention_head_dim": HEAD_DIM, "swa_head_dim": HEAD_DIM,
    "rotary_dim": HEAD_DIM // 2,
    # MLPs and experts
    "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "d_ff": 128, "decoder_ffn_dim": 128,
    "encoder_ffn_dim": 128, "ffn_hidden_size": 128, "mlp_dim": 128, "dim_ff": 128, "dff": 128, "d_inner": 128,
    "dense_intermediate_size": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "expert_ffn_hidden_size": 32, "moe_shared_expert_intermediate_size": 32, "shared_intermediate_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "moe_k": 2,
    "n_shared_experts": 1, "num_shared_experts": 1, "zero_expert_num": 2,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    # positions and windows
    "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256, "max_seq_len": 256,
    "max_sequence_length": 256, "attention_window_size": 16, "sliding_window": 16,
    # latent attention (MLA) and sparse-attention indexers. As in real checkpoints, an indexer's top-k covers a
    # short prompt whole, so left padding changes nothing.
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "o_lora_rank": 16, "o_groups": 2,
    "index_head_dim": 16, "index_n_heads": 2, "index_topk": 64, "index_block_size": 2, "index_topk_blocks": 2,
    # state-space and linear-attention layers
    "state_size": 8, "ssm_state_size": 8, "d_state": 8, "mamba_d_state": 8, "mamba_n_heads": 8,
    "mamba_num_heads": 8, "mamba_d_head": 16, "mamba_head_dim": 16, "mamba_n_groups": 1, "n_groups": 1,
    "mamba_expand": 2, "mamba_d_ssm": 2 * HIDDEN, "time_step_rank": 8, "conv1d_width": 4,
    "linear_num_heads": HEADS, "linear_head_dim": HEAD_DIM, "linear_num_value_heads": 4,
    "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    # extra embeddings (BLT byte n-grams, RoCBert glyphs and sounds)
    "encoder_hash_byte_group_vocab": 64, "pronunciation_embed_dim": 16, "pronunciation_vocab_size": 64,
    "shape_embed_dim": 16, "shape_vocab_size": 64,
    # vision and audio towers of multimodal types
    "num_image_tokens": 4, "image_size": 32, "patch_size": 8, "vision_output_dim": HIDDEN,
    "projection_dim": HIDDEN, "text_hidden_size": HIDDEN, "projector_hidden_size": HIDDEN,
    "projection_hidden_dim": HIDDEN, "output_channels": 32, "downsample_hidden_size": 32,
    "adapter_in_dim": HIDDEN, "adapter_out_dim": HIDDEN, "adapter_input_size": HIDDEN,
    "nemo_conv_channels": 32, "ext_pw_out_channel": HIDDEN, "depthwise_separable_out_channel": HIDDEN,
}
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers",
              "num_decoder_layers")
# Sizes that only ever shrink: a class default below the tiny value (one KV head, two experts) is a design
# choice worth keeping.
NEVER_GROW = {
    "num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
    "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
    "num_experts_per_tok", "moe_topk", "top_k", "moe_k", "n_shared_experts", "num_shared_experts",
    "zero_expert_num", "first_k_dense_replace",
}
# Sizes that some classes leave `None` and their models then read as-is.
SIZES_IF_NONE = ("head_dim", "num_key_value_heads", "num_experts_per_tok")

# Attributes that name a token id; ids at or beyond the tiny vocabulary are moved above what the test
# tokenizer produces (it has ~300 tokens), so an image or pad id never collides with a real prompt token.
SPECIAL_ID_BASE = 400

# Per-type fixes, applied as constructor arguments after the generic sizes (so `__post_init__` sees them).
# A dotted key reaches into a sub-config ("text_config.head_dim"); keys a class does not declare are still
# passed on, since many classes read extra constructor kwargs (gemma4's `global_head_dim`).

# Gemma 4's full-attention layers have their own (512-wide) heads, set through its per_layer_config.
_GEMMA4_TEXT = {"global_head_dim": 32}
_GEMMA4_ASSISTANT_TEXT = {**_GEMMA4_TEXT, "num_kv_shared_layers": LAYERS}  # reuses the target's KV everywhere
# Indexed-attention layers need the token indexer (QSA), which the class leaves unset; a budget of 4 tokens in
# blocks of 2 makes the selection bite even on a 7-token prompt.
_QWEN4_QSA = {
    "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM, "indexer_budget": 4,
    "indexer_compress_ratio": 2,
}
# Its sliding-window layers are MLA with their own sizes, read from `swa_*` constructor kwargs.
_DOTS3_SWA = {
    "swa_num_attention_heads": HEADS, "swa_num_key_value_heads": HEADS, "swa_q_lora_rank": 32,
    "swa_kv_lora_rank": 16, "swa_head_dim": HEAD_DIM, "swa_qk_nope_head_dim": 8, "swa_v_head_dim": 16,
}


def _sub(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    return {f"{name}.{key}": value for key, value in overrides.items()}


OVERRIDES: dict[str, dict[str, Any]] = {
    # --- Class defaults that cannot run a model as they stand.
    # DBRX's attention reads `attn_config.rope_theta`, which only released checkpoints carry, and clamps with
    # `clip_qkv` even when it is None.
    "dbrx": {"attn_config.rope_theta": 10_000.0, "attn_config.clip_qkv": 8.0},
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1},  # left None, yet layers after the first are MoE
    "qwen4_exp": _sub("text_config", _QWEN4_QSA),
    "qwen4_exp_text": _QWEN4_QSA,
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},  # left None
    # Default rope parameters have no per-layer-type entry (and its layer types are all full attention).
    "cohere_compass_text": {
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {
            kind: {"rope_type": "default", "rope_theta": 10_000.0, "mrope_section": [4, 2, 2]}
            for kind in ("sliding_attention", "full_attention")
        },
    },
    "xmod": {"default_language": "en_XX"},  # its adapters are per language; with no default, forward refuses
    "zaya": {
        "num_experts_per_tok": 1,  # the only routing it supports
        "layer_types": ["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"],  # sliding and global
        "sliding_window": SIZES["sliding_window"],
    },
    # Used as a causal LM, XLM must not attend ahead; its class default is bidirectional. (CPM-Ant attends
    # both ways over its input by design. XLNet stays bidirectional too: with attn_type="uni", transformers
    # 5.24 fails on a batch with an attention mask, broadcasting the mask in place.)
    "xlm": {"causal": True},
    # --- Sizes the generic names do not reach, or that must agree with each other.
    "mamba2": {"num_heads": 8},  # num_heads * head_dim must equal expand * hidden_size
    "longcat_flash": {"head_dim": 8, "num_layers": 2},  # MLA rotary width; a layer holds 2 attention blocks
    # One layer per (high- and low-level) stack, run in 2 high-level cycles of 1 low-level cycle: 4 layer
    # calls. (The class rewrites num_hidden_layers to that count.)
    "hrm_text": {"num_hidden_layers": 1, "H_cycles": 2, "L_cycles": 1},
    # One input and one output layer around two recurrent layers (looped twice): 6 layer calls. The class
    # default of 8 input and 8 output layers does not fit in 4 layers.
    "dory": {"n_input_layers": 1, "n_output_layers": 1},
    # attn_layers sets the depth (local and LSH attention); the axial position factors must sum to the hidden
    # size and multiply to the maximum length.
    "reformer": {
        "attn_layers": ["local", "lsh", "local", "lsh"],
        "axial_pos_embds_dim": [32, 32],
        "axial_pos_shape": [16, 16],
    },
    "musicgen": {"decoder.num_codebooks": 1},  # one codebook: the input ids are a plain [batch, seq] matrix
    "musicgen_melody": {"decoder.num_codebooks": 1},
    # The vision tower's expert counts grow layer by layer ("pyramid"): 2 dense layers, then 2 and 4 experts.
    "dots3_note": {"vision_config.pyramid_num_routed": [-1, -1, 2, 4], **_sub("text_config", _DOTS3_SWA)},
    "dots3_note_text": _DOTS3_SWA,
    "gemma4": _sub("text_config", _GEMMA4_TEXT),
    "gemma4_text": _GEMMA4_TEXT,
    "gemma4_unified": _sub("text_config", _GEMMA4_TEXT),
    "gemma4_unified_text": _GEMMA4_TEXT,
    "gemma4_assistant": _sub("text_config", _GEMMA4_ASSISTANT_TEXT),
    "gemma4_unified_assistant": _sub("text_config", _GEMMA4_ASSISTANT_TEXT),
    # --- Layer patterns. Models with several kinds of layers keep at least one of each: most get there
    # through the generic `layer_types` rule in `_tiny`; these derive their kinds from other fields, or
    # default to one kind.
    "gpt_neo": {"attention_types": [[["global", "local"], LAYERS // 2]]},  # global, local, global, local
    "mllama": {"text_config.cross_attention_layers": [1]},  # 1 cross-attention layer (skipped without image)
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},  # mamba, attention+MoE, mamba, attention+MoE
    "bamba": {"attn_layer_indices": [1]},  # mamba, attention, mamba, mamba
    "granitemoehybrid": {
        "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    },
    "lfm2": {"full_attn_idxs": [1, 3]},  # conv, attention, conv, attention
    # Mamba blocks and hybrid (shared transformer + mamba) blocks; the shared transformer needs two users.
    "zamba": {"layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"]},
    "zamba2": {"layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"]},
    # Sliding and full attention; both produce a KV cache (layers 0-1) that the last two layers reuse.
    "gemma3n_text": {
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "num_kv_shared_layers": 2,
    },
}

# Constructor kwargs for types whose *default* config does not validate, needed before it can be shrunk.
BASE_KWARGS: dict[str, dict[str, Any]] = {
    # The default text config keeps per-layer inputs, which an assistant must not have.
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
}

# Types that cannot be built here at all, and why.
UNBUILDABLE: dict[str, str] = {
    "gemma3n": (
        "its vision tower is a timm model; timm needs torchvision, and PyPI's torchvision for torch 2.13 is "
        "built against CUDA torch (its ops library fails to load next to torch+cpu). gemma3n_text covers the "
        "language model."
    ),
}

# Types that build but whose forward cannot run from input ids alone, and why.
_ASSISTANT = (
    "a Gemma 4 drafter (assistant) model: every layer reuses the target model's KV cache, so forward needs "
    "the target's `shared_kv_states` and `inputs_embeds`"
)
NO_PLAIN_FORWARD: dict[str, str] = {"gemma4_assistant": _ASSISTANT, "gemma4_unified_assistant": _ASSISTANT}

# Plain-forward outputs that differ from the usual `depth + 1` hidden states of shape [batch, seq, hidden]:
# - gemma3n_text: each hidden state stacks its AltUp streams: [altup_num_inputs=4, batch, seq, hidden].
# - reformer: hidden_states is a list, not a tuple.
# - mllama: 4 (its cross-attention layer is skipped without an image); longcat_flash: 3 (2 layers of 2
#   blocks); dory: 7 (1 input + 2 recurrent layers x 2 loops + 1 output); blt: 9 (local encoder, then local
#   decoder layers).


def _field_default(field: Any) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except (TypeError, ValueError, RuntimeError):  # values without a plain truth value (arrays, tensors)
        return True


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_big_token_id(value: Any) -> bool:
    return any(_is_size(v) and v >= VOCAB for v in (value if isinstance(value, list) else [value]))


def _tiny_token_id(value: Any, token_ids: dict[int, int]) -> Any:
    """Each distinct id beyond the vocabulary gets the next free one from SPECIAL_ID_BASE (the same one
    wherever it occurs in a config tree, so e.g. bos == pad stays true)."""
    if not (_is_size(value) and value >= VOCAB):
        return value
    return token_ids.setdefault(value, SPECIAL_ID_BASE + len(token_ids))


def _read(config: Any, key: str) -> Any:
    """config.key, also for attributes a heterogeneous (per-layer) config refuses to give globally."""
    return getattr(config, "_getattr_without_heterogeneous_validation", lambda k: getattr(config, k))(key)


def _keep_layer_kinds(cls: type, kwargs: dict[str, Any], old_types: Any, tiny: Any) -> Any:
    """Patterns like "every 6th layer is global" leave a 4-layer model with one kind of layer only: the kinds
    it lost take over its last layers (where such patterns put them)."""
    new_types = _read(tiny, "layer_types")
    if not (isinstance(old_types, (list, tuple)) and isinstance(new_types, (list, tuple))):
        return tiny
    lost = sorted(set(old_types) - set(new_types), key=list(old_types).index)
    if not lost or len(lost) >= len(new_types):
        return tiny
    return cls(**kwargs, layer_types=list(new_types)[: len(new_types) - len(lost)] + lost)


def _tiny(config: Any, overrides: dict[str, Any], token_ids: dict[int, int]) -> Any:
    """A tiny copy of `config`, built through its class so `__post_init__` re-derives all that follows from
    the sizes.

    Fields are passed on when they are a size (shrunk), a sub-config (shrunk the same way), a per-layer list
    (cut to the new depth), a token id (moved below the vocabulary) or differ from the class default (what a
    parent config chose for its sub-config). Everything else is left for the class to fill in.
    """
    from transformers import PretrainedConfig

    cls = type(config)
    try:
        fresh = cls()
    except Exception:  # noqa: BLE001 - defaults that do not validate (BASE_KWARGS): compare with the config
        fresh = config

    def read(key: str) -> Any:
        return _read(config, key)

    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
    kwargs: dict[str, Any] = {}
    fields = [f for f in dataclasses.fields(cls) if f.init]
    for field in fields:
        key, value = field.name, read(field.name)
        if isinstance(value, PretrainedConfig):
            kwargs[key] = _tiny(value, nested.get(key, {}), token_ids)
        elif isinstance(value, dict) and key.endswith("_config") and value:
            # Some configs keep sub-configs as plain dicts (attn_config of MPT).
            kwargs[key] = {k: SIZES[k] if k in SIZES and _is_size(v) else v for k, v in value.items()}
        elif key in SIZES and (_is_size(value) and value != 0 or (value is None and key in SIZES_IF_NONE)):
            # (a size of 0 switches a feature off, and stays 0)
            kwargs[key] = min(value, SIZES[key]) if key in NEVER_GROW and value is not None else SIZES[key]
        elif key in SIZES and isinstance(value, list) and value and all(_is_size(v) and v for v in value):
            kwargs[key] = [SIZES[key]] * len(value)  # a size given per layer (gemma3n's intermediate_size)
        elif key.endswith(("token_id", "token_index", "token_ids")) and _is_big_token_id(value):
            kwargs[key] = [_tiny_token_id(v, token_ids) for v in value] if isinstance(value, list) else (
                _tiny_token_id(value, token_ids)
            )
        elif _differs(value, _read(fresh, key)):
            kwargs[key] = value
    if "kv_lora_rank" in kwargs and "num_key_value_heads" in kwargs:
        # Multi-head latent attention expands its one latent KV to every query head.
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", HEADS)
    depth_key = next((k for k in DEPTH_KEYS if k in kwargs and _is_size(read(k))), None)
    if depth_key is not None:
        old_depth, depth = read(depth_key), kwargs[depth_key]
        for field in fields:
            value = kwargs.get(field.name, read(field.name))
            # Per-layer lists are cut to the new depth, unless the class derives them (default None) from it.
            derived = _field_default(field) is None and field.name not in kwargs
            if isinstance(value, list) and len(value) == old_depth and old_depth > depth and not derived:
                kwargs[field.name] = value[:depth]
    kwargs.update({k: v for k, v in overrides.items() if "." not in k})
    tiny = cls(**kwargs)
    if "layer_types" in {f.name for f in fields} and "layer_types" not in kwargs:
        tiny = _keep_layer_kinds(cls, kwargs, read("layer_types"), tiny)
    return tiny


def tiny_config(model_type: str) -> Any:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type in UNBUILDABLE:
        raise NotImplementedError(f"{model_type}: {UNBUILDABLE[model_type]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = CONFIG_MAPPING[model_type](**BASE_KWARGS.get(model_type, {}))
        config = _tiny(base, OVERRIDES.get(model_type, {}), {})
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if hasattr(text, "is_decoder"):
        text.is_decoder = True  # encoder families used as causal LMs (BERT, RoBERTa) need it
    if hasattr(config, "is_decoder"):
        config.is_decoder = True
    return config


def tiny_causal_lm(model_type: str, seed: int = 0) -> torch.nn.Module:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    torch.manual_seed(seed)
    config = tiny_config(model_type)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    # A composite config whose causal LM is one of its parts (MusicGen's decoder): build that part.
    parts = [v for v in vars(config).values() if isinstance(v, model_class.config_class)]
    if not isinstance(config, model_class.config_class) and parts:
        config = parts[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_class._from_config(config, dtype=torch.float32, attn_implementation="eager")
    # Random init leaves norms at identity; perturb every parameter a little so a skipped norm or scale shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim <= 1:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
