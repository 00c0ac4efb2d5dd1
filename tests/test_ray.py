"""The Ray engine on a local 2-worker Ray cluster (CPU only) gives the store the local engine gives.

CI installs the ray extra, so there this test must run: a missing Ray is a failure under CI=true and a skip
elsewhere.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tokentrail.engines.local import trace_into_store
from tokentrail.errors import TokentrailError
from tokentrail.runs import ModelSettings
from tokentrail.store import TraceStore
from tokentrail.tracing import TraceOptions, Tracer


def _ray():
    if os.environ.get("CI"):
        import ray  # the ray extra is part of CI's setup: its absence must fail, not skip

        return ray
    return pytest.importorskip("ray")


TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "If John has 50 apples and gives 12 to Mary, he has",
    "Solve",
    "All men are mortal. Socrates is a man. Therefore,",
    "Once upon a time in a castle there lived a king.",
    "import numpy as np",
    "The square root of 144 is 12.",
    "Socrates is mortal.",
    "fibonacci",
    "Paris",
]
OPTIONS = TraceOptions(top_k=3, logit_lens=True)
ARRAYS = ("states", "final_states", "next_token_ids", "next_token_probs", "lens_token_ids", "lens_probs")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = _ray()
    # Two CPUs, two workers of one CPU each; a small object store, since only shard counts travel through it.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_matches_local_engine(tmp_path, tiny_model_dir, ray_cluster):
    import torch

    from tokentrail.engines.ray import trace_into_store_ray

    # The actors run one torch thread each; the local engine must too, or reductions may round differently.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = ModelSettings(spec=str(tiny_model_dir))
        fingerprint = settings.fingerprint()
        local_store = TraceStore.open(tmp_path / "local", model=fingerprint, options=OPTIONS.to_dict())
        loaded = settings.load()
        local = trace_into_store(local_store, TEXTS, lambda: Tracer(loaded, OPTIONS, batch_size=3), shard_size=4,
                                 show_progress=False)
    finally:
        torch.set_num_threads(threads)

    ray_store = TraceStore.open(tmp_path / "ray", model=fingerprint, options=OPTIONS.to_dict())
    report = trace_into_store_ray(ray_store, TEXTS, settings, OPTIONS, batch_size=3, shard_size=4, n_workers=2,
                                  show_progress=False)
    assert (report.traced, report.reused, report.shards_written) == (len(TEXTS), 0, 3)
    assert report.forward_passes == local.forward_passes

    # The same prompts went into the same shards, hence as many bytes (names differ between processes:
    # safetensors writes its metadata in hash-map order, so only sizes and parsed contents can be compared).
    assert ray_store.size_bytes() == local_store.size_bytes()
    reopened = TraceStore.open(tmp_path / "ray")
    assert not reopened.verify()
    a, b = local_store.load(TEXTS), reopened.load(TEXTS)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.tokens == b.tokens and a.next_tokens == b.next_tokens and a.lens_tokens == b.lens_tokens

    # A rerun finds everything stored and starts no actor.
    again = trace_into_store_ray(ray_store, TEXTS, settings, OPTIONS, batch_size=3, shard_size=4, n_workers=2,
                                 show_progress=False)
    assert (again.traced, again.reused, again.shards_written, again.forward_passes) == (0, len(TEXTS), 0, 0)


@pytest.mark.slow
def test_ray_worker_error_is_one_line(tmp_path, ray_cluster):
    from tokentrail.engines.ray import trace_into_store_ray

    settings = ModelSettings(spec=str(tmp_path / "no-such-model"))
    store = TraceStore.open(tmp_path / "store", model={"name": "x", "weights_sha256": "0", "dtype": "float32"},
                            options=OPTIONS.to_dict())
    with pytest.raises(TokentrailError, match="no-such-model"):
        trace_into_store_ray(store, TEXTS[:2], settings, OPTIONS, batch_size=2, shard_size=1, n_workers=2,
                             show_progress=False)


def test_missing_ray_says_how_to_install(monkeypatch):
    import sys

    from tokentrail.engines.ray import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(TokentrailError, match=r"pip install 'tokentrail\[ray\]'"):
        require_ray()


def test_cpu_share_fits_on_one_node():
    """An actor lives on one node: its CPU share must fit a node, not just the cluster's total."""
    from types import SimpleNamespace

    from tokentrail.engines.ray import _worker_resources

    def fake_ray(*cpus_per_node):
        nodes = [{"Alive": True, "Resources": {"CPU": float(n)}} for n in cpus_per_node]
        nodes.append({"Alive": False, "Resources": {"CPU": 64.0}})  # a dead node counts for nothing
        return SimpleNamespace(cluster_resources=lambda: {"CPU": float(sum(cpus_per_node))}, nodes=lambda: nodes)

    cpu = ModelSettings(spec="x", device="cpu")
    assert _worker_resources(fake_ray(8, 8), cpu, 1, None, None) == (8.0, 0.0)  # not 16: no node has 16
    assert _worker_resources(fake_ray(8, 8), cpu, 2, None, None) == (8.0, 0.0)
    assert _worker_resources(fake_ray(8, 8), cpu, 3, None, None) == (4.0, 0.0)  # 5 would fit only 2 actors
    assert _worker_resources(fake_ray(1, 1), cpu, 1, None, None) == (1.0, 0.0)
    assert _worker_resources(fake_ray(2), cpu, 4, None, None) == (1.0, 0.0)  # more actors than cores: 1 each
    assert _worker_resources(fake_ray(8, 8), cpu, 1, 3, None) == (3.0, 0.0)  # asked for: kept


def test_relative_model_path_is_made_absolute(tmp_path, monkeypatch):
    """Actors run in another directory, perhaps on another machine: a local model path must travel absolute."""
    from tokentrail.engines.ray import _portable

    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _portable(ModelSettings(spec="my-model", dtype="bfloat16")) == \
        ModelSettings(spec=str(tmp_path / "my-model"), dtype="bfloat16")
    assert _portable(ModelSettings(spec="./my-model")).spec == str(tmp_path / "my-model")
    for spec in ("default", "org/not-here", str(tmp_path / "my-model")):  # hub ids, names, absolute: unchanged
        assert _portable(ModelSettings(spec=spec)).spec == spec
