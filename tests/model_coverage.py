"""Every causal-LM type in transformers, traced by tokentrail and checked against an independent reference.

`classify(model_type)` builds the type's tiny random model (tests/zoo.py), loads it the way a user's model is
loaded (discovery plus the load-time self-check), traces mixed-length prompts in one padded batch and checks
every number against a reference computed here, one prompt at a time without padding:

- the test's own hooks on the blocks: layer 0 = input of the first block, layer l = output of block l;
- those hooks agree with the model's own `output_hidden_states` (either convention: block inputs then the
  normed state, or block outputs then the normed state), which proves the blocks are the residual stream;
- tokentrail's states equal the reference to 1e-4 relative (per layer, to the layer's largest entry);
- the final-normed state equals `output_hidden_states[-1]` where the model reports the normed state there;
- the logit lens at the last layer and the traced next-token probabilities equal the model's own softmax.

A type ends in exactly one state: "traced" (all of the above hold), "refused" (tokentrail refused it at load,
with its one-line reason) or "not built" (the tiny model cannot be built here; the reason says why). A type
that tokentrail traces but that differs from the reference raises `WrongNumbers`: never a table entry.

`python tests/model_coverage.py` rewrites docs/models.md from this; tests/test_coverage.py fails when it drifts.
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from zoo import causal_lm_types, tiny_causal_lm

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "If John has 50 apples and gives 12 to Mary, he has",
    "Solve",
]
RTOL = 1e-4
DOC = Path(__file__).resolve().parent.parent / "docs" / "models.md"


class WrongNumbers(AssertionError):
    """tokentrail traced a model and a number differs from the independent reference."""


@dataclass(frozen=True)
class Row:
    model_type: str
    model_class: str
    status: str  # "traced", "refused" or "not built"
    detail: str  # traced: how it batches; otherwise the one-line reason

    def cells(self) -> str:
        return f"| `{self.model_type}` | `{self.model_class}` | {self.status} | {self.detail} |"


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.to_tuple()[0]


def _relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / (np.max(np.abs(expected)) + 1e-12))


def _batch_first(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """One prompt's tensor as [1, T, ...]: XLNet's blocks run sequence first, Gemma-3n's stack their AltUp
    streams in front, CPM-Ant's carry prompt-tuning tokens ahead of the prompt."""
    if tensor.ndim == 3 and tensor.shape[:2] == (length, 1):
        return tensor.transpose(0, 1)
    if tensor.ndim == 4 and tensor.shape[1:3] == (1, length):
        return tensor.permute(1, 2, 0, 3)
    return tensor[:, -length:]


@torch.inference_mode()
def reference(model: torch.nn.Module, blocks: list[torch.nn.Module], ids: list[int], entry: torch.nn.Module):
    """Unpadded forward of one prompt: our own block hooks, output_hidden_states and the next-token softmax."""
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def before(index):
        def hook(module, args, kwargs):
            if index not in inputs:
                inputs[index] = (args[0] if args else next(iter(kwargs.values()))).detach().clone()
        return hook

    # A block listed at several layers (shared or looped blocks, unrolled in the order they run) fills the
    # next of its layers at each call.
    layers_of: dict[torch.nn.Module, list[int]] = {}
    for index, block in enumerate(blocks, start=1):
        layers_of.setdefault(block, []).append(index)

    def after(indices):
        def hook(module, args, output):
            index = next((i for i in indices if i not in outputs), indices[-1])
            outputs[index] = _first_tensor(output).detach().clone()
        return hook

    handles = [entry.register_forward_pre_hook(before(0), with_kwargs=True)]
    handles += [block.register_forward_hook(after(indices)) for block, indices in layers_of.items()]
    try:
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    # A token's state is flattened: parallel residual streams [S, H] (hyper-connections) become one vector.
    # A block the forward pass skipped (Mllama's cross-attention layers without an image) passes its input on.
    n = len(ids)
    layers = [_batch_first(inputs[0], n)[0, -1].reshape(-1)]
    for i in range(1, len(blocks) + 1):
        layers.append(_batch_first(outputs[i], n)[0, -1].reshape(-1) if i in outputs else layers[-1])
    hidden = [_batch_first(h, n)[0, -1].reshape(-1).float().numpy() for h in out.hidden_states]
    probs = torch.softmax(out.logits[0, -1].float(), -1).numpy()
    ran = [0] + sorted(outputs)
    return np.stack([layer.float().numpy() for layer in layers]), hidden, probs, ran


