"""Store format 2: self-describing shards, no file that grows with the store, reads that never delete, checked
keys, format-1 stores still opening, and many writers at once."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tokentrail import store as store_module
from tokentrail.errors import StoreError
from tokentrail.store import TraceStore, prompt_key
from tokentrail.tracing import Trace

MODEL = {"name": "m", "kind": "dir", "weights_sha256": "w", "config_sha256": "c", "tokenizer_sha256": "t",
         "dtype": "float32"}
OPTIONS = {"position": "last", "top_k": 1}


def batch(texts: list[str], seed: int = 0) -> Trace:
    """A traced batch with states derived from each text alone, so two writers of one text store the same."""
    states = np.stack([np.random.default_rng(int(prompt_key(t)[:8], 16)).normal(size=(3, 4)) for t in texts])
    return Trace(prompt_ids=texts, prompts=texts, categories=["c"] * len(texts), labels=[""] * len(texts),
                 states=states.astype(np.float32), final_states=states[:, -1].astype(np.float32),
                 token_ids=[np.array([len(t)]) for t in texts], tokens=[[t[:3]] for t in texts],
                 next_token_ids=np.zeros((len(texts), 1), np.int64),
                 next_token_probs=np.ones((len(texts), 1), np.float32), next_tokens=[["x"] for _ in texts])


def filled(root: Path, groups: list[list[str]]) -> TraceStore:
    store = TraceStore.open(root, model=MODEL, options=OPTIONS)
    for texts in groups:
        store.add(batch(texts))
    store.save_index()
    return store


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_commit_writes_new_files_only(tmp_path):
    store = filled(tmp_path / "s", [["a", "b"]])
    before = {name: (tmp_path / "s" / name).stat().st_mtime_ns for name in ("header.json", "index.npz")}
    listing = set(os.listdir(tmp_path / "s" / "shards"))
    name = store.add(batch(["c"]))
    added = set(os.listdir(tmp_path / "s" / "shards")) - listing
    assert added == {name, name.replace(".safetensors", ".json")}
    assert {n: (tmp_path / "s" / n).stat().st_mtime_ns for n in before} == before  # nothing rewritten
    reopened = TraceStore.open(tmp_path / "s")  # the stale cache is topped up from the new sidecar
    assert "c" in reopened and len(reopened) == 3
    np.testing.assert_array_equal(reopened.load(["c", "a"]).states, batch(["c", "a"]).states)


def test_shards_describe_themselves(tmp_path):
    store = filled(tmp_path / "s", [["first prompt", "second"]])
    (name,) = store.shards
    sidecar = json.loads((tmp_path / "s" / "shards" / name.replace(".safetensors", ".json")).read_text())
    assert sidecar["texts"] == ["first prompt", "second"]
    assert sidecar["keys"] == [prompt_key("first prompt"), prompt_key("second")]
    # The shard's own metadata holds them too: a lost sidecar loses nothing.
    (tmp_path / "s" / "shards" / name.replace(".safetensors", ".json")).unlink()
    (tmp_path / "s" / "index.npz").unlink()
    assert TraceStore.open(tmp_path / "s").load(["second"]).prompts == ["second"]


def test_swapped_keys_are_detected_not_mislabelled(tmp_path):
    store = filled(tmp_path / "s", [["a", "b"], ["c", "d"]])
    # A sidecar that lies about its shard's rows (a swapped or mislabelled file), and no cache to hide it.
    first = min(store.shards)
    sidecar = tmp_path / "s" / "shards" / first.replace(".safetensors", ".json")
    info = json.loads(sidecar.read_text())
    info["keys"] = info["keys"][::-1]
    sidecar.write_text(json.dumps(info))
    (tmp_path / "s" / "index.npz").unlink()
    reader = TraceStore.open(tmp_path / "s")
    wrong = json.loads(sidecar.read_text())["texts"]
    with pytest.raises(StoreError, match=r"holds another prompt at row \d than its index says; rerun `tokentrail trace`"):
        reader.load(wrong)
    # Two shard files swapped under each other's names fail their checksums.
    a, b = (tmp_path / "s" / "shards" / name for name in sorted(store.shards))
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(StoreError, match="failed its checksum"):
        TraceStore.open(tmp_path / "s").load(["c"])


def test_reads_never_change_the_store(tmp_path):
    """A damaged shard, a damaged index cache, a damaged sidecar: every read-only use reports, none deletes."""
    store = filled(tmp_path / "s", [["a", "b"], ["c", "d"]])
    shard = tmp_path / "s" / "shards" / min(store.shards)
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (tmp_path / "s" / "index.npz").write_bytes(b"not an npz")
    before = files(tmp_path / "s")
    reader = TraceStore.open(tmp_path / "s")
    assert any("failed its checksum" in problem for problem in reader.verify())
    with pytest.raises(StoreError, match="failed its checksum"):
        reader.load(["a", "b", "c", "d"])
    assert reader.missing(["a", "b", "c"]) == []  # a reader does not set anything aside
    assert files(tmp_path / "s") == before


def test_a_writer_sets_a_damaged_shard_aside_and_traces_it_again(tmp_path):
    store = filled(tmp_path / "s", [["a", "b"], ["c", "d"]])
    bad = min(store.shards)
    held = json.loads((tmp_path / "s" / "shards" / bad.replace(".safetensors", ".json")).read_text())["texts"]
    (tmp_path / "s" / "shards" / bad).write_bytes(b"\x00" * 64)
    writer = TraceStore.open(tmp_path / "s", model=MODEL, options=OPTIONS)
    assert writer.missing(["a", "b", "c", "d"]) == held
    assert any("failed its checksum" in problem for problem in writer.problems)
    assert sorted(os.listdir(tmp_path / "s" / "quarantine")) == sorted([bad, bad.replace(".safetensors", ".json")])
    assert (tmp_path / "s" / "quarantine" / bad).read_bytes() == b"\x00" * 64  # kept as it was found


def test_transient_read_errors_are_retried_then_reported_and_lose_nothing(tmp_path, monkeypatch):
    store = filled(tmp_path / "s", [["a", "b"]])
    before = files(tmp_path / "s")
    monkeypatch.setattr(store_module, "RETRY_DELAY_S", 0.0)
    real_read = Path.read_bytes
    failures = {"left": 2}

    def flaky(path: Path) -> bytes:
        if path.suffix == ".safetensors" and failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", flaky)
    np.testing.assert_array_equal(TraceStore.open(tmp_path / "s").load(["a"]).states, batch(["a"]).states)
    # An error that does not go away: one line, and a writer removes nothing.
    failures["left"] = 10**6
    writer = TraceStore.open(tmp_path / "s", model=MODEL, options=OPTIONS)
    with pytest.raises(StoreError, match=r"cannot read shard .*: input/output error after 4 tries; nothing was "
                                         r"removed"):
        writer.missing(["a", "b", "new"])
    monkeypatch.setattr(Path, "read_bytes", real_read)
    assert files(tmp_path / "s") == before
    assert store.missing(["a", "b", "new"]) == ["new"]


def test_a_format_1_store_opens_and_migrates_by_adding_files(tmp_path):
    """A store written by the previous format (one manifest listing every shard) reads as it is; the first trace
    into it adds sidecars and a header and rewrites nothing."""
    store = filled(tmp_path / "s", [["a", "b"], ["c"]])
    legacy = tmp_path / "legacy"
    shutil.copytree(tmp_path / "s", legacy)
    manifest = {"format": 1, "tool_version": "0.1.0", "model": MODEL, "options": OPTIONS, "n_layers": 2,
                "hidden_size": 4, "shards": {}}
    for name in store.shards:
        sidecar = legacy / "shards" / name.replace(".safetensors", ".json")
        info = json.loads(sidecar.read_text())
        manifest["shards"][name] = {k: info[k] for k in ("sha256", "bytes", "keys", "texts")}
        sidecar.unlink()
    for name in ("header.json", "index.npz"):
        (legacy / name).unlink()
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    before = files(legacy)
    reader = TraceStore.open(legacy)
    np.testing.assert_array_equal(reader.load(["c", "a"]).states, batch(["c", "a"]).states)
    assert reader.header["n_layers"] == 2 and files(legacy) == before
    writer = TraceStore.open(legacy, model=MODEL, options=OPTIONS)
    writer.add(batch(["e"]))
    after = files(legacy)
    assert all(after[name] == data for name, data in before.items())  # nothing rewritten, manifest included
    assert json.loads(after["header.json"])["format"] == 2
    assert TraceStore.open(legacy).missing(["a", "b", "c", "e", "f"]) == ["f"]


def _writer(root: str, texts: list[str], shard_size: int) -> None:
    store = TraceStore.open(Path(root), model=MODEL, options=OPTIONS)
    missing = store.missing(texts)
    for start in range(0, len(missing), shard_size):
        chunk = missing[start : start + shard_size]
        store.refresh()
        todo = [text for text, held in zip(chunk, store.holds(chunk)) if not held]
        if todo:
            store.add(batch(todo))
    store.save_index()


def test_four_processes_with_overlapping_prompt_sets(tmp_path):
    texts = [f"prompt {i}" for i in range(120)]
    sets = [texts[0:70], texts[30:100], texts[50:120], texts[::2]]
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_writer, args=(str(tmp_path / "s"), chosen, 5)) for chosen in sets]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    store = TraceStore.open(tmp_path / "s")
    assert len(store) == 120 and store.missing(texts) == []
    loaded = store.load(texts)
    assert loaded.prompts == texts
    np.testing.assert_array_equal(loaded.states, batch(texts).states)  # what one writer alone would store
    # Whatever the interleaving, the index names one copy per prompt; copies of a prompt in two shards are equal.
    keys = [key for keys in store.keys_by_shard().values() for key in keys]
    assert set(keys) == {prompt_key(t) for t in texts}
    assert store.verify() == []


def test_export_reads_one_shard_at_a_time(tmp_path):
    """The export of a store many shards big holds about one shard in memory, and writes exactly what the store
    holds, in the run's prompt order."""
    import tracemalloc

    from tokentrail.exports import export_run

    texts = [f"prompt {i}" for i in range(2000)]
    run_dir = tmp_path / "run"
    store = TraceStore.open(run_dir / "store", model=MODEL, options=OPTIONS)
    rng = np.random.default_rng(0)
    for start in range(0, len(texts), 50):
        chunk = texts[start : start + 50]
        traced = batch(chunk)
        traced.states = rng.normal(size=(len(chunk), 5, 1024)).astype(np.float32)  # 20 KiB per prompt
        traced.final_states = traced.states[:, -1].copy()
        store.add(traced)
    order = texts[::-1]  # the run's prompt order is not the store's
    run = {"prompts": {"name": "t", "source": "test",
                       "items": [{"id": f"id{i}", "text": t, "category": f"c{i % 3}"} for i, t in enumerate(order)]}}
    (run_dir / "run.json").write_text(json.dumps(run))
    expected = TraceStore.open(run_dir / "store").load(order)
    states_bytes = expected.states.nbytes
    del expected.states
    tracemalloc.start()
    export_run(run_dir, tmp_path / "all.npz", projection=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert states_bytes > 40_000_000 and peak < states_bytes / 4, (peak, states_bytes)
    expected = TraceStore.open(run_dir / "store").load(order)
    with np.load(tmp_path / "all.npz", allow_pickle=False) as data:
        np.testing.assert_array_equal(data["states"], expected.states)
        np.testing.assert_array_equal(data["final_states"], expected.final_states)
        assert data["prompts"].tolist() == order and data["prompt_ids"][1] == "id1"
        assert data["tokens"].tolist() == [t[:3] for t in order] and "projection" not in data
        assert data["token_offsets"].tolist() == list(range(len(order) + 1))


def test_a_damaged_header_stops_everything_and_deletes_nothing(tmp_path):
    filled(tmp_path / "s", [["a", "b"]])
    (tmp_path / "s" / "header.json").write_text('{"format": 2, "model": ')
    before = files(tmp_path / "s")
    for model in (None, MODEL):
        with pytest.raises(StoreError, match=r"header.json is unreadable .*; nothing was changed"):
            TraceStore.open(tmp_path / "s", model=model, options=OPTIONS if model else None)
    assert files(tmp_path / "s") == before


def _update_many(run_dir: str, prefix: str) -> None:
    from tokentrail.runs import update_run

    for i in range(25):
        update_run(Path(run_dir), **{f"{prefix}{i}": i})


def test_concurrent_run_json_updates_keep_every_field(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_update_many, args=(str(tmp_path), prefix)) for prefix in ("a", "b", "c")]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert run == {f"{prefix}{i}": i for prefix in ("a", "b", "c") for i in range(25)}
