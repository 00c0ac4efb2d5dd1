"""Reading a run never loads torch or transformers: analyze, plot, report, info, export, project, and a rerun
that has nothing to trace, each in a fresh interpreter that reports what it imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokentrail import cli

PROMPTS = "# math\n2 + 2 =\n7 * 6 =\n# story\nOnce upon a time\nThe sun set over the hills\n"
PROBE = """
import json, sys
from tokentrail.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def traced(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("torch-free")
    (folder / "prompts.txt").write_text(PROMPTS)
    assert cli.main(["run", str(folder / "prompts.txt"), "--model", str(tiny_model_dir), "--out",
                     str(folder / "run"), "-q", "--permutations", "9"]) == 0
    return folder


@pytest.mark.parametrize("command", [
    ["analyze", "run", "--permutations", "9"],
    ["plot", "run"],
    ["report", "run"],
    ["info", "run"],
    ["export", "run", "--to", "states.npz"],
    ["project", "run"],
    ["trace", "prompts.txt", "--model", "MODEL", "--out", "run", "-q"],
    ["run", "prompts.txt", "--model", "MODEL", "--out", "run", "-q", "--permutations", "9"],
])
def test_reading_a_run_imports_no_torch(traced, tiny_model_dir, command):
    argv = [str(tiny_model_dir) if part == "MODEL" else part for part in command]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=traced, env=env, capture_output=True,
                            text=True, check=False)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}, result.stderr
