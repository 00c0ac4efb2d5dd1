"""Bad input: one line on stderr naming the problem and the fix, exit code 2, and no damage to what was stored.

Each test runs the command in-process (`tokentrail.cli.main`) against a run directory made beforehand and checks
the exact message, the exit code and that every byte of the run directory is as it was.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import traced_run
from tokentrail import cli

PROMPTS = "# math\n2 + 2 =\n7 * 6 =\n# story\nOnce upon a time\nThe sun set over the hills\n"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished run (traced and analysed) that no failing command may touch."""
    folder = tmp_path_factory.mktemp("prior")
    assert cli.main(["analyze", str(traced_run(folder, tiny_model_dir, PROMPTS))]) == 0
    return folder


@pytest.fixture
def work(prior_run, tmp_path) -> Path:
    """A private copy of the prior run, so each test starts from the same bytes."""
    shutil.copytree(prior_run, tmp_path / "w")
    return tmp_path / "w"


def fails(capsys, argv: list[str], message: str, exact: bool = True) -> None:
    code = cli.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    if exact:
        assert lines[0] == message
    else:
        assert lines[0].startswith(message), lines[0]


def trace_into(work: Path, model: Path, prompts: Path, *extra: str) -> list[str]:
    return ["trace", str(prompts), "--model", str(model), "--out", str(work / "run"), "-q", *extra]


def test_missing_prompts_file(work, tiny_model_dir, capsys):
    before = snapshot(work)
    missing = work / "nope.yaml"
    fails(capsys, trace_into(work, tiny_model_dir, missing),
          f"error: {missing}: prompts file not found; check the path or use --preset NAME")
    assert snapshot(work) == before


def test_empty_prompts_file(work, tiny_model_dir, capsys):
    (work / "empty.txt").write_text("\n  \n")
    before = snapshot(work)
    fails(capsys, trace_into(work, tiny_model_dir, work / "empty.txt"),
          f"error: {work / 'empty.txt'}: prompts file is empty; add at least one prompt")
    assert snapshot(work) == before


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.yaml", "math:\n  - 2 + 2 =\n  bad: [\n", "line 3: malformed YAML"),
        ("bad.json", '{"math": [\n"2 + 2 =",\n]}', "line 3: malformed JSON (Expecting value); fix the file"),
        ("bad.csv", "category,prompt\nmath,2+2=\nmath,1,2,3,4,5\n",
         "line 3: expected columns category,prompt[,id][,label], got 6 fields"),
    ],
)
def test_malformed_files_name_the_line(work, tiny_model_dir, capsys, name, content, message):
    (work / name).write_text(content)
    before = snapshot(work)
    fails(capsys, trace_into(work, tiny_model_dir, work / name), f"error: {work / name}: {message}", exact=False)
    assert snapshot(work) == before


def test_whitespace_only_prompt(work, tiny_model_dir, capsys):
    (work / "ws.csv").write_text("category,prompt\nmath,2+2=\nmath,   \n")
    before = snapshot(work)
    fails(capsys, trace_into(work, tiny_model_dir, work / "ws.csv"),
          f"error: {work / 'ws.csv'}: line 3: empty or whitespace-only prompt; remove it or give it text")
    assert snapshot(work) == before


def test_duplicate_ids(work, tiny_model_dir, capsys):
    (work / "dup.csv").write_text("category,prompt,id\nmath,2+2=,a\nmath,3+3=,a\n")
    before = snapshot(work)
    fails(capsys, trace_into(work, tiny_model_dir, work / "dup.csv"),
          f"error: {work / 'dup.csv'}: line 3: duplicate prompt id 'a' (also at {work / 'dup.csv'}: line 2); "
          "ids must be unique")
    assert snapshot(work) == before


