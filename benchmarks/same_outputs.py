"""Does a refactoring change any number? Run `tokentrail run` on both seed presets with an older revision and
with the working tree, and compare `metrics/*.csv` byte for byte and `summary.json` key by key.

    python benchmarks/same_outputs.py a610aed^        # the revision before the issue-16 reshaping

The older revision is checked out into a temporary git worktree and imported through PYTHONPATH, with this
checkout's interpreter and packages, so the only difference is tokentrail's own source. Keys of summary.json
that the newer code adds on purpose are listed with `--allow-new-keys`; everything else must be identical.
Exit status 0 when all outputs match, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ("seed-spectrum", "seed-categories")


def _run(source: Path, preset: str, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(source), "MPLBACKEND": "Agg"}
    command = "import sys; from tokentrail.cli import main; sys.exit(main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", command, "run", "--preset", preset, "--out", str(out), "--quiet"],
                   check=True, env=env, cwd=out.parent)


def _summary(path: Path, allowed: set[str]) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    return {key: value for key, value in data.items() if key not in allowed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="older revision to compare with, e.g. a610aed^")
    parser.add_argument("--allow-new-keys", default="analysis_layers",
                        help="comma-separated summary.json keys the newer code may add (default: analysis_layers)")
    args = parser.parse_args()
    allowed = {key for key in args.allow_new_keys.split(",") if key}
    differences = 0
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        old_tree = scratch_dir / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old_tree), args.revision],
                       check=True)
        try:
            for preset in PRESETS:
                runs = {}
                for name, source in (("old", old_tree / "src"), ("new", ROOT / "src")):
                    runs[name] = scratch_dir / f"{name}-{preset}"
                    _run(source, preset, runs[name])
                old_files = sorted(p.name for p in (runs["old"] / "metrics").glob("*.csv"))
                new_files = sorted(p.name for p in (runs["new"] / "metrics").glob("*.csv"))
                if old_files != new_files:
                    print(f"{preset}: metrics files differ: {old_files} vs {new_files}")
                    differences += 1
                for name in old_files:
                    same = (runs["old"] / "metrics" / name).read_bytes() == (runs["new"] / "metrics" / name).read_bytes()
                    print(f"{preset}: metrics/{name}: {'identical' if same else 'DIFFERENT'}")
                    differences += not same
                old_summary = _summary(runs["old"] / "summary.json", allowed)
                new_summary = _summary(runs["new"] / "summary.json", allowed)
                same = old_summary == new_summary
                print(f"{preset}: summary.json without {sorted(allowed)}: {'identical' if same else 'DIFFERENT'}")
                differences += not same
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=False)
    print("all outputs identical" if not differences else f"{differences} difference(s)")
    return 1 if differences else 0


if __name__ == "__main__":
    raise SystemExit(main())
