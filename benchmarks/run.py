"""`make bench`: how far tokentrail is from the bare forward pass, from its peers and from its targets.

Writes benchmarks/results/latest.json, prints a markdown table and puts the same table into
docs/performance.md between its bench markers. Every timing is the median of --repeats runs after one
warm-up run; methods compared with each other run in the same rounds, in rotating order, so that a machine
that gets busier or quieter during the run shifts all of them alike.

    python benchmarks/run.py                 # everything, about 25 minutes on 2 CPU cores
    python benchmarks/run.py --quick         # small sizes, a smoke test of the benchmark itself
    python benchmarks/run.py --sections throughput,memory
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SECTIONS = ("throughput", "memory", "load", "rerun", "projection", "store", "dtype", "gpu", "steer", "explore",
            "physics", "large")
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
GiB = 1 << 30
MiB = 1 << 20


# --- helpers ---------------------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    import torch

    from tokentrail.batching import usable_cpus

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "cpu": cpu,
        "usable_cpus": usable_cpus(),
        "memory_bytes": memory,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": version_of("transformers"),
        "nnsight": version_of("nnsight"),
        "transformer_lens": version_of("transformer-lens"),
        "ray": version_of("ray"),
        "scikit-learn": version_of("scikit-learn"),
        "tokentrail_commit": commit,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def child(*args: str, timeout: float = 1800) -> dict[str, Any]:
    """Run benchmarks/child.py in a fresh interpreter and return the JSON of its last line."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "child.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, check=False)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"child {' '.join(args)} failed ({proc.returncode}): {' | '.join(tail)}")
    result = json.loads(lines[-1])
    result["wall_s"] = wall
    return result


def rounds(methods: dict[str, Any], repeats: int, label: str) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time every method once per round, one warm-up round first; the order rotates from round to round.

    Returns the timings of the counted rounds and what each method returned in the warm-up round.
    """
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, Any] = {}
    for round_index in range(repeats + 1):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            started = time.perf_counter()
            returned = methods[name]()
            elapsed = time.perf_counter() - started
            if round_index == 0:
                outputs[name] = returned
            else:
                times[name].append(elapsed)
            del returned
        log(f"{label} round {round_index}/{repeats} done" + (" (warm-up)" if round_index == 0 else ""))
    return times, outputs


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of per-round ratios: steadier than a ratio of medians when the machine's load drifts."""
    return median([a / b for a, b in zip(numerator, denominator)])


def relative_error(states, reference, layers: slice = slice(None)) -> float:
    import numpy as np

    a, b = np.asarray(states)[:, layers], np.asarray(reference)[:, layers]
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- sections --------------------------------------------------------------------------------------------------
def throughput(args) -> dict[str, Any]:
    import methods
    import numpy as np
    import torch
    from workloads import mixed_prompts

    from tokentrail.batching import set_sane_threads
    from tokentrail.models import load_model
    from tokentrail.tracing import TraceOptions, Tracer

    set_sane_threads()
    loaded = load_model("default")
    texts = mixed_prompts(loaded.tokenizer, n=args.prompts, max_tokens=args.max_tokens)
    tracer = Tracer(loaded, TraceOptions(logit_lens=False), batch_size=args.batch_size)
    encoded = tracer.encode(texts)
    lengths = [len(ids) for ids in encoded]
    plan = methods.batch_inputs(tracer, encoded)
    n, n_layers, hidden = len(texts), loaded.parts.n_layers, loaded.model.config.hidden_size
    runs: dict[str, Any] = {
        "bare": methods.bare(loaded, plan),
        "tokentrail": methods.tokentrail(loaded, texts, args.batch_size, logit_lens=False),
        "tokentrail_lens": methods.tokentrail(loaded, texts, args.batch_size, logit_lens=True),
        "seed": methods.seed_method(loaded, texts),
    }
    skipped: dict[str, str] = {}
    if version_of("nnsight"):
        # Wrapping instruments every module's forward for good, plain calls included: sharing tokentrail's
        # model object would slow the bare forward and every other method down with it.
        runs["nnsight"] = methods.nnsight(load_model("default"), plan, n)
    else:
        skipped["nnsight"] = "nnsight is not installed (pip install nnsight==0.8.1)"
    bridge, why = methods.transformer_lens_bridge(lambda: load_model("default"))
    if bridge is not None:
        runs["transformer_lens"] = methods.transformer_lens(bridge, plan, n, n_layers, hidden)
    else:
        skipped["transformer_lens"] = why

    times, outputs = rounds(runs, args.repeats, "throughput")
    # The load-time self-check (tokentrail.selfcheck) runs once per load, before any tracing: its cost is
    # measured against one trace of this workload.
    from tokentrail.selfcheck import self_check

    self_check(loaded)  # warm-up
    check_times = []
    for _ in range(args.repeats):
        check_started = time.perf_counter()
        self_check(loaded)
        check_times.append(time.perf_counter() - check_started)
    # What each method collected in the warm-up round, against tokentrail's states.
    reference_states, reference_final = outputs["tokentrail"]
    agreement: dict[str, dict[str, float]] = {}
    for name in ("nnsight", "transformer_lens", "seed"):
        if name in outputs:
            states, final = outputs[name]
            comparable = slice(0, n_layers) if name == "seed" else slice(None)  # seed's last layer is normed
            agreement[name] = {"states": relative_error(states, reference_states, comparable),
                               "final_states": float(np.abs(final - reference_final).max()
                                                     / np.abs(reference_final).max())}
    del outputs
    result: dict[str, Any] = {
        "prompts": n,
        "tokens": int(sum(lengths)),
        "length_min": int(min(lengths)), "length_max": int(max(lengths)),
        "length_mean": float(np.mean(lengths)),
        "batch_size": args.batch_size,
        "forward_passes": len(plan),
        "padded_tokens": int(sum(int(kw["input_ids"].numel()) for _, kw in plan)),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "methods": {
            name: {"median_s": median(values), "times_s": values, "prompts_per_s": n / median(values)}
            for name, values in times.items()
        },
        "agreement_with_tokentrail": agreement,
        "self_check": {"median_s": median(check_times), "times_s": check_times},
        "skipped": skipped,
        "notes": {
            "bare": "model(**batch) for tokentrail's own batches, inputs prebuilt, outputs dropped",
            "tokentrail": "Tracer.trace(texts) end to end: tokenize, forward, readout, token strings",
            "nnsight": "nnsight.NNsight over its own copy of the same model (wrapping instruments the object "
                       "for every later call, wrapped or not), same batches, saves the same positions",
            "transformer_lens": "TransformerBridge.boot_transformers over a second copy (it forces eager "
                                "attention), run_with_cache with names_filter and pos_slice=-1, same batches",
            "seed": "one prompt per forward pass with output_hidden_states=True and full logits",
        },
    }
    ratios = {
        "tokentrail_over_bare": paired_ratio(times["tokentrail"], times["bare"]),
        "seed_over_tokentrail": paired_ratio(times["seed"], times["tokentrail"]),
        "lens_over_no_lens": paired_ratio(times["tokentrail_lens"], times["tokentrail"]),
        "self_check_over_trace": median(check_times) / median(times["tokentrail"]),
    }
    for peer in ("nnsight", "transformer_lens"):
        if peer in times:
            ratios[f"tokentrail_over_{peer}"] = paired_ratio(times["tokentrail"], times[peer])
    result["ratios"] = ratios
    del runs, bridge
    gc.collect()
    return result