def test_non_utf8_bytes(work, tiny_model_dir, capsys):
    (work / "latin.txt").write_bytes(b"# math\n2 + 2 =\ncaf\xe9\n")
    before = snapshot(work)
    fails(capsys, trace_into(work, tiny_model_dir, work / "latin.txt"),
          f"error: {work / 'latin.txt'}: line 3: not valid UTF-8; re-save the file as UTF-8")
    assert snapshot(work) == before


def test_prompt_longer_than_context(work, tiny_model_dir, capsys):
    (work / "long.txt").write_text("# math\n" + "apples " * 400 + "\n")
    before = snapshot(work)
    code = cli.main(trace_into(work, tiny_model_dir, work / "long.txt"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: prompt 'apples apples")
    assert err.endswith("tokens, more than the model's context of 128; shorten it or pass --truncate")
    assert snapshot(work) == before
    # With --truncate it is traced (keeping the end of the prompt).
    assert cli.main(trace_into(work, tiny_model_dir, work / "long.txt", "--truncate", "--out",
                               str(work / "truncated"))) == 0


def test_category_with_one_prompt(work, tiny_model_dir, capsys):
    (work / "lone.txt").write_text("# math\n2 + 2 =\n7 * 6 =\n# story\nOnce upon a time\n")
    assert cli.main(["trace", str(work / "lone.txt"), "--model", str(tiny_model_dir), "--out", str(work / "lone"),
                     "-q"]) == 0
    capsys.readouterr()
    before = snapshot(work)
    fails(capsys, ["analyze", str(work / "lone")],
          f"error: {work / 'lone'}: category 'story' has one prompt; separation by layer needs at least 2 per "
          "category: add a prompt to it or merge it into another category")
    assert snapshot(work) == before


def test_fewer_than_two_prompts_for_a_projection(work, tiny_model_dir, capsys):
    (work / "one.txt").write_text("2 + 2 =\n")
    assert cli.main(["trace", str(work / "one.txt"), "--model", str(tiny_model_dir), "--out", str(work / "one"),
                     "-q"]) == 0
    capsys.readouterr()
    before = snapshot(work)
    fails(capsys, ["analyze", str(work / "one")],
          f"error: {work / 'one'}: a projection needs at least 2 prompts, the run has 1; add prompts")
    assert snapshot(work) == before


def test_unknown_preset(work, capsys):
    before = snapshot(work)
    fails(capsys, ["trace", "--preset", "seed-everything", "--out", str(work / "run")],
          "error: unknown preset 'seed-everything'; available presets: categories-large, seed-categories, seed-spectrum, spectrum-large")
    assert snapshot(work) == before


def test_unknown_model(work, capsys):
    before = snapshot(work)
    fails(capsys, ["trace", "--model", "acme/absent-model", "--out", str(work / "run")],
          "error: model 'acme/absent-model' is not in the local Hugging Face cache and this machine cannot "
          "download it; run `huggingface-cli download acme/absent-model` where the hub is reachable, or pass a "
          "local directory")
    assert snapshot(work) == before


def test_unknown_architecture(work, tiny_model_dir, capsys, monkeypatch):
    from tokentrail.models import parts

    monkeypatch.setattr(parts, "_DEPTH_NAMES", ("vocab_size",))  # a depth no block list of the model has
    (work / "new.txt").write_text("A prompt never traced before\n")
    before = snapshot(work)
    fails(capsys, trace_into(work, tiny_model_dir, work / "new.txt"),
          "error: unsupported architecture LlamaForCausalLM: looked for a ModuleList of 320 decoder blocks (the "
          "config's layer count); none found, only model.layers (3): no list holds one block per layer, so there "
          "is no stack of blocks to trace (stacks run in cycles, as in HRM, hand more than one state between them)")
    assert snapshot(work) == before


def test_self_check_refuses_a_model_it_cannot_prove(work, tiny_model_dir, capsys, monkeypatch):
    """A tracer that disagrees with the model's own output_hidden_states stops the run before anything is stored."""
    from tokentrail import selfcheck

    original = selfcheck._reference

    def shifted(loaded, ids):  # as if the tracer hooked the wrong modules: every reference state moved
        reference = original(loaded, ids)
        reference.hidden = [state + 1.0 for state in reference.hidden]
        reference.embedding = reference.embedding + 1.0
        return reference

    monkeypatch.setattr(selfcheck, "_reference", shifted)
    (work / "new.txt").write_text("A prompt never traced before\n")
    before = snapshot(work)
    fails(capsys, trace_into(work, tiny_model_dir, work / "new.txt"),
          "error: tiny-llama0: self-check failed: the embedding output (layer 0) differs from the model's "
          "output_hidden_states by ", exact=False)
    assert snapshot(work) == before
    # --no-self-check traces anyway (the user's own risk), batching only prompts of equal length.
    assert cli.main([*trace_into(work, tiny_model_dir, work / "new.txt"), "--no-self-check"]) == 0
    run = json.loads((work / "run" / "run.json").read_text())
    assert run["self_check"] is None and run["model"]["self_check"] is False


def test_unknown_layer_index(work, capsys):
    before = snapshot(work)
    fails(capsys, ["analyze", str(work / "run"), "--layers", "0:99"],
          f"error: cannot analyse {work / 'run'}: ", exact=False)
    assert snapshot(work) == before


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--position", "middle", "error: unknown position 'middle'; use last, all, or a token index like 0 or -2"),
        ("--device", "tpu", "error: unknown device 'tpu'; choose one of cpu, cuda, mps, auto"),
        ("--dtype", "int3", "error: unknown dtype 'int3'; choose one of float32, bfloat16, float16, auto"),
    ],
)
def test_unknown_position_device_dtype(work, tiny_model_dir, capsys, option, value, message):
    before = snapshot(work)
    fails(capsys, trace_into(work, tiny_model_dir, work / "prompts.txt", option, value), message)
    assert snapshot(work) == before