def _hooks_agree_with_hidden_states(layers: np.ndarray, hidden: list[np.ndarray]) -> str | None:
    """Which convention the model's output_hidden_states follow, or None if our hooks match neither.

    `layers` holds only the layers of blocks that ran (and layer 0).
    """
    n_layers = len(layers) - 1
    if len(hidden) != n_layers + 1 or any(state.shape != layers[0].shape for state in hidden[:-1]):
        return None
    if all(_relative(layers[layer], hidden[layer]) < RTOL for layer in range(n_layers)):
        return "inputs"
    if all(_relative(layers[layer], hidden[layer - 1]) < RTOL for layer in range(1, n_layers + 1)):
        return "outputs"
    return None


def check_traced(loaded) -> str:
    """Trace PROMPTS batched and compare with the reference; returns the batching used, raises WrongNumbers."""
    from tokentrail.tracing import TraceOptions, Tracer

    tracer = Tracer(loaded, TraceOptions(top_k=5), batch_size=len(PROMPTS))
    trace = tracer.trace(PROMPTS)
    n_layers = loaded.parts.n_layers
    for row, ids in enumerate(trace.token_ids):
        layers, hidden, probs, ran = reference(loaded.model, loaded.parts.blocks, ids.tolist(), loaded.parts.entry)
        convention = _hooks_agree_with_hidden_states(layers[ran], hidden)
        if convention is None:
            raise WrongNumbers(f"prompt {row}: the blocks tokentrail hooks do not produce output_hidden_states")
        for layer in range(n_layers + 1):
            error = _relative(trace.states[row, layer], layers[layer])
            if error > RTOL:
                raise WrongNumbers(f"prompt {row}, layer {layer}: batched state differs by {error:.2g}")
        if hidden[-1].shape != layers[-1].shape or _relative(hidden[-1], layers[-1]) > RTOL:  # the normed state
            error = _relative(trace.final_states[row], hidden[-1])
            if error > RTOL:
                raise WrongNumbers(f"prompt {row}: final-normed state differs by {error:.2g}")
        for name, ids_k, probs_k in (("lens at the last layer", trace.lens_token_ids[row, n_layers],
                                      trace.lens_probs[row, n_layers]),
                                     ("next token", trace.next_token_ids[row], trace.next_token_probs[row])):
            error = _relative(probs_k, probs[ids_k])
            if error > RTOL or probs_k[0] < probs.max() * (1 - RTOL):
                raise WrongNumbers(f"prompt {row}: {name} differs from the model's softmax by {error:.2g}")
    parts = loaded.parts
    detail = {"left": "left padding", "right": "right padding", "none": "equal-length batches"}[parts.padding]
    if parts.stream_shape and len(parts.stream_shape) > 1:
        detail += f"; {parts.stream_shape[0]} parallel residual streams, stored side by side"
    if parts.skipped_blocks:
        detail += f"; block(s) {', '.join(map(str, parts.skipped_blocks))} skipped by a text-only pass (state kept)"
    if parts.final_norm is None:
        detail += "; no final norm (post-norm)"
    if parts.layout != "batch" or parts.extra_leading_tokens:
        detail += {"sequence": "; blocks run sequence first", "streams": "; streams stacked ahead of the batch"
                   }.get(parts.layout, "")
        detail += "; extra tokens ahead of the prompt (not stored)" if parts.extra_leading_tokens else ""
    if parts.entry is not parts.blocks[0]:
        detail += "; layers split across parallel lists"
    if isinstance(loaded.model.get_output_embeddings(), torch.nn.ModuleList):
        detail += "; one codebook (several codebooks are refused)"
    if len(set(parts.blocks)) < len(parts.blocks):
        detail += f"; shared or looped blocks, one layer per call ({len(parts.blocks)} calls)"
    if parts.bidirectional:
        detail += "; bidirectional over the prompt (each prompt proven alone)"
    return detail


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.replace("|", "\\|")


