"""Steering hooks, greedy generation and the steering experiment, checked on tiny random models."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import numpy as np
import pytest
import torch

from tokentrail.errors import TokentrailError
from tokentrail.prompts import Prompt, PromptSet
from tokentrail.runs import trace_run
from tokentrail.steering import (
    Steering,
    SteeringVector,
    axis_score,
    default_layers,
    encode_prompts,
    ends_line,
    generate,
    mcnemar_p,
    random_vector,
    residual_scale,
    run_steering,
    steering_vector,
    wilson_interval,
)
from tokentrail.tasks import generate_problems
from tokentrail.tracing import Trace, TraceOptions, Tracer

PROMPTS = [
    "If John has 50 apples and gives 12 to Mary, he has",
    "15 * 12 + 4 =",
    "Solve",
    "Once upon a time in a castle there lived a king. The capital of France is",
]


def _read_csv(path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


def _hidden(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _vector(loaded, layer: int, seed: int = 1) -> SteeringVector:
    hidden = loaded.parts.unembed.weight.shape[1]
    direction = np.random.default_rng(seed).standard_normal(hidden).astype(np.float32)
    return SteeringVector(layer, direction / np.linalg.norm(direction), scale=3.0, method="test")


def _hook_count(loaded) -> int:
    """Hooks left on the blocks by tokentrail; transformers keeps its own output recorders once it has used them."""
    hooks = [hook for block in loaded.parts.blocks
             for hook in (*block._forward_hooks.values(), *block._forward_pre_hooks.values())]
    return sum(not getattr(hook, "__module__", "").startswith("transformers") for hook in hooks)


def _trace(states: np.ndarray, categories: list[str]) -> Trace:
    n = len(categories)
    return Trace(prompt_ids=[f"p{i}" for i in range(n)], prompts=[f"t{i}" for i in range(n)], categories=categories,
                 labels=[""] * n, states=states.astype(np.float32), final_states=states[:, -1].astype(np.float32),
                 token_ids=[np.array([i]) for i in range(n)], tokens=[["t"]] * n, next_token_ids=np.zeros((n, 1)),
                 next_token_probs=np.zeros((n, 1)), next_tokens=[["x"]] * n)


# ------------------------------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("position", ["last", "prompt"])
def test_hook_adds_exactly_delta_at_layer_and_position(tiny_loaded, arch, position):
    """Block outputs captured with and without the hook on one unpadded prompt: the steered layer differs by
    exactly alpha * scale * unit at the chosen positions, and nowhere else; earlier layers are untouched."""
    loaded = tiny_loaded(arch)
    layer, alpha = 2, 1.7
    vector = _vector(loaded, layer)
    ids = torch.tensor([encode_prompts(loaded, [PROMPTS[0]])[0]])
    captured: dict[str, list[torch.Tensor]] = {"plain": [], "steered": []}

    def run(key: str, steering: Steering | None) -> torch.Tensor:
        def keep(module, args, output):
            captured[key].append(_hidden(output).detach().clone())

        with steering if steering is not None else torch.no_grad():
            handles = [block.register_forward_hook(keep) for block in loaded.parts.blocks]
            try:
                with torch.no_grad():
                    return loaded.model(input_ids=ids).logits
            finally:
                for handle in handles:
                    handle.remove()

    plain_logits = run("plain", None)
    steered_logits = run("steered", Steering(loaded, [vector], alpha, position))
    plain, steered = captured["plain"], captured["steered"]
    delta = torch.from_numpy(np.float32(alpha) * np.float32(3.0) * vector.direction)
    assert torch.allclose(delta, torch.from_numpy(vector.delta(alpha)))
    expected = plain[layer - 1].clone()
    columns = slice(-1, None) if position == "last" else slice(None)
    expected[:, columns] = plain[layer - 1][:, columns] + delta
    assert torch.equal(steered[layer - 1], expected)
    assert torch.allclose(steered[layer - 1] - plain[layer - 1], (expected - plain[layer - 1]), atol=1e-5)
    for earlier in range(layer - 1):
        assert torch.equal(steered[earlier], plain[earlier])
    assert not torch.equal(steered_logits, plain_logits)
    assert _hook_count(loaded) == 0


@pytest.mark.parametrize("position", ["last", "prompt", "all"])
def test_generation_steers_exactly_the_chosen_positions(tiny_loaded, position):
    """Inside the real batched, left-padded, cached generation loop: at every forward pass (prefill and each
    decode step) the steered block's output equals its raw output plus delta exactly where the position mode
    says, and equals it bit for bit elsewhere."""
    loaded = tiny_loaded("llama")
    layer, alpha = 2, 2.5
    vector = _vector(loaded, layer)
    block = loaded.parts.blocks[layer - 1]
    encoded = encode_prompts(loaded, PROMPTS)
    raw: list[torch.Tensor] = []
    post: list[torch.Tensor] = []
    first = block.register_forward_hook(lambda m, a, o: raw.append(_hidden(o).detach().clone()))
    try:
        with Steering(loaded, [vector], alpha, position) as steering:
            second = block.register_forward_hook(lambda m, a, o: post.append(_hidden(o).detach().clone()))
            try:
                out = generate(loaded, encoded, max_new_tokens=4, batch_size=8, steering=steering,
                               stop_at_newline=False)
            finally:
                second.remove()
    finally:
        first.remove()
    assert _hook_count(loaded) == 0
    assert len(raw) == len(post) >= 2
    delta = torch.from_numpy(vector.delta(alpha))
    lengths = torch.tensor(sorted(len(ids) for ids in encoded))  # one batch, rows sorted by length
    width = int(lengths.max())
    for step, (before, after) in enumerate(zip(raw, post)):
        if step == 0:
            where = torch.zeros(before.shape[:2], dtype=torch.bool)
            if position == "last":
                where[:, -1] = True
            else:  # every real prompt token of each left-padded row
                where = torch.arange(width)[None, :] >= (width - lengths)[:, None]
        else:
            where = torch.full(before.shape[:2], position == "all")
        assert torch.equal(after, torch.where(where[..., None], before + delta, before)), (step, position)
    assert len(out.texts) == len(PROMPTS)


@pytest.mark.parametrize("position", ["last", "prompt", "all"])
def test_alpha_zero_is_bit_identical(tiny_loaded, position):
    loaded = tiny_loaded("llama")
    encoded = encode_prompts(loaded, PROMPTS)
    kwargs = {"max_new_tokens": 6, "batch_size": 3, "capture_states": True, "keep_logits": True,
              "stop_at_newline": False}
    plain = generate(loaded, encoded, **kwargs)
    zero = generate(loaded, encoded, steering=Steering(loaded, [_vector(loaded, 2), _vector(loaded, 3, 2)], 0.0,
                                                     position), **kwargs)
    assert zero.token_ids == plain.token_ids
    assert all(len(ids) == 6 for ids in plain.token_ids)
    assert len(zero.logits) == len(plain.logits) == len(PROMPTS)
    for a, b in zip(zero.logits, plain.logits):
        assert a.shape == b.shape and np.array_equal(a, b)
    assert np.array_equal(zero.states, plain.states)
    assert _hook_count(loaded) == 0


def test_nonzero_alpha_changes_generation(tiny_loaded):
    loaded = tiny_loaded("llama")
    encoded = encode_prompts(loaded, PROMPTS)
    plain = generate(loaded, encoded, max_new_tokens=4, keep_logits=True, stop_at_newline=False)
    pushed = generate(loaded, encoded, max_new_tokens=4, keep_logits=True, stop_at_newline=False,
                      steering=Steering(loaded, [_vector(loaded, 1)], 5.0, "prompt"))
    assert not all(np.array_equal(a, b) for a, b in zip(plain.logits, pushed.logits))


def test_hooks_removed_on_error(tiny_loaded):
    loaded = tiny_loaded("llama")
    before = _hook_count(loaded)
    with pytest.raises(RuntimeError, match="boom"), Steering(loaded, [_vector(loaded, 1)], 1.0):
        assert _hook_count(loaded) == before + 1
        raise RuntimeError("boom")
    assert _hook_count(loaded) == before
    wrong = SteeringVector(2, np.ones(7, dtype=np.float32) / np.sqrt(7), 1.0, "bad")  # wrong hidden size
    with pytest.raises(RuntimeError):
        generate(loaded, encode_prompts(loaded, PROMPTS[:2]), max_new_tokens=2, steering=Steering(loaded, [wrong], 1.0))
    assert _hook_count(loaded) == before


def test_steering_rejects_bad_settings(tiny_loaded):
    loaded = tiny_loaded("llama")
    with pytest.raises(TokentrailError, match="position"):
        Steering(loaded, [_vector(loaded, 1)], 1.0, "middle")
    with pytest.raises(TokentrailError, match="layers 1..3"):
        Steering(loaded, [_vector(loaded, 4)], 1.0)
    with pytest.raises(TokentrailError, match="same layer"):
        Steering(loaded, [_vector(loaded, 1), _vector(loaded, 1, 5)], 1.0)


def test_generate_matches_hf_generate(tiny_loaded):
    """Our cached, left-padded greedy loop gives the tokens of HF's own greedy generate on single prompts."""
    loaded = tiny_loaded("llama")
    encoded = encode_prompts(loaded, PROMPTS)
    ours = generate(loaded, encoded, max_new_tokens=5, batch_size=4, stop_at_newline=False)
    for ids, got in zip(encoded, ours.token_ids):
        with torch.no_grad():
            ref = loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert got == ref[0, len(ids):].tolist()[: len(got)]


