"""The Lines-of-Thought replication as a user runs it: the pseudo-sentences (deterministic, distinct, the asked
size), and `tokentrail lines-of-thought` on a tiny model, checked against its own stored states by hand."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import tokentrail as tt
from tokentrail import cli
from tokentrail.tasks.pseudo_sentences import pseudo_sentences


def test_pseudo_sentences_are_deterministic_distinct_chunks():
    first, again = pseudo_sentences(60, 12), pseudo_sentences(60, 12)
    assert first == again
    texts = first.texts
    assert len(texts) == len(set(texts)) == 60
    assert all(len(text.split()) == 12 for text in texts)
    assert first.source.startswith("python-") and "60 chunks of 12 words" in first.description
    # Consecutive, non-overlapping: the chunks read on from one another.
    longer = pseudo_sentences(30, 24).texts
    assert longer[0] == " ".join(texts[0:2])
    with pytest.raises(ValueError, match="at least 2"):
        pseudo_sentences(1, 12)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("lot") / "run"
    assert cli.main(["lines-of-thought", "--model", str(tiny_model_dir), "--out", str(out), "--sentences", "40",
                     "--words", "8", "-q"]) == 0
    return out


def test_lines_of_thought_writes_its_measures(run_dir):
    summary = json.loads((run_dir / "lines_of_thought" / "summary.json").read_text())
    assert summary["sentences"] == 40 and summary["layers"] == 3 and summary["hidden"] == 32
    assert np.isfinite(summary["lambda_per_layer"]) and summary["paper"]["gpt2-medium"]["lambda_per_layer"] == 0.18
    assert (run_dir / "figures" / "lines_of_thought.png").is_file()
    with open(run_dir / "lines_of_thought" / "pairs.csv", newline="") as handle:
        pairs = list(csv.DictReader(handle))
    assert [(int(p["start_layer"]), int(p["end_layer"])) for p in pairs] == [(1, 2), (1, 3), (2, 3)]
    # The fraction of directions, by hand from the stored states (uncentred SVD at each layer 1..L).
    states = np.asarray(tt.open_run(run_dir).trace.states, dtype=np.float64)
    with open(run_dir / "lines_of_thought" / "layers.csv", newline="") as handle:
        layers = list(csv.DictReader(handle))
    for row in layers:
        singular = np.linalg.svd(states[:, int(row["layer"])], compute_uv=False)
        share = np.cumsum(singular**2) / np.sum(singular**2)
        assert int(row["directions_90"]) == int(np.argmax(share >= 0.9)) + 1
    # lambda is the slope of ln(variance) against the end layer over every pair, by hand.
    slope = np.polyfit([int(p["end_layer"]) for p in pairs], [np.log(float(p["residual_variance"])) for p in pairs], 1)[0]
    assert summary["lambda_per_layer"] == pytest.approx(slope, rel=1e-6)


def test_a_rerun_traces_nothing_new(run_dir, tiny_model_dir, capsys):
    assert cli.main(["lines-of-thought", "--model", str(tiny_model_dir), "--out", str(run_dir), "--sentences", "40",
                     "--words", "8", "-q"]) == 0
    assert "traced 0 prompt(s)" in capsys.readouterr().err


def test_bad_sizes_are_one_line(tmp_path, capsys):
    assert cli.main(["lines-of-thought", "--out", str(tmp_path / "x"), "--sentences", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
