"""The tracer on a CUDA GPU gives the CPU's states (float32) and close ones in bfloat16.

Skipped where no GPU is present (CI has none); run on a GPU machine with
`PYTHONPATH=src python -m pytest tests/test_gpu.py`.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import ARCHITECTURES
from tokentrail.models import from_objects, load_model
from tokentrail.tracing import TraceOptions, Tracer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ["The capital of France is", "def f(x):", "If John has 50 apples and gives 12 to Mary, he has", "Solve"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cuda_states_equal_cpu_states(tiny_loaded, arch):
    cpu = tiny_loaded(arch)
    gpu_model = copy.deepcopy(cpu.model).to("cuda")
    gpu = from_objects(gpu_model, cpu.tokenizer, name=f"tiny-{arch}-cuda")
    assert gpu.device.type == "cuda"
    on_cpu = Tracer(cpu, TraceOptions(top_k=3), batch_size=4).trace(PROMPTS)
    on_gpu = Tracer(gpu, TraceOptions(top_k=3), batch_size=4).trace(PROMPTS)
    scale = np.abs(on_cpu.states).max(axis=-1, keepdims=True)
    assert np.max(np.abs(on_gpu.states - on_cpu.states) / scale) < 1e-3
    assert (on_gpu.next_token_ids[:, 0] == on_cpu.next_token_ids[:, 0]).all()
    assert (on_gpu.lens_token_ids[:, -1, 0] == on_cpu.lens_token_ids[:, -1, 0]).all()
    # The hooks hand back CPU float32 arrays whatever the device.
    assert on_gpu.states.dtype == np.float32


def test_load_on_cuda_in_bfloat16(tiny_model_dir):
    cpu = load_model(str(tiny_model_dir))
    gpu = load_model(str(tiny_model_dir), device="cuda", dtype="bfloat16")
    assert gpu.device.type == "cuda" and next(gpu.model.parameters()).dtype == torch.bfloat16
    full = Tracer(cpu, TraceOptions()).trace(PROMPTS)
    half = Tracer(gpu, TraceOptions()).trace(PROMPTS)
    cosine = np.sum(full.states * half.states, -1) / (
        np.linalg.norm(full.states, axis=-1) * np.linalg.norm(half.states, axis=-1)
    )
    assert cosine.min() > 0.99
    auto = load_model(str(tiny_model_dir), device="auto")
    assert auto.device.type == "cuda"
