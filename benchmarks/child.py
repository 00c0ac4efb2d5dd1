"""Benchmark parts that need a process of their own; each prints one JSON line as its last output.

Peak memory can only be told apart per configuration in a fresh process (the resident set never shrinks back
to what it was), and a cold start has to start cold. `run.py` calls this file; it is not meant for users.

    python benchmarks/child.py memory --config bare|tokentrail|hidden_states --prompts 32 --tokens 2048
    python benchmarks/child.py load --kind cold|cached --repeats 5
    python benchmarks/child.py trace-cli --out DIR
    python benchmarks/child.py projection --prompts 100000 --layers 31 --hidden 576 --batch 1024
    python benchmarks/child.py make-store --out DIR --prompts 100000 --layers 31 --hidden 576 --batch 1024
    python benchmarks/child.py project-cli --run DIR
    python benchmarks/child.py store-scale --out DIR --shards 10000 --per-shard 100 --layers 3 --hidden 32
    python benchmarks/child.py store-open --store DIR/store
    python benchmarks/child.py export-cli --run DIR --to FILE.npz
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Start the high-water mark again from the current resident set (Linux >= 4.0), so that the peak read
    later belongs to what ran after this call and not to model loading."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """Peak resident set since `reset_peak` (VmHWM), or over the process's life if the reset was refused."""
    hwm = _status_kib("VmHWM") * 1024
    return hwm or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def emit(result: dict) -> None:
    result["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result), flush=True)


def memory(config: str, n_prompts: int, n_tokens: int) -> None:
    import torch
    from workloads import long_token_ids

    from tokentrail.models import load_model
    from tokentrail.tracing import TraceOptions, Tracer

    loaded = load_model("default")
    model = loaded.model
    encoded = long_token_ids(model.config.vocab_size, n_prompts, n_tokens)
    input_ids = torch.tensor(encoded)
    mask = torch.ones_like(input_ids)
    # The same call for all three, logits for the last column only: what differs is what is kept per layer.
    kwargs = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False, "logits_to_keep": 1,
              "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    tracer = Tracer(loaded, TraceOptions(logit_lens=False), batch_size=n_prompts, memory_budget=1 << 62)
    with torch.inference_mode():
        # The weights are memory-mapped and only become resident when first used; a tiny forward pass pages
        # them all in, so that the baseline below holds the whole model and the peak holds activations only.
        model(input_ids=input_ids[:1, :8], use_cache=False, logits_to_keep=1)
    gc.collect()
    baseline = rss_bytes()
    resettable = reset_peak()
    started = time.perf_counter()
    with torch.inference_mode():
        if config == "bare":
            model(**kwargs)
            kept = None
        elif config == "tokentrail":
            kept = tracer.trace_ids(encoded)["states"]
        elif config == "hidden_states":
            out = model(**kwargs, output_hidden_states=True)
            kept = torch.stack([h[:, -1] for h in out.hidden_states], dim=1).numpy()
            del out
        else:
            raise SystemExit(f"unknown config {config}")
    seconds = time.perf_counter() - started
    emit({"config": config, "prompts": n_prompts, "tokens": n_tokens, "seconds": seconds,
          "baseline_rss_bytes": baseline, "peak_rss_bytes": peak_bytes(), "peak_reset": resettable,
          "kept_bytes": 0 if kept is None else int(kept.nbytes), "threads": torch.get_num_threads()})


def load(kind: str, repeats: int) -> None:
    from tokentrail.models import load_model

    load_model("default")  # warm-up, excluded: imports, page cache of the GGUF and of the cached weights
    gc.collect()
    times = []
    for _ in range(repeats):
        cache = tempfile.mkdtemp(prefix="tokentrail-cold-") if kind == "cold" else None
        if cache:
            os.environ["TOKENTRAIL_CACHE"] = cache
        try:
            started = time.perf_counter()
            loaded = load_model("default")
            times.append(time.perf_counter() - started)
            del loaded
            gc.collect()
        finally:
            if cache:
                os.environ.pop("TOKENTRAIL_CACHE", None)
                shutil.rmtree(cache, ignore_errors=True)
    emit({"kind": kind, "times_s": times})


def trace_cli(out_dir: str) -> None:
    """`tokentrail trace --preset seed-categories`, counting model loads and forward passes on the way."""
    started = time.perf_counter()
    import tokentrail.models
    import tokentrail.runs
    from tokentrail.cli import main

    loads = {"count": 0}
    original = tokentrail.models.load_model

    def counting_load(*args, **kwargs):
        loads["count"] += 1
        return original(*args, **kwargs)

    tokentrail.models.load_model = counting_load
    if hasattr(tokentrail.runs, "load_model"):
        tokentrail.runs.load_model = counting_load
    code = main(["trace", "--preset", "seed-categories", "--out", out_dir, "--quiet"])
    run = json.loads((Path(out_dir) / "run.json").read_text())
    modeling = sorted(name for name in sys.modules if name.startswith("transformers.models.") and ".modeling_" in name)
    emit({"exit_code": code, "seconds_in_process": time.perf_counter() - started, "model_loads": loads["count"],
          "forward_passes": run.get("last_trace", {}).get("forward_passes"),
          "traced": run.get("last_trace", {}).get("traced"), "modeling_modules_imported": modeling})


def projection(n_prompts: int, n_layers: int, hidden: int, batch: int, components: int) -> None:
    import numpy as np
    from workloads import synthetic_trajectories

    from tokentrail.analysis.projection import TrajectoryPCA

    gc.collect()
    baseline = rss_bytes()
    resettable = reset_peak()
    started = time.perf_counter()
    pca = TrajectoryPCA(n_components=components)
    pca.fit_stream(lambda: synthetic_trajectories(n_prompts, n_layers, hidden, batch))
    seconds = time.perf_counter() - started
    emit({"prompts": n_prompts, "layers": n_layers, "hidden": hidden, "batch_prompts": batch,
          "data_bytes": n_prompts * n_layers * hidden * 4, "seconds": seconds, "baseline_rss_bytes": baseline,
          "peak_rss_bytes": peak_bytes(), "peak_reset": resettable,
          "explained_variance_ratio": np.asarray(pca.explained_variance_ratio_).tolist()})


def make_store(out_dir: str, n_prompts: int, n_layers: int, hidden: int, batch: int, shard: int) -> None:
    """A run directory whose store holds `n_prompts` synthetic trajectories, written through `TraceStore.add`.

    The states come from the same generator as the `projection` section; everything else a shard holds (one
    token per prompt, a top-1 readout) is minimal, since `tokentrail project` reads only the states.
    """
    import numpy as np
    from workloads import synthetic_trajectories

    from tokentrail.atomic import atomic_write_json
    from tokentrail.prompts import Prompt, PromptSet
    from tokentrail.store import TraceStore
    from tokentrail.tracing import Trace, TraceOptions

    started = time.perf_counter()
    categories = ("math", "code", "poetry", "logic")
    prompt_set = PromptSet(name="synthetic", source="benchmarks/child.py make-store", prompts=[
        Prompt(id=f"p{i}", text=f"synthetic prompt {i}", category=categories[i % 4], label="")
        for i in range(n_prompts)])
    options = TraceOptions(logit_lens=False)
    fingerprint = {"name": "synthetic", "kind": "synthetic", "weights_sha256": "0" * 64, "dtype": "float32"}
    store = TraceStore.open(Path(out_dir) / "store", model=fingerprint, options=options.to_dict())
    texts = prompt_set.texts
    done = 0
    for states in synthetic_trajectories(n_prompts, n_layers, hidden, batch):
        for start in range(0, len(states), shard):
            part = states[start : start + shard]
            chunk = texts[done : done + len(part)]
            p = len(part)
            store.add(Trace(
                prompt_ids=[f"p{done + i}" for i in range(p)], prompts=chunk, categories=["x"] * p,
                labels=[""] * p, states=part, final_states=part[:, -1], token_ids=[np.array([1])] * p,
                tokens=[["x"]] * p, next_token_ids=np.ones((p, 1), dtype=np.int64),
                next_token_probs=np.ones((p, 1), dtype=np.float32), next_tokens=[["y"]] * p))
            done += p
    atomic_write_json(Path(out_dir) / "run.json", {
        "tool": "tokentrail", "model": {"spec": "synthetic", "fingerprint": fingerprint},
        "trace_options": options.to_dict(),
        "prompts": {"name": prompt_set.name, "source": prompt_set.source, "items": prompt_set.to_records()}})
    size = sum(f.stat().st_size for f in (Path(out_dir) / "store").rglob("*") if f.is_file())
    emit({"prompts": n_prompts, "shards": len(store.shards), "store_bytes": size,
          "seconds": time.perf_counter() - started})


def project_cli(run_dir: str) -> None:
    """`tokentrail project RUN_DIR` as a user runs it, with the peak resident set of the whole command."""
    from tokentrail.cli import main

    gc.collect()
    baseline = rss_bytes()
    resettable = reset_peak()
    started = time.perf_counter()
    code = main(["project", run_dir])
    emit({"exit_code": code, "seconds": time.perf_counter() - started, "baseline_rss_bytes": baseline,
          "peak_rss_bytes": peak_bytes(), "peak_reset": resettable})


def store_scale(out_dir: str, n_shards: int, per_shard: int, n_layers: int, hidden: int) -> None:
    """A store of `n_shards` shards of `per_shard` synthetic prompts written through `TraceStore.add`, timing
    every commit, plus a run.json naming every prompt so that CLI commands read it as a user's run."""
    import numpy as np

    from tokentrail.atomic import atomic_write_json
    from tokentrail.store import TraceStore
    from tokentrail.tracing import Trace, TraceOptions

    options = TraceOptions(logit_lens=False, top_k=1)
    fingerprint = {"name": "synthetic", "kind": "synthetic", "weights_sha256": "0" * 64, "dtype": "float32"}
    store = TraceStore.open(Path(out_dir) / "store", model=fingerprint, options=options.to_dict())
    rng = np.random.default_rng(0)
    commits = []
    started = time.perf_counter()
    for shard in range(n_shards):
        texts = [f"synthetic prompt {shard * per_shard + i}" for i in range(per_shard)]
        states = rng.normal(size=(per_shard, n_layers + 1, hidden)).astype(np.float32)
        batch = Trace(prompt_ids=texts, prompts=texts, categories=["x"] * per_shard, labels=[""] * per_shard,
                      states=states, final_states=states[:, -1], token_ids=[np.array([1])] * per_shard,
                      tokens=[["x"]] * per_shard, next_token_ids=np.ones((per_shard, 1), dtype=np.int64),
                      next_token_probs=np.ones((per_shard, 1), dtype=np.float32), next_tokens=[["y"]] * per_shard)
        commit_started = time.perf_counter()
        store.add(batch)
        commits.append(time.perf_counter() - commit_started)
    written = time.perf_counter() - started
    index_started = time.perf_counter()
    store.save_index()
    index_seconds = time.perf_counter() - index_started
    items = [{"id": f"p{i}", "text": f"synthetic prompt {i}", "category": ("a", "b", "c", "d")[i % 4], "label": ""}
             for i in range(n_shards * per_shard)]
    atomic_write_json(Path(out_dir) / "run.json", {
        "tool": "tokentrail", "model": {"spec": "synthetic", "fingerprint": fingerprint},
        "trace_options": options.to_dict(), "prompts": {"name": "synthetic", "source": "child.py", "items": items}})
    size = sum(f.stat().st_size for f in (Path(out_dir) / "store").rglob("*") if f.is_file())
    emit({"shards": n_shards, "prompts": n_shards * per_shard, "store_bytes": size, "write_seconds": written,
          "commit_seconds": commits, "save_index_seconds": index_seconds,
          "states_bytes": n_shards * per_shard * (n_layers + 1) * hidden * 4})


def store_open(store_dir: str) -> None:
    """Open a store (list and index its shards) and look one prompt up, in a fresh process."""
    from tokentrail.store import TraceStore

    gc.collect()
    baseline = rss_bytes()
    resettable = reset_peak()
    started = time.perf_counter()
    store = TraceStore.open(Path(store_dir))
    opened = time.perf_counter() - started
    found = "synthetic prompt 123" in store
    emit({"seconds": opened, "prompts": len(store), "shards": len(store.shards), "found": found,
          "baseline_rss_bytes": baseline, "peak_rss_bytes": peak_bytes(), "peak_reset": resettable})


def export_cli(run_dir: str, to: str) -> None:
    """`tokentrail export RUN_DIR --to FILE --no-projection` as a user runs it, with its peak resident set."""
    from tokentrail.cli import main

    gc.collect()
    baseline = rss_bytes()
    resettable = reset_peak()
    started = time.perf_counter()
    code = main(["export", run_dir, "--to", to, "--no-projection"])
    emit({"exit_code": code, "seconds": time.perf_counter() - started, "baseline_rss_bytes": baseline,
          "peak_rss_bytes": peak_bytes(), "peak_reset": resettable, "export_bytes": Path(to).stat().st_size})


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("memory")
    p.add_argument("--config", required=True)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=2048)
    p = sub.add_parser("load")
    p.add_argument("--kind", required=True, choices=["cold", "cached"])
    p.add_argument("--repeats", type=int, default=5)
    p = sub.add_parser("trace-cli")
    p.add_argument("--out", required=True)
    p = sub.add_parser("projection")
    p.add_argument("--prompts", type=int, default=100_000)
    p.add_argument("--layers", type=int, default=31)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--components", type=int, default=2)
    p = sub.add_parser("make-store")
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=100_000)
    p.add_argument("--layers", type=int, default=31)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--shard", type=int, default=1024)
    p = sub.add_parser("project-cli")
    p.add_argument("--run", required=True)
    p = sub.add_parser("store-scale")
    p.add_argument("--out", required=True)
    p.add_argument("--shards", type=int, default=10_000)
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--hidden", type=int, default=32)
    p = sub.add_parser("store-open")
    p.add_argument("--store", required=True)
    p = sub.add_parser("export-cli")
    p.add_argument("--run", required=True)
    p.add_argument("--to", required=True)
    args = parser.parse_args()
    if args.what == "memory":
        memory(args.config, args.prompts, args.tokens)
    elif args.what == "load":
        load(args.kind, args.repeats)
    elif args.what == "trace-cli":
        trace_cli(args.out)
    elif args.what == "make-store":
        make_store(args.out, args.prompts, args.layers, args.hidden, args.batch, args.shard)
    elif args.what == "project-cli":
        project_cli(args.run)
    elif args.what == "store-scale":
        store_scale(args.out, args.shards, args.per_shard, args.layers, args.hidden)
    elif args.what == "store-open":
        store_open(args.store)
    elif args.what == "export-cli":
        export_cli(args.run, args.to)
    else:
        projection(args.prompts, args.layers, args.hidden, args.batch, args.components)


if __name__ == "__main__":
    main()