def test_captured_states_match_tracer_and_steered_retrace(tiny_loaded):
    """Generation's prefill capture equals the Tracer's states; the Tracer run inside a Steering context
    records the steered state (base + delta at the steered layer, last token)."""
    loaded = tiny_loaded("llama")
    tracer = Tracer(loaded, TraceOptions(logit_lens=False), batch_size=4)
    base = tracer.trace(PROMPTS)
    gen = generate(loaded, encode_prompts(loaded, PROMPTS), max_new_tokens=1, capture_states=True)
    np.testing.assert_allclose(gen.states, base.states, atol=1e-5)
    vector = _vector(loaded, 2)
    with Steering(loaded, [vector], 0.8, "last"):
        steered = tracer.trace(PROMPTS)
    assert _hook_count(loaded) == 0
    np.testing.assert_allclose(steered.states[:, :2], base.states[:, :2], atol=0)
    np.testing.assert_allclose(steered.states[:, 2] - base.states[:, 2],
                               np.broadcast_to(vector.delta(0.8), (len(PROMPTS), vector.direction.size)), atol=1e-5)


# ------------------------------------------------------------------------------------------------ vectors


def test_vectors_from_trace(tmp_path):
    rng = np.random.default_rng(0)
    states = rng.standard_normal((6, 4, 5))
    categories = ["word-problems"] * 3 + ["pure-math"] * 3
    states[3:, 2] += 4.0  # pure-math sits away along every axis at layer 2
    trace = _trace(states, categories)
    vector = steering_vector(trace, 2, "mean-diff")
    diff = states[3:, 2].mean(0) - states[:3, 2].mean(0)
    np.testing.assert_allclose(vector.direction, diff / np.linalg.norm(diff), rtol=1e-5)
    assert vector.scale == pytest.approx(np.median(np.linalg.norm(states[:, 2], axis=1)))
    assert residual_scale(trace, 2) == pytest.approx(vector.scale)
    pca = steering_vector(trace, 2, "pca")
    assert np.linalg.norm(pca.direction) == pytest.approx(1.0, abs=1e-6)
    assert float(pca.direction @ diff) > 0  # signed from source to target
    assert steering_vector(trace, 2, "pca", source="pure-math", target="word-problems").direction @ diff < 0
    np.save(tmp_path / "one.npy", np.arange(5, dtype=np.float32))
    np.save(tmp_path / "all.npy", np.eye(4, 5, dtype=np.float32))
    assert np.argmax(steering_vector(trace, 2, tmp_path / "one.npy").direction) == 4
    assert np.argmax(steering_vector(trace, 3, tmp_path / "all.npy").direction) == 3
    from safetensors.numpy import save_file

    save_file({"vector": np.ones(5, dtype=np.float32)}, str(tmp_path / "v.safetensors"))
    np.testing.assert_allclose(steering_vector(trace, 1, tmp_path / "v.safetensors").direction, np.full(5, 5 ** -0.5),
                               rtol=1e-6)
    np.save(tmp_path / "bad.npy", np.ones(3, dtype=np.float32))
    with pytest.raises(TokentrailError, match="shape"):
        steering_vector(trace, 1, tmp_path / "bad.npy")
    with pytest.raises(TokentrailError, match="categories are"):
        steering_vector(trace, 1, source="stories")
    with pytest.raises(TokentrailError, match="1..3"):
        steering_vector(trace, 0)
    control = random_vector(vector, seed=0)
    assert control.scale == vector.scale and control.layer == 2
    assert np.linalg.norm(control.direction) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(control.direction, random_vector(vector, seed=0).direction)


