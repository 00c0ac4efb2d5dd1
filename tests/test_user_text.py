"""User text is data: prompts, ids and categories that look like rich markup, emoji codes or terminal escape
sequences reach the terminal as the characters they are, and the store, the export and the HTML keep them
exactly (the HTML escaped).

The end-to-end test runs `tokentrail run` on a real pseudo-terminal, so rich behaves as it does for a user (colours
on, terminal width), and reads every byte that reached the terminal.
"""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.table import Table

from tokentrail.terminal import SafeConsole, visible

# YAML double-quoted escapes: \e is ESC, \a is BEL. Each text is short enough for the run table's 50 characters.
PROMPTS_YAML = r'''
prompts:
  - {id: "[/]open", category: "[bold]loud[/bold]", text: "[bold red]shout[/] and [/] here"}
  - {id: "title", category: "[bold]loud[/bold]", text: "\e]0;pwned\a set the title"}
  - {id: "clear", category: "plain :smile:", text: "\e[2J\e[H cleared the screen"}
  - {id: "emoji", category: "plain :smile:", text: "Hi :smile: <script>alert(1)</script>"}
'''
TEXTS = ["[bold red]shout[/] and [/] here", "\x1b]0;pwned\x07 set the title", "\x1b[2J\x1b[H cleared the screen",
         "Hi :smile: <script>alert(1)</script>"]


def test_visible_escapes_every_control_character():
    assert visible("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert visible("tab\tnew\nline\rend") == "tab\\tnew\\nline\\rend"
    assert visible("\x07\x7f\x85\u2028\u2029") == "\\x07\\x7f\\x85\\u2028\\u2029"
    assert visible("\u202eevil\u2066") == "\\u202eevil\\u2066"  # bidi overrides reorder what follows them
    assert visible("[bold]:smile: café 中文 🙂") == "[bold]:smile: café 中文 🙂"  # printable text is untouched


def test_safe_console_renders_markup_and_escapes_as_text():
    buffer = io.StringIO()
    console = SafeConsole(file=buffer, width=200, force_terminal=True, color_system="truecolor")
    table = Table("id", "prompt")
    table.add_row("[/]", "\x1b]0;pwned\x07 [bold red]shout[/] :smile:")
    console.print(table)
    console.print("warning: [red]not red[/] \x1b[2J")
    shown = buffer.getvalue()
    assert "\x1b]" not in shown and "\x1b[2J" not in shown and "\x07" not in shown
    assert "\\x1b]0;pwned\\x07 [bold red]shout[/] :smile:" in shown and "🙂" not in shown
    assert "[red]not red[/] \\x1b[2J" in shown


def read_terminal(argv: list[str], cwd: Path, timeout: float = 600) -> tuple[int, bytes]:
    """Run a command with stdin, stdout and stderr on a new pseudo-terminal; every byte written to it."""
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "220", "LINES": "50", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=follower, stdout=follower, stderr=follower,
                               close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], timeout)
        if not ready:
            process.kill()
            pytest.fail(f"{argv} wrote nothing for {timeout} s")
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's last writer has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=60), b"".join(chunks)


def test_run_on_a_terminal_shows_user_text_inert(tmp_path, tiny_model_dir):
    (tmp_path / "prompts.yaml").write_text(PROMPTS_YAML)
    code, shown = read_terminal([sys.executable, "-c", "from tokentrail.cli import entry; entry()", "run",
                                 "prompts.yaml", "--model", str(tiny_model_dir), "--out", "run", "-q",
                                 "--permutations", "9"], cwd=tmp_path)
    text = shown.decode("utf-8", errors="replace")
    assert code == 0, text
    # Rich may colour its own output (SGR: ESC [ ... m); any other escape sequence came from the prompts.
    assert re.sub(rb"\x1b\[[0-9;]*m", b"", shown).count(b"\x1b") == 0, text
    assert b"\x07" not in shown
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    for expected in ("[bold red]shout[/] and [/] here", "\\x1b]0;pwned\\x07 set the title",
                     "\\x1b[2J\\x1b[H cleared the screen", "Hi :smile: <script>alert(1)</script>", "[/]open",
                     "[bold]loud[/bold]", "plain :smile:"):
        assert expected in plain, (expected, plain)
    assert "🙂" not in plain and "😄" not in plain
    # The store and the export keep the exact text; the report escapes it as HTML.
    export = subprocess.run([sys.executable, "-c", "from tokentrail.cli import entry; entry()", "export", "run",
                             "--to", "states.npz"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert export.returncode == 0, export.stderr
    with np.load(tmp_path / "states.npz", allow_pickle=False) as data:
        assert data["prompts"].tolist() == TEXTS
        assert data["prompt_ids"].tolist() == ["[/]open", "title", "clear", "emoji"]
        assert data["categories"].tolist() == ["[bold]loud[/bold]"] * 2 + ["plain :smile:"] * 2
    page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
