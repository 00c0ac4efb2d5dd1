"""The command line as a user runs it: a subprocess in a temporary directory, then a look at what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

COMMANDS = ["run", "trace", "analyze", "plot", "report", "bifurcation", "compare", "steer", "export", "project", "info", "models", "presets",
            "explore", "physics", "lines-of-thought", "presets build"]


def tokentrail(*args: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-c", "from tokentrail.cli import entry; entry()", *args],
                            cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"tokentrail {' '.join(args)} failed: {result.stderr}")
    return result


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_an_example(command, tmp_path):
    result = tokentrail(*command.split(), "--help", cwd=tmp_path, check=True)
    assert "Example:" in result.stdout and f"tokentrail {command}" in result.stdout


def test_trace_export_info_on_a_local_model(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("category,prompt\nmath,2 + 2 =\nmath,7 * 6 =\nstory,Once upon a time\nstory,The sun set\n")
    tokentrail("trace", str(prompts), "--model", str(tiny_model_dir), "--out", "run", "-q", cwd=tmp_path, check=True)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["prompts"]["source"] == str(prompts) and len(run["prompts"]["items"]) == 4
    assert run["model"]["fingerprint"]["kind"] == "dir" and run["last_trace"]["traced"] == 4
    assert {"torch", "transformers", "tokentrail"} <= set(run["versions"])
    check = run["self_check"]  # the load-time self-check ran and proved left padding on this Llama
    assert check["padding"] == "left" and check["final_norm"] == "model.norm" and check["max_state_error"] < 1e-4
    tokentrail("export", "run", "--to", "states.npz", cwd=tmp_path, check=True)
    with np.load(tmp_path / "states.npz", allow_pickle=False) as data:
        assert data["states"].shape == (4, 4, 32) and data["states"].dtype == np.float32
        assert data["final_states"].shape == (4, 32)
        assert data["prompts"].tolist()[2] == "Once upon a time"
        assert data["categories"].tolist() == ["math", "math", "story", "story"]
        assert data["layers"].tolist() == [0, 1, 2, 3]
    info = tokentrail("info", "run", cwd=tmp_path, check=True).stdout
    assert "n_layers" in info and "math=2, story=2" in info and "passed: left padding" in info
    second = tokentrail("trace", str(prompts), "--model", str(tiny_model_dir), "--out", "run", "-q", cwd=tmp_path)
    assert "traced 0 prompt(s) in 0 forward pass(es), 4 read back" in second.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trace", "--preset", "nope"], "error: unknown preset 'nope'; available presets: categories-large, seed-categories, seed-spectrum, spectrum-large"),
        (["trace", "missing.yaml"], "error: missing.yaml: prompts file not found"),
        (["trace", "--model", "no/such-model"], "error: model 'no/such-model' is not in the local Hugging Face cache"),
        (["trace", "--device", "tpu"], "error: unknown device 'tpu'"),
        (["trace", "--position", "middle"], "error: unknown position 'middle'"),
        (["info", "nowhere"], "error: nowhere: no such run directory"),
        (["export", "nowhere"], "error: nowhere: no such run directory"),
    ],
)
def test_errors_are_one_line_and_exit_2(tmp_path, args, message):
    result = tokentrail(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.strip().startswith(message)
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_default_run_on_the_embedded_model(tmp_path):
    """`tokentrail run` with no arguments: embedded model, seed-categories, ./tokentrail-out/."""
    result = tokentrail("run", "-q", cwd=tmp_path, check=True)
    out_dir = tmp_path / "tokentrail-out"
    run = json.loads((out_dir / "run.json").read_text())
    assert run["model"]["fingerprint"]["name"] == "smollm2-135m"
    assert run["prompts"]["name"] == "seed-categories" and len(run["prompts"]["items"]) == 25
    assert "' Paris'" in result.stdout
    assert f"results: {out_dir.resolve()}" in result.stdout.replace("\n", "")
    summary = json.loads((out_dir / "summary.json").read_text())
    assert 0 <= summary["best_separation_layer"] <= 30 and 0 < summary["best_p_value"] <= 1
    assert f"best category separation at layer {summary['best_separation_layer']}" in result.stdout.replace("\n", " ")
    for name in ("projection", "separation", "bifurcation", "dynamics", "axis_intervals", "category_separation",
                 "bifurcation_intervals", "components"):
        assert (out_dir / "metrics" / f"{name}.csv").stat().st_size > 0
    for name in ("trajectories.png", "trajectories.svg", "depth.png", "thought_evolution.gif",
                 "trajectories_2d.html", "logit_lens.png", "intervals.png"):
        assert (out_dir / "figures" / name).stat().st_size > 0
    report = (out_dir / "report.html").read_text()
    assert "<h1" in report
    # The intervals reach the page: the category order along the axis and the bifurcation table.
    assert "Order of the categories along the axis at layer 30" in report
    assert "Bifurcation by category (95 % intervals)" in report
    metrics_before = {p.name: p.read_bytes() for p in (out_dir / "metrics").iterdir()}
    again = tokentrail("run", "-q", cwd=tmp_path, check=True)
    assert "traced 0 prompt(s) in 0 forward pass(es), 25 read back" in again.stderr
    # Same command, same machine: byte-identical tables and exports.
    assert {p.name: p.read_bytes() for p in (out_dir / "metrics").iterdir()} == metrics_before
    tokentrail("export", "tokentrail-out", "--to", "a.npz", cwd=tmp_path, check=True)
    tokentrail("export", "tokentrail-out", "--to", "b.npz", cwd=tmp_path, check=True)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as data:
        assert data["projection"].shape == (25, 31, 2)
        assert data["explained_variance_ratio"].shape == (2,)


@pytest.mark.slow
def test_spectrum_bifurcation_question_is_one_command(tmp_path):
    tokentrail("trace", "--preset", "seed-spectrum", "--out", "spec", "-q", "--no-logit-lens", cwd=tmp_path, check=True)
    result = tokentrail("bifurcation", "spec", "--prompt", "15", cwd=tmp_path, check=True)
    assert "spectrum-15 (docstrings)" in result.stdout
    assert len([line for line in result.stdout.splitlines() if line.startswith("│ ")]) == 31


def test_steer_command_on_a_local_model(tmp_path, tiny_model_dir):
    """`tokentrail steer` traces seed-spectrum into an empty run, sweeps, and adds its section to the report."""
    result = tokentrail("steer", "--out", "run", "--model", str(tiny_model_dir), "--layers", "1", "--alphas", "0.5",
                        "--problems", "6", "--max-new-tokens", "4", "--random", "3", "--train", "8", "--confirm",
                        "--instruction-format", "Compute: {question}", "-q",
                        cwd=tmp_path, check=True)
    steer_dir = tmp_path / "run" / "steer"
    rows = (steer_dir / "results.csv").read_text().splitlines()
    assert rows[0].startswith("condition,layer,alpha")
    # With --confirm the grid only chooses the cell; the random directions are drawn on the held-out problems.
    assert [row.split(",")[0] for row in rows[1:]] == ["baseline", "instruction", "pure-math", "steer"]
    confirm_rows = (steer_dir / "confirm_results.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in confirm_rows[1:]] == ["baseline", "instruction", "pure-math", "steer",
                                                                "random"]
    assert len((steer_dir / "confirm_random_draws.csv").read_text().splitlines()) == 1 + 3
    assert (steer_dir / "gain_heatmap.png").stat().st_size > 0
    assert (steer_dir / "confirm_results.csv").stat().st_size > 0
    assert "generated word problems" in result.stdout and "Held out" in result.stdout
    assert "Steering experiment" in (tmp_path / "run" / "report.html").read_text()


def test_batch_size_auto_traces_the_same_states(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.csv"
    # Two pairs of equal length (auto batching may join them) and lengths that differ between the pairs.
    prompts.write_text("category,prompt\nmath,one plus one is\nmath,two plus two is\n"
                       "story,once upon a time there was a\nstory,once upon a time there was a king\n")
    for size, out in (("1", "single"), ("auto", "auto")):
        tokentrail("trace", str(prompts), "--model", str(tiny_model_dir), "--out", out, "--batch-size", size, "-q",
                   cwd=tmp_path, check=True)
        tokentrail("export", out, "--to", f"{out}.npz", cwd=tmp_path, check=True)
    auto = json.loads((tmp_path / "auto" / "run.json").read_text())["last_trace"]
    assert auto["traced"] == 4 and auto["forward_passes"] < 4  # auto batching put prompts together
    with np.load(tmp_path / "single.npz") as single, np.load(tmp_path / "auto.npz") as batched:
        np.testing.assert_allclose(batched["states"], single["states"], rtol=1e-4, atol=1e-5)
    bad = tokentrail("trace", str(prompts), "--model", str(tiny_model_dir), "--out", "bad", "--batch-size", "many",
                     cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --batch-size must be a whole number or auto, got 'many'"
    assert not (tmp_path / "bad").exists()
