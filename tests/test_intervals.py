"""Bootstrap intervals over prompts, resampling within categories, against answers known in closed form, and
separation by layer carrying them into its table and figure."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from tokentrail.analysis.intervals import stratified_bootstrap_mean
from tokentrail.analysis.separation import separation_by_layer


def test_one_stratum_matches_the_normal_interval_of_a_mean():
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 2.0, size=(400, 1))
    low, high = stratified_bootstrap_mean(values, ["all"] * 400, n_boot=4000, seed=1)
    # The sampling distribution of a mean of 400 draws: normal, sd = s / sqrt(n) (plug-in, as the bootstrap).
    half = stats.norm.ppf(0.975) * values.std() / np.sqrt(400)
    assert low[0] == pytest.approx(values.mean() - half, abs=0.02)
    assert high[0] == pytest.approx(values.mean() + half, abs=0.02)


def test_strata_keep_their_sizes():
    # Two strata of constants: every resample keeps 3 of one and 1 of the other, so the mean never moves.
    values = np.array([[0.0], [0.0], [0.0], [4.0]])
    low, high = stratified_bootstrap_mean(values, ["a", "a", "a", "b"], n_boot=500)
    assert low[0] == high[0] == 1.0  # an unstratified bootstrap would spread from 0 to 4


def test_coverage_on_synthetic_data_with_a_known_mean():
    rng = np.random.default_rng(5)
    covered = 0
    for trial in range(200):
        values = rng.exponential(1.0, size=(60, 1))  # skewed, true mean 1
        low, high = stratified_bootstrap_mean(values, ["x"] * 60, n_boot=400, seed=trial)
        covered += low[0] <= 1.0 <= high[0]
    assert 0.88 <= covered / 200 <= 0.99  # nominal 95 %; the percentile interval runs a little narrow


def test_refusals():
    with pytest.raises(ValueError, match="strata"):
        stratified_bootstrap_mean(np.zeros((3, 1)), ["a", "b"])
    with pytest.raises(ValueError, match="level"):
        stratified_bootstrap_mean(np.zeros((3, 1)), ["a"] * 3, level=1.5)


def test_separation_intervals_bracket_the_reading():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(3, 4, 16)) * 3
    states = np.concatenate([centres[c] + rng.normal(size=(8, 4, 16)) for c in range(3)])
    categories = [name for name in ("a", "b", "c") for _ in range(8)]
    result = separation_by_layer(states, categories, n_permutations=0, n_bootstrap=500)
    for name in ("silhouette", "knn_accuracy"):
        assert np.all(result[f"{name}_low"] <= result[name] + 1e-12)
        assert np.all(result[name] <= result[f"{name}_high"] + 1e-12)
    assert result["n_bootstrap"] == 500
    assert "silhouette_low" not in separation_by_layer(states, categories, n_permutations=0)


def test_axis_intervals_per_category_in_the_tables(tmp_path):
    from tokentrail.analysis.pipeline import AnalysisOptions, analyze_states
    from tokentrail.metrics import write_metrics

    rng = np.random.default_rng(7)
    categories = ["story"] * 6 + ["middle"] * 5 + ["code"] * 6
    states = rng.normal(size=(len(categories), 3, 8))
    result = analyze_states(states, None, categories, AnalysisOptions(axis=("story", "code"), n_permutations=0,
                                                                      n_bootstrap=400))
    labels = np.asarray(categories)
    found = result.axis_intervals
    assert found.names == ["story", "middle", "code"]
    for index, name in enumerate(found.names):
        scores = result.axis_score[labels == name]
        assert found.counts[index] == len(scores)
        np.testing.assert_allclose(found.mean[index], scores.mean(axis=0))  # by hand
        low, high, mean = found.low[index], found.high[index], found.mean[index]
        assert np.all(low <= mean + 1e-12) and np.all(mean <= high + 1e-12) and np.all(high > low)
    write_metrics(result, [f"p{i}" for i in range(len(categories))], categories, tmp_path)
    rows = (tmp_path / "metrics" / "axis_intervals.csv").read_text().splitlines()
    assert rows[0] == ("category,layer,prompts,mean,low,high,rank,rank_low,rank_high,next_category,order_holds")
    assert len(rows) == 1 + 3 * 3
    assert set(result.summary["axis_score_last_layer_interval_by_category"]) == {"story", "middle", "code"}
    order = [row["category"] for row in result.summary["axis_order_last_layer"]]
    assert order == sorted(found.names, key=lambda n: result.axis_score[labels == n, -1].mean())
    # Without resamples there are no intervals, and no table.
    plain = analyze_states(states, None, categories, AnalysisOptions(axis=("story", "code"), n_permutations=0,
                                                                     n_bootstrap=0))
    assert plain.axis_intervals is None