def memory(args) -> dict[str, Any]:
    from tokentrail.batching import batch_cost, default_memory_budget
    from tokentrail.models import load_model
    from tokentrail.tracing import Tracer

    configs = {}
    for config in ("bare", "tokentrail", "hidden_states"):
        log(f"memory: {config}, {args.memory_prompts} prompts x {args.memory_tokens} tokens, fresh process")
        configs[config] = child("memory", "--config", config, "--prompts", str(args.memory_prompts),
                                "--tokens", str(args.memory_tokens))
    loaded = load_model("default")
    extra = {name: configs[name]["peak_rss_bytes"] - configs[name]["baseline_rss_bytes"] for name in configs}
    # What tokentrail would do by itself with these prompts: the batches its defaults plan, no forward pass.
    plans = {}
    for label, batch_size in (("cli_default_batch_16", 16), ("auto", None)):
        tracer = Tracer(loaded, batch_size=batch_size)
        batches = tracer.plan_batches([args.memory_tokens] * args.memory_prompts)
        plans[label] = {"batches": len(batches), "largest_batch": max(len(b) for b in batches),
                        "memory_budget_bytes": tracer.memory_budget,
                        "estimated_peak_activation_bytes": batch_cost(loaded)(max(len(b) for b in batches),
                                                                              args.memory_tokens)}
    n_layers, hidden = loaded.parts.n_layers, loaded.model.config.hidden_size
    states_bytes = args.memory_prompts * (n_layers + 1) * hidden * 4
    return {
        "prompts": args.memory_prompts,
        "tokens": args.memory_tokens,
        "repeats": 1,
        "note": "one fresh process per configuration, all 32 prompts in one forward pass with logits for the "
                "last column only; peak = VmHWM after the high-water mark was reset once the weights were "
                "resident, so it holds the forward pass and what it keeps, not model loading",
        "configs": configs,
        "extra_over_baseline_bytes": extra,
        "peak_ratio_tokentrail_over_bare": configs["tokentrail"]["peak_rss_bytes"] / configs["bare"]["peak_rss_bytes"],
        "peak_ratio_hidden_states_over_bare": (configs["hidden_states"]["peak_rss_bytes"]
                                               / configs["bare"]["peak_rss_bytes"]),
        "tokentrail_extra_over_bare_bytes": extra["tokentrail"] - extra["bare"],
        "hidden_states_extra_over_bare_bytes": extra["hidden_states"] - extra["bare"],
        "states_bytes_prompts_x_layers_x_hidden": states_bytes,
        "all_layers_all_tokens_bytes": states_bytes * args.memory_tokens,
        "default_plans": plans,
        "default_memory_budget_bytes": default_memory_budget(loaded.device),
    }