def classify(model_type: str, tokenizer) -> Row:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from tokentrail.errors import TokentrailError
    from tokentrail.models import from_objects

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = tiny_causal_lm(model_type)
    except Exception as exc:  # noqa: BLE001 - recorded as the reason this type is not built
        return Row(model_type, model_class, "not built", _one_line(exc))
    try:
        loaded = from_objects(model, tokenizer, name=model_type)
    except TokentrailError as exc:
        reason = _one_line(exc).removeprefix(f"{model_type}: ")
        return Row(model_type, model_class, "refused", reason)
    return Row(model_type, model_class, "traced", check_traced(loaded))


def normalised(detail: str) -> str:
    """A reason without its measured numbers, which may move in the last digits across machines."""
    return re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", detail)


def read_doc() -> dict[str, Row]:
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `([^`]+)` \| `([^`]+)` \| ([a-z ]+) \| (.*) \|$", line)
        if match:
            rows[match.group(1)] = Row(match.group(1), match.group(2), match.group(3),
                                       match.group(4))
    return rows


def render(rows: list[Row]) -> str:
    import transformers

    counts = {status: sum(row.status == status for row in rows) for status in ("traced", "refused", "not built")}
    share = 100 * counts["traced"] / len(rows)
    lines = [
        "# Model coverage",
        "",
        "Generated by `python tests/model_coverage.py` (`make models-doc`) and checked by `tests/test_coverage.py`, so",
        ("it cannot drift from the code. Every causal-LM type of transformers "
         f"{transformers.__version__} (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, {len(rows)} types, multimodal"),
        "wrappers included) is built from a tiny config with random weights and loaded like a user's model",
        "(discovery, then the load-time self-check). Each traced type is compared, prompt by prompt, with an",
        "independent reference computed in the test: block hooks on an unpadded forward pass, cross-checked",
        "with `output_hidden_states`, states equal to 1e-4 relative, and the logit lens at the last layer equal",
        "to the model's own next-token distribution.",
        "",
        (f"**{counts['traced']} traced correctly ({share:.1f} %), {counts['refused']} refused at load with a "
         f"reason, {counts['not built']} not built here.** No type traces with a wrong number: such a type fails"),
        "the test instead of entering this table.",
        "",
        "- *traced*: states, final state and logit lens match; the detail says how prompts of different",
        "  lengths share a forward pass, as the self-check proved: left padding, right padding (where left",
        "  padding would change the states: recurrent models that run pad tokens through their state, position",
        "  ids counted from a padding index), or equal-length batches (where any padding changes them). It also",
        "  notes parallel residual streams (stored side by side), blocks a text-only pass skips, post-norm",
        "  models without a final norm, blocks laid out sequence first or with their streams stacked in front",
        "  (turned to [batch, tokens, ...] before anything is kept), extra tokens the blocks carry ahead of the",
        "  prompt (not stored), layers split across parallel lists, shared or looped blocks (one layer per call,",
        "  in the order they ran), bidirectional models (each padded prompt proven against its own forward pass)",
        "  and one-codebook audio LMs. Steering refuses every such model with one line; tracing is exact.",
        "- *refused*: tokentrail refuses the type at load with this one line (the self-check's or discovery's).",
        "- *not built*: the tiny model could not be built in the test environment; the reason is the builder's",
        "  error, not tokentrail's.",
        "",
        "| type | class | status | detail |",
        "|---|---|---|---|",
    ]
    lines += [row.cells() for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    from conftest import make_tokenizer

    tokenizer = make_tokenizer()
    rows = []
    for model_type in causal_lm_types():
        try:
            rows.append(classify(model_type, tokenizer))
        except WrongNumbers as exc:
            rows.append(Row(model_type, "?", "WRONG", _one_line(exc)))
        print(rows[-1].cells(), flush=True)
    DOC.write_text(render(rows), encoding="utf-8")


if __name__ == "__main__":
    main()