def test_axis_score():
    a, b = np.array([1.0, 0.0]), np.array([3.0, 0.0])
    scores = axis_score(np.array([[1.0, 5.0], [3.0, -2.0], [2.0, 0.0], [5.0, 0.0]]), a, b)
    np.testing.assert_allclose(scores, [0.0, 1.0, 0.5, 2.0])


def test_wilson_and_mcnemar():
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert mcnemar_p(0, 5) == pytest.approx(0.0625)
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 3) == 1.0


def test_ends_line():
    assert ends_line(" 38\n")
    assert ends_line("\n 38\n")
    assert ends_line(" 38\nmore")
    assert not ends_line("\n")
    assert not ends_line(" \n\n")
    assert not ends_line("\n 38")
    assert not ends_line(" 38")


def test_default_layers():
    assert default_layers(30) == [10, 15]
    assert default_layers(3) == [1, 2]
    assert default_layers(1) == [1]


# --------------------------------------------------------------------------------------------- experiment


def test_run_steering_end_to_end(tmp_path, tiny_loaded):
    """A run directory with no run in it gets the seed-spectrum preset traced, then the sweep writes steer/."""
    loaded = tiny_loaded("llama")
    run_dir = tmp_path / "run"
    # The tiny tokenizer spells "Question:" byte by byte; the bare question keeps prompts inside its context of 128.
    result = run_steering(run_dir, loaded, layers=[1, 2], alphas=[0.0, 1.0], n_problems=12, max_new_tokens=3,
                          batch_size=5, word_format="{question}", instruction_format="do: {question}",
                          direction_from="seed", n_random=3, show_progress=False)
    assert (run_dir / "run.json").exists()
    out = run_dir / "steer"
    for name in ("results.csv", "random_draws.csv", "problems.csv", "summary.json", "gain_heatmap.png",
                 "gain_heatmap.svg"):
        assert (out / name).stat().st_size > 0, name
    rows = _read_csv(out / "results.csv")
    assert [r["condition"] for r in rows[:3]] == ["baseline", "instruction", "pure-math"]
    assert len(rows) == 3 + 2 * 2 * 2  # a steer and a random (mean of the draws) row per cell
    draws = _read_csv(out / "random_draws.csv")
    assert len(draws) == 2 * 2 * 3 and {r["draw"] for r in draws} == {"0", "1", "2"}
    assert len(_read_csv(out / "problems.csv")) == 12 * (3 + 2 * 2)  # random draws keep only their summary
    for layer in (1, 2):
        zero = result.row("steer", layer, 0.0)
        assert zero["gain"] == 0 and zero["changed"] == 0 and zero["axis_shift_layer"] == pytest.approx(0, abs=1e-9)
        assert result.row("random", layer, 0.0)["changed"] == 0
        assert zero["null_p"] == pytest.approx(1.0)  # every random draw (alpha 0) ties with it
        pushed = result.row("steer", layer, 1.0)
        # mean-diff moves the steered layer's last-token state by alpha * scale / centroid distance on the axis
        expected = result.settings["scales"][str(layer)] / result.settings["centroid_distance"][str(layer)]
        assert pushed["axis_shift_layer"] == pytest.approx(expected, rel=1e-3)
        assert 0 <= pushed["p_holm"] <= 1 and pushed["p_holm"] >= pushed["p_vs_baseline"]
        assert pushed["gain_low"] <= pushed["gain"] <= pushed["gain_high"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["layers"] == [1, 2] and len(summary["rows"]) == len(rows)
    assert set(summary["axis_profiles"]) == {"baseline", "instruction", "pure-math"}
    assert set(summary["accuracy_by_template"]["baseline"]) == {p.template for p in generate_problems(12)}
    assert len(summary["axis_profiles"]["baseline"]) == loaded.parts.n_layers + 1
    section = result.section()
    assert section["title"] == "Steering experiment"
    assert section["html_figures"] == [out / "gain_heatmap.png"]
    assert len(section["table"]) == len(rows) and "accuracy" in section["table"][0]
    assert "Baseline accuracy" in section["text"]
    assert _hook_count(loaded) == 0


def test_run_steering_checks(tmp_path, tiny_loaded):
    llama, gpt2 = tiny_loaded("llama"), tiny_loaded("gpt2")
    run_dir = tmp_path / "run"
    prompts = PromptSet("mini", [Prompt(f"p{i}", t, c) for i, (t, c) in enumerate(
        [("12 + 5 =", "pure-math"), ("3 * 4 =", "pure-math"), ("Tom has 3 apples and", "word-problems"),
         ("Mary is 10, John", "word-problems")])])
    trace_run(run_dir, prompts, llama, TraceOptions(), show_progress=False)
    with pytest.raises(TokentrailError, match="traced with model"):
        run_steering(run_dir, gpt2, layers=[1], alphas=[1.0], n_problems=2, show_progress=False)
    with pytest.raises(TokentrailError, match="categories are"):
        run_steering(run_dir, llama, layers=[1], alphas=[1.0], n_problems=2, target="pure-code", show_progress=False)
    with pytest.raises(TokentrailError, match="alpha"):
        run_steering(run_dir, llama, alphas=[], show_progress=False)
    with pytest.raises(TokentrailError, match="method"):
        run_steering(run_dir, llama, method="nonsense", show_progress=False)
    with pytest.raises(TokentrailError, match="--direction-from"):
        run_steering(run_dir, llama, direction_from="prompts", show_progress=False)
    with pytest.raises(TokentrailError, match="--random"):
        run_steering(run_dir, llama, n_random=0, show_progress=False)
    with pytest.raises(TokentrailError, match="layers must be in 1..3"):
        run_steering(run_dir, llama, layers=[9], show_progress=False)
    result = run_steering(run_dir, llama, layers=[3], alphas=[0.5], n_problems=3, max_new_tokens=2,
                          method="pca", position="all", word_format="{question}", instruction_format="do: {question}",
                          direction_from="seed", n_random=2, show_progress=False)
    assert result.row("steer", 3, 0.5)["method"] == "pca"
    assert result.row("steer", 3, 0.5)["position"] == "all"


def test_heatmap(tmp_path):
    from tokentrail.viz.steer_figures import draw_gain_heatmap, plot_gain_heatmap

    rows = [{"condition": "baseline", "layer": None, "alpha": None, "gain": 0.0, "accuracy": 0.1, "n": 20}]
    for layer in (3, 6):
        for alpha in (0.5, 1.0):
            rows.append({"condition": "steer", "layer": layer, "alpha": alpha, "gain": 0.05 * layer * alpha,
                         "p_vs_baseline": 0.01})
            rows.append({"condition": "random", "layer": layer, "alpha": alpha, "gain": -0.02, "p_vs_baseline": 0.9})
    fig = draw_gain_heatmap(rows, title="tiny $model")
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 2
    texts = [t.get_text() for t in image_axes[0].texts]
    assert "+30.0*" in texts and len(texts) == 4
    png, svg = plot_gain_heatmap(rows, tmp_path / "h")
    assert png.read_bytes()[:4] == b"\x89PNG" and b"<svg" in svg.read_bytes()[:500]


# --------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_embedded_tiny_sweep(tmp_path, embedded):
    result = run_steering(tmp_path / "run", embedded, layers=[10], alphas=[0.5], n_problems=20, n_random=4,
                          n_train=20, show_progress=False)
    assert {r["condition"] for r in result.rows} == {"baseline", "instruction", "pure-math", "steer", "random"}
    for row in result.rows:
        assert row["n"] == 20 and 0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 1
    steer = result.row("steer", 10, 0.5)
    # The hook adds alpha * scale * direction at layer 10, so on the run's word -> math axis the state moves by
    # exactly that vector's component along the axis, over the axis length.
    settings = result.settings
    expected = 0.5 * settings["scales"]["10"] * settings["cosine_to_mean_diff"]["10"] / settings["centroid_distance"]["10"]
    assert steer["axis_shift_layer"] == pytest.approx(expected, rel=1e-3)
    assert settings["cosine_to_mean_diff"]["10"] > 0  # the direction from data points the seed's way
    assert -1 <= result.settings["cosine_data_vs_seed"]["10"] <= 1
    assert (tmp_path / "run" / "steer" / "gain_heatmap.png").exists()
    rows = _read_csv(tmp_path / "run" / "steer" / "problems.csv")
    assert len(rows) == 20 * 4 and all(r["generation"] is not None for r in rows)


def test_run_steering_from_model_settings(tmp_path, tiny_model_dir):
    """Given settings rather than a model, the run records how to load the model again, as `trace` would."""
    from tokentrail.runs import ModelSettings, read_run

    settings = ModelSettings(spec=str(tiny_model_dir))
    result = run_steering(tmp_path / "run", settings, layers=[2], alphas=[1.0], n_problems=2, max_new_tokens=2,
                          word_format="{question}", show_progress=False)
    run = read_run(tmp_path / "run")
    assert run["model"]["spec"] == str(tiny_model_dir) and "in_memory" not in run["model"]
    assert result.settings["model"]["weights_sha256"] == run["model"]["fingerprint"]["weights_sha256"]


def test_generation_batches_equal_lengths_where_left_padding_is_unsafe(tiny_tokenizer):
    """A model whose self-check rejected left padding (RoBERTa-style positions) generates in equal-length
    batches, so each prompt decodes exactly as it does alone."""
    from tokentrail.models import from_objects
    from tokentrail.steering import batch_order
    from zoo import tiny_causal_lm

    assert batch_order([[1, 2], [3], [4, 5], [6]], 8, equal_lengths=True) == [[1, 3], [0, 2]]
    loaded = from_objects(tiny_causal_lm("roberta"), tiny_tokenizer, name="roberta")
    assert loaded.parts.padding != "left"
    encoded = encode_prompts(loaded, PROMPTS)
    together = generate(loaded, encoded, max_new_tokens=3, batch_size=8, stop_at_newline=False)
    alone = generate(loaded, encoded, max_new_tokens=3, batch_size=1, stop_at_newline=False)
    assert together.token_ids == alone.token_ids


def test_holm_matches_its_definition():
    """Holm by the book: sort, multiply the i-th smallest by (m - i), take the running maximum, cap at 1."""
    from tokentrail.steering.statistics import holm

    rng = np.random.default_rng(3)
    for _ in range(20):
        p = rng.uniform(0, 0.2, size=rng.integers(1, 12))
        m = len(p)
        expected = np.empty(m)
        ranked = sorted(range(m), key=lambda i: p[i])
        running = 0.0
        for rank, index in enumerate(ranked):
            running = max(running, min(1.0, (m - rank) * p[index]))
            expected[index] = running
        np.testing.assert_allclose(holm(p), expected)
    assert np.isnan(holm([0.01, float("nan"), 0.02])[1])
    np.testing.assert_allclose(holm([0.01, float("nan"), 0.02])[[0, 2]], [0.02, 0.02])


def test_paired_interval_is_the_t_interval_of_the_differences():
    from scipy.stats import t

    from tokentrail.steering.statistics import paired_interval

    d = np.array([1, 0, 0, -1, 1, 1, 0, 0, 1, 0], dtype=float)
    half = t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert paired_interval(d) == pytest.approx((d.mean() - half, d.mean() + half))
    assert paired_interval([0, 0, 0]) == (0.0, 0.0)


def test_empirical_p_counts_the_observed_gain():
    from tokentrail.steering.statistics import empirical_p

    assert empirical_p(0.05, [0.0, 0.01, 0.06, -0.02]) == pytest.approx(2 / 5)
    assert empirical_p(0.10, [0.0] * 19) == pytest.approx(1 / 20)  # never 0: the observed gain counts


def test_training_problems_are_disjoint_from_the_evaluation_problems():
    from tokentrail.steering.experiment import training_problems

    evaluation = generate_problems(120, 0)
    train = training_problems(evaluation, 150, 0)
    assert len(train) == 150 and train == training_problems(evaluation, 150, 0)  # deterministic
    seen = {p.question for p in evaluation} | {p.expression for p in evaluation}
    assert not any(p.question in seen or p.expression in seen for p in train)
    assert len({p.question for p in train}) == 150


def test_paired_direction_is_the_normalised_mean_of_paired_differences():
    from tokentrail.steering.vectors import paired_direction

    rng = np.random.default_rng(0)
    word, pure = rng.normal(size=(30, 8)), rng.normal(size=(30, 8)) + 2.0
    vector = paired_direction(word, pure, 4)
    mean = np.mean([b - a for a, b in zip(word, pure)], axis=0)
    np.testing.assert_allclose(vector.direction, mean / np.sqrt(np.sum(mean**2)), rtol=1e-6)
    norms = sorted(float(np.sqrt(np.sum(x**2))) for x in [*word, *pure])
    assert vector.scale == pytest.approx((norms[29] + norms[30]) / 2)  # median of 60 norms
    assert vector.layer == 4


def test_random_directions_are_distinct_seeded_and_unit():
    from tokentrail.steering.vectors import random_vectors

    like = SteeringVector(3, np.eye(64, dtype=np.float32)[0], 2.5, "mean-diff")
    draws = random_vectors(like, 0, 20)
    matrix = np.stack([d.direction for d in draws])
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1, rtol=1e-6)
    cosines = matrix @ matrix.T
    assert np.max(np.abs(cosines - np.eye(20))) < 0.9  # no two draws alike
    assert all(d.scale == 2.5 and d.layer == 3 for d in draws)
    np.testing.assert_array_equal(matrix, np.stack([d.direction for d in random_vectors(like, 0, 20)]))
    other_layer = SteeringVector(4, like.direction, 2.5, "mean-diff")
    assert not np.allclose(random_vectors(other_layer, 0, 1)[0].direction, draws[0].direction)


