"""`--holdout`: the natural-to-formal axis is fitted on one half of each axis category and read only on the other
half, and the evaluation half never enters the fit (checked by changing it and watching nothing else move)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import traced_run
from tokentrail import cli
from tokentrail.analysis.pipeline import AnalysisOptions, analyze_states
from tokentrail.analysis.separation import axis_score, holdout_split

CATEGORIES = ["story"] * 6 + ["middle"] * 4 + ["code"] * 5


def _states(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(len(CATEGORIES), 4, 6))


def test_split_is_half_of_each_axis_category_and_seeded():
    fit = holdout_split(CATEGORIES, ("story", "code"), seed=3)
    labels = np.asarray(CATEGORIES)
    assert fit[labels == "story"].sum() == 3 and fit[labels == "code"].sum() == 3  # the larger half of 5
    assert not fit[labels == "middle"].any()
    np.testing.assert_array_equal(fit, holdout_split(CATEGORIES, ("story", "code"), seed=3))
    assert not np.array_equal(fit, holdout_split(CATEGORIES, ("story", "code"), seed=4))
    with pytest.raises(ValueError, match="at least 2"):
        holdout_split(["a", "b", "b"], ("a", "b"))


def test_centroids_come_from_the_fitting_half_only():
    states = _states()
    fit = holdout_split(CATEGORIES, ("story", "code"), seed=0)
    labels = np.asarray(CATEGORIES)
    scores = axis_score(states, CATEGORIES, "story", "code", fit_mask=fit)
    # By hand: the line between the fitting halves' centroids.
    a = states[(labels == "story") & fit].mean(axis=0)
    b = states[(labels == "code") & fit].mean(axis=0)
    expected = np.sum((states - a) * (b - a), axis=-1) / np.sum((b - a) ** 2, axis=-1)
    np.testing.assert_allclose(scores, expected, atol=1e-12)


def test_the_evaluation_half_never_enters_the_fit():
    states = _states(1)
    options = AnalysisOptions(axis=("story", "code"), holdout=True, n_permutations=0)
    first = analyze_states(states, None, CATEGORIES, options)
    fit = first.axis_fit
    labels = np.asarray(CATEGORIES)
    evaluated = ~fit & np.isin(labels, ["story", "code"])
    assert np.isnan(first.axis_score[fit]).all() and np.isfinite(first.axis_score[~fit]).all()
    # Move every evaluated prompt of the axis categories far away: the middle category's readings, which depend
    # only on the fitted centroids, must not change at all.
    moved = states.copy()
    moved[evaluated] += 100.0 * np.random.default_rng(2).normal(size=moved[evaluated].shape)
    second = analyze_states(moved, None, CATEGORIES, options)
    np.testing.assert_array_equal(second.axis_fit, fit)
    middle = labels == "middle"
    np.testing.assert_array_equal(second.axis_score[middle], first.axis_score[middle])
    assert first.summary["axis_holdout"] == {"fitted_on": 6, "evaluated_in_axis_categories": 5}


def test_analyze_holdout_from_the_command_line(tmp_path, tiny_model_dir):
    prompts = ("# story\nOnce upon a time\nThe sun set\nAll men are mortal.\nThe capital of France is\n"
               "# code\ndef fibonacci(n):\nimport numpy as np\nreturn n if n\nprint(n)\n")
    run_dir = traced_run(tmp_path, tiny_model_dir, prompts)
    assert cli.main(["analyze", str(run_dir), "--axis", "story,code", "--holdout", "--permutations", "9"]) == 0
    with open(run_dir / "metrics" / "axis_score.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["axis_role"] for r in rows} == {"fit", "evaluated"}
    assert all(r["score"] == "" for r in rows if r["axis_role"] == "fit")
    assert all(r["score"] != "" for r in rows if r["axis_role"] == "evaluated")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["analysis"]["holdout"] is True
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["axis_holdout"]["fitted_on"] == 4


def test_bootstrap_option_from_the_command_line(tmp_path, tiny_model_dir, capsys):
    prompts = ("# story\nOnce upon a time\nThe sun set\nAll men are mortal.\n"
               "# code\ndef fibonacci(n):\nimport numpy as np\nprint(n)\n")
    run_dir = traced_run(tmp_path, tiny_model_dir, prompts)
    capsys.readouterr()
    assert cli.main(["analyze", str(run_dir), "--bootstrap", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --bootstrap must be 0 (no intervals) or more resamples, got -1"
    assert cli.main(["analyze", str(run_dir), "--permutations", "9", "--bootstrap", "50"]) == 0
    assert (run_dir / "metrics" / "components.csv").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["options"]["n_bootstrap"] == 50 and summary["p_value_floor"] == 0.1
    assert cli.main(["analyze", str(run_dir), "--bootstrap", "0"]) == 0
    assert not (run_dir / "metrics" / "components.csv").exists()
    assert "silhouette_low" not in (run_dir / "metrics" / "separation.csv").read_text()
