"""`--dtype auto`: bfloat16 where the device computes it natively, float32 elsewhere, and the dtype used is the one
recorded (fingerprint, store, run.json, `info`), with the request beside it.

The decision is tested with the hardware faked (cpu flags, CUDA), never on what this machine happens to have.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from tokentrail import cli
from tokentrail.errors import ModelLoadError
from tokentrail.models import DTYPE_CHOICES, auto_dtype, cpu_flags, dtype_name, load_model, resolve_dtype
from tokentrail.models import sources as models
from tokentrail.runs import ModelSettings
from tokentrail.store import TraceStore

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512_bf16 avx512_vnni
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid bf16 i8mm
"""


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
        ({"avx2", "amx_tile", "amx_bf16"}, "bfloat16"),
        ({"fp", "asimd", "bf16"}, "bfloat16"),  # arm64 with bf16
        ({"avx2", "avx512f", "avx512_vnni"}, "float32"),  # AVX-512 without its bf16 instructions
        ({"fp", "asimd"}, "float32"),  # arm64 without bf16
        (set(), "float32"),  # not Linux, or /proc/cpuinfo unreadable
    ],
)
def test_auto_on_cpu_follows_the_bf16_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(models, "cpu_flags", lambda: set(flags))
    assert auto_dtype("cpu") == expected
    assert dtype_name("auto", "cpu") == expected
    assert resolve_dtype("auto") == {"bfloat16": torch.bfloat16, "float32": torch.float32}[expected]


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    x86, arm = tmp_path / "x86", tmp_path / "arm"
    x86.write_text(X86_CPUINFO)
    arm.write_text(ARM_CPUINFO)
    assert {"avx512f", "avx512_bf16"} <= cpu_flags(x86) and "bf16" not in cpu_flags(x86)
    assert {"asimd", "bf16"} <= cpu_flags(arm)
    assert cpu_flags(tmp_path / "missing") == set()


def _fake_cuda(monkeypatch, capability: int, emulated: bool = True):
    """A CUDA device of compute capability `capability`.x; older ones run bfloat16 only emulated (or not)."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return capability >= 8 or (including_emulation and emulated)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


@pytest.mark.parametrize(("capability", "expected"), [(9, "bfloat16"), (8, "bfloat16"), (7, "float32")])
def test_auto_on_cuda_needs_native_bf16(monkeypatch, capability, expected):
    _fake_cuda(monkeypatch, capability)
    monkeypatch.setattr(models, "cpu_flags", lambda: set())  # the CPU's flags do not decide for a GPU
    assert auto_dtype("cuda") == expected
    assert auto_dtype(torch.device("cuda", 0)) == expected
    assert dtype_name("auto", "auto") == expected  # --device auto picks the GPU
    assert dtype_name("auto", "cpu", device_map="auto") == expected  # a device map fills the GPUs


def test_auto_without_cuda_or_on_mps_is_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_dtype("cuda") == "float32"
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx512_bf16"})
    assert auto_dtype("mps") == "float32"


def test_explicit_dtypes_pass_through_and_typos_are_refused(monkeypatch):
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx512_bf16"})
    for name in ("float32", "bfloat16", "float16"):
        assert dtype_name(name) == name
    assert DTYPE_CHOICES == ("float32", "bfloat16", "float16", "auto")
    with pytest.raises(ModelLoadError, match=r"^unknown dtype 'bf16'; choose one of float32, bfloat16, float16, auto$"):
        dtype_name("bf16")


@pytest.mark.parametrize(("flags", "expected"), [({"avx512_bf16"}, "bfloat16"), (set(), "float32")])
def test_model_settings_resolve_auto_before_the_fingerprint(monkeypatch, tiny_model_dir, flags, expected):
    monkeypatch.setattr(models, "cpu_flags", lambda: set(flags))
    settings = ModelSettings(spec=str(tiny_model_dir), dtype="auto")
    assert (settings.dtype, settings.dtype_requested) == (expected, "auto")
    assert settings.fingerprint()["dtype"] == expected
    assert asdict(settings)["dtype"] == expected
    plain = ModelSettings(spec=str(tiny_model_dir), dtype="float32")
    assert plain.dtype_requested is None and plain.fingerprint()["dtype"] == "float32"
    # The same weights under another dtype are another model to a store.
    assert settings.fingerprint() != ModelSettings(spec=str(tiny_model_dir), dtype="float16").fingerprint()


def test_load_model_records_the_dtype_it_used(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(models, "cpu_flags", lambda: {"amx_bf16"})
    loaded = load_model(str(tiny_model_dir), dtype="auto")
    assert loaded.fingerprint["dtype"] == "bfloat16"
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def _reference_states(model_dir, texts, dtype):
    """The model's own output_hidden_states of each prompt's last token, layers 0..L-1 (before the final norm)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    rows = []
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            rows.append(np.stack([h[0, -1].float().numpy() for h in hidden[:-1]]))
    return np.stack(rows)