def test_other_model_is_refused(work, tmp_path, tiny_model_dir, capsys):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    from conftest import tiny_model

    tiny_model("llama", seed=1).save_pretrained(other)
    capsys.readouterr()
    before = snapshot(work)
    fails(capsys, trace_into(work, other, work / "prompts.txt"),
          f"error: {work / 'run' / 'store'} holds traces of model '{tiny_model_dir.name}' (float32), not "
          "'other-model' (float32); refusing to mix them: use a new --out directory")
    assert snapshot(work) == before


def test_other_options_are_refused(work, tiny_model_dir, capsys):
    before = snapshot(work)
    fails(capsys, trace_into(work, tiny_model_dir, work / "prompts.txt", "--chat"),
          f"error: {work / 'run' / 'store'} was traced with other options (chat differ); refusing to mix them: "
          "use a new --out directory")
    assert snapshot(work) == before


def test_disk_full_while_writing(work, tiny_model_dir, capsys, monkeypatch):
    from tokentrail import atomic

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", no_space)
    (work / "more.txt").write_text(PROMPTS + "# story\nA third story begins\n")
    before = snapshot(work)
    code = cli.main(trace_into(work, tiny_model_dir, work / "more.txt"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: disk full while writing {work / 'run' / 'store' / 'shards'}/")
    assert err.endswith("nothing stored was changed: free space and rerun to resume")
    assert snapshot(work) == before
    monkeypatch.undo()
    assert cli.main(trace_into(work, tiny_model_dir, work / "more.txt")) == 0


def test_debug_shows_the_traceback(work, capsys):
    with pytest.raises(Exception, match="unknown preset"):
        cli.main(["--debug", "trace", "--preset", "nope", "--out", str(work / "run")])


# --- usage errors: exit 2 in Typer's plain style, whatever the mistake ---------------------------------------

@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["frobnicate"], "Error: No such command 'frobnicate'."),
        (["analyze", "RUN", "--frobnicate"], "Error: No such option: --frobnicate"),
        (["trace", "--top-k", "many"], "Error: Invalid value for '--top-k': "),
        (["analyze"], "Error: Missing argument 'run_dir'."),
        (["plot", "RUN", "--fps"], "Error: Option '--fps' requires an argument."),
    ],
)
def test_usage_errors_exit_2(work, capsys, argv, error):
    before = snapshot(work)
    code = cli.main([str(work / "run") if a == "RUN" else a for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith(error), err
    assert "unexpected" not in err and "Traceback" not in err
    assert snapshot(work) == before


def test_usage_error_shows_control_characters_escaped(capsys):
    assert cli.main(["\x1b]0;owned\x07"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    assert err.strip().splitlines()[-1] == "Error: No such command '\\x1b]0;owned\\x07'."


# --- paths the user gave that cannot be written --------------------------------------------------------------

def test_out_dir_is_a_file(work, tiny_model_dir, capsys):
    (work / "a-file").write_text("not a directory\n")
    before = snapshot(work)
    fails(capsys, ["trace", str(work / "prompts.txt"), "--model", str(tiny_model_dir), "--out", str(work / "a-file")],
          f"error: --out {work / 'a-file'} is a file, not a directory; choose another --out")
    fails(capsys, ["run", str(work / "prompts.txt"), "--model", str(tiny_model_dir), "--out",
                   str(work / "a-file" / "run")],
          f"error: --out {work / 'a-file' / 'run'} cannot be made: {work / 'a-file'} is a file, not a directory; "
          "choose another --out")
    assert snapshot(work) == before


def test_out_dir_not_writable(work, tiny_model_dir, capsys, monkeypatch):
    # Tests may run as root, which may write anywhere: the refusal is shown through what os.access answers.
    locked = work / "locked"
    locked.mkdir()
    real_access = cli.os.access
    monkeypatch.setattr(cli.os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    before = snapshot(work)
    fails(capsys, ["trace", str(work / "prompts.txt"), "--model", str(tiny_model_dir), "--out", str(locked / "run")],
          f"error: --out {locked / 'run'}: {locked} is not writable by you; choose another --out")
    assert snapshot(work) == before


def test_permission_denied_while_writing_names_the_path(work, capsys, monkeypatch):
    from tokentrail import atomic

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", denied)
    before = snapshot(work)
    fails(capsys, ["analyze", str(work / "run")],
          f"error: cannot write {work / 'run' / 'metrics'}/", exact=False)
    assert snapshot(work) == before


@pytest.mark.parametrize("what", ["figures", "report"])
def test_disk_full_while_drawing_leaves_no_partial_file(work, capsys, monkeypatch, what):
    """A full disk while figures or the report are written: one line, exit 2, every old file intact, no
    half-written PNG, SVG, GIF or HTML and no temporary file left behind."""
    from tokentrail import atomic

    assert cli.main(["report", str(work / "run")]) == 0
    capsys.readouterr()
    real_fsync = atomic.os.fsync
    calls = {"n": 0}

    def fsync_full(fd):  # the disk fills up while this kind of file is being written
        name = os.readlink(f"/proc/self/fd/{fd}")
        if (what == "figures" and "/figures/" in name) or (what == "report" and "report.html" in name):
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync_full)
    before = snapshot(work)
    command = ["plot", str(work / "run")] if what == "figures" else ["report", str(work / "run")]
    code = cli.main(command)
    err = capsys.readouterr().err.strip()
    assert calls["n"] == 1
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: disk full while writing ") and err.endswith("free space and rerun to resume")
    assert snapshot(work) == before


def test_export_target_is_a_directory_or_under_a_file(work, capsys):
    (work / "a-file").write_text("x")
    before = snapshot(work)
    fails(capsys, ["export", str(work / "run"), "--to", str(work / "run")],
          f"error: --to {work / 'run'} is a directory; give a file path")
    fails(capsys, ["export", str(work / "run"), "--to", str(work / "a-file" / "states.npz")],
          f"error: --to {work / 'a-file' / 'states.npz'} cannot be written: {work / 'a-file'} is a file, not a "
          "directory")
    assert snapshot(work) == before


# --- model files that are not what they claim ----------------------------------------------------------------

def test_fake_gguf(work, capsys):
    (work / "model.gguf").write_bytes(b"PK\x03\x04 a zip file, not a model" * 10)
    before = snapshot(work)
    fails(capsys, ["trace", str(work / "prompts.txt"), "--model", str(work / "model.gguf"), "--out",
                   str(work / "new")],
          f"error: '{work / 'model.gguf'}' is not a GGUF file (it does not start with the GGUF magic bytes); check "
          "that it is the model you meant and that it downloaded completely")
    assert snapshot(work) == before


def test_truncated_gguf(work, capsys):
    from tokentrail.models import embedded_gguf_path

    source = embedded_gguf_path("smollm2-135m")
    if source is None:
        pytest.fail("the embedded SmolLM2 GGUF is not installed; run `make setup`")
    with open(source, "rb") as handle:
        (work / "cut.gguf").write_bytes(handle.read(1_000_000))  # a download that stopped after 1 MB
    before = snapshot(work)
    fails(capsys, ["trace", str(work / "prompts.txt"), "--model", str(work / "cut.gguf"), "--out", str(work / "new")],
          f"error: {work / 'cut.gguf'}: cannot read this GGUF file (", exact=False)
    assert snapshot(work) == before


def test_model_folder_without_weights(work, tiny_model_dir, capsys):
    folder = work / "config-only"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    before = snapshot(work)
    fails(capsys, ["trace", str(work / "prompts.txt"), "--model", str(folder), "--out", str(work / "new")],
          f"error: directory '{folder}' has a config.json but no weights (*.safetensors or *.bin); a config alone "
          "would give a randomly initialised model: save the weights beside it")
    assert snapshot(work) == before


def damaged_copy(model_dir: Path, folder: Path) -> Path:
    """A copy of a saved model whose weights file is not safetensors at all."""
    shutil.copytree(model_dir, folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 4096)
    return folder


def test_model_folder_with_damaged_weights(work, tiny_model_dir, capsys):
    folder = damaged_copy(tiny_model_dir, work / "damaged")
    before = snapshot(work)
    fails(capsys, ["trace", str(work / "prompts.txt"), "--model", str(folder), "--out", str(work / "new")],
          f"error: model '{folder}': a weights file is damaged or not safetensors (", exact=False)
    assert snapshot(work) == before


def test_unrelated_file_as_model(work, capsys):
    before = snapshot(work)
    fails(capsys, ["trace", str(work / "prompts.txt"), "--model", str(work / "prompts.txt"), "--out",
                   str(work / "new")],
          f"error: '{work / 'prompts.txt'}' is neither a model directory nor a .gguf file; --model takes default, "
          "an embedded model name, a .gguf file, a saved HF model folder or a hub id")
    assert snapshot(work) == before


# --- option values out of range, refused before any work -----------------------------------------------------

@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fps", "0"], "error: --fps must be more than 0 and at most 50 frames per second, got 0"),
        (["--fps", "-2"], "error: --fps must be more than 0 and at most 50 frames per second, got -2"),
        (["--components", "4"], "error: --components must be 2 or 3 (the figures draw 2-D and 3-D projections), got 4"),
        (["--permutations", "0"],
         "error: --permutations must be at least 1 (the p-value is at least 1/(permutations + 1)), got 0"),
    ],
)
def test_run_options_out_of_range_refused_before_tracing(work, tiny_model_dir, capsys, monkeypatch, extra, message):
    from tokentrail import runs

    monkeypatch.setattr(runs, "trace_run", lambda *a, **k: pytest.fail("traced despite a bad option"))
    (work / "new.txt").write_text(PROMPTS + "# story\nNever traced before\n")
    before = snapshot(work)
    fails(capsys, ["run", str(work / "new.txt"), "--model", str(tiny_model_dir), "--out", str(work / "run"), "-q",
                   *extra], message)
    assert snapshot(work) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plot", "RUN", "--fps", "0"], "error: --fps must be more than 0 and at most 50 frames per second, got 0"),
        (["report", "RUN", "--fps", "51"], "error: --fps must be more than 0 and at most 50 frames per second, got 51"),
        (["analyze", "RUN", "--components", "1"],
         "error: --components must be 2 or 3 (the figures draw 2-D and 3-D projections), got 1"),
        (["project", "RUN", "--components", "7"],
         "error: --components must be 2 or 3 (the figures draw 2-D and 3-D projections), got 7"),
        (["analyze", "RUN", "--permutations", "0"],
         "error: --permutations must be at least 1 (the p-value is at least 1/(permutations + 1)), got 0"),
        (["compare", "RUN", "RUN", "--cka-permutations", "0"],
         "error: --cka-permutations must be at least 1 (the p-value is at least 1/(cka-permutations + 1)), got 0"),
    ],
)
def test_options_out_of_range_on_a_run(work, capsys, argv, message):
    before = snapshot(work)
    fails(capsys, [str(work / "run") if a == "RUN" else a for a in argv], message)
    assert snapshot(work) == before


