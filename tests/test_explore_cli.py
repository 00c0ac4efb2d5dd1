"""`tokentrail explore` as a user runs it: a subprocess that serves a run until Ctrl-C, and one clear line with exit
status 2 for what it cannot serve."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import traced_run

PROMPTS = "# math\n2 + 2 =\n7 * 6 =\n# story\nOnce upon a time\nThe sun set over the hills\n"
ENTRY = "from tokentrail.cli import entry; entry()"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return traced_run(tmp_path_factory.mktemp("explore-cli"), tiny_model_dir, PROMPTS)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ENTRY, "explore", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _info(port: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5) as response:
                info = json.loads(response.read())
            if info["model_status"] != "loading":
                return info
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("explore did not answer in time")
        time.sleep(0.2)


def _stop(server: subprocess.Popen) -> tuple[int, str, str]:
    server.send_signal(signal.SIGINT)
    try:
        out, err = server.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        out, err = server.communicate()
        raise AssertionError(f"Ctrl-C did not stop explore: {err}") from None
    return server.returncode, out, err


def test_serves_a_run_and_stops_cleanly_on_ctrl_c(run_dir, tmp_path):
    port = _free_port()
    server = _start(str(run_dir), "--port", str(port), cwd=tmp_path)
    try:
        info = _info(port)
        assert info["model_status"] == "ready" and info["n_prompts"] == 4
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/trace", method="POST",
                                         data=json.dumps({"prompt": "7 * 6 ="}).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["prompt"] == "7 * 6 ="
    finally:
        code, out, err = _stop(server)
    assert code == 0, err
    assert f"http://127.0.0.1:{port}/" in out and "Traceback" not in err


def test_binding_beyond_this_machine_is_warned_about(run_dir, tmp_path):
    port = _free_port()
    server = _start(str(run_dir), "--host", "0.0.0.0", "--port", str(port), cwd=tmp_path)
    try:
        _info(port)
    finally:
        code, _, err = _stop(server)
    assert code == 0 and "not only this machine" in err


def _refused(args: list[str], cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", ENTRY, "explore", *args], cwd=cwd, capture_output=True, check=False,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_what_it_cannot_serve_is_one_line_and_exit_2(run_dir, tmp_path):
    assert "not a tokentrail run" in _refused([str(tmp_path)], tmp_path)
    assert "no such run directory" in _refused([str(tmp_path / "missing")], tmp_path)
    assert "--port" in _refused([str(run_dir), "--port", "70000"], tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        line = _refused([str(run_dir), "--port", str(taken.getsockname()[1])], tmp_path)
    assert "cannot serve on 127.0.0.1" in line
