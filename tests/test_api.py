"""The notebook API (`import tokentrail as tt`): the same numbers as the library and the command line."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

import tokentrail as tt
from tokentrail import cli
from tokentrail.errors import PromptFileError, TokentrailError
from tokentrail.tracing import TraceOptions, Tracer

PROMPTS = {"math": ["2 + 2 =", "7 * 6 =", "9 - 3 ="], "story": ["Once upon a time", "The sun set over the hills",
                                                              "A knight rode out"]}


def test_import_is_light():
    probe = "import sys, tokentrail as tt; tt.open_run; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_trace_equals_the_tracer(tiny_loaded):
    loaded = tiny_loaded("llama")
    trace = tt.trace(PROMPTS, loaded, top_k=3)
    texts = [text for texts in PROMPTS.values() for text in texts]
    direct = Tracer(loaded, TraceOptions(top_k=3)).trace(texts)
    np.testing.assert_array_equal(trace.states, direct.states)
    np.testing.assert_array_equal(trace.final_states, direct.final_states)
    assert trace.prompts == texts and trace.categories == ["math"] * 3 + ["story"] * 3
    assert trace.next_tokens == direct.next_tokens and trace.next_token_ids.shape == (6, 3)
    assert len(tt.trace(["only one prompt"], loaded)) == 1
    with pytest.raises(PromptFileError, match="^prompts given in Python: empty or whitespace-only prompt"):
        tt.trace(["fine", " "], loaded)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("api")
    (folder / "prompts.json").write_text(json.dumps(PROMPTS))
    assert cli.main(["trace", str(folder / "prompts.json"), "--model", str(tiny_model_dir), "--out",
                     str(folder / "run"), "-q"]) == 0
    assert cli.main(["analyze", str(folder / "run"), "--normalize", "rms", "--permutations", "19"]) == 0
    return folder / "run"


def test_open_run_reads_what_the_cli_wrote(run_dir, tiny_model_dir):
    run = tt.open_run(run_dir)
    assert run.trace.prompts == [text for texts in PROMPTS.values() for text in texts]
    # The analysis with the options the CLI saved gives the tables the CLI wrote.
    tables = run.tables(run.analyze())
    with open(run_dir / "metrics" / "separation.csv", newline="") as handle:
        written = list(csv.DictReader(handle))
    separation = tables["separation"]
    assert list(separation.columns) == list(written[0])
    for column in ("silhouette", "knn_accuracy", "p_value"):
        np.testing.assert_allclose(separation[column].to_numpy(dtype=float),
                                   [float(row[column]) for row in written], rtol=1e-5, atol=1e-6)
    projection = tables["projection"]
    assert len(projection) == 6 * len(run.analyze().layers)
    with pytest.raises(TokentrailError, match="unknown analysis option 'normalise'"):
        run.analyze(normalise="rms")


def test_figures_and_report(run_dir):
    import matplotlib.figure
    import plotly.graph_objects as go

    run = tt.open_run(run_dir)
    figures = run.figures(run.analyze(n_components=3, n_permutations=9))
    assert isinstance(figures["trajectories_2d"], go.Figure) and isinstance(figures["trajectories_3d"], go.Figure)
    assert isinstance(figures["separation"], matplotlib.figure.Figure)
    assert isinstance(figures["intervals"], matplotlib.figure.Figure)
    assert len(figures["trajectories_2d"].data) >= 6  # a trace per prompt at least
    path = run.report()
    assert path == run_dir / "report.html" and "Once upon a time" in path.read_text(encoding="utf-8")


def test_open_run_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(TokentrailError, match="no such run directory"):
        tt.open_run(tmp_path / "nowhere")