def test_top_k_beyond_the_vocabulary(work, tiny_model_dir, capsys):
    before = snapshot(work)
    fails(capsys, ["trace", str(work / "prompts.txt"), "--model", str(tiny_model_dir), "--out", str(work / "new"),
                   "--top-k", "321"],
          "error: --top-k 321 is more than the model's vocabulary of 320 tokens; use at most 320")
    assert snapshot(work) == before


def test_out_dir_reusable_after_a_failed_load(work, tiny_model_dir, capsys):
    """A model that fails to load (here: damaged weights) leaves nothing in --out that blocks another model."""
    damaged = damaged_copy(tiny_model_dir, work / "damaged")
    fresh = work / "fresh"
    assert cli.main(["trace", str(work / "prompts.txt"), "--model", str(damaged), "--out", str(fresh), "-q"]) == 2
    capsys.readouterr()
    assert cli.main(["trace", str(work / "prompts.txt"), "--model", str(tiny_model_dir), "--out", str(fresh),
                     "-q"]) == 0
    run = json.loads((fresh / "run.json").read_text())
    assert run["model"]["spec"] == str(tiny_model_dir) and run["last_trace"]["traced"] == 4
    # Options too: a self-check-free first attempt that stopped before any shard does not pin the options.
    assert cli.main(["trace", str(work / "prompts.txt"), "--model", str(tiny_model_dir), "--out",
                     str(work / "fresh2"), "-q", "--top-k", "999"]) == 2
    assert cli.main(["trace", str(work / "prompts.txt"), "--model", str(tiny_model_dir), "--out",
                     str(work / "fresh2"), "-q", "--top-k", "3"]) == 0


