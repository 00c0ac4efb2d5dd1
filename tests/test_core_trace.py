"""The Trace container refuses arrays that do not fit together, at creation."""

from __future__ import annotations

import numpy as np
import pytest

from tokentrail.core.trace import Trace


def fields(n: int = 3, layers: int = 4, hidden: int = 5, k: int = 2, **changes):
    return {
        "prompt_ids": [f"p{i}" for i in range(n)], "prompts": [f"t{i}" for i in range(n)], "categories": ["c"] * n,
        "labels": [""] * n, "states": np.zeros((n, layers + 1, hidden)), "final_states": np.zeros((n, hidden)),
        "token_ids": [np.arange(i + 1) for i in range(n)], "tokens": [["x"] * (i + 1) for i in range(n)],
        "next_token_ids": np.zeros((n, k), np.int64), "next_token_probs": np.zeros((n, k)),
        "next_tokens": [["y"] * k for _ in range(n)], **changes,
    }


def test_a_consistent_trace_is_made():
    trace = Trace(**fields(lens_token_ids=np.zeros((3, 5, 2)), lens_probs=np.zeros((3, 5, 2)),
                           token_states=[np.zeros((i + 1, 5, 5)) for i in range(3)]))
    assert (len(trace), trace.n_layers, trace.hidden_size) == (3, 4, 5)


@pytest.mark.parametrize(("changes", "message"), [
    ({"categories": ["c"] * 2}, "categories has 2 entries for 3 prompts"),
    ({"states": np.zeros((3, 5))}, r"states has shape \(3, 5\), expected \[3, layers \+ 1, hidden\]"),
    ({"final_states": np.zeros((2, 5))}, r"final_states has shape \(2, 5\), expected \[3, hidden\]"),
    ({"next_token_probs": np.zeros((3, 3))}, "next_token_ids .* must both be"),
    ({"lens_token_ids": np.zeros((3, 5, 2))}, "lens_token_ids and lens_probs come together"),
    ({"lens_token_ids": np.zeros((3, 4, 2)), "lens_probs": np.zeros((3, 4, 2))}, "lens arrays"),
    ({"token_states": [np.zeros((1, 5, 5))] * 3}, r"token_states\[1\] has shape \(1, 5, 5\) for 2 tokens"),
])
def test_arrays_that_do_not_fit_are_refused(changes, message):
    with pytest.raises(ValueError, match=f"inconsistent Trace: {message}"):
        Trace(**fields(**changes))


def test_assemble_gives_text_ids_and_neutral_defaults():
    import hashlib

    arrays = fields()
    texts = arrays.pop("prompts")
    for key in ("prompt_ids", "categories", "labels"):
        arrays.pop(key)
    trace = Trace.assemble(texts, **arrays)
    assert trace.prompt_ids == [hashlib.sha256(text.encode()).hexdigest()[:12] for text in texts]
    assert trace.categories == ["uncategorized"] * 3 and trace.labels == [""] * 3
