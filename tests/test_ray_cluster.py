"""The Ray engine on a real two-node Ray cluster, and actor deaths in the middle of a run.

Both nodes run on this machine (`ray.cluster_utils.Cluster`, Ray's own tool for multi-node tests: a head node
and a worker node, each with its own raylet, object store and workers, one CPU each). An actor asks for one
CPU, so the two actors of a run must land on different nodes; a recording subclass of the engine's actor notes
the node id, working directory and shard of every call, which shows they did. Every run is compared with the
local engine on the same prompts and model: the arrays must be identical, since a shard's prompts are batched
the same way on either engine and every actor runs one torch thread, as the local reference does here.

Like tests/test_ray.py: Ray is part of CI's setup, so under CI=true a missing Ray fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from test_ray import ARRAYS, OPTIONS, TEXTS, _ray  # the same prompts and checks as the one-node tests
from tokentrail.engines import ray as ray_engine
from tokentrail.errors import TokentrailError
from tokentrail.runs import ModelSettings
from tokentrail.store import TraceStore
from tokentrail.tracing import Tracer

BATCH, SHARD = 3, 4  # 11 prompts: 3 shards, so both actors get work and one gets two shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and a second node, one CPU and a resource of their own each; removed even on failure.

    RAY_TMPDIR points Ray at a private directory, so this cluster's address file, sockets and logs are its
    own: a `ray.init()` elsewhere on this machine does not find it, and the shutdown stops only the processes
    this fixture started (never `ray stop`, which would stop every Ray instance of the user).
    """
    ray = _ray()
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="tt-ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    with pytest.MonkeyPatch.context() as env:
        # The nodes' processes, and so the actors, inherit these.
        env.setenv("RAY_TMPDIR", temp)
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("TOKENIZERS_PARALLELISM", "false")
        cluster = Cluster()
        try:
            small = 80 << 20  # only shard counts travel through the object store
            cluster.add_node(num_cpus=1, resources={"node_a": 1}, object_store_memory=small,
                             include_dashboard=False)
            cluster.add_node(num_cpus=1, resources={"node_b": 1}, object_store_memory=small)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def recording_worker(log_dir: Path, deaths: Sequence[str] = ()):
    """The engine's actor, noting every call in `log_dir` and dying as `deaths` says, each death once across
    all actors, in the order of the calls: "before" exits before tracing its shard, "after" once the shard is
    committed but before the driver hears of it (where tracing the shard again would store it twice), and ""
    lets the call through.

    Defined in a function, so Ray pickles it by value: no actor has to import this test module.
    """

    class RecordingWorker(ray_engine.ShardWorker):
        def trace_shard(self, texts: list[str]) -> tuple[int, int]:
            import uuid

            import ray

            call = {"node": ray.get_runtime_context().get_node_id(), "cwd": os.getcwd(), "pid": os.getpid(),
                    "texts": texts}
            (log_dir / f"call-{uuid.uuid4().hex}.json").write_text(json.dumps(call))
            death = None
            for i, when in enumerate(deaths):
                try:  # O_EXCL: exactly one actor claims each death
                    os.close(os.open(log_dir / f"death-{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
                death = when
                break
            if death == "before":
                os._exit(1)
            result = super().trace_shard(texts)
            if death == "after":
                os._exit(1)
            return result

    return RecordingWorker


def calls(log_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(log_dir.glob("call-*.json"))]


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, tiny_model_dir):
    """The local engine's store of TEXTS, traced with one torch thread like each actor."""
    import torch

    from tokentrail.engines.local import trace_into_store

    settings = ModelSettings(spec=str(tiny_model_dir))
    store = TraceStore.open(tmp_path_factory.mktemp("local") / "store", model=settings.fingerprint(),
                            options=OPTIONS.to_dict())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = settings.load()
        trace_into_store(store, TEXTS, lambda: Tracer(loaded, OPTIONS, batch_size=BATCH), shard_size=SHARD,
                         show_progress=False)
    finally:
        torch.set_num_threads(threads)
    return store


def assert_same_as_local(store: TraceStore, local: TraceStore) -> None:
    """Every prompt stored once, with the local engine's arrays."""
    store = TraceStore.open(store.root)  # as a later command would read it
    assert store.missing(TEXTS) == [] and len(store) == len(TEXTS)
    # The same shards, hence the same bytes: a prompt stored twice (a shard committed, then traced again)
    # would add a shard's worth.
    assert store.size_bytes() == local.size_bytes()
    a, b = local.load(TEXTS), store.load(TEXTS)
    assert b.prompts == TEXTS
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.tokens == b.tokens and a.next_tokens == b.next_tokens and a.lens_tokens == b.lens_tokens


def test_two_node_cluster_traces_like_the_local_engine(two_nodes, local_reference, tiny_model_dir, tmp_path,
                                                       monkeypatch):
    """`tokentrail trace --engine ray --ray-address ...` on two nodes, with a relative --model path."""
    from tokentrail.cli import main

    log_dir = tmp_path / "calls"
    log_dir.mkdir()
    monkeypatch.setattr(ray_engine, "ShardWorker", recording_worker(log_dir))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    # A relative model path, valid only in this directory: the actors run elsewhere (the nodes' processes
    # were started from pytest's directory), so it must be made absolute before it is shipped.
    monkeypatch.chdir(tiny_model_dir.parent)
    relative = tiny_model_dir.name
    code = main(["trace", str(prompts), "--model", relative, "--engine", "ray", "--ray-address", two_nodes.address,
                 "--workers", "2", "--batch-size", str(BATCH), "--shard-size", str(SHARD), "--top-k", "3",
                 "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 0

    made = calls(log_dir)
    assert sorted(text for call in made for text in call["texts"]) == sorted(TEXTS)  # 3 shards, no retry
    nodes = {node.node_id for node in two_nodes.list_all_nodes()}
    assert len(nodes) == 2 and {call["node"] for call in made} == nodes, "one actor on each node"
    assert all(not (Path(call["cwd"]) / relative).exists() for call in made), "actors ran where the path is valid"
    assert_same_as_local(TraceStore.open(tmp_path / "run" / "store"), local_reference)


def test_actor_deaths_cost_no_prompt_and_no_duplicate(two_nodes, local_reference, tiny_model_dir, tmp_path,
                                                      monkeypatch):
    """An actor dying after committing its shard, then one dying before: the run still completes; with no
    retries it stops, and the same call again resumes it."""
    settings = ModelSettings(spec=str(tiny_model_dir))
    fingerprint = settings.fingerprint()

    def run(name: str, log_dir: Path, deaths: Sequence[str], retries: int = 2, workers: int = 2):
        log_dir.mkdir(exist_ok=True)
        monkeypatch.setattr(ray_engine, "ShardWorker", recording_worker(log_dir, deaths))
        store = TraceStore.open(tmp_path / name, model=fingerprint, options=OPTIONS.to_dict())
        return store, ray_engine.trace_into_store_ray(
            store, TEXTS, settings, OPTIONS, batch_size=BATCH, shard_size=SHARD, n_workers=workers,
            address=two_nodes.address, show_progress=False, retries=retries)

    # Replacement actors take over the dead actors' shards within the run.
    store, report = run("healed", tmp_path / "healed-calls", deaths=("after", "before"))
    assert (report.traced, report.reused, report.shards_written) == (len(TEXTS), 0, 3)
    made = calls(tmp_path / "healed-calls")
    assert len({call["pid"] for call in made}) >= 3, "the dead actors were replaced"
    assert len(made) == 4  # 3 shards, one traced twice: the one lost before its commit
    assert_same_as_local(store, local_reference)

    # Without retries a death before a commit stops the run, with a line saying to rerun; what was committed
    # stays. One actor, so that the two shards before the death are surely committed.
    with pytest.raises(TokentrailError, match="rerun the same command"):
        run("resumed", tmp_path / "failed-calls", deaths=("", "", "before"), retries=0, workers=1)
    kept = len(TraceStore.open(tmp_path / "resumed"))
    assert kept == 2 * SHARD
    # Rerunning the same call traces only what is missing.
    store, report = run("resumed", tmp_path / "resumed-calls", deaths=(), workers=1)
    assert (report.traced, report.reused) == (len(TEXTS) - kept, kept)
    assert_same_as_local(store, local_reference)
