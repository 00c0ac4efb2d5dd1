"""The ways of collecting last-token states that the benchmark times against each other.

Every batched method gets the very batches tokentrail plans (same prompts per forward pass, same left
padding, same position ids, `logits_to_keep=1`), so that the differences are what each tool adds on top of
the forward pass, not a batching choice. Each returns `(states [P, L+1, H], final_states [P, H])` in input
order, so the benchmark can also check that they all collected the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tokentrail.models import LoadedModel
from tokentrail.tracing import TraceOptions, Tracer

Method = Callable[[], tuple[np.ndarray, np.ndarray | None]]


def batch_inputs(tracer: Tracer, encoded: list[list[int]]) -> list[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Tokentrail's own batch plan, turned into ready model inputs (built once, outside any timing)."""
    lengths = np.array([len(ids) for ids in encoded])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded])
    plan = []
    for index in tracer.plan_batches(lengths):
        input_ids, mask = tracer._padded(flat, starts[index], lengths[index])
        kwargs = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False,
                  "position_ids": (mask.cumsum(-1) - 1).clamp(min=0), "logits_to_keep": 1}
        plan.append((index, kwargs))
    return plan


def bare(loaded: LoadedModel, plan) -> Method:
    """The forward passes alone, outputs dropped: the floor any tracer can reach."""
    model = loaded.model

    def run():
        with torch.inference_mode():
            for _, kwargs in plan:
                model(**kwargs)
        return None, None

    return run


def tokentrail(loaded: LoadedModel, texts: list[str], batch_size: int | None, logit_lens: bool) -> Method:
    """The whole `Tracer.trace`: tokenizing, forward passes, readouts, token strings, the Trace object."""
    tracer = Tracer(loaded, TraceOptions(logit_lens=logit_lens), batch_size=batch_size)

    def run():
        trace = tracer.trace(texts)
        return trace.states, trace.final_states

    return run


def nnsight(loaded: LoadedModel, plan, n: int) -> Method:
    """nnsight 0.8 wrapping a model object loaded like tokentrail's, saving the same positions of the same modules.

    Not tokentrail's own object: once wrapped, every call of every module goes through nnsight's dispatch,
    traced or not, which would slow all other methods down too.
    """
    import nnsight as ns

    wrapped = ns.NNsight(loaded.model)
    inner = wrapped.model  # LlamaModel inside LlamaForCausalLM
    n_layers = loaded.parts.n_layers

    def run():
        states = np.zeros((n, n_layers + 1, loaded.model.config.hidden_size), dtype=np.float32)
        finals = np.zeros((n, loaded.model.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for index, kwargs in plan:
                with wrapped.trace(**kwargs):
                    saved = ns.save([])
                    saved.append(inner.layers[0].input[:, -1])
                    for layer in range(n_layers):
                        saved.append(inner.layers[layer].output[:, -1])
                    final = inner.norm.output[:, -1].save()
                states[index] = torch.stack(saved, dim=1).float().numpy()
                finals[index] = final.float().numpy()
        return states, finals

    return run


def transformer_lens_bridge(spec_loader: Callable[[], LoadedModel]) -> tuple[Any, str | None]:
    """TransformerLens 4's bridge over a second copy of the model, or (None, why not).

    The bridge switches the model it wraps to eager attention (its hooks need the attention pattern), so it
    gets its own copy: handing it tokentrail's model would slow every other method down.
    """
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as exc:
        return None, f"transformer_lens not installed ({exc})"
    copy = spec_loader()
    try:
        bridge = TransformerBridge.boot_transformers(
            "HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=copy.model, tokenizer=copy.tokenizer, device="cpu"
        )
    except Exception as exc:  # noqa: BLE001 - any failure to boot is reported, not fatal
        return None, f"TransformerBridge.boot_transformers failed offline: {type(exc).__name__}: {exc}"
    return bridge, None


def transformer_lens(bridge, plan, n: int, n_layers: int, hidden: int) -> Method:
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]

    def run():
        states = np.zeros((n, n_layers + 1, hidden), dtype=np.float32)
        finals = np.zeros((n, hidden), dtype=np.float32)
        with torch.inference_mode():
            for index, kwargs in plan:
                inputs = dict(kwargs)
                input_ids = inputs.pop("input_ids")
                _, cache = bridge.run_with_cache(input_ids, names_filter=[*names, "ln_final.hook_out"],
                                                 pos_slice=-1, return_type=None, **inputs)
                states[index] = torch.stack([cache[name][:, -1] for name in names], dim=1).float().numpy()
                finals[index] = cache["ln_final.hook_out"][:, -1].float().numpy()
        return states, finals

    return run


def seed_method(loaded: LoadedModel, texts: list[str]) -> Method:
    """What the seed write-up did: one prompt per forward pass with `output_hidden_states=True`.

    Its last hidden state is the final-normed one (not block L's raw output), so only layers 0..L-1 and the
    final state are comparable with the others.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    n_layers = loaded.parts.n_layers

    def run():
        states = np.zeros((len(texts), n_layers + 1, model.config.hidden_size), dtype=np.float32)
        finals = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for i, text in enumerate(texts):
                ids = tokenizer(text, return_tensors="pt")
                out = model(**ids, output_hidden_states=True)
                hidden = torch.stack([h[0, -1] for h in out.hidden_states])
                states[i, :n_layers] = hidden[:n_layers].numpy()
                finals[i] = hidden[n_layers].numpy()
                torch.softmax(out.logits[0, -1], dim=-1).topk(5)  # the seed read the next token too
        return states, finals

    return run
