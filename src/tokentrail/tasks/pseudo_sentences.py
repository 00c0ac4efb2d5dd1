"""Pseudo-sentences for the Lines-of-Thought replication: consecutive chunks of real English prose, built offline.

The paper cuts Thoreau's *Walden* into non-overlapping 50-token chunks. Nothing may be downloaded here, so the prose
is the one every Python installation ships: the docstrings of the standard library's modules, classes and
functions (PSF licence). They are read with `ast` from the library's source files in a fixed order (modules by
name, then docstrings in source order), reduced to prose (doctest lines, reST directives and lines without a
letter are dropped, whitespace collapsed), joined, and cut into chunks of `words` words. Words rather than tokens
keep this free of any tokenizer; 30 words are about 40 tokens for the embedded models.

The same Python version gives the same sentences; another version's docstrings differ, and `source` in the
prompt set records the version.
"""

from __future__ import annotations

import ast
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CATEGORY", "PseudoSentences", "pseudo_sentences", "stdlib_files"]

CATEGORY = "stdlib-prose"
_MARKUP = re.compile(r"^\s*(>>>|\.\.\.|\.\. |:[a-z]+:|[-=~^*#]{3,})")


# Packages whose text is not the library's own prose or code: tests, the IDE, tools, bundled wheels.
_SKIPPED_PACKAGES = {"test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "site-packages"}


def stdlib_files() -> list[Path]:
    """The standard library's public source files in a fixed order: its top-level modules by name, then each
    folder's files (private ones and `_SKIPPED_PACKAGES` left out). Shared by the pseudo-sentences and the large
    presets."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [path for path in sorted(root.glob("*.py")) if not path.name.startswith("_")]
    for package in sorted(p for p in root.iterdir() if p.is_dir()):
        if package.name not in _SKIPPED_PACKAGES and not package.name.startswith("_"):
            files.extend(sorted(package.rglob("*.py")))
    return files


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=True)
            if text:
                yield text


def _prose(docstring: str) -> str:
    lines = []
    for line in docstring.splitlines():
        if _MARKUP.match(line) or not re.search(r"[A-Za-z]{2}", line):
            continue
        lines.append(line.strip())
    return " ".join(" ".join(lines).split())


@dataclass(frozen=True)
class PseudoSentences:
    """The chunks, in order, with where they come from (`source`) and a one-line `description`."""

    texts: list[str]
    source: str
    description: str


def pseudo_sentences(count: int = 500, words: int = 30) -> PseudoSentences:
    """The first `count` non-overlapping chunks of `words` words of standard-library prose (module docstring)."""
    if count < 2:
        raise ValueError(f"need at least 2 pseudo-sentences, got {count}")
    if words < 2:
        raise ValueError(f"a pseudo-sentence needs at least 2 words, got {words}")
    chunks: list[str] = []
    buffer: list[str] = []
    for path in stdlib_files():
        for docstring in _docstrings(path):
            buffer.extend(_prose(docstring).split())
            while len(buffer) >= words and len(chunks) < count:
                chunks.append(" ".join(buffer[:words]))
                del buffer[:words]
            if len(chunks) >= count:
                break
        if len(chunks) >= count:
            break
    if len(chunks) < count:
        raise ValueError(f"the standard library's docstrings hold only {len(chunks)} chunks of {words} words")
    unique = list(dict.fromkeys(chunks))  # a repeated chunk would trace the same trajectory twice
    version = ".".join(map(str, sys.version_info[:3]))
    return PseudoSentences(texts=unique, source=f"python-{version}-stdlib-docstrings",
                           description=f"{len(unique)} chunks of {words} words of Python {version} standard-library "
                                       "docstrings (PSF licence)")