def test_per_row_steering_equals_steering_each_row_alone(tiny_loaded):
    from tokentrail.steering import Steering

    loaded = tiny_loaded("llama")
    encoded = encode_prompts(loaded, PROMPTS)
    vector = random_vector(SteeringVector(2, np.eye(loaded.parts.hidden_size, dtype=np.float32)[0], 3.0, "x"), 1)
    deltas = np.zeros((len(encoded), loaded.parts.hidden_size), np.float32)
    deltas[[0, 2]] = vector.delta(1.5)
    mixed = generate(loaded, encoded, max_new_tokens=4, batch_size=4, keep_logits=True, stop_at_newline=False,
                     steering=Steering.per_row(loaded, {2: deltas}))
    steered = generate(loaded, [encoded[0], encoded[2]], max_new_tokens=4, batch_size=4, keep_logits=True,
                       stop_at_newline=False, steering=Steering(loaded, [vector], 1.5))
    plain = generate(loaded, [encoded[1], encoded[3]], max_new_tokens=4, batch_size=4, keep_logits=True,
                     stop_at_newline=False)
    assert [mixed.token_ids[i] for i in (0, 2)] == steered.token_ids
    assert [mixed.token_ids[i] for i in (1, 3)] == plain.token_ids
    for mine, theirs in zip([mixed.logits[i] for i in (0, 2, 1, 3)], [*steered.logits, *plain.logits]):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)


