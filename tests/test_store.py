"""TraceStore: content addressing, resumption after SIGKILL, checksum failures, refusal to mix."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tokentrail.errors import StoreError
from tokentrail.prompts import PromptSet, load_prompt_file
from tokentrail.runs import BatchSettings, ModelSettings, load_trace, trace_run
from tokentrail.store import TraceStore, prompt_key
from tokentrail.tracing import TraceOptions, Tracer

TEXTS = ["The capital of France is", "def f(x):", "Once upon a time", "15 * 44 + 12 =", "All men are mortal."]


def prompt_set(texts, categories=None) -> PromptSet:
    from tokentrail.prompts import Prompt

    categories = categories or ["a", "b", "a", "b", "a", "b", "a", "b"][: len(texts)]
    return PromptSet("t", [Prompt(f"p{i}", t, c) for i, (t, c) in enumerate(zip(texts, categories))], source="test")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_round_trip_equals_direct_trace(tmp_path, tiny_loaded):
    loaded = tiny_loaded("gpt2")
    outcome = trace_run(tmp_path / "run", prompt_set(TEXTS), loaded, TraceOptions(), BatchSettings(shard_size=2),
                        show_progress=False)
    direct = Tracer(loaded, TraceOptions()).trace(TEXTS)
    _, stored = load_trace(tmp_path / "run")
    for trace in (outcome.trace, stored):
        np.testing.assert_array_equal(trace.states, direct.states)
        np.testing.assert_array_equal(trace.final_states, direct.final_states)
        np.testing.assert_array_equal(trace.lens_token_ids, direct.lens_token_ids)
        assert trace.tokens == direct.tokens and trace.lens_tokens == direct.lens_tokens
        assert trace.next_tokens == direct.next_tokens
        assert [ids.tolist() for ids in trace.token_ids] == [ids.tolist() for ids in direct.token_ids]
    assert stored.prompt_ids == [f"p{i}" for i in range(5)] and stored.categories[:2] == ["a", "b"]
    # Format 2: a header, and per shard the arrays plus a sidecar that describes them.
    store_dir = tmp_path / "run" / "store"
    header = json.loads((store_dir / "header.json").read_text())
    assert header["format"] == 2 and header["options"] == TraceOptions().to_dict()
    shards = sorted(store_dir.glob("shards/*.safetensors"))
    assert len(shards) == 3
    for shard in shards:
        sidecar = json.loads(shard.with_suffix(".json").read_text())
        assert sidecar["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
        assert shard.name.startswith(sidecar["sha256"][:32]) and sidecar["n_layers"] == 3
        assert sidecar["keys"] == [prompt_key(text) for text in sidecar["texts"]]
    assert sorted(text for shard in shards for text in json.loads(shard.with_suffix(".json").read_text())["texts"]) \
        == sorted(TEXTS)


def test_rerun_traces_nothing_and_one_new_prompt_traces_one(tmp_path, tiny_loaded):
    loaded = tiny_loaded("llama")
    first = trace_run(tmp_path, prompt_set(TEXTS), loaded, TraceOptions(), show_progress=False)
    assert (first.report.traced, first.report.forward_passes) == (5, 1)
    again = trace_run(tmp_path, prompt_set(TEXTS), loaded, TraceOptions(), show_progress=False)
    assert (again.report.traced, again.report.reused, again.report.forward_passes) == (0, 5, 0)
    more = trace_run(tmp_path, prompt_set([*TEXTS, "A brand new prompt"]), loaded, TraceOptions(), show_progress=False)
    assert (more.report.traced, more.report.reused, more.report.forward_passes) == (1, 5, 1)
    # Recategorising a prompt is not a new trace: the text decides.
    moved = trace_run(tmp_path, prompt_set(TEXTS, ["z"] * 5), loaded, TraceOptions(), show_progress=False)
    assert moved.report.traced == 0 and moved.trace.categories == ["z"] * 5


def test_nothing_to_trace_never_loads_the_model(tmp_path, tiny_model_dir, monkeypatch):
    settings = ModelSettings(spec=str(tiny_model_dir))
    trace_run(tmp_path, prompt_set(TEXTS), settings, TraceOptions(), show_progress=False)

    def refuse(self):
        raise AssertionError("the model was loaded although every prompt was stored")

    monkeypatch.setattr(ModelSettings, "load", refuse)
    outcome = trace_run(tmp_path, prompt_set(TEXTS), settings, TraceOptions(), show_progress=False)
    assert outcome.report.traced == 0


def test_corrupt_shard_is_detected_and_recomputed(tmp_path, tiny_loaded):
    loaded = tiny_loaded("qwen3")
    clean = trace_run(tmp_path, prompt_set(TEXTS), loaded, TraceOptions(), BatchSettings(shard_size=2),
                      show_progress=False)
    shards = sorted((tmp_path / "store" / "shards").glob("*.safetensors"))

    def corrupt(path):
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))

    corrupt(shards[0])
    again = trace_run(tmp_path, prompt_set(TEXTS), loaded, TraceOptions(), BatchSettings(shard_size=2),
                      show_progress=False)
    assert any("failed its checksum" in p for p in again.report.problems)
    assert again.report.traced in (1, 2)
    np.testing.assert_array_equal(again.trace.states, clean.trace.states)
    # The recomputed shard may come back under the same content-addressed name; what matters is that it verifies.
    assert TraceStore.open(tmp_path / "store").verify() == []
    # Reading without tracing never uses a bad shard either.
    corrupt(shards[1])
    with pytest.raises(StoreError, match="failed its checksum"):
        load_trace(tmp_path)


def test_other_model_or_options_are_refused_and_nothing_changes(tmp_path, tiny_loaded):
    trace_run(tmp_path, prompt_set(TEXTS), tiny_loaded("llama"), TraceOptions(), show_progress=False)
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match="holds traces of model 'tiny-llama'.*refusing to mix"):
        trace_run(tmp_path, prompt_set(TEXTS), tiny_loaded("gpt2"), TraceOptions(), show_progress=False)
    with pytest.raises(StoreError, match="other options .position differ.; refusing to mix"):
        trace_run(tmp_path, prompt_set(TEXTS), tiny_loaded("llama"), TraceOptions(position="0"), show_progress=False)
    assert snapshot(tmp_path) == before


def test_content_keys_and_duplicates(tmp_path, tiny_loaded):
    store = TraceStore.open(tmp_path, model={"weights_sha256": "x", "dtype": "float32"}, options={})
    trace = Tracer(tiny_loaded("llama")).trace(TEXTS[:2])
    store.add(trace)
    assert TEXTS[0] in store and len(store) == 2
    assert store.missing([TEXTS[0], TEXTS[2], TEXTS[2]]) == [TEXTS[2]]
    assert prompt_key("a") != prompt_key("a ")


def test_position_all_round_trip(tmp_path, tiny_loaded):
    loaded = tiny_loaded("gpt2")
    outcome = trace_run(tmp_path, prompt_set(TEXTS), loaded, TraceOptions(position="all"), show_progress=False)
    direct = Tracer(loaded, TraceOptions(position="all")).trace(TEXTS)
    for stored, fresh in zip(outcome.trace.token_states, direct.token_states):
        np.testing.assert_array_equal(stored, fresh)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from tokentrail.cli import entry; entry()", *args]


def _start_and_wait(base: list[str], out_dir: Path, shards: int) -> subprocess.Popen:
    """Start a trace and return once `shards` shards are committed (the run still going)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(_cli(*base, "--out", str(out_dir)), env=env, stderr=subprocess.PIPE, text=True)
    shard_dir = out_dir / "store" / "shards"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError):
            if sum(1 for name in os.listdir(shard_dir) if name.endswith(".safetensors") and name[0] != ".") >= shards:
                break
        time.sleep(0.002)
    assert process.poll() is None, "the run finished before it could be interrupted"
    return process


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("kill")
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(f"# c{i % 3}\nprompt number {i} says {'word ' * (i % 7)}\n" for i in range(40)))
    base = ["trace", str(prompts), "--model", str(tiny_model_dir), "--shard-size", "1", "--batch-size", "1", "-q"]
    subprocess.run(_cli(*base, "--out", str(folder / "clean")), check=True, capture_output=True)
    return prompts, base, folder / "clean"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, kill_setup, seed):
    import random

    prompts, base, clean_dir = kill_setup
    threshold = random.Random(seed).randint(2, 25)
    killed_dir = tmp_path / "killed"
    process = _start_and_wait(base, killed_dir, threshold)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = len(TraceStore.open(killed_dir / "store"))
    assert threshold <= partial < 40
    subprocess.run(_cli(*base, "--out", str(killed_dir)), check=True, capture_output=True)
    _, resumed = load_trace(killed_dir)
    _, clean = load_trace(clean_dir)
    store = TraceStore.open(killed_dir / "store")
    keys = [key for keys in store.keys_by_shard().values() for key in keys]
    assert len(keys) == len(set(keys)) == 40  # every prompt exactly once
    assert resumed.prompts == clean.prompts == load_prompt_file(prompts).texts
    np.testing.assert_array_equal(resumed.states, clean.states)
    np.testing.assert_array_equal(resumed.final_states, clean.final_states)


def test_sigint_stops_cleanly_and_says_how_to_resume(tmp_path, kill_setup):
    _, base, _ = kill_setup
    process = _start_and_wait(base, tmp_path / "run", 3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1] == "interrupted; rerun the same command to resume (traced shards are kept)"
    assert "Traceback" not in stderr
    assert len(TraceStore.open(tmp_path / "run" / "store")) >= 3
