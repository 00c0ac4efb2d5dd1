"""Bad input: one line on stderr naming the problem and the fix, exit code 2, and no damage to what was stored.

Each test runs the command in-process (`tokentrail.cli.main`) against a run directory made beforehand and checks
the exact message, the exit code and that every byte of the run directory is as it was.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from tokentrail import cli

PROMPTS = "# math\n2 + 2 =\n7 * 6 =\n# story\nOnce upon a time\nThe sun set over the hills\n"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished run (traced and analysed) that no failing command may touch."""
    folder = tmp_path_factory.mktemp("prior")
    (folder / "prompts.txt").write_text(PROMPTS)
    assert cli.main(["trace", str(folder / "prompts.txt"), "--model", str(tiny_model_dir), "--out",
                     str(folder / "run"), "-q"]) == 0
    assert cli.main(["analyze", str(folder / "run")]) == 0
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
          "error: unknown preset 'seed-everything'; available presets: seed-categories, seed-spectrum")
    assert snapshot(work) == before


def test_unknown_model(work, capsys):
    before = snapshot(work)
    fails(capsys, ["trace", "--model", "acme/absent-model", "--out", str(work / "run")],
          "error: model 'acme/absent-model' is not in the local Hugging Face cache and this machine cannot "
          "download it; run `huggingface-cli download acme/absent-model` where the hub is reachable, or pass a "
          "local directory")
    assert snapshot(work) == before


def test_unknown_architecture(work, tiny_model_dir, capsys, monkeypatch):
    from tokentrail import models

    monkeypatch.setattr(models, "_DEPTH_NAMES", ("vocab_size",))  # a depth no block list of the model has
    (work / "new.txt").write_text("A prompt never traced before\n")
    before = snapshot(work)
    fails(capsys, trace_into(work, tiny_model_dir, work / "new.txt"),
          "error: unsupported architecture LlamaForCausalLM: looked for a ModuleList of 320 decoder blocks (the "
          "config's layer count); none found, only model.layers (3): blocks reused across the depth (looped "
          "layers) cannot be traced")
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
        ("--dtype", "int3", "error: unknown dtype 'int3'; choose one of float32, bfloat16, float16"),
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