def load(args) -> dict[str, Any]:
    result = {}
    for kind in ("cached", "cold"):
        log(f"load: {kind} x {args.repeats} in a fresh process")
        out = child("load", "--kind", kind, "--repeats", str(args.repeats))
        result[kind] = {"times_s": out["times_s"], "median_s": median(out["times_s"])}
    result["cold_over_cached"] = result["cold"]["median_s"] / result["cached"]["median_s"]
    result["note"] = ("cold: TOKENTRAIL_CACHE points at an empty temporary directory, so the GGUF is hashed and "
                      "dequantized; cached: the dequantized safetensors copy is read. One warm-up load first.")
    return result


def rerun(args) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tokentrail-bench-") as tmp:
        log("rerun: warm-up")
        child("trace-cli", "--out", str(Path(tmp) / "warm"))
        cold, cached = [], []
        for i in range(args.repeats):
            log(f"rerun: cold {i + 1}/{args.repeats}, then cached")
            cold.append(child("trace-cli", "--out", str(Path(tmp) / f"cold{i}")))
            cached.append(child("trace-cli", "--out", str(Path(tmp) / f"cold{i}")))
    summary = {}
    for name, outs in (("cold", cold), ("cached", cached)):
        summary[name] = {
            "wall_s": [o["wall_s"] for o in outs], "median_wall_s": median([o["wall_s"] for o in outs]),
            "in_process_s": [o["seconds_in_process"] for o in outs],
            "median_in_process_s": median([o["seconds_in_process"] for o in outs]),
            "model_loads": max(o["model_loads"] for o in outs),
            "forward_passes": max(o["forward_passes"] or 0 for o in outs),
            "traced": max(o["traced"] or 0 for o in outs),
            "modeling_modules_imported": sorted({m for o in outs for m in o["modeling_modules_imported"]}),
        }
    summary["cold_over_cached"] = summary["cold"]["median_wall_s"] / summary["cached"]["median_wall_s"]
    summary["note"] = ("`tokentrail trace --preset seed-categories --quiet` in a fresh interpreter; wall time "
                       "includes starting Python. cold: a new run directory; cached: the same directory again.")
    return summary


def steer(args) -> dict[str, Any]:
    """The default `tokentrail steer --confirm` on the embedded model, once (it takes minutes): wall time,
    generations and generations per second, as the run itself records them."""
    with tempfile.TemporaryDirectory(prefix="tokentrail-bench-") as tmp:
        out = Path(tmp) / "steer"
        command = ["steer", "--out", str(out), "--confirm", "--quiet"]
        if args.quick:
            command += ["--problems", "20", "--random", "3", "--train", "20", "--layers", "10", "--alphas", "0.5"]
        log("steer: " + " ".join(command))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys; from tokentrail.cli import main; sys.exit(main(sys.argv[1:]))",
                        *command], check=True, capture_output=True)
        wall = time.perf_counter() - started
        settings = json.loads((out / "steer" / "summary.json").read_text(encoding="utf-8"))["settings"]
    return {"wall_s": wall, "in_process_s": settings["seconds"], "cpu_s": settings["cpu_seconds"],
            "generations": settings["generations"], "generations_per_second": settings["generations_per_second"],
            "command": "tokentrail " + " ".join(command[:1] + command[3:]),
            "note": "development grid (2 layers x 3 alphas, no null) + held-out test (prompting conditions, the "
                    "chosen cell and 20 random directions), 200 problems each; model load and tracing included"}


# Twenty tokens with the embedded model's tokenizer (the response's token count is recorded to show it).
EXPLORE_PROMPT = 'def mean(values): """Return the arithmetic mean of the numbers.""" return sum(values) /'


