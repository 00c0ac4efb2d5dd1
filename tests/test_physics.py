"""`tokentrail physics` as a user runs it on a run traced with `--position all` by a tiny model: what it writes,
checked against computations done here from the stored states (numpy, scikit-learn), and its refusals."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.decomposition import PCA

import tokentrail as tt
from tokentrail import cli

PROMPTS = {
    "story": ["Once upon a time in a castle", "The capital of France is Paris. Once upon", "All men are mortal."],
    "code": ["def fibonacci(n): return n if n", "import numpy as np", "return fibonacci(n - 1) +"],
    "math": ["Solve: 15 * 12 + 4 =", "The square root of 144 is", "15 * 12 + 4 = 184. 12 *"],
}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("physics")
    (folder / "prompts.json").write_text(json.dumps(PROMPTS))
    assert cli.main(["run", str(folder / "prompts.json"), "--model", str(tiny_model_dir), "--out",
                     str(folder / "run"), "-q", "--position", "all", "--permutations", "9",
                     "--axis", "story,code"]) == 0
    result = subprocess.run([sys.executable, "-c", "from tokentrail.cli import entry; entry()", "physics",
                             str(folder / "run"), "--directions", "3"], capture_output=True, text=True,
                            check=False, cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder / "run"


def test_physics_writes_its_tables_figures_and_report_section(run_dir):
    for name in ("layers.csv", "prompts.csv", "heads.csv", "summary.json"):
        assert (run_dir / "physics" / name).is_file()
    for name in ("physics_energy", "physics_clustering", "physics_ode", "physics_geometry"):
        assert (run_dir / "figures" / f"{name}.png").is_file()
    summary = json.loads((run_dir / "physics" / "summary.json").read_text())
    assert summary["notes"] == [] and summary["probed_prompts"] == 9
    assert set(summary) >= {"energy", "expansion", "clustering", "geometry", "ode", "text"}
    assert summary["energy"]["formal_vs_natural"]["axis"] == ["story", "code"]
    assert cli.main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert "Physics of the residual stream" in page and "physics energy" in page


def test_layer_table_matches_the_stored_states(run_dir):
    trace = tt.open_run(run_dir).trace
    states = np.asarray(trace.states, dtype=np.float64)
    rows = _rows(run_dir / "physics" / "layers.csv")
    assert [int(r["layer"]) for r in rows] == list(range(states.shape[1]))
    for row in rows[1:]:
        layer = int(row["layer"])
        step = np.linalg.norm(states[:, layer] - states[:, layer - 1], axis=-1)
        assert float(row["relative_step"]) == pytest.approx(
            np.mean(step / np.linalg.norm(states[:, layer - 1], axis=-1)), rel=1e-5)
    for row in rows:
        layer = int(row["layer"])
        share = PCA(1, svd_solver="full").fit(states[:, layer]).explained_variance_ratio_[0]
        assert float(row["top_pc_share"]) == pytest.approx(share, rel=1e-5)
        # Mean pairwise cosine of each prompt's tokens, averaged over prompts, by hand.
        means = []
        for tokens in trace.token_states:
            unit = tokens[:, layer] / np.linalg.norm(tokens[:, layer], axis=-1, keepdims=True)
            gram = unit @ unit.T
            n = len(unit)
            means.append((gram.sum() - np.trace(gram)) / (n * (n - 1)))
        assert float(row["token_mean_cosine"]) == pytest.approx(np.mean(means), rel=1e-4)


def test_expansion_starts_at_the_perturbation_and_energy_has_every_head(run_dir):
    heads = _rows(run_dir / "physics" / "heads.csv")
    assert len(heads) == 3 * 4  # tiny model: 3 blocks x 4 heads
    assert all(float(r["energy"]) >= float(r["energy_log_partition"]) - 1e-9 for r in heads)
    prompts = _rows(run_dir / "physics" / "prompts.csv")
    assert {r["category"] for r in prompts} == set(PROMPTS)
    assert all(r["expansion_rate"] == "" for r in prompts if r["layer"] == "0")
    assert all(r["expansion_rate"] != "" for r in prompts if r["layer"] != "0")


def test_a_last_token_run_gets_what_needs_no_tokens(tmp_path, tiny_model_dir):
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    assert cli.main(["trace", str(tmp_path / "prompts.json"), "--model", str(tiny_model_dir), "--out",
                     str(tmp_path / "run"), "-q"]) == 0
    assert cli.main(["physics", str(tmp_path / "run"), "--no-energy", "--no-expansion"]) == 0
    summary = json.loads((tmp_path / "run" / "physics" / "summary.json").read_text())
    assert "clustering" not in summary and "energy" not in summary
    assert any("--position all" in note for note in summary["notes"])


@pytest.mark.parametrize(("option", "words"), [
    (["--threshold", "1.5"], "--threshold"),
    (["--directions", "0"], "--directions"),
    (["--epsilon", "0"], "--epsilon"),
    (["--min-plateau", "1"], "--min-plateau"),
    (["--max-prompts", "0"], "--max-prompts"),
])
def test_bad_options_are_one_line_and_exit_2(run_dir, capsys, option, words):
    assert cli.main(["physics", str(run_dir), *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_not_a_run(tmp_path, capsys):
    assert cli.main(["physics", str(tmp_path)]) == 2
    assert "not a tokentrail run" in capsys.readouterr().err


def test_max_prompts_probes_every_category_and_keeps_each_prompt_its_own_row(run_dir, tmp_path):
    import shutil

    from tokentrail.physics.measures import probe_rows

    # A set stored category by category: the first 4 rows would all be "a"; the categories take turns instead.
    assert probe_rows(["a"] * 5 + ["b"] * 2 + ["c"] * 2, 4).tolist() == [0, 1, 5, 7]
    assert probe_rows(["a", "b"], None).tolist() == [0, 1] and probe_rows(["a", "b"], 9).tolist() == [0, 1]
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert cli.main(["physics", str(copy), "--max-prompts", "4", "--no-expansion"]) == 0
    summary = json.loads((copy / "physics" / "summary.json").read_text())
    assert summary["probed_prompts"] == 4
    assert summary["probed_by_category"] == {"story": 2, "code": 1, "math": 1}
    assert summary["energy"]["formal_vs_natural"]["n"] == [2, 1]
    # Each probed prompt's energy is the one the full run measured for that same prompt.
    full = {(r["prompt_id"], r["layer"]): r["energy"] for r in _rows(run_dir / "physics" / "prompts.csv")}
    part = [r for r in _rows(copy / "physics" / "prompts.csv") if r["layer"] != "0"]
    probed = [r for r in part if r["energy"] != ""]
    assert len({r["prompt_id"] for r in probed}) == 4
    for row in probed:
        assert float(row["energy"]) == pytest.approx(float(full[(row["prompt_id"], row["layer"])]), rel=1e-5)
