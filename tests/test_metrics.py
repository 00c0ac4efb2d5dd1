"""The analysis pipeline end to end on synthetic states, and the tables it writes."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict

import numpy as np
import pytest
from sklearn.decomposition import PCA

from tokentrail.analysis.pipeline import AnalysisOptions, analyze_states, default_axis
from tokentrail.metrics import TABLES, format_cell, write_metrics

SEED_CATEGORIES = ["math", "code", "history-facts", "creative-poetry", "logic-syllogism"]
N_BLOCKS = 8  # layers 0..8
HIDDEN = 16


def synthetic_run(per_category: int = 4, seed: int = 0, n_categories: int = 5):
    rng = np.random.default_rng(seed)
    names = SEED_CATEGORIES[:n_categories]
    categories = [name for name in names for _ in range(per_category)]
    centres = rng.normal(size=(len(names), HIDDEN))
    depth = np.linspace(0.0, 1.0, N_BLOCKS + 1)[:, None]
    states = np.empty((len(categories), N_BLOCKS + 1, HIDDEN))
    for p, name in enumerate(categories):
        drift = np.cumsum(rng.normal(0, 0.3, (N_BLOCKS + 1, HIDDEN)), axis=0)
        states[p] = (1 + 5 * depth) * (centres[names.index(name)] * depth + drift + 1.0)
    states = states.astype(np.float32)
    final = states[:, -1] / np.sqrt(np.mean(states[:, -1].astype(np.float64) ** 2, axis=-1, keepdims=True))
    tokens = [rng.normal(size=(int(rng.integers(1, 5)), N_BLOCKS + 1, HIDDEN)) for _ in categories]
    prompt_ids = [f"{c}-{i}" for i, c in enumerate(categories)]
    return states, final.astype(np.float32), categories, tokens, prompt_ids


FAST = AnalysisOptions(n_permutations=20)


# ------------------------------------------------------------------------------------------------ pipeline


def test_default_analysis_shapes_and_summary():
    states, final, categories, _, _ = synthetic_run()
    result = analyze_states(states, final, categories, FAST)
    n_prompts, n_layers = states.shape[:2]
    np.testing.assert_array_equal(result.layers, np.arange(n_layers))
    assert result.projection.shape == (n_prompts, n_layers, 2)
    assert result.depth_projection.shape == (n_prompts, n_layers, 2)
    assert result.explained_variance_ratio.shape == (2,)
    assert result.dynamics["step_size"].shape == (n_prompts, n_layers - 1)
    assert result.projected["velocity_pc2_pc1"].shape == (n_prompts, n_layers - 1)
    assert result.separation is not None and result.separation["silhouette"].shape == (n_layers,)
    assert result.axis == ("creative-poetry", "code")
    assert result.axis_score.shape == (n_prompts, n_layers)
    assert result.bifurcation_layer.shape == (n_prompts,) and len(result.bifurcation_toward) == n_prompts
    assert result.divergence_layer.shape == (n_prompts, n_prompts)
    assert result.wasserstein is None and result.token_cosine is None
    summary = result.summary
    json.dumps(summary, allow_nan=False)  # plain JSON: no numpy types, no NaN
    assert summary["n_prompts"] == n_prompts and summary["n_layers"] == n_layers
    assert summary["best_separation_layer"] == int(np.argmax(result.separation["silhouette"]))
    assert summary["chance"] == pytest.approx(0.2)
    assert set(summary["bifurcation"]["by_category"]) == set(SEED_CATEGORIES)
    assert result.projection.dtype == np.float64


def test_raw_projection_matches_sklearn_and_layers_0_to_L_drop_the_last_block():
    states, final, categories, _, _ = synthetic_run()
    result = analyze_states(states, final, categories, AnalysisOptions(layers="0:L", n_permutations=0))
    np.testing.assert_array_equal(result.layers, np.arange(N_BLOCKS))
    seed_stack = states[:, :-1]  # the seed's output_hidden_states[:-1]
    expected = PCA(2).fit_transform(seed_stack.reshape(-1, HIDDEN).astype(np.float64))
    # Up to the sign of each component (the sign rule itself is tested with the projection).
    np.testing.assert_allclose(np.abs(result.projection), np.abs(expected.reshape(*seed_stack.shape[:2], 2)),
                               atol=1e-6)
    assert result.projected["speed"].shape == (len(categories), N_BLOCKS - 1)


def test_include_final_appends_the_final_normed_state_as_L_plus_1():
    states, final, categories, _, _ = synthetic_run()
    result = analyze_states(states, final, categories, AnalysisOptions(include_final=True, n_components=3,
                                                                         n_permutations=0))
    assert result.layers.tolist() == list(range(N_BLOCKS + 2))
    assert result.projection.shape == (len(categories), N_BLOCKS + 2, 3)
    stack = np.concatenate([states, final[:, None]], axis=1)
    reference = PCA(3).fit(stack.reshape(-1, HIDDEN).astype(np.float64))
    np.testing.assert_allclose(result.explained_variance_ratio, reference.explained_variance_ratio_, rtol=1e-6)
    # The depth view always covers the raw layers only.
    assert result.depth_projection.shape == (len(categories), N_BLOCKS + 1, 3)


def test_depth_view_is_rms_normalised_and_centred_per_layer():
    states, final, categories, _, _ = synthetic_run(seed=1)
    result = analyze_states(states, final, categories, AnalysisOptions(n_permutations=0))
    x = states.astype(np.float64)
    x = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True))
    x = x - x.mean(axis=0)
    reference = PCA(2).fit(x.reshape(-1, HIDDEN))
    np.testing.assert_allclose(result.depth_explained_variance_ratio, reference.explained_variance_ratio_,
                               rtol=1e-8)
    np.testing.assert_allclose(np.abs(result.depth_projection),
                               np.abs(reference.transform(x.reshape(-1, HIDDEN)).reshape(*x.shape[:2], 2)),
                               atol=1e-8)


def test_fit_on_projects_everyone_into_the_subset_basis():
    states, final, categories, _, _ = synthetic_run()
    options = AnalysisOptions(fit_on=["code", "math"], n_permutations=0)
    result = analyze_states(states, final, categories, options)
    fitted = np.isin(categories, ["code", "math"])
    subset_pca = PCA(2).fit(states[fitted].reshape(-1, HIDDEN).astype(np.float64))
    np.testing.assert_allclose(result.explained_variance_ratio, subset_pca.explained_variance_ratio_, rtol=1e-6)
    assert result.projection.shape[0] == len(categories)


def test_transport_is_added_with_token_states():
    states, final, categories, tokens, _ = synthetic_run()
    result = analyze_states(states, final, categories, FAST, token_states=tokens)
    assert result.wasserstein.shape == (len(categories), N_BLOCKS)
    assert result.token_cosine.shape == (len(categories), N_BLOCKS + 1)
    single = [i for i, t in enumerate(tokens) if len(t) == 1]
    assert all(np.isnan(result.token_cosine[i]).all() for i in single)
    with pytest.raises(ValueError, match="token states of prompt 0"):
        analyze_states(states, final, categories, FAST, token_states=[t[:, :3] for t in tokens])
    with pytest.raises(ValueError, match="token states for 3 prompts"):
        analyze_states(states, final, categories, FAST, token_states=tokens[:3])


def test_categories_that_do_not_allow_separation_give_a_warning_not_an_error():
    states, final, categories, _, _ = synthetic_run()
    categories = categories[:-1] + ["lonely"]
    result = analyze_states(states, final, categories, FAST)
    assert result.separation is None
    assert any("separation by layer skipped" in w and "lonely" in w for w in result.warnings)
    assert result.summary["best_separation_layer"] is None
    assert result.bifurcation_layer[-1] == -1


def test_single_category_still_analyses():
    states, final, _, _, _ = synthetic_run()
    result = analyze_states(states, final, ["all"] * len(states), FAST)
    assert result.separation is None and result.axis is None and result.axis_score is None
    assert (result.bifurcation_layer == -1).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (AnalysisOptions(fit_on=["poems"]), "'poems' is not among the categories"),
        (AnalysisOptions(fit_on=[]), "fit_on names no category"),
        (AnalysisOptions(axis=("math", "nope")), "'nope' is not among the categories"),
        (AnalysisOptions(axis=("math", "math")), "two different categories"),
        (AnalysisOptions(n_components=1), "n_components must be 2 or more"),
        (AnalysisOptions(normalize="l2"), "normalize must be one of"),
        (AnalysisOptions(center="median"), "center must be one of"),
        (AnalysisOptions(layers="0:99"), "out of range"),
        (AnalysisOptions(layers="3"), "at least 2 layers"),
        (AnalysisOptions(sustain=0), "sustain"),
    ],
)
def test_bad_options_raise_one_line_errors(options, message):
    states, final, categories, _, _ = synthetic_run()
    with pytest.raises(ValueError, match=message) as info:
        analyze_states(states, final, categories, options)
    assert "\n" not in str(info.value)


def test_bad_inputs():
    states, final, categories, _, _ = synthetic_run()
    with pytest.raises(ValueError, match="include_final needs"):
        analyze_states(states, None, categories, AnalysisOptions(include_final=True))
    with pytest.raises(ValueError, match="final_states must have shape"):
        analyze_states(states, final[:2], categories, FAST)
    with pytest.raises(ValueError, match="categories for"):
        analyze_states(states, final, categories[:2], FAST)


def test_options_from_json_are_accepted_and_not_modified():
    states, final, categories, _, _ = synthetic_run()
    options = AnalysisOptions(axis=["math", "code"], n_permutations=0)  # a list, as JSON would give
    before = asdict(options)
    result = analyze_states(states, final, categories, options)
    assert result.axis == ("math", "code")
    assert asdict(options) == before


def test_default_axis_rule():
    assert default_axis(SEED_CATEGORIES) == ("creative-poetry", "code")
    spectrum = ["pure-code", "pure-math", "pure-story", "word-problems", "docstrings", "pseudocode",
                "algorithmic-poetry"]
    assert default_axis(spectrum) == ("pure-story", "pure-code")
    assert default_axis(["pseudocode", "poetry"]) is None  # "pseudocode" is not the word "code"
    assert default_axis(["a", "b"]) is None
    assert default_axis(["code-poetry", "math"]) is None  # a name with both ends is neither


# ------------------------------------------------------------------------------------------------- writer


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_write_metrics_tables_match_the_result(tmp_path):
    states, final, categories, tokens, prompt_ids = synthetic_run()
    result = analyze_states(states, final, categories, AnalysisOptions(include_final=True, n_permutations=20),
                            token_states=tokens)
    written = write_metrics(result, prompt_ids, categories, tmp_path)
    assert [p.name for p in written] == list(TABLES) + ["summary.json"]
    assert not [p for p in tmp_path.rglob("*.tmp")]

    projection = read_csv(tmp_path / "metrics" / "projection.csv")
    assert projection[0] == ["prompt_id", "category", "layer", "pc1", "pc2"]
    assert len(projection) == 1 + len(categories) * (N_BLOCKS + 2)
    row = projection[1 + 3 * (N_BLOCKS + 2) + N_BLOCKS + 1]  # prompt 3 at the final-norm layer
    assert row[:3] == [prompt_ids[3], categories[3], str(N_BLOCKS + 1)]
    assert float(row[3]) == pytest.approx(result.projection[3, -1, 0], rel=1e-7)

    dynamics = read_csv(tmp_path / "metrics" / "dynamics.csv")
    assert len(dynamics) == 1 + len(categories) * N_BLOCKS
    assert dynamics[1][-1] == ""  # no turn before the first step
    assert float(dynamics[2][-1]) == pytest.approx(result.dynamics["turning_angle"][0, 0], rel=1e-7)

    separation = read_csv(tmp_path / "metrics" / "separation.csv")
    assert separation[0][:7] == ["layer", "silhouette", "silhouette_low", "silhouette_high", "knn_accuracy",
                                 "knn_accuracy_low", "knn_accuracy_high"]
    assert len(separation) == 1 + N_BLOCKS + 1

    divergence = read_csv(tmp_path / "metrics" / "divergence.csv")
    n = len(categories)
    assert len(divergence) == 1 + n * (n - 1) // 2

    transport = read_csv(tmp_path / "metrics" / "transport.csv")
    assert transport[N_BLOCKS + 1][-1] == ""  # no next layer after the last
    assert float(transport[1][-1]) == pytest.approx(result.wasserstein[0, 0], rel=1e-7)

    bifurcation = read_csv(tmp_path / "metrics" / "bifurcation.csv")
    assert [r[2] for r in bifurcation[1:]] == [str(v) for v in result.bifurcation_layer]

    text = (tmp_path / "summary.json").read_text()
    summary = json.loads(text)
    assert text == json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert "NaN" not in text and summary["n_prompts"] == len(categories)


def test_outputs_are_byte_identical_across_runs(tmp_path):
    states, final, categories, tokens, prompt_ids = synthetic_run()
    snapshots = []
    for name in ("first", "second"):
        result = analyze_states(states.copy(), final.copy(), list(categories), FAST, token_states=tokens)
        write_metrics(result, prompt_ids, categories, tmp_path / name)
        snapshots.append(snapshot(tmp_path / name))
    assert snapshots[0] == snapshots[1]
    # Writing again over the same folder changes nothing either.
    write_metrics(result, prompt_ids, categories, tmp_path / "second")
    assert snapshot(tmp_path / "second") == snapshots[0]


def test_stale_tables_are_removed(tmp_path):
    states, final, categories, tokens, prompt_ids = synthetic_run()
    with_tokens = analyze_states(states, final, categories, FAST, token_states=tokens)
    write_metrics(with_tokens, prompt_ids, categories, tmp_path)
    assert (tmp_path / "metrics" / "transport.csv").exists()
    lonely = categories[:-1] + ["lonely"]
    without = analyze_states(states, final, lonely, FAST)
    write_metrics(without, prompt_ids, lonely, tmp_path)
    assert not (tmp_path / "metrics" / "transport.csv").exists()
    assert not (tmp_path / "metrics" / "separation.csv").exists()


def test_write_metrics_checks_lengths(tmp_path):
    states, final, categories, _, prompt_ids = synthetic_run()
    result = analyze_states(states, final, categories, AnalysisOptions(n_permutations=0))
    with pytest.raises(ValueError, match="prompt ids"):
        write_metrics(result, prompt_ids[:-1], categories, tmp_path)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1 / 3, "0.33333333"),
        (np.float32(2.5), "2.5"),
        (-0.0, "0"),
        (float("nan"), ""),
        (math.inf, "inf"),
        (None, ""),
        (np.int64(7), "7"),
        (True, "true"),
        ("a,b", "a,b"),
        (1e-20, "1e-20"),
    ],
)
def test_cell_format(value, text):
    assert format_cell(value) == text


def test_summary_says_which_layers_each_analysis_used():
    """--layers chooses the projection's layers only; the summary says so, so that no reader takes the
    separation or bifurcation layers for the projection's subset."""
    rng = np.random.default_rng(0)
    states = rng.normal(size=(6, 5, 4))
    categories = ["a"] * 3 + ["b"] * 3
    result = analyze_states(states, states[:, -1], categories, AnalysisOptions(layers="0:L", n_permutations=0))
    assert result.summary["analysis_layers"] == (
        "projection: layers 0..3; dynamics, separation, bifurcations, divergence and axis scores: every raw layer "
        "0..4 (the embedding and each block's raw output)")
    assert len(result.separation["silhouette"]) == 5  # every layer, as the summary says
    final = analyze_states(states, states[:, -1], categories,
                           AnalysisOptions(layers="0,2", include_final=True, n_permutations=0))
    assert final.summary["analysis_layers"].startswith("projection: layers 0, 2 and the final-normed state; ")
