"""Prompt sets: load, validate and identify the prompts a run traces.

A prompt file is YAML, JSON, CSV (`category,prompt[,id][,label]`) or plain text (one prompt per line, optional
`# category` header lines). Built-in presets live in `presets/` as YAML.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tokentrail.errors import PromptFileError

DEFAULT_CATEGORY = "uncategorized"


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    category: str
    label: str = ""


@dataclass
class PromptSet:
    name: str
    prompts: list[Prompt]
    description: str = ""
    source: str = ""
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.prompts]

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    @property
    def categories(self) -> list[str]:
        return [p.category for p in self.prompts]

    @property
    def labels(self) -> list[str]:
        return [p.label for p in self.prompts]

    def to_records(self) -> list[dict[str, str]]:
        return [{"id": p.id, "text": p.text, "category": p.category, "label": p.label} for p in self.prompts]


def derive_id(category: str, text: str) -> str:
    """A stable id from the content, so that reordering a file never renames a prompt."""
    slug = re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-") or "prompt"
    # The category is hashed too: two categories can share a slug (names that differ only in punctuation).
    digest = hashlib.sha256(f"{category}\x00{text}".encode()).hexdigest()[:10]
    return f"{slug}-{digest}"


def _validated(records: list[dict[str, Any]], name: str, source: str, description: str = "") -> PromptSet:
    if not records:
        raise PromptFileError(f"{source}: no prompts found; add at least one prompt")
    prompts: list[Prompt] = []
    seen: dict[str, str] = {}
    for record in records:
        where = record.get("where", source)
        text = record.get("text")
        if not isinstance(text, str):
            raise PromptFileError(f"{where}: prompt text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise PromptFileError(f"{where}: empty or whitespace-only prompt; remove it or give it text")
        if "\x00" in text:
            raise PromptFileError(f"{where}: prompt contains a NUL byte; remove it")
        category = str(record.get("category") or DEFAULT_CATEGORY).strip() or DEFAULT_CATEGORY
        label = "" if record.get("label") is None else str(record.get("label"))
        given_id = record.get("id")
        prompt_id = derive_id(category, text) if given_id in (None, "") else str(given_id)
        if prompt_id in seen:
            if given_id in (None, ""):
                raise PromptFileError(
                    f"{where}: duplicate prompt: the same text in category {category!r} is also at "
                    f"{seen[prompt_id]}; remove one"
                )
            raise PromptFileError(
                f"{where}: duplicate prompt id {prompt_id!r} (also at {seen[prompt_id]}); ids must be unique"
            )
        seen[prompt_id] = str(where)
        prompts.append(Prompt(id=prompt_id, text=text, category=category, label=label))
    return PromptSet(name=name, prompts=prompts, description=description, source=source)


def _records_from_mapping_or_list(data: Any, source: str) -> tuple[list[dict[str, Any]], str, str]:
    """Accept `{prompts: [...]}`, `{category: [texts]}` or `[{text, category, ...}]`."""
    name, description = "", ""
    if isinstance(data, dict) and "prompts" in data:
        name = str(data.get("name") or "")
        description = str(data.get("description") or "")
        data = data["prompts"]
    records: list[dict[str, Any]] = []
    if isinstance(data, dict):
        for category, texts in data.items():
            if isinstance(texts, str):
                texts = [texts]
            if not isinstance(texts, list):
                raise PromptFileError(f"{source}: category {category!r} must map to a list of prompt strings")
            for i, text in enumerate(texts):
                records.append({"text": text, "category": str(category), "where": f"{source}: {category}[{i}]"})
    elif isinstance(data, list):
        for i, item in enumerate(data):
            where = f"{source}: prompt {i + 1}"
            if isinstance(item, str):
                records.append({"text": item, "where": where})
            elif isinstance(item, dict):
                text = item.get("text", item.get("prompt"))
                records.append({**item, "text": text, "where": where})
            else:
                raise PromptFileError(f"{where}: expected a string or a mapping, got {type(item).__name__}")
    elif data is None:
        records = []
    else:
        raise PromptFileError(f"{source}: expected a list of prompts or a mapping, got {type(data).__name__}")
    return records, name, description


def _parse_yaml(text: str, source: str) -> tuple[list[dict[str, Any]], str, str]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise PromptFileError(f"{source}:{line}: malformed YAML ({problem}); fix the file") from None
    return _records_from_mapping_or_list(data, source)


def _parse_json(text: str, source: str) -> tuple[list[dict[str, Any]], str, str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"{source}: line {exc.lineno}: malformed JSON ({exc.msg}); fix the file") from None
    return _records_from_mapping_or_list(data, source)


def _parse_csv(text: str, source: str) -> tuple[list[dict[str, Any]], str, str]:
    reader = csv.reader(io.StringIO(text, newline=""))
    columns = ["category", "prompt", "id", "label"]
    records: list[dict[str, Any]] = []
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise PromptFileError(f"{source}: line {reader.line_num}: malformed CSV ({exc}); fix the file") from None
    header_seen = False
    for line_no, row in enumerate(rows, start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        lowered = [cell.strip().lower() for cell in row]
        if not header_seen and not records and {"category", "prompt"} <= set(lowered):
            columns = lowered
            header_seen = True
            continue
        if len(row) < 2 or len(row) > len(columns):
            raise PromptFileError(
                f"{source}: line {line_no}: expected columns category,prompt[,id][,label], got {len(row)} fields"
            )
        values = dict(zip(columns, row))
        records.append(
            {
                "category": values.get("category"),
                "text": values.get("prompt"),
                "id": values.get("id"),
                "label": values.get("label"),
                "where": f"{source}: line {line_no}",
            }
        )
    return records, "", ""


def _parse_text(text: str, source: str) -> tuple[list[dict[str, Any]], str, str]:
    records: list[dict[str, Any]] = []
    category = DEFAULT_CATEGORY
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("#"):
            category = line.lstrip()[1:].strip() or DEFAULT_CATEGORY
            continue
        if not line.strip():
            continue
        records.append({"text": line, "category": category, "where": f"{source}: line {line_no}"})
    return records, "", ""


_PARSERS = {
    ".yaml": _parse_yaml,
    ".yml": _parse_yaml,
    ".json": _parse_json,
    ".csv": _parse_csv,
    ".txt": _parse_text,
}


def load_prompt_file(path: str | Path) -> PromptSet:
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise PromptFileError(f"{source}: prompts file not found; check the path or use --preset NAME")
    if path.is_dir():
        raise PromptFileError(f"{source}: is a directory, expected a prompts file (.yaml, .json, .csv, .txt)")
    parser = _PARSERS.get(path.suffix.lower(), _parse_text)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PromptFileError(f"{source}: line {line}: not valid UTF-8; re-save the file as UTF-8") from None
    if not text.strip():
        raise PromptFileError(f"{source}: prompts file is empty; add at least one prompt")
    records, name, description = parser(text, source)
    return _validated(records, name or path.stem, source, description)


def preset_names() -> list[str]:
    folder = resources.files("tokentrail") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> PromptSet:
    names = preset_names()
    if name not in names:
        raise PromptFileError(f"unknown preset {name!r}; available presets: {', '.join(names)}")
    text = (resources.files("tokentrail") / "presets" / f"{name}.yaml").read_text(encoding="utf-8")
    records, set_name, description = _parse_yaml(text, f"preset {name}")
    return _validated(records, set_name or name, f"preset:{name}", description)


def resolve_prompts(prompts_file: str | Path | None, preset: str | None, default_preset: str) -> PromptSet:
    """The one place that decides between a file and a preset, so every command behaves alike."""
    if prompts_file is not None and preset is not None:
        raise PromptFileError("give either a prompts file or --preset, not both")
    if prompts_file is not None:
        return load_prompt_file(prompts_file)
    return load_preset(preset or default_preset)