# --- prompt files read strictly: the file line that is wrong, or exactly what was written ----------------------

@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("dup.yaml", "math:\n  - 2 + 2 =\n  - 3 + 3 =\nstory:\n  - Once\n  - Twice\nmath:\n  - 4 + 4 =\n",
         "line 7: repeated key 'math' (first at line 1); a key may appear once in a mapping"),
        ("dup.json", '{\n  "math": ["2 + 2 =", "3 + 3 ="],\n  "math": ["4 + 4 ="]\n}\n',
         "line 3: repeated key 'math' (first at line 2); a key may appear once in an object"),
        ("bad.jsonl", '{"text": "a", "category": "x"}\n{"text": "b", "category": "x"}\n["c"]\n',
         'line 3: expected one JSON object per line, got a list; write {"text": ..., "category": ...}'),
        ("bad.tsv", "category\tprompt\nmath\t2 + 2 =\nmath\t3 + 3 =\tid\tlabel\textra\n",
         "line 3: expected columns category<TAB>prompt[<TAB>id][<TAB>label], got 5 fields"),
        ("quote.csv", 'category,prompt\nmath,2 + 2 =\nmath,"3 + 3 =\nstory,Once\nstory,Twice\n',
         ("line 3: unterminated quoted field: the quote that opens a field on this line is never closed; close it "
         '(write "" for a quote inside a quoted field)')),
        ("ff.txt", "# math\n2 + 2 =\n3 +\x0c 3 =\n",
         ("line 3: the control character '\\x0c' is inside the line; a text prompt file holds one prompt per line and "
         "no control characters but tabs (use .jsonl, .yaml, .json, .csv or .tsv for such prompts)")),
        ("separator.txt", "# math\n2 + 2 =\n3 + 3 =\u2028 4 + 4 =\n",
         ("line 3: the control character '\\u2028' is inside the line; a text prompt file holds one prompt per line "
         "and no control characters but tabs (use .jsonl, .yaml, .json, .csv or .tsv for such prompts)")),
        ("listcat.yaml", "prompts:\n  - text: 2 + 2 =\n    category: [math, arithmetic]\n  - text: 3 + 3 =\n",
         "line 3: category must be a string, got a list"),
        ("listid.json", '[\n  {"text": "a", "id": "x"},\n  {"text": "b", "id": {"n": 1}}\n]\n',
         "line 3: id must be a string, got a mapping"),
        ("set.prompts", "hello\n",
         ("unknown prompts file extension '.prompts'; use .yaml, .yml, .json, .jsonl, .csv, .tsv, .txt or .text (no "
         "extension: plain text)")),
    ],
)
def test_prompt_files_read_strictly(work, tiny_model_dir, capsys, name, content, message):
    (work / name).write_text(content, encoding="utf-8")
    before = snapshot(work)
    fails(capsys, trace_into(work, tiny_model_dir, work / name), f"error: {work / name}: {message}")
    assert snapshot(work) == before


