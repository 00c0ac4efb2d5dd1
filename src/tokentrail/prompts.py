"""Prompt sets: load, validate and identify the prompts a run traces.

A prompt file is YAML (`.yaml`, `.yml`), JSON (`.json`), JSON Lines (`.jsonl`), CSV (`.csv`,
`category,prompt[,id][,label]`), TSV (`.tsv`, the same columns separated by tabs) or plain text (`.txt`, `.text` or
no extension: one prompt per line, optional `# category` header lines). Built-in presets live in `presets/` as YAML.

Files are read strictly: a file loads exactly what a reader of it would expect, or it is refused with one
`PromptFileError` line naming the file line that is wrong (`<path>: line N: ...`). Line numbers count lines of the
file (separated by "\\n"), never parser records. README.md ("Prompt files") states every rule.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import hashlib
import json
import json.decoder
import json.scanner
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import yaml

from tokentrail.errors import PromptFileError

DEFAULT_CATEGORY = "uncategorized"

# A prompts file larger than this is refused before it is parsed (a path that never ends, /dev/zero say, too).
MAX_PROMPT_FILE_BYTES = 256 * 1024 * 1024

# C0 controls, DEL, C1 controls (NEL among them) and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# The same without the tab, which a line of a plain-text prompt file may hold.
_LINE_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_PROMPT_KEYS = ("text", "prompt", "category", "id", "label")
_TOP_LEVEL_KEYS = ("prompts", "name", "description")


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

    # Each prompt's field, in order: `prompt_set.texts`, `.ids`, `.categories`, `.labels`.
    ids = property(lambda self: [p.id for p in self.prompts])
    texts = property(lambda self: [p.text for p in self.prompts])
    categories = property(lambda self: [p.category for p in self.prompts])
    labels = property(lambda self: [p.label for p in self.prompts])

    def to_records(self) -> list[dict[str, str]]:
        return [{"id": p.id, "text": p.text, "category": p.category, "label": p.label} for p in self.prompts]


def derive_id(category: str, text: str) -> str:
    """A stable id from the content, so that reordering a file never renames a prompt."""
    slug = re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-") or "prompt"
    # The category is hashed too: two categories can share a slug (names that differ only in punctuation).
    digest = hashlib.sha256(f"{category}\x00{text}".encode()).hexdigest()[:10]
    return f"{slug}-{digest}"


# ---------------------------------------------------------------------------------------------------- helpers


def _fail(source: str, line: int | None, message: str) -> NoReturn:
    where = f"{source}: line {line}" if line is not None else source
    raise PromptFileError(f"{where}: {message}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Lines:
    """Character offset -> file line (lines end at "\\n"; the first line is `first`)."""

    def __init__(self, text: str, first: int = 1) -> None:
        self._starts = [0]
        self._starts.extend(m.end() for m in re.finditer("\n", text))
        self._first = first

    def __call__(self, index: int) -> int:
        return bisect.bisect_right(self._starts, max(index, 0)) - 1 + self._first

    def offset(self, line: int) -> int:
        return self._starts[line - self._first]


class _Map(dict):
    """A mapping read from a file, with the file line of itself and of each of its keys."""

    line: int = 0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.key_lines: dict[Any, int] = {}


class _Seq(list):
    """A list read from a file, with the file line of itself and of each item."""

    line: int = 0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.item_lines: list[int] = []


@dataclass
class _Record:
    """One prompt as a file gave it, before validation: values as parsed, with file lines."""

    line: int
    text: Any
    category: Any = None
    id: Any = None
    label: Any = None
    lines: dict[str, int] = field(default_factory=dict)  # file line of each field, where it differs from `line`


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value!r}"
    if isinstance(value, int):
        return f"integer {value!r}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------------- YAML


class _StrictYamlLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a key repeated in one mapping and keeping the file line of keys and items."""

    def __init__(self, text: str, source: str, lines: _Lines) -> None:
        self.source = source
        self.lines = lines
        self.current: yaml.Node | None = None
        super().__init__(text)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        self.current = node
        return super().construct_object(node, deep=deep)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` may be overridden by the mapping's own keys, as YAML says
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in first
                except TypeError:
                    continue  # an unhashable key: SafeConstructor refuses it with its own message
                line = self.lines(key_node.start_mark.index)
                if repeated:
                    _fail(self.source, line,
                          f"repeated key {key!r} (first at line {first[key]}); a key may appear once in a mapping")
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def _construct_yaml_map(loader: _StrictYamlLoader, node: yaml.MappingNode) -> Iterator[_Map]:
    data = _Map()
    data.line = loader.lines(node.start_mark.index)
    yield data
    data.update(loader.construct_mapping(node))
    for key_node, _ in node.value:  # merged (`<<`) keys included, the mapping's own last, as in `data`
        data.key_lines[loader.construct_object(key_node)] = loader.lines(key_node.start_mark.index)


def _construct_yaml_seq(loader: _StrictYamlLoader, node: yaml.SequenceNode) -> Iterator[_Seq]:
    data = _Seq()
    data.line = loader.lines(node.start_mark.index)
    yield data
    data.extend(loader.construct_sequence(node))
    data.item_lines = [loader.lines(child.start_mark.index) for child in node.value]


_StrictYamlLoader.add_constructor("tag:yaml.org,2002:map", _construct_yaml_map)
_StrictYamlLoader.add_constructor("tag:yaml.org,2002:seq", _construct_yaml_seq)


def _parse_yaml(text: str, source: str) -> tuple[list[_Record], str, str]:
    lines = _Lines(text)
    try:
        # PyYAML's reader refuses characters YAML does not allow raw as soon as it is made.
        loader = _StrictYamlLoader(text, source, lines)
    except yaml.reader.ReaderError as exc:
        character = chr(exc.character) if isinstance(exc.character, int) else exc.character
        _fail(source, lines(exc.position),
              f"malformed YAML (the character {character!r} is not allowed raw in YAML; write it as an escape "
              'in a double-quoted string, e.g. "\\x1b"); fix the file')
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = loader.lines(mark.index) if mark is not None else None
        problem = _one_line(exc.problem or exc.context or "invalid YAML")
        _fail(source, line, f"malformed YAML ({problem}); fix the file")
    except yaml.YAMLError as exc:
        _fail(source, None, f"malformed YAML ({_one_line(exc)}); fix the file")
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # A value PyYAML cannot build (a date like 2024-13-45, a number of 5000 digits) or nesting too deep.
        index = loader.current.start_mark.index if loader.current is not None else loader.get_mark().index
        reason = "nested too deeply" if isinstance(exc, RecursionError) else _one_line(exc)[:200]
        _fail(source, loader.lines(index), f"malformed YAML (cannot read this value: {reason}); fix the file")
    finally:
        loader.dispose()
    return _records_from_data(data, source, 1)


# ---------------------------------------------------------------------------------------------------- JSON


class _StrictJsonDecoder(json.JSONDecoder):
    """The standard library's pure-Python JSON scanner, with objects that refuse repeated keys and know lines."""

    def __init__(self, text: str, source: str, first_line: int = 1) -> None:
        super().__init__()
        self.source = source
        self.lines = _Lines(text, first_line)
        self.last = 0  # where the value being read starts, for errors the scanner gives no position for
        self.parse_object = self._parse_object
        self.parse_array = self._parse_array
        self.scan_once = json.scanner.py_make_scanner(self)

    def _recorder(self, scan_once: Callable[[str, int], Any], starts: list[int]) -> Callable[[str, int], Any]:
        def recording(string: str, index: int) -> Any:
            starts.append(index)
            self.last = index
            return scan_once(string, index)

        return recording

    def _parse_object(self, s_and_end: tuple[str, int], strict: bool, scan_once: Any, object_hook: Any,
                      object_pairs_hook: Any, memo: Any = None) -> tuple[_Map, int]:
        s, start = s_and_end
        starts: list[int] = []
        pairs, end = json.decoder.JSONObject(s_and_end, strict, self._recorder(scan_once, starts), None, list, memo)
        data = _Map()
        data.line = self.lines(start - 1)
        for (key, value), value_start in zip(pairs, starts):
            line = self.lines(self._key_end(s, value_start))
            if key in data:
                _fail(self.source, line,
                      f"repeated key {key!r} (first at line {data.key_lines[key]}); a key may appear once in an "
                      "object")
            data[key] = value
            data.key_lines[key] = line
        return data, end

    def _parse_array(self, s_and_end: tuple[str, int], scan_once: Any) -> tuple[_Seq, int]:
        _, start = s_and_end
        starts: list[int] = []
        values, end = json.decoder.JSONArray(s_and_end, self._recorder(scan_once, starts))
        data = _Seq(values)
        data.line = self.lines(start - 1)
        data.item_lines = [self.lines(i) for i in starts]
        return data, end

    @staticmethod
    def _key_end(s: str, value_start: int) -> int:
        """The closing quote of the key whose value starts at `value_start` (a JSON string is one line)."""
        i = value_start - 1
        while i > 0 and s[i] in " \t\r\n":
            i -= 1
        i -= 1  # the ':'
        while i > 0 and s[i] in " \t\r\n":
            i -= 1
        return i


def _decode_json(text: str, source: str, first_line: int = 1) -> Any:
    decoder = _StrictJsonDecoder(text, source, first_line)
    try:
        return decoder.decode(text)
    except json.JSONDecodeError as exc:
        _fail(source, exc.lineno + first_line - 1, f"malformed JSON ({exc.msg}); fix the file")
    except RecursionError:
        _fail(source, decoder.lines(decoder.last), "malformed JSON (nested too deeply); fix the file")
    except ValueError:
        # int() refuses a number of thousands of digits.
        _fail(source, decoder.lines(decoder.last), "malformed JSON (a number too long to read); fix the file")


def _parse_json(text: str, source: str) -> tuple[list[_Record], str, str]:
    data = _decode_json(text, source)
    return _records_from_data(data, source, _Lines(text)(len(text) - len(text.lstrip())))


def _parse_jsonl(text: str, source: str) -> tuple[list[_Record], str, str]:
    records: list[_Record] = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        item = _decode_json(line, source, line_no)
        if not isinstance(item, dict):
            _fail(source, line_no, f"expected one JSON object per line, got {_type_name(item)}; "
                                   'write {"text": ..., "category": ...}')
        records.append(_record_from_mapping(item, line_no, source))
    return records, "", ""


# ---------------------------------------------------------------------------------------------------- from data


def _record_from_mapping(item: dict[Any, Any], line: int, source: str) -> _Record:
    key_lines = getattr(item, "key_lines", {})
    for key in item:
        if key not in _PROMPT_KEYS:
            _fail(source, key_lines.get(key, line),
                  f"unknown key {key!r} in a prompt; a prompt has text (or prompt), category, id and label")
    if "text" in item and "prompt" in item:
        _fail(source, max(key_lines.get("text", line), key_lines.get("prompt", line)),
              "a prompt has both 'text' and 'prompt'; give one of them")
    text_key = "text" if "text" in item else "prompt"
    if text_key not in item:
        _fail(source, line, "a prompt mapping has no 'text' (or 'prompt'); give the prompt's text")
    lines = {name: key_lines[key] for name, key in
             (("text", text_key), ("category", "category"), ("id", "id"), ("label", "label")) if key in key_lines}
    return _Record(line=line, text=item[text_key], category=item.get("category"), id=item.get("id"),
                   label=item.get("label"), lines=lines)


def _records_from_data(data: Any, source: str, top_line: int) -> tuple[list[_Record], str, str]:
    """Accept `{prompts: [...], name, description}`, `{category: [texts]}` or `[text or {text, category, ...}]`."""
    name, description = "", ""
    if isinstance(data, dict) and "prompts" in data:
        key_lines = getattr(data, "key_lines", {})
        for key in data:
            if key not in _TOP_LEVEL_KEYS:
                _fail(source, key_lines.get(key, top_line),
                      f"unknown top-level key {key!r} next to 'prompts'; the top level may hold only prompts, "
                      "name and description")
        name = _name_value(data.get("name"), "name", source, key_lines.get("name", top_line))
        description_value = data.get("description")
        if description_value is not None and not isinstance(description_value, str):
            _fail(source, key_lines.get("description", top_line),
                  f"description must be a string, got {_type_name(description_value)}")
        description = description_value or ""
        top_line = key_lines.get("prompts", top_line)
        data = data["prompts"]
    records: list[_Record] = []
    if isinstance(data, dict):
        key_lines = getattr(data, "key_lines", {})
        for category, texts in data.items():
            key_line = key_lines.get(category, top_line)
            if category is None:
                _fail(source, key_line, "a category key is null; quote it ('null') or give a name")
            if category in ("name", "description"):
                _fail(source, key_line, f"{category!r} is read only next to 'prompts' (name, description, "
                                        "prompts: [...]); put the prompts under 'prompts' or rename the category")
            if isinstance(texts, str):
                items, item_lines = [texts], [key_line]
            elif isinstance(texts, list):
                items, item_lines = texts, getattr(texts, "item_lines", [key_line] * len(texts))
            else:
                _fail(source, key_line,
                      f"category {category!r} must map to a list of prompt strings, got {_type_name(texts)}")
            for text, line in zip(items, item_lines):
                records.append(_Record(line=line, text=text, category=category, lines={"category": key_line}))
    elif isinstance(data, list):
        item_lines = getattr(data, "item_lines", [top_line] * len(data))
        for item, line in zip(data, item_lines):
            if isinstance(item, dict):
                records.append(_record_from_mapping(item, line, source))
            elif isinstance(item, str):
                records.append(_Record(line=line, text=item))
            else:
                _fail(source, line, f"expected a prompt string or a mapping, got {_type_name(item)}")
    elif data is not None:
        _fail(source, top_line, f"expected a list of prompts or a mapping, got {_type_name(data)}")
    return records, name, description


# ---------------------------------------------------------------------------------------------------- CSV / TSV


def _lines_with_ends(text: str) -> Iterator[str]:
    """The file's lines split at "\\n" only (kept), so the csv reader's line_num counts file lines."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        if end < 0:
            yield text[start:]
            return
        yield text[start : end + 1]
        start = end + 1


def _unclosed_quote(text: str, start: int, delimiter: str) -> int | None:
    """The offset of a quote opening a field at or after `start` that is never closed, or None."""
    field_end = re.compile(f"[{re.escape(delimiter)}\r\n]")
    i, n = start, len(text)
    while i < n:
        if text[i] == '"':  # a quoted field: find its closing quote ("" is a quote inside it)
            opened = i
            i += 1
            while True:
                j = text.find('"', i)
                if j < 0:
                    return opened
                if text[j + 1 : j + 2] == '"':
                    i = j + 2
                    continue
                i = j + 1
                break
        match = field_end.search(text, i)
        if match is None:
            return None
        i = match.end()
    return None


def _parse_table(text: str, source: str, dialect: type[csv.Dialect], kind: str) -> tuple[list[_Record], str, str]:
    sep = "," if kind == "CSV" else "<TAB>"
    expected = f"category{sep}prompt[{sep}id][{sep}label]"
    reader = csv.reader(_lines_with_ends(text), dialect=dialect, strict=True)
    columns = ["category", "prompt", "id", "label"]
    records: list[_Record] = []
    seen_row = False
    while True:
        start = reader.line_num + 1  # the file line this record starts on (a quoted field may span lines)
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            _csv_failure(exc, text, source, start, reader.line_num, dialect.delimiter, kind)
        if not row or all(not cell.strip() for cell in row):
            continue
        if not seen_row:
            seen_row = True
            lowered = [cell.strip().lower() for cell in row]
            if "category" in lowered and ("prompt" in lowered or "text" in lowered):
                columns = _header_columns(lowered, source, start)
                continue
        needed = max(columns.index("category"), columns.index("prompt")) + 1
        if len(row) < max(2, needed) or len(row) > len(columns):
            _fail(source, start, f"expected columns {expected}, got {len(row)} fields")
        values = dict(zip(columns, row))
        records.append(_Record(line=start, text=values["prompt"], category=values["category"],
                               id=values.get("id"), label=values.get("label")))
    return records, "", ""


def _header_columns(cells: list[str], source: str, line: int) -> list[str]:
    columns = ["prompt" if cell == "text" else cell for cell in cells]
    for cell, column in zip(cells, columns):
        if column not in ("category", "prompt", "id", "label"):
            _fail(source, line, f"the header row has an unknown column {cell!r}; the columns are category, "
                                "prompt (or text), id and label")
        if columns.count(column) > 1:
            _fail(source, line, f"the header row names the column {column!r} twice")
    return columns


def _csv_failure(exc: csv.Error, text: str, source: str, start: int, line_num: int, delimiter: str,
                 kind: str) -> NoReturn:
    message = str(exc)
    if message == "unexpected end of data" or "field larger than field limit" in message:
        opened = _unclosed_quote(text, _Lines(text).offset(start), delimiter)
        if opened is not None:
            _fail(source, _Lines(text)(opened),
                  'unterminated quoted field: the quote that opens a field on this line is never closed; '
                  'close it (write "" for a quote inside a quoted field)')
    if "field larger than field limit" in message:
        _fail(source, start, f"a field is longer than {csv.field_size_limit()} characters, the most the {kind} "
                             "reader takes; shorten it")
    if "expected after" in message:
        _fail(source, line_num, f'malformed {kind} (text after the closing quote of a quoted field; write "" for '
                                "a quote inside a quoted field); fix the file")
    if "new-line character seen in unquoted field" in message:
        _fail(source, line_num, f"malformed {kind} (a carriage return inside an unquoted field; quote the field "
                                "or end lines with \\n or \\r\\n); fix the file")
    _fail(source, line_num, f"malformed {kind} ({_one_line(message)}); fix the file")


def _parse_csv(text: str, source: str) -> tuple[list[_Record], str, str]:
    return _parse_table(text, source, csv.excel, "CSV")


def _parse_tsv(text: str, source: str) -> tuple[list[_Record], str, str]:
    return _parse_table(text, source, csv.excel_tab, "TSV")


# ---------------------------------------------------------------------------------------------------- text


def _parse_text(text: str, source: str) -> tuple[list[_Record], str, str]:
    records: list[_Record] = []
    category: str | None = None
    category_line: int | None = None
    for line_no, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        bad = _LINE_CONTROL.search(line)
        if bad is not None:
            _fail(source, line_no,
                  f"the control character {bad.group()!r} is inside the line; a text prompt file holds one prompt "
                  "per line and no control characters but tabs (use .jsonl, .yaml, .json, .csv or .tsv for such "
                  "prompts)")
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            category, category_line = stripped[1:], line_no
            continue
        lines = {"category": category_line} if category_line is not None else {}
        records.append(_Record(line=line_no, text=line, category=category, lines=lines))
    return records, "", ""


# ---------------------------------------------------------------------------------------------------- validation


def _name_value(value: Any, what: str, source: str, line: int) -> str:
    """A category, id, label or set name: a string or an integer (exactly its digits), trimmed, no controls."""
    if value is None:
        return ""
    if isinstance(value, (bool, float)):
        _fail(source, line, f"{what} must be a string, got {_type_name(value)}; quote it")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        _fail(source, line, f"{what} must be a string, got {_type_name(value)}")
    value = value.strip()
    bad = _CONTROL.search(value)
    if bad is not None:
        _fail(source, line, f"{what} {value!r} contains the control character {bad.group()!r}; remove it")
    return value


def _validated(records: list[_Record], name: str, source: str, description: str = "") -> PromptSet:
    if not records:
        raise PromptFileError(f"{source}: no prompts found; add at least one prompt")
    prompts: list[Prompt] = []
    seen: dict[str, str] = {}
    for record in records:
        where = f"{source}: line {record.line}"
        text = record.text
        text_line = record.lines.get("text", record.line)
        if not isinstance(text, str):
            hint = "" if isinstance(text, (list, dict)) or text is None else "; quote it"
            _fail(source, text_line, f"prompt text must be a string, got {_type_name(text)}{hint}")
        if not text.strip():
            _fail(source, text_line, "empty or whitespace-only prompt; remove it or give it text")
        if "\x00" in text:
            _fail(source, text_line, "prompt contains a NUL byte; remove it")
        category = _name_value(record.category, "category", source, record.lines.get("category", record.line))
        category = category or DEFAULT_CATEGORY
        label = _name_value(record.label, "label", source, record.lines.get("label", record.line))
        given_id = _name_value(record.id, "id", source, record.lines.get("id", record.line))
        prompt_id = given_id or derive_id(category, text)
        if prompt_id in seen:
            if not given_id:
                raise PromptFileError(
                    f"{where}: duplicate prompt: the same text in category {category!r} is also at "
                    f"{seen[prompt_id]}; remove one"
                )
            raise PromptFileError(
                f"{where}: duplicate prompt id {prompt_id!r} (also at {seen[prompt_id]}); ids must be unique"
            )
        seen[prompt_id] = where
        prompts.append(Prompt(id=prompt_id, text=text, category=category, label=label))
    return PromptSet(name=name, prompts=prompts, description=description, source=source)


# ---------------------------------------------------------------------------------------------------- files


_PARSERS: dict[str, Callable[[str, str], tuple[list[_Record], str, str]]] = {
    ".yaml": _parse_yaml,
    ".yml": _parse_yaml,
    ".json": _parse_json,
    ".jsonl": _parse_jsonl,
    ".csv": _parse_csv,
    ".tsv": _parse_tsv,
    ".txt": _parse_text,
    ".text": _parse_text,
    "": _parse_text,
}
_SUPPORTED = ".yaml, .yml, .json, .jsonl, .csv, .tsv, .txt or .text (no extension: plain text)"


def _display(path: Path) -> str:
    """The path for a one-line message: as is, or quoted with escapes when it holds control characters."""
    text = str(path)
    return repr(text) if _CONTROL.search(text) else text


def _read_limited(path: Path, source: str) -> bytes:
    """The file's bytes: only a regular file, at most MAX_PROMPT_FILE_BYTES, never a blocking open or read."""
    limit = MAX_PROMPT_FILE_BYTES
    too_big = f"prompts file is larger than {limit} bytes, the most tokentrail reads; split it"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        _fail(source, None, f"cannot read the prompts file ({_one_line(exc.strerror or exc)}); check it and its "
                            "permissions")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # it changed since it was checked
            _fail(source, None, "is not a regular file (a device, FIFO or socket); give a prompts file")
        if info.st_size > limit:
            _fail(source, None, too_big)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        _fail(source, None, f"cannot read the prompts file ({_one_line(exc.strerror or exc)}); check it")
    finally:
        os.close(fd)
    if size > limit:
        _fail(source, None, too_big)
    return b"".join(chunks)


def load_prompt_file(path: str | Path) -> PromptSet:
    path = Path(path)
    source = _display(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise PromptFileError(f"{source}: prompts file not found; check the path or use --preset NAME") from None
    except OSError as exc:
        _fail(source, None, f"cannot read the prompts file ({_one_line(exc.strerror or exc)}); check the path and "
                            "its permissions")
    except ValueError:  # a NUL byte in the path
        _fail(source, None, "cannot read the prompts file (the path contains a NUL byte); check the path")
    if stat.S_ISDIR(info.st_mode):
        raise PromptFileError(f"{source}: is a directory, expected a prompts file ({_SUPPORTED})")
    suffix = path.suffix.lower()
    parser = _PARSERS.get(suffix)
    if parser is None:
        _fail(source, None, f"unknown prompts file extension {path.suffix!r}; use {_SUPPORTED}")
    if not stat.S_ISREG(info.st_mode):
        _fail(source, None, "is not a regular file (a device, FIFO or socket); give a prompts file")
    if info.st_size > MAX_PROMPT_FILE_BYTES:
        _fail(source, None, f"prompts file is larger than {MAX_PROMPT_FILE_BYTES} bytes, the most tokentrail "
                            "reads; split it")
    raw = _read_limited(path, source)
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PromptFileError(f"{source}: line {line}: not valid UTF-8; re-save the file as UTF-8") from None
    if not text.strip():
        raise PromptFileError(f"{source}: prompts file is empty; add at least one prompt")
    records, name, description = parser(text, source)
    return _validated(records, name or path.stem, source, description)


def prompt_set_from_data(data: Any, name: str = "prompts") -> PromptSet:
    """A prompt set from Python values, by the rules of a JSON prompt file: a list of texts or of
    `{text, category, id, label}` mappings, `{category: [texts]}`, or `{prompts: [...], name, description}`."""
    if isinstance(data, str):
        data = [data]
    try:
        records, set_name, description = _records_from_data(data, "python", 1)
        return _validated(records, set_name or name, "python", description)
    except PromptFileError as exc:  # Python values have no file lines: keep only the problem
        problem = re.sub(r"^python: (line \d+: )?", "", str(exc))
        raise PromptFileError(f"prompts given in Python: {problem}") from None


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
