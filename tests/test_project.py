"""`tokentrail project`: the PCA of a store fitted shard by shard, checked against scikit-learn on the states."""

from __future__ import annotations

import csv
import io
import shutil

import numpy as np
import pytest
from sklearn.decomposition import PCA

from test_cli import tokentrail
from tokentrail.store import TraceStore

PROMPTS = """category,prompt
math,2 + 2 =
math,7 * 6 =
math,The square root of 81 is
code,"def add(a, b): return"
code,for i in range(10):
code,print("hello")
story,Once upon a time
story,The sun set over the hills
story,She opened the old door
"""


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("project")
    (root / "prompts.csv").write_text(PROMPTS)
    # Small shards, so that every pass over the store crosses several of them.
    tokentrail("trace", "prompts.csv", "--model", str(tiny_model_dir), "--out", "run", "--shard-size", "2",
               "--batch-size", "2", "-q", cwd=root, check=True)
    tokentrail("export", "run", "--to", "states.npz", cwd=root, check=True)
    with np.load(root / "states.npz", allow_pickle=False) as data:
        states = data["states"].astype(np.float64)
        final_states = data["final_states"].astype(np.float64)
        categories = data["categories"].tolist()
    return root, states, final_states, categories


def _sklearn_projection(stack: np.ndarray, fit_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    pca = PCA(k, svd_solver="full").fit(fit_rows.reshape(-1, stack.shape[-1]))
    return pca.transform(stack.reshape(-1, stack.shape[-1])).reshape(*stack.shape[:2], k), pca.explained_variance_ratio_


def _assert_same_up_to_sign(ours: np.ndarray, reference: np.ndarray) -> None:
    for component in range(reference.shape[-1]):
        sign = np.sign(np.sum(ours[..., component] * reference[..., component]))
        np.testing.assert_allclose(ours[..., component], sign * reference[..., component], rtol=1e-4,
                                   atol=1e-4 * np.abs(reference).max())


def test_project_default_options_match_sklearn(traced_run):
    root, states, _, categories = traced_run
    result = tokentrail("project", "run", "--batch-prompts", "3", cwd=root, check=True)
    assert "wrote run/projection.npz (projection 9 x 4 x 2, fitted on 9 prompts)" in result.stdout
    with np.load(root / "run" / "projection.npz", allow_pickle=False) as data:
        reference, ratio = _sklearn_projection(states, states, 2)
        _assert_same_up_to_sign(data["projection"], reference)
        np.testing.assert_allclose(data["explained_variance_ratio"], ratio, rtol=1e-6)
        assert data["projection_layers"].tolist() == [0, 1, 2, 3]
        assert data["categories"].tolist() == categories
        assert "layer_means" not in data


def test_project_depth_view_with_fit_on_and_final_state(traced_run):
    root, states, final_states, categories = traced_run
    tokentrail("project", "run", "--to", "depth.npz", "--normalize", "rms", "--center", "per-layer",
               "--fit-on", "math,code", "--include-final", "--layers", "1:L", "--components", "3",
               "--batch-prompts", "1", cwd=root, check=True)
    stack = np.concatenate([states[:, 1:3], final_states[:, None]], axis=1)
    stack = stack / np.sqrt(np.mean(stack**2, axis=-1, keepdims=True))
    fitted = np.isin(categories, ["math", "code"])
    layer_means = stack[fitted].mean(axis=0)
    reference, ratio = _sklearn_projection(stack - layer_means, (stack - layer_means)[fitted], 3)
    with np.load(root / "depth.npz", allow_pickle=False) as data:
        _assert_same_up_to_sign(data["projection"], reference)
        np.testing.assert_allclose(data["explained_variance_ratio"], ratio, rtol=1e-6)
        np.testing.assert_allclose(data["layer_means"], layer_means, rtol=1e-5, atol=1e-6)
        assert data["projection_layers"].tolist() == [1, 2, 4]
        assert data["fit_mask"].tolist() == fitted.tolist()


def test_project_agrees_with_analyze(traced_run):
    """The streamed fit and the in-memory one behind `analyze` and `export` give the same coordinates."""
    root, *_ = traced_run
    tokentrail("analyze", "run", "--normalize", "unit", "--permutations", "1", cwd=root, check=True)
    tokentrail("export", "run", "--to", "analyzed.npz", cwd=root, check=True)
    tokentrail("project", "run", "--to", "streamed.npz", "--batch-prompts", "4", cwd=root, check=True)
    with np.load(root / "analyzed.npz") as analyzed, np.load(root / "streamed.npz") as streamed:
        np.testing.assert_allclose(streamed["projection"], analyzed["projection"], atol=1e-4)
        np.testing.assert_allclose(streamed["explained_variance_ratio"], analyzed["explained_variance_ratio"],
                                   rtol=1e-6)


def test_iter_states_follows_the_order_given_and_repeats(traced_run):
    root, states, final_states, _ = traced_run
    store = TraceStore.open(root / "run" / "store")
    texts = [row["prompt"] for row in csv.DictReader(io.StringIO(PROMPTS))]
    order = [8, 0, 3, 0, 5]
    wanted = [texts[i] for i in order]
    seen = np.zeros(len(order), dtype=int)
    for positions, batch_states, batch_final in store.iter_states(wanted, batch_prompts=2):
        for position, row_states, row_final in zip(positions, batch_states, batch_final):
            seen[position] += 1
            np.testing.assert_array_equal(row_states, states[order[position]].astype(np.float32))
            np.testing.assert_array_equal(row_final, final_states[order[position]].astype(np.float32))
    assert seen.tolist() == [1] * len(order)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-prompts", "0"], "error: --batch-prompts must be a positive integer, got 0"),
        (["--to", "out.txt"], "error: projection target out.txt must end in .npz"),
        (["--fit-on", "poetry"], "error: cannot project run: category 'poetry' is not among the categories"),
        (["--layers", "0:99"], "error: cannot project run: layer spec '0:99': 99 is out of range"),
        (["--layers", "2"], "error: cannot project run: the projection needs at least 2 layers"),
    ],
)
def test_project_bad_input_is_one_line_and_leaves_the_run_alone(traced_run, args, message):
    root, *_ = traced_run
    before = {p: p.read_bytes() for p in (root / "run").rglob("*") if p.is_file()}
    result = tokentrail("project", "run", *args, cwd=root)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.strip().startswith(message)
    after = {p: p.read_bytes() for p in (root / "run").rglob("*") if p.is_file()}
    assert after == before


def test_project_refuses_a_corrupted_shard_in_one_line(traced_run, tmp_path):
    root, *_ = traced_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    shard = min((run / "store" / "shards").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = tokentrail("project", "run", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert f"shard {shard.name} failed its checksum" in result.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
