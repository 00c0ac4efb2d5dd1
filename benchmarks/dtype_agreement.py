"""bfloat16 against float32: how much faster, and how much the traced numbers and the analysis change.

For each embedded model that is installed and each preset, the model is loaded in float32 and in bfloat16
(`load_model(spec, dtype=...)`), the preset traced with the default TraceOptions (as `tokentrail run` does),
and compared:

* trace time: the best and the median of --repeats traces after one warm-up, the two dtypes alternating round
  by round so that a machine getting busier or quieter shifts both alike (on a shared machine the best of the
  repeats is the one least disturbed by other work, so the table shows it);
* state error: for every prompt and layer, ||bf16 - f32|| / ||f32|| over the hidden dimension; median and max;
* next token: the fraction of prompts whose top-1 next token is the same;
* analysis: `analyze_states` with the default AnalysisOptions on each dtype's states: best separation layer,
  kNN accuracy and silhouette there, and the largest silhouette difference over all layers.

Writes benchmarks/results/dtype_agreement.json and prints a markdown table. The load average (`uptime`) is
recorded before and after: on a shared machine the timing ratios are indicative only.

    python benchmarks/dtype_agreement.py [--repeats 5] [--models default,gemma3-270m]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "dtype_agreement.json"
PRESETS = ("seed-categories", "seed-spectrum")
MODELS = ("default", "gemma3-270m")
DTYPES = ("float32", "bfloat16")


def log(message: str) -> None:
    print(f"[dtype {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def relative_errors(test: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """||test - reference|| / ||reference|| over the last axis: one number per prompt and layer."""
    test, reference = test.astype(np.float64), reference.astype(np.float64)
    return np.linalg.norm(test - reference, axis=-1) / np.linalg.norm(reference, axis=-1)


def analysis(trace) -> dict[str, Any]:
    from tokentrail.analysis.pipeline import AnalysisOptions, analyze_states

    result = analyze_states(trace.states, trace.final_states, trace.categories, AnalysisOptions(),
                            token_states=trace.token_states)
    best = result.summary["best_separation_layer"]
    return {
        "best_layer": best,
        "knn_accuracy": float(result.summary["best_knn_accuracy"]),
        "silhouette": float(result.summary["best_silhouette"]),
        "silhouette_by_layer": [float(x) for x in result.separation["silhouette"]],
        "knn_accuracy_by_layer": [float(x) for x in result.separation["knn_accuracy"]],
    }


def measure(spec: str, presets: list[str], repeats: int) -> dict[str, Any]:
    from tokentrail.models import load_model
    from tokentrail.prompts import load_preset
    from tokentrail.tracing import TraceOptions, Tracer

    tracers = {}
    for dtype in DTYPES:
        loaded = load_model(spec, dtype=dtype)
        log(f"{spec} {dtype}: loaded in {loaded.load_seconds:.1f} s")
        tracers[dtype] = Tracer(loaded, TraceOptions())
    rows = {}
    for name in presets:
        prompts = load_preset(name)
        traces, times = {}, {dtype: [] for dtype in DTYPES}
        for dtype in DTYPES:  # warm-up, and the traces that are compared
            traces[dtype] = tracers[dtype].trace(prompts.texts, prompts.ids, prompts.categories, prompts.labels)
        for round_ in range(repeats):
            for dtype in (DTYPES if round_ % 2 == 0 else DTYPES[::-1]):
                started = time.perf_counter()
                tracers[dtype].trace(prompts.texts, prompts.ids, prompts.categories, prompts.labels)
                times[dtype].append(time.perf_counter() - started)
        f32, b16 = traces["float32"], traces["bfloat16"]
        errors = relative_errors(b16.states, f32.states)  # [prompts, layers]
        final_errors = relative_errors(b16.final_states, f32.final_states)
        seconds = {dtype: float(min(times[dtype])) for dtype in DTYPES}
        seconds_median = {dtype: float(statistics.median(times[dtype])) for dtype in DTYPES}
        found = {dtype: analysis(traces[dtype]) for dtype in DTYPES}
        row = {
            "prompts": len(prompts),
            "layers": int(f32.states.shape[1]),
            "seconds": seconds,
            "seconds_median": seconds_median,
            "all_seconds": times,
            "speedup": seconds["float32"] / seconds["bfloat16"],
            "speedup_median": seconds_median["float32"] / seconds_median["bfloat16"],
            "state_rel_error_median": float(np.median(errors)),
            "state_rel_error_max": float(errors.max()),
            "state_rel_error_max_layer": int(np.unravel_index(errors.argmax(), errors.shape)[1]),
            "state_rel_error_median_by_layer": [float(x) for x in np.median(errors, axis=0)],
            "final_state_rel_error_median": float(np.median(final_errors)),
            "final_state_rel_error_max": float(final_errors.max()),
            "top1_agreement": float(np.mean(f32.next_token_ids[:, 0] == b16.next_token_ids[:, 0])),
            "analysis": found,
            "silhouette_max_abs_diff": float(np.max(np.abs(
                np.subtract(found["float32"]["silhouette_by_layer"], found["bfloat16"]["silhouette_by_layer"])))),
        }
        rows[name] = row
        log(f"{spec} {name}: f32 {seconds['float32']:.2f} s, bf16 {seconds['bfloat16']:.2f} s, "
            f"median error {row['state_rel_error_median']:.2%}, max {row['state_rel_error_max']:.2%}")
    return {"fingerprints": {d: tracers[d].loaded.fingerprint for d in DTYPES}, "presets": rows}


def table(results: dict[str, Any]) -> str:
    lines = [
        ("| model | preset (prompts) | f32 s | bf16 s | speed-up | state error median / max | top-1 same "
         "| best layer f32 / bf16 | kNN f32 / bf16 | silhouette f32 / bf16 | max Δ silhouette (any layer) |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model, measured in results["models"].items():
        for preset, row in measured["presets"].items():
            a, b = row["analysis"]["float32"], row["analysis"]["bfloat16"]
            lines.append(
                f"| {model} | {preset} ({row['prompts']}) | {row['seconds']['float32']:.2f} | "
                f"{row['seconds']['bfloat16']:.2f} | {row['speedup']:.1f}x | "
                f"{row['state_rel_error_median']:.2%} / {row['state_rel_error_max']:.1%} | "
                f"{row['top1_agreement']:.0%} | {a['best_layer']} / {b['best_layer']} | "
                f"{a['knn_accuracy']:.2f} / {b['knn_accuracy']:.2f} | "
                f"{a['silhouette']:.3f} / {b['silhouette']:.3f} | {row['silhouette_max_abs_diff']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    from tokentrail.models import auto_dtype, embedded_models

    installed = {row["name"] for row in embedded_models() if row["installed"]} | {"default"}
    results: dict[str, Any] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "auto_dtype_cpu": auto_dtype("cpu")},
        "uptime_before": uptime(),
        "repeats": args.repeats,
        "models": {},
        "not_installed": [],
    }
    log(results["uptime_before"])
    for spec in args.models.split(","):
        if spec not in installed:
            log(f"{spec}: not installed, skipped")
            results["not_installed"].append(spec)
            continue
        results["models"][spec] = measure(spec, args.presets.split(","), args.repeats)
    results["uptime_after"] = uptime()
    log(results["uptime_after"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nload before: {results['uptime_before']}\nload after:  {results['uptime_after']}")


if __name__ == "__main__":
    main()
