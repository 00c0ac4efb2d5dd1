"""Text for the terminal: user text (prompts, ids, categories, labels, paths) is shown, never obeyed.

Prompt sets are full of text that a terminal or rich would otherwise act on: `[bold]` and `[/]` in chat
templates (rich console markup), `:smile:` (rich emoji codes), and escape sequences that clear the screen, set
the window title or hide what follows. Everything tokentrail prints goes through one of the consoles made here:
markup, emoji codes and highlighting are off, and every control character is shown as an escape (`\\x1b`), so
what reaches the terminal is exactly the characters a user can read. The store, the exports and the HTML keep
the exact text; only the terminal view is escaped.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


# C0 controls, DEL and C1 controls (Unicode category Cc), the line and paragraph separators (Zl, Zp), and the
# bidirectional marks, overrides and isolates, which reorder what is shown after them so that a prompt could
# display as other text than it holds.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: Any) -> str:
    """`text` with every control character written as an escape (`\\x1b`, `\\n`, `\\u2028`): one line, inert."""
    return _CONTROL.sub(_escape, str(text))


def _visible_lines(text: str) -> str:
    """Like `visible`, but keeps line breaks: for tokentrail's own multi-line output."""
    return "\n".join(visible(line) for line in text.split("\n"))


class SafeConsole(Console):
    """A rich console that never interprets what it prints: no markup, no emoji codes, no highlighting, and
    control characters escaped in every string it renders (messages and table cells alike). Styles come only
    from `Text` objects that tokentrail builds itself."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("markup", False)
        kwargs.setdefault("emoji", False)
        kwargs.setdefault("highlight", False)
        super().__init__(**kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Text:
        # Every string printed or put in a table cell comes through here; markup is refused whatever the caller
        # asked for, since no caller should hand user text to the markup parser.
        kwargs["markup"] = False
        kwargs["emoji"] = False
        return super().render_str(_visible_lines(text), **kwargs)


def warning_text(message: str) -> Text:
    """`warning: MESSAGE` with the label styled and the message inert."""
    return Text.assemble(("warning: ", "yellow"), visible(message))


class VisibleFormatter(logging.Formatter):
    """Log records as one inert line each: library messages can quote prompt text too."""

    def format(self, record: logging.LogRecord) -> str:
        return visible(super().format(record))


class _RateColumn(TextColumn):
    """Items per second, the figure a user compares between models and machines."""

    def __init__(self, unit: str) -> None:
        super().__init__("")
        self.unit = unit

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.elapsed and task.completed:
            speed = task.completed / task.elapsed  # rich needs several updates before it estimates a speed
        return Text("" if speed is None else f"{speed:6.1f} {self.unit}/s")


def progress_bar(label: str, unit: str, console: Console | None = None, disable: bool = False) -> Progress:
    """The one progress bar: `label`, the task's description (user text: shown as data, never as markup), the
    bar, done/total, the rate in `unit` per second and the time left; on stderr unless `console` says else."""
    return Progress(
        TextColumn(label, style="bold"),
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(unit),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console or SafeConsole(stderr=True),
        transient=False,
        disable=disable,
    )