def test_confirm_chooses_the_cell_without_looking_at_test_answers(tmp_path, tiny_loaded, monkeypatch):
    """Poison every test answer: the cell chosen on the development problems must not change."""
    from tokentrail import tasks
    from tokentrail.steering.experiment import best_cell

    loaded = tiny_loaded("llama")
    settings = {"layers": [1, 2], "alphas": [0.5, 2.0], "n_problems": 6, "max_new_tokens": 2, "batch_size": 8,
                "word_format": "{question}", "instruction_format": "do: {question}", "direction_from": "seed",
                "n_random": 2, "confirm": True, "show_progress": False}
    clean = run_steering(tmp_path / "clean", loaded, **settings)
    original = tasks.generate_problems

    def poisoned(n, seed=0):
        problems = original(n, seed)
        if seed == 0:
            return problems
        return [dataclasses.replace(p, answer=p.answer + 1000) for p in problems]

    monkeypatch.setattr(tasks, "generate_problems", poisoned)
    dirty = run_steering(tmp_path / "dirty", loaded, **settings)
    assert (clean.confirm["layer"], clean.confirm["alpha"]) == best_cell(clean.rows)
    assert (dirty.confirm["layer"], dirty.confirm["alpha"]) == (clean.confirm["layer"], clean.confirm["alpha"])
    assert dirty.confirm["rows"][0]["accuracy"] == 0  # the poison reached the test set, and only there
    assert dirty.row("baseline")["accuracy"] == clean.row("baseline")["accuracy"]
    assert "Held out" in clean.summary_text()
    assert (tmp_path / "clean" / "steer" / "confirm_results.csv").exists()