def _post(url: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - started, answer


def explore(args) -> dict[str, Any]:
    """`tokentrail explore` on a seed-spectrum run of the embedded model, through its HTTP API as the page uses
    it: a 20-token prompt submitted -> its placed trajectory back (the page then draws it), and one steering
    comparison. Timed by the client, so HTTP and JSON are included; the server is a separate process."""
    import socket
    import urllib.request

    entry = "import sys; from tokentrail.cli import main; sys.exit(main(sys.argv[1:]))"
    with tempfile.TemporaryDirectory(prefix="tokentrail-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        log("explore: tracing seed-spectrum into a run")
        subprocess.run([sys.executable, "-c", entry, "trace", "--preset", "seed-spectrum", "--out", str(run_dir),
                        "--quiet"], check=True, capture_output=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        started = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-c", entry, "explore", str(run_dir), "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        base = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/api/info", timeout=5) as response:
                        info = json.loads(response.read())
                    if info["model_status"] != "loading":
                        break
                except OSError:
                    pass
                if time.perf_counter() - started > 300:
                    raise RuntimeError("explore did not start")
                time.sleep(0.1)
            ready_s = time.perf_counter() - started
            if info["model_status"] != "ready":
                raise RuntimeError(f"explore is read-only: {info['model_problem']}")
            _post(f"{base}/api/trace", {"prompt": EXPLORE_PROMPT})  # warm-up
            times, tokens = [], 0
            for i in range(args.repeats * 4):
                log(f"explore: trace {i + 1}/{args.repeats * 4}")
                seconds, answer = _post(f"{base}/api/trace", {"prompt": EXPLORE_PROMPT})
                times.append(seconds)
                tokens = len(answer["tokens"])
            steer_times = []
            for _ in range(args.repeats):
                seconds, _answer = _post(f"{base}/api/steer", {
                    "prompt": EXPLORE_PROMPT, "layer": 10, "alpha": 1.0, "source": "pure-code",
                    "target": "pure-story", "max_new_tokens": 24})
                steer_times.append(seconds)
        finally:
            server.send_signal(2)
            server.wait(30)
    return {"prompt_tokens": tokens, "trace_s": times, "median_trace_s": median(times), "worst_trace_s": max(times),
            "steer_s": steer_times, "median_steer_s": median(steer_times), "ready_s": ready_s,
            "note": "POST /api/trace with a 20-token prompt on a seed-spectrum run of the embedded model, timed by "
                    "an HTTP client (trace, placement, projection, JSON both ways); steer: 24 new tokens greedy, "
                    "with and without steering, and both trajectories; ready: process start to model loaded"}


def physics(args) -> dict[str, Any]:
    """`tokentrail physics` on a `--position all` seed-spectrum run of the embedded model: what each measure
    costs (physics/summary.json records the seconds of each part), and the whole command's wall time."""
    entry = "import sys; from tokentrail.cli import main; sys.exit(main(sys.argv[1:]))"
    with tempfile.TemporaryDirectory(prefix="tokentrail-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        log("physics: tracing seed-spectrum with --position all")
        subprocess.run([sys.executable, "-c", entry, "trace", "--preset", "seed-spectrum", "--position", "all",
                        "--out", str(run_dir), "--quiet"], check=True, capture_output=True)
        command = ["physics", str(run_dir), "--directions", "8"]
        log("physics: " + " ".join(command))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", entry, *command], check=True, capture_output=True)
        wall = time.perf_counter() - started
        summary = json.loads((run_dir / "physics" / "summary.json").read_text(encoding="utf-8"))
    seconds = summary["seconds"]
    prompts = summary["probed_prompts"]
    return {"wall_s": wall, "seconds": seconds, "prompts": summary["prompts"], "probed_prompts": prompts,
            "energy_per_prompt_s": seconds.get("energy", 0.0) / max(prompts, 1),
            "expansion_per_prompt_s": seconds.get("expansion", 0.0) / max(prompts, 1),
            "note": "stored-state measures (ode: steps and block linearity; geometry: TwoNN, anisotropy, effective "
                    "rank; tokens: token clustering and token-cloud geometry) and the model probes (energy: two "
                    "forward passes per prompt; expansion: one batch of 1 + 8 rows per prompt); wall time "
                    "includes starting Python and loading the model"}


def _timed_cli(*command: str) -> dict[str, float]:
    """Run `tokentrail COMMAND` in a fresh process: its wall seconds and its own peak RSS (from wait4, so the
    figure is this child's, not the largest of every child so far)."""
    entry = "import sys; from tokentrail.cli import main; sys.exit(main(sys.argv[1:]))"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", entry, *command], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"tokentrail {' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024}


def large(args) -> dict[str, Any]:
    """The large presets (issue 20): `tokentrail trace` of each on each of --large-models (defaults, batch auto,
    self-check on), then `tokentrail analyze --holdout` with the default 1,000 permutations and 1,000 bootstrap
    resamples; one run each (they take minutes), each in a fresh process. --quick: the seed presets instead."""
    found: dict[str, Any] = {}
    presets = ("seed-spectrum", "seed-categories") if args.quick else ("spectrum-large", "categories-large")
    for model in args.large_models.split(","):
        for preset in presets:
            with tempfile.TemporaryDirectory(prefix="tokentrail-bench-large-") as tmp:
                run_dir = str(Path(tmp) / "run")
                log(f"large: trace --preset {preset} --model {model}")
                traced = _timed_cli("trace", "--preset", preset, "--model", model, "--batch-size", "auto",
                                    "--out", run_dir, "--quiet")
                log(f"large: analyze --holdout ({preset}, {model})")
                analysed = _timed_cli("analyze", run_dir, "--holdout")
                summary = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
                found[f"{model}/{preset}"] = {"prompts": summary["n_prompts"], "trace": traced,
                                              "analyze": analysed,
                                              "n_permutations": summary["options"]["n_permutations"],
                                              "n_bootstrap": summary["options"]["n_bootstrap"]}
    return found


def projection(args) -> dict[str, Any]:
    log(f"projection: {args.projection_prompts} prompts x 31 x 576, streamed, fresh process")
    out = child("projection", "--prompts", str(args.projection_prompts), "--batch", str(args.projection_batch))
    out["source"] = ("batches generated on the fly from a seeded RNG (low-rank drift plus noise); no store is "
                     "written, so the figure is the fit's own memory, not the page cache")
    # The same trajectories written into a real run's store, then `tokentrail project` on it as a user runs it.
    with tempfile.TemporaryDirectory(prefix="tokentrail-bench-store-") as tmp:
        log(f"projection: writing a synthetic store of {args.projection_prompts} prompts")
        written = child("make-store", "--out", tmp, "--prompts", str(args.projection_prompts),
                        "--batch", str(args.projection_batch), "--shard", str(args.projection_batch))
        log("projection: tokentrail project on it, fresh process")
        projected = child("project-cli", "--run", tmp)
        if projected["exit_code"] != 0:
            raise RuntimeError(f"tokentrail project failed with exit code {projected['exit_code']}")
    out["store"] = {"write": written, "project_cli": projected,
                    "note": "`tokentrail project RUN_DIR` with its defaults (raw states, global centring, every "
                            "layer, --batch-prompts 1024) over a store written through TraceStore.add with "
                            "shards of --projection-batch prompts; peak = VmHWM of the whole command after imports "
                            "of nothing but the benchmark child"}
    return out


def store(args) -> dict[str, Any]:
    """The store at scale: a commit's cost early and late, opening a store of millions of prompts with and
    without its index cache, and a streamed export's peak memory."""
    shards, per_shard = args.store_shards, args.store_per_shard
    with tempfile.TemporaryDirectory(prefix="tokentrail-bench-scale-") as tmp:
        log(f"store: writing {shards:,} shards of {per_shard} prompts (hidden {args.store_hidden}), timing commits")
        written = child("store-scale", "--out", tmp, "--shards", str(shards), "--per-shard", str(per_shard),
                        "--hidden", str(args.store_hidden), timeout=7200)
        commits = written.pop("commit_seconds")
        early = commits[max(0, 10 - 5): 10 + 5]
        late = commits[-10:]
        log("store: opening it in a fresh process, with its index cache, then without")
        opened = child("store-open", "--store", str(Path(tmp) / "store"))
        cache = Path(tmp) / "store" / "index.npz"
        cache.rename(cache.with_suffix(".bench-aside"))
        rebuilt = child("store-open", "--store", str(Path(tmp) / "store"))
        cache.with_suffix(".bench-aside").rename(cache)
        log("store: tokentrail export --no-projection on it, fresh process")
        exported = child("export-cli", "--run", tmp, "--to", str(Path(tmp) / "export.npz"), timeout=7200)
        if exported["exit_code"] != 0:
            raise RuntimeError(f"tokentrail export failed with exit code {exported['exit_code']}")
    return {
        **written,
        "commit_early_median_s": median(early), "commit_late_median_s": median(late),
        "commit_late_over_early": median(late) / median(early),
        "commit_early_s": early, "commit_late_s": late,
        "open_with_cache": opened, "open_without_cache": rebuilt, "export_cli": exported,
        "note": ("synthetic shards written through TraceStore.add (states of 3 blocks + embedding, one token per "
                 "prompt); early = median commit of shards 5-14, late = of the last 10; open = TraceStore.open "
                 "plus one lookup in a fresh process; export = `tokentrail export --no-projection`, peak = VmHWM"),
    }


def _dtypes_on(device: str, args, batch_size: int | None) -> dict[str, Any]:
    """The throughput workload traced in float32 and in bfloat16 on `device`, with a bare forward pass in each
    dtype and the peak device memory: what --dtype auto buys, and what it costs in agreement."""
    import methods
    import numpy as np
    import torch
    from workloads import mixed_prompts

    from tokentrail.models import load_model
    from tokentrail.tracing import TraceOptions, Tracer

    out: dict[str, Any] = {"device": device, "batch_size": batch_size}
    states: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        loaded = load_model("default", dtype=dtype, device=device)
        texts = mixed_prompts(loaded.tokenizer, n=args.prompts, max_tokens=args.max_tokens)
        tracer = Tracer(loaded, TraceOptions(logit_lens=False), batch_size=batch_size)
        plan = methods.batch_inputs(tracer, tracer.encode(texts))
        plan = [(index, {k: v.to(loaded.device) if hasattr(v, "to") else v for k, v in kwargs.items()})
                for index, kwargs in plan]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, outputs = rounds({"bare": methods.bare(loaded, plan),
                                 "tokentrail": methods.tokentrail(loaded, texts, batch_size, logit_lens=False)},
                                args.repeats, f"{dtype} on {device}")
        states[dtype] = outputs["tokentrail"][0]
        out[dtype] = {"trace_median_s": median(times["tokentrail"]), "bare_median_s": median(times["bare"]),
                      "trace_s": times["tokentrail"], "bare_s": times["bare"]}
        if device == "cuda":
            out[dtype]["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        del loaded, tracer, plan
        gc.collect()
    f32, b16 = np.asarray(states["float32"], dtype=np.float64), np.asarray(states["bfloat16"], dtype=np.float64)
    errors = np.linalg.norm(b16 - f32, axis=-1) / np.maximum(np.linalg.norm(f32, axis=-1), 1e-12)
    out["state_relative_error_median"] = float(np.median(errors))
    out["state_relative_error_max"] = float(np.max(errors))
    out["bf16_speedup"] = out["float32"]["trace_median_s"] / out["bfloat16"]["trace_median_s"]
    return out


def dtype(args) -> dict[str, Any]:
    from tokentrail.models import auto_dtype

    result = _dtypes_on("cpu", args, args.batch_size)
    result["auto_chooses"] = auto_dtype("cpu")
    return result


def gpu(args) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        log("gpu: no CUDA device, skipped")
        return {"skipped": "no CUDA device on this machine; the section runs wherever torch sees one"}
    return _dtypes_on("cuda", args, 64)


# --- report ----------------------------------------------------------------------------------------------------
def _fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < 100 else f"{seconds:.0f} s"


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _fmt_b(value: float) -> str:
    return f"{value / GiB:.2f} GiB" if abs(value) >= GiB else f"{value / MiB:.0f} MiB"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure the issue asks for: value, target, whether it is met."""
    rows: list[dict[str, Any]] = []
    t = results.get("throughput")
    if t:
        m, r = t["methods"], t["ratios"]
        label = f"{t['prompts']} prompts, {t['length_min']}-{t['length_max']} tokens"
        rows.append({"figure": f"trace vs bare forward ({label})", "tokentrail": _fmt_s(m["tokentrail"]["median_s"]),
                     "other": _fmt_s(m["bare"]["median_s"]), "ratio": r["tokentrail_over_bare"],
                     "target": "<= 1.05", "met": r["tokentrail_over_bare"] <= 1.05})
        if "self_check_over_trace" in r:
            rows.append({"figure": "load-time self-check vs the trace", "tokentrail": _fmt_s(t["self_check"]["median_s"]),
                         "other": _fmt_s(m["tokentrail"]["median_s"]), "ratio": r["self_check_over_trace"],
                         "target": "<= 0.02", "met": r["self_check_over_trace"] <= 0.02})
        rows.append({"figure": "seed method (1 prompt/pass, output_hidden_states) vs trace",
                     "tokentrail": _fmt_s(m["tokentrail"]["median_s"]), "other": _fmt_s(m["seed"]["median_s"]),
                     "ratio": r["seed_over_tokentrail"], "target": ">= 3 (speed-up)",
                     "met": r["seed_over_tokentrail"] >= 3})
        for peer, name in (("nnsight", "nnsight " + str(results["machine"].get("nnsight"))),
                           ("transformer_lens", "TransformerLens " + str(results["machine"].get("transformer_lens")))):
            if peer in m:
                ratio = r[f"tokentrail_over_{peer}"]
                rows.append({"figure": f"trace vs {name}", "tokentrail": _fmt_s(m["tokentrail"]["median_s"]),
                             "other": _fmt_s(m[peer]["median_s"]), "ratio": ratio, "target": "<= 1.00",
                             "met": ratio <= 1.0})
            else:
                rows.append({"figure": f"trace vs {name}", "tokentrail": "", "other": "not run", "ratio": None,
                             "target": "<= 1.00", "met": None, "note": t["skipped"].get(peer)})
        rows.append({"figure": "logit lens on vs off", "tokentrail": _fmt_s(m["tokentrail_lens"]["median_s"]),
                     "other": _fmt_s(m["tokentrail"]["median_s"]), "ratio": r["lens_over_no_lens"],
                     "target": "(reported)", "met": None})
    mem = results.get("memory")
    if mem:
        c = mem["configs"]
        size = f"{mem['prompts']} x {mem['tokens']} tokens"
        rows.append({"figure": f"peak RSS, trace vs bare ({size})", "tokentrail": _fmt_b(c["tokentrail"]["peak_rss_bytes"]),
                     "other": _fmt_b(c["bare"]["peak_rss_bytes"]), "ratio": mem["peak_ratio_tokentrail_over_bare"],
                     "target": "extra O(P x L x H)",
                     "met": mem["tokentrail_extra_over_bare_bytes"]
                     <= 4 * mem["states_bytes_prompts_x_layers_x_hidden"] + 64 * MiB,
                     "note": f"extra {_fmt_b(mem['tokentrail_extra_over_bare_bytes'])}; "
                             f"P x (L+1) x H floats = {_fmt_b(mem['states_bytes_prompts_x_layers_x_hidden'])}"})
        rows.append({"figure": f"peak RSS, output_hidden_states vs bare ({size})",
                     "tokentrail": "", "other": _fmt_b(c["hidden_states"]["peak_rss_bytes"]),
                     "ratio": mem["peak_ratio_hidden_states_over_bare"], "target": "(reported)", "met": None,
                     "note": f"extra {_fmt_b(mem['hidden_states_extra_over_bare_bytes'])}, O(P x T x L x H)"})
    ld = results.get("load")
    if ld:
        rows.append({"figure": "model load, cold (GGUF dequantized) vs cached", "tokentrail": _fmt_s(ld["cached"]["median_s"]),
                     "other": _fmt_s(ld["cold"]["median_s"]), "ratio": ld["cold_over_cached"],
                     "target": "(reported)", "met": None})
    rr = results.get("rerun")
    if rr:
        rows.append({"figure": "seed-categories trace, cached rerun vs cold",
                     "tokentrail": _fmt_s(rr["cached"]["median_wall_s"]), "other": _fmt_s(rr["cold"]["median_wall_s"]),
                     "ratio": rr["cold_over_cached"], "target": "rerun loads no model",
                     "met": rr["cached"]["model_loads"] == 0 and rr["cached"]["forward_passes"] == 0,
                     "note": f"rerun: {rr['cached']['model_loads']} model loads, "
                             f"{rr['cached']['forward_passes']} forward passes"})
    pj = results.get("projection")
    if pj:
        rows.append({"figure": f"streaming PCA, {pj['prompts']:,} x {pj['layers']} x {pj['hidden']}",
                     "tokentrail": _fmt_b(pj["peak_rss_bytes"]), "other": _fmt_s(pj["seconds"]), "ratio": None,
                     "target": "peak RSS <= 2 GiB", "met": pj["peak_rss_bytes"] <= 2 * GiB,
                     "note": f"data {_fmt_b(pj['data_bytes'])}, fit alone on generated batches"})
        if "store" in pj:
            cli = pj["store"]["project_cli"]
            rows.append({"figure": f"`tokentrail project` on a store of {pj['prompts']:,} x {pj['layers']} x "
                                   f"{pj['hidden']}", "tokentrail": _fmt_b(cli["peak_rss_bytes"]),
                         "other": _fmt_s(cli["seconds"]), "ratio": None, "target": "peak RSS <= 2 GiB",
                         "met": cli["peak_rss_bytes"] <= 2 * GiB,
                         "note": f"store {_fmt_b(pj['store']['write']['store_bytes'])} on disk, read twice"})
    st = results.get("store")
    if st:
        rows.append({"figure": f"store commit at shard {st['shards']:,} vs shard 10", "tokentrail":
                     _fmt_ms(st["commit_late_median_s"]), "other": _fmt_ms(st["commit_early_median_s"]),
                     "ratio": st["commit_late_over_early"], "target": "equal within noise (<= 1.5)",
                     "met": st["commit_late_over_early"] <= 1.5,
                     "note": f"{st['prompts']:,} prompts, store {_fmt_b(st['store_bytes'])}"})
        rows.append({"figure": f"open a store of {st['shards']:,} shards, {st['prompts']:,} prompts",
                     "tokentrail": _fmt_ms(st["open_with_cache"]["seconds"]),
                     "other": _fmt_ms(st["open_without_cache"]["seconds"]), "ratio": None,
                     "target": "(reported)", "met": None,
                     "note": f"with its index cache; other: rebuilt from {st['shards']:,} sidecars; peak "
                             f"{_fmt_b(st['open_with_cache']['peak_rss_bytes'])}"})
        ex = st["export_cli"]
        rows.append({"figure": "`tokentrail export` of that store, streamed", "tokentrail": _fmt_b(ex["peak_rss_bytes"]),
                     "other": _fmt_s(ex["seconds"]), "ratio": None,
                     "target": "peak RSS < states size", "met": ex["peak_rss_bytes"] < st["states_bytes"],
                     "note": f"states {_fmt_b(st['states_bytes'])}, export {_fmt_b(ex['export_bytes'])}"})
    for key, label in (("dtype", "CPU"), ("gpu", "GPU")):
        dt = results.get(key)
        if dt and "skipped" in dt:
            rows.append({"figure": f"bfloat16 vs float32 trace ({label})", "tokentrail": "", "other": "not run",
                         "ratio": None, "target": "(reported)", "met": None, "note": dt["skipped"]})
        elif dt:
            memory = (f"; peak GPU memory {_fmt_b(dt['bfloat16']['peak_memory_bytes'])} vs "
                      f"{_fmt_b(dt['float32']['peak_memory_bytes'])}" if "peak_memory_bytes" in dt["float32"] else "")
            rows.append({"figure": f"bfloat16 vs float32 trace ({label}, batch {dt['batch_size']})",
                         "tokentrail": _fmt_s(dt["bfloat16"]["trace_median_s"]),
                         "other": _fmt_s(dt["float32"]["trace_median_s"]), "ratio": dt["bf16_speedup"],
                         "target": "(reported)", "met": None,
                         "note": f"states within {dt['state_relative_error_median']:.2%} median, "
                                 f"{dt['state_relative_error_max']:.1%} worst; bare forward "
                                 f"{_fmt_s(dt['bfloat16']['bare_median_s'])} vs "
                                 f"{_fmt_s(dt['float32']['bare_median_s'])}{memory}"})
    st = results.get("steer")
    if st:
        rows.append({"figure": "`tokentrail steer --confirm` (default: grid + held-out test with 20 random directions)",
                     "tokentrail": _fmt_s(st["wall_s"]), "other": f"{st['generations']:,} generations",
                     "ratio": None, "target": "about 15 min", "met": st["wall_s"] < 20 * 60,
                     "note": f"{st['generations_per_second']:.1f} generations/s"})
    ex = results.get("explore")
    if ex:
        rows.append({"figure": f"`explore`: {ex['prompt_tokens']}-token prompt -> placed trajectory (HTTP API)",
                     "tokentrail": _fmt_ms(ex["median_trace_s"]), "other": f"worst {_fmt_ms(ex['worst_trace_s'])}",
                     "ratio": None, "target": "<= 300 ms", "met": ex["median_trace_s"] <= 0.3,
                     "note": f"steering comparison {_fmt_s(ex['median_steer_s'])}; server ready in "
                             f"{_fmt_s(ex['ready_s'])}"})
    ph = results.get("physics")
    if ph:
        parts = ", ".join(f"{name} {_fmt_s(value)}" for name, value in ph["seconds"].items())
        rows.append({"figure": f"`tokentrail physics` ({ph['prompts']} prompts, --position all)",
                     "tokentrail": _fmt_s(ph["wall_s"]),
                     "other": f"energy {_fmt_ms(ph['energy_per_prompt_s'])}/prompt, expansion "
                              f"{_fmt_ms(ph['expansion_per_prompt_s'])}/prompt",
                     "ratio": None, "target": "(reported)", "met": None, "note": parts})
    for key, lg in (results.get("large") or {}).items():
        model, preset = key.split("/")
        rows.append({"figure": f"`tokentrail trace --preset {preset}` ({lg['prompts']:,} prompts, {model})",
                     "tokentrail": _fmt_s(lg["trace"]["seconds"]), "other": _fmt_b(lg["trace"]["peak_rss_bytes"]),
                     "ratio": None, "target": "minutes, not hours", "met": lg["trace"]["seconds"] < 3600,
                     "note": "batch auto, self-check on, logit lens on; one run"})
        rows.append({"figure": f"`tokentrail analyze --holdout` on it ({lg['n_permutations']:,} permutations, "
                               f"{lg['n_bootstrap']:,} resamples)",
                     "tokentrail": _fmt_s(lg["analyze"]["seconds"]), "other": _fmt_b(lg["analyze"]["peak_rss_bytes"]),
                     "ratio": None, "target": "minutes, not hours", "met": lg["analyze"]["seconds"] < 3600,
                     "note": "every table with its intervals; one run"})
    if "duration_s" in results:
        rows.append({"figure": "whole benchmark", "tokentrail": _fmt_s(results["duration_s"]), "other": "",
                     "ratio": None, "target": "< 20 min", "met": results["duration_s"] < 1200})
    return rows


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Measured {results['finished']} on {m['cpu']} ({m['usable_cpus']} CPUs, "
        f"{(m['memory_bytes'] or 0) / GiB:.0f} GiB, {m['torch_threads']} torch threads"
        + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU") + f"), torch {m['torch']}, "
        f"transformers {m['transformers']}; median of {results['config']['repeats']} runs after a warm-up"
        + (" (quick mode: small sizes)" if results["config"]["quick"] else "") + ".",
        "",
        "| Figure | tokentrail | other | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["targets"]:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        met = {True: "yes", False: "**no**", None: ""}[row["met"]]
        note = f" ({row['note']})" if row.get("note") else ""
        lines.append(f"| {row['figure']}{note} | {row['tokentrail']} | {row['other']} | {ratio} | "
                     f"{row['target']} | {met} |")
    return "\n".join(lines) + "\n"


def update_doc(table: str) -> bool:
    if not DOC.exists():
        return False
    text = DOC.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{table}{END}{tail}", encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the benchmark, not the tool")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 5)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts in the throughput section (200)")
    parser.add_argument("--max-tokens", type=int, default=48, help="longest prompt in the throughput section")
    parser.add_argument("--batch-size", type=lambda v: None if v == "auto" else int(v), default=16,
                        help="tokentrail's batch size, or auto (default 16, the CLI's default)")
    parser.add_argument("--large-models", default="default",
                        help="models for the large-preset section, comma-separated (default: the embedded one)")
    parser.add_argument("--memory-prompts", type=int, default=None)
    parser.add_argument("--memory-tokens", type=int, default=None)
    parser.add_argument("--projection-prompts", type=int, default=None)
    parser.add_argument("--projection-batch", type=int, default=1024, help="prompts per streamed batch")
    parser.add_argument("--store-shards", type=int, default=None, help="shards in the store section (10,000)")
    parser.add_argument("--store-per-shard", type=int, default=100, help="prompts per shard in the store section")
    parser.add_argument("--store-hidden", type=int, default=128, help="hidden size of the store section's states")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default benchmarks/results/latest.json; --quick: a temporary file)")
    parser.add_argument("--no-doc", action="store_true", help="leave docs/performance.md alone")
    args = parser.parse_args(argv)
    quick = args.quick
    args.repeats = args.repeats or (2 if quick else 5)
    args.prompts = args.prompts or (24 if quick else 200)
    args.memory_prompts = args.memory_prompts or (4 if quick else 32)
    args.memory_tokens = args.memory_tokens or (128 if quick else 2048)
    args.projection_prompts = args.projection_prompts or (2000 if quick else 100_000)
    args.store_shards = args.store_shards or (40 if quick else 10_000)
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "tokentrail-bench-quick.json" if quick else HERE / "results" / "latest.json"
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")

    started = time.perf_counter()
    results: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
    }
    section_seconds = {}
    for name in SECTIONS:
        if name not in chosen:
            continue
        section_started = time.perf_counter()
        log(f"section {name}")
        results[name] = globals()[name](args)
        section_seconds[name] = time.perf_counter() - section_started
        log(f"section {name} took {section_seconds[name]:.0f} s")
    results["section_seconds"] = section_seconds
    results["duration_s"] = time.perf_counter() - started
    results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["targets"] = targets(results)
    table = markdown(results)
    results["markdown"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)
    print(table)
    if not args.no_doc and set(chosen) == set(SECTIONS) and not quick and update_doc(table):
        log(f"table written into {DOC.relative_to(ROOT)}")
    log(f"results: {args.out} ({results['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