def test_prompt_path_that_never_ends(work, tiny_model_dir, capsys):
    os.mkfifo(work / "fifo.txt")
    before = snapshot(work)
    for path in (work / "fifo.txt", Path("/dev/zero")):
        fails(capsys, trace_into(work, tiny_model_dir, path),
              f"error: {path}: is not a regular file (a device, FIFO or socket); give a prompts file")
    assert snapshot(work) == before


def test_prompt_file_over_the_size_limit(work, tiny_model_dir, capsys, monkeypatch):
    from tokentrail import prompts

    monkeypatch.setattr(prompts, "MAX_PROMPT_FILE_BYTES", 64)
    (work / "big.txt").write_text("a prompt of some length\n" * 4)
    before = snapshot(work)
    fails(capsys, trace_into(work, tiny_model_dir, work / "big.txt"),
          f"error: {work / 'big.txt'}: prompts file is larger than 64 bytes, the most tokentrail reads; split it")
    assert snapshot(work) == before


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("prompts.jsonl", ('{"category": "math", "text": "2 + 2 ="}\n{"category": "math", "text": "7 * 6 ="}\n\n'
                          '{"category": "story", "prompt": "Once upon a time"}\n'
                          '{"category": "story", "text": "The sun set over the hills"}\n')),
        ("prompts.tsv", ("category\tprompt\nmath\t2 + 2 =\nmath\t7 * 6 =\nstory\tOnce upon a time\n"
                        "story\tThe sun set over the hills\n")),
    ],
)
def test_jsonl_and_tsv_trace_the_same_prompts(work, tiny_model_dir, capsys, name, content):
    """The new formats load exactly the prompts of the prior run's .txt file: the store has them all already."""
    (work / name).write_text(content)
    assert cli.main(trace_into(work, tiny_model_dir, work / name)) == 0
    assert "traced 0 prompt(s) in 0 forward pass(es), 4 read back from the store" in capsys.readouterr().err