def test_a_shared_prompt_prefix_generates_what_separate_runs_do(tiny_loaded):
    """repeat=2: each prompt's prefix runs once; copy 0 unsteered, copy 1 steered at its last token."""
    from tokentrail.steering import Steering

    loaded = tiny_loaded("llama")
    encoded = encode_prompts(loaded, PROMPTS)
    vector = random_vector(SteeringVector(2, np.eye(loaded.parts.hidden_size, dtype=np.float32)[0], 3.0, "x"), 4)
    deltas = np.zeros((2 * len(encoded), loaded.parts.hidden_size), np.float32)
    deltas[1::2] = vector.delta(2.0)
    shared = generate(loaded, encoded, max_new_tokens=4, batch_size=4, keep_logits=True, stop_at_newline=False,
                      capture_states=True, steering=Steering.per_row(loaded, {2: deltas}), repeat=2)
    plain = generate(loaded, encoded, max_new_tokens=4, batch_size=4, keep_logits=True, stop_at_newline=False,
                     capture_states=True)
    steered = generate(loaded, encoded, max_new_tokens=4, batch_size=4, keep_logits=True, stop_at_newline=False,
                       capture_states=True, steering=Steering(loaded, [vector], 2.0))
    assert shared.token_ids[0::2] == plain.token_ids and shared.token_ids[1::2] == steered.token_ids
    np.testing.assert_allclose(shared.states[0::2], plain.states, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(shared.states[1::2], steered.states, rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(shared.logits, [x for pair in zip(plain.logits, steered.logits) for x in pair]):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)
    with pytest.raises(TokentrailError, match="last prompt token only"):
        generate(loaded, encoded, steering=Steering.per_row(loaded, {2: deltas}, position="all"), repeat=2)


def test_heatmap_without_random_rows_draws_one_panel_and_holm_stars():
    from tokentrail.viz.steer_figures import draw_gain_heatmap

    rows = [{"condition": "baseline", "layer": None, "alpha": None, "gain": 0.0, "accuracy": 0.1, "n": 20},
            {"condition": "steer", "layer": 3, "alpha": 0.5, "gain": 0.2, "p_vs_baseline": 0.01, "p_holm": 0.2},
            {"condition": "steer", "layer": 3, "alpha": 1.0, "gain": 0.3, "p_vs_baseline": 0.001, "p_holm": 0.002}]
    fig = draw_gain_heatmap(rows)
    (panel,) = [ax for ax in fig.axes if ax.images]
    assert sorted(t.get_text() for t in panel.texts) == ["+20.0", "+30.0*"]  # the star follows the Holm p
    assert "Holm-adjusted" in fig._suptitle.get_text()


def test_layers_all_sweeps_every_block():
    from tokentrail.steering.experiment import parse_layers

    assert parse_layers("all", 4) == [1, 2, 3, 4]
    assert parse_layers(None, 30) == [10, 15] and parse_layers([3, 1, 3], 4) == [1, 3]
    with pytest.raises(TokentrailError, match="numbers or 'all'"):
        parse_layers("most", 4)


def test_exchangeable_p_is_the_exact_permutation_probability():
    """Brute force: on every problem pick which of the R + 1 answers is 'the steered one', all combinations
    equally likely, and count how often the steered total reaches the observed one."""
    import itertools

    from tokentrail.steering.statistics import exchangeable_p

    rng = np.random.default_rng(5)
    for _ in range(10):
        n, r = 4, 2
        steered = rng.random(n) < 0.6
        draws = rng.random((r, n)) < 0.3
        answers = np.vstack([steered, draws])  # [R + 1, N]
        observed = int(steered.sum())
        hits = total = 0
        for pick in itertools.product(range(r + 1), repeat=n):
            total += 1
            hits += int(sum(answers[pick[i], i] for i in range(n)) >= observed)
        assert exchangeable_p(steered, draws) == pytest.approx(hits / total)
    assert exchangeable_p([True] * 3, np.zeros((4, 3), bool)) == pytest.approx(1 / 5**3)