def test_cli_traces_with_auto_and_records_both(monkeypatch, tmp_path, tiny_model_dir, capsys):
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx512_bf16"})
    texts = ["2 + 2 =", "7 * 6 =", "Once upon a time", "The sun set over the hills"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# math\n" + "\n".join(texts[:2]) + "\n# story\n" + "\n".join(texts[2:]) + "\n")
    run_dir = tmp_path / "run"
    assert cli.main(["trace", str(prompts), "--model", str(tiny_model_dir), "--out", str(run_dir), "-q",
                     "--dtype", "auto", "--batch-size", "1"]) == 0

    run = json.loads((run_dir / "run.json").read_text())
    assert run["model"]["dtype"] == "bfloat16" and run["model"]["dtype_requested"] == "auto"
    assert run["model"]["fingerprint"]["dtype"] == "bfloat16"
    store = TraceStore.open(run_dir / "store")
    assert store.header["model"]["dtype"] == "bfloat16"

    # The stored states are bfloat16's: equal to the model's own bfloat16 forward pass, not to float32's.
    states = store.load(texts, prompt_ids=[str(i) for i in range(4)], categories=["m", "m", "s", "s"], labels=[""] * 4).states
    n_blocks = states.shape[1] - 1
    bf16 = _reference_states(tiny_model_dir, texts, torch.bfloat16)
    f32 = _reference_states(tiny_model_dir, texts, torch.float32)
    traced = states[:, :n_blocks]
    scale = np.abs(f32).max()
    assert np.abs(traced - bf16).max() <= 1e-6 * scale
    assert np.abs(traced - f32).max() > 1e-4 * scale

    capsys.readouterr()
    monkeypatch.setattr(cli.out, "_width", 200)  # one table row per line, whatever the terminal
    assert cli.main(["info", str(run_dir)]) == 0
    dtype_row = next(line for line in capsys.readouterr().out.splitlines() if " dtype " in line)
    assert "bfloat16 (chosen by --dtype auto)" in dtype_row

    # Traced again with --dtype float32, the same store is refused: its states are bfloat16's.
    capsys.readouterr()
    assert cli.main(["trace", str(prompts), "--model", str(tiny_model_dir), "--out", str(run_dir), "-q",
                     "--dtype", "float32"]) == 2
    assert "(bfloat16)" in capsys.readouterr().err


def test_cli_auto_without_bf16_traces_float32(monkeypatch, tmp_path, tiny_model_dir, capsys):
    monkeypatch.setattr(models, "cpu_flags", lambda: set())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# math\n2 + 2 =\n7 * 6 =\n# story\nOnce upon a time\nThe sun set\n")
    run_dir = tmp_path / "run"
    assert cli.main(["trace", str(prompts), "--model", str(tiny_model_dir), "--out", str(run_dir), "-q",
                     "--dtype", "auto"]) == 0
    run = json.loads((run_dir / "run.json").read_text())
    assert (run["model"]["dtype"], run["model"]["dtype_requested"]) == ("float32", "auto")
    assert TraceStore.open(run_dir / "store").header["model"]["dtype"] == "float32"


def test_cli_unknown_dtype_is_one_line_listing_auto(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("2 + 2 =\n")
    capsys.readouterr()
    code = cli.main(["trace", str(prompts), "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"), "-q",
                     "--dtype", "bf16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["error: unknown dtype 'bf16'; choose one of float32, bfloat16, float16, auto"]
    assert not (tmp_path / "run").exists()
