"""Property: a prompt set written in any supported format loads exactly as written, or is refused naming a line.

Prompt sets are generated with awkward texts (unicode, quotes, commas, tabs, newlines, `#`, surrounding spaces,
control characters) and names, written with the standard writers of each format (yaml.safe_dump, json.dumps,
csv.writer) and loaded. A small model of the documented rules (README, "Prompt files") says what must load:

- text is kept exactly; a blank text or one with a NUL byte is refused;
- a category, id or label has its surrounding whitespace removed; one that then holds a control character
  (C0, DEL, C1, U+2028, U+2029) is refused; an empty category is `uncategorized`, an empty id is derived;
- two prompts with the same id (given or derived) are refused at the second;
- CSV/TSV rows whose cells are all blank are skipped; a plain-text line may not hold control characters but tabs.

A refusal must be one line, a PromptFileError naming "line N"; for the line-oriented formats (CSV, TSV, JSONL,
text) N must be the file line of the first wrong prompt.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokentrail.errors import PromptFileError
from tokentrail.prompts import DEFAULT_CATEGORY, derive_id, load_prompt_file

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
LINE_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters that trip up writers and readers, mixed with any unicode (but lone surrogates, not UTF-8).
AWKWARD = list(",;\"'`\t\n\r#:-{}[]|>&*!%@ \\=\u00a0\u3000é中😀\ufeff\x1b\x7f\x85\u2028\u2029\x0b\x0c\x1c")
any_char = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
awkward_text = st.text(st.one_of(st.sampled_from(AWKWARD), any_char), min_size=1, max_size=24)
plain_text = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=24)
bad_text = st.one_of(st.sampled_from([" ", "\t ", "\u3000", "\n"]), awkward_text.map(lambda t: t + "\x00"))
# About one row in ten has a text to refuse, one name in eight is wild (often with a control character).


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, picked with the given weights (st.one_of weighs its branches alike)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


texts = weighted((5, plain_text), (4, awkward_text), (1, bad_text))
clean_name = st.text(st.characters(whitelist_categories=("L", "N", "Pd", "Zs"), blacklist_characters="\u3000"),
                     min_size=0, max_size=8)
wild_name = st.text(st.one_of(st.sampled_from(AWKWARD), any_char), min_size=0, max_size=8)
names = weighted((2, st.none()), (5, clean_name), (1, wild_name))


@dataclass(frozen=True)
class Row:
    text: str
    category: str | None
    id: str | None
    label: str | None


rows_strategy = st.lists(st.builds(Row, texts, names, names, names), min_size=1, max_size=6)


@dataclass
class Written:
    """A record as the file holds it, with the file line the loader must name for it."""

    line: int  # 0 where the test does not work the line out (YAML, JSON)
    text: str
    category: str | None
    id: str | None = None
    label: str | None = None
    category_line: int | None = None


BAD = object()


def name_rule(value: str | None):
    if value is None:
        return ""
    value = value.strip()
    return BAD if CONTROL.search(value) else value


def expected(records: list[Written]):
    """(ids, texts, categories, labels), or ("refused", line) with the line of the first wrong prompt."""
    out: list[tuple[str, str, str, str]] = []
    seen: set[str] = set()
    for record in records:
        if not record.text.strip() or "\x00" in record.text:
            return ("refused", record.line)
        category = name_rule(record.category)
        if category is BAD:
            return ("refused", record.category_line or record.line)
        label, given = name_rule(record.label), name_rule(record.id)
        if label is BAD or given is BAD:
            return ("refused", record.line)
        category = category or DEFAULT_CATEGORY
        prompt_id = given or derive_id(category, record.text)
        if prompt_id in seen:
            return ("refused", record.line)
        seen.add(prompt_id)
        out.append((prompt_id, record.text, category, label))
    if not out:
        return ("refused", None)
    return tuple(list(column) for column in zip(*out))


def check(suffix: str, content: str, records: list[Written], exact_lines: bool) -> None:
    if content.startswith("\ufeff"):
        return  # a byte order mark opening a file is not content (documented); not this property's business
    want = expected(records)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"prompts{suffix}"
        path.write_text(content, encoding="utf-8", newline="")
        try:
            got = load_prompt_file(path)
        except PromptFileError as exc:
            message = str(exc)
            assert "\n" not in message and "\r" not in message, message
            assert want[0] == "refused", f"refused a valid file: {message}\n{content!r}"
            if want[1] is None:
                assert message.endswith(("no prompts found; add at least one prompt",
                                         "prompts file is empty; add at least one prompt")), message
                return
            match = re.match(rf"{re.escape(str(path))}: line (\d+): ", message)
            assert match, message
            line = int(match.group(1))
            if exact_lines:
                assert line == want[1], (message, want, content)
            else:
                assert 1 <= line <= content.count("\n") + 1, (message, content)
            return
    assert want[0] != "refused", f"loaded a file that must be refused at line {want[1]}: {content!r}"
    assert (got.ids, got.texts, got.categories, got.labels) == want


def line_of_end(buffer: io.StringIO) -> int:
    return buffer.getvalue().count("\n") + 1


def cells(row: Row) -> list[str]:
    return [row.category or "", row.text, row.id or "", row.label or ""]


def write_table(rows: list[Row], dialect: str, header: bool) -> tuple[str, list[Written]]:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, dialect=dialect)
    filled = [row for row in rows if any(cell.strip() for cell in cells(row))]
    first = [cell.strip().lower() for cell in cells(filled[0])] if filled else []
    if header or ("category" in first and ("prompt" in first or "text" in first)):
        writer.writerow(["category", "prompt", "id", "label"])
    records = []
    for row in rows:
        line = line_of_end(buffer)
        writer.writerow(cells(row))
        if all(not cell.strip() for cell in cells(row)):
            continue  # a row of blank cells is skipped
        records.append(Written(line, row.text, row.category, row.id, row.label))
    return buffer.getvalue(), records


def as_mapping(row: Row) -> dict[str, str]:
    item = {"text": row.text}
    item.update({key: value for key, value in (("category", row.category), ("id", row.id),
                                                ("label", row.label)) if value is not None})
    return item


@PROPERTY
@given(rows_strategy, st.booleans())
def test_csv(rows, header):
    content, records = write_table(rows, "excel", header)
    check(".csv", content, records, exact_lines=True)


@PROPERTY
@given(rows_strategy, st.booleans())
def test_tsv(rows, header):
    content, records = write_table(rows, "excel-tab", header)
    check(".tsv", content, records, exact_lines=True)


@PROPERTY
@given(rows_strategy, st.booleans(), st.lists(st.sampled_from(["", "  ", "\t"]), min_size=6, max_size=6),
       st.sampled_from(["\n", "\r\n"]))
def test_jsonl(rows, ensure_ascii, blanks, newline):
    lines, records = [], []
    for row, blank in zip(rows, blanks):
        if blank:
            lines.append(blank)
        lines.append(json.dumps(as_mapping(row), ensure_ascii=ensure_ascii))
        records.append(Written(len(lines), row.text, row.category, row.id, row.label))
    check(".jsonl", newline.join(lines) + newline, records, exact_lines=True)


@PROPERTY
@given(rows_strategy, st.booleans(), st.sampled_from([None, 1, 2]))
def test_json(rows, ensure_ascii, indent):
    content = json.dumps([as_mapping(row) for row in rows], ensure_ascii=ensure_ascii, indent=indent)
    records = [Written(0, row.text, row.category, row.id, row.label) for row in rows]
    check(".json", content, records, exact_lines=False)


def yaml_dump(data, allow_unicode: bool, flow: bool) -> str:
    # PyYAML writes NEL, LS and PS raw when allowed to, and YAML then reads them as line breaks: escape them.
    allow_unicode = allow_unicode and not re.search("[\x85\u2028\u2029]", json.dumps(data, ensure_ascii=False))
    return yaml.safe_dump(data, allow_unicode=allow_unicode, default_flow_style=flow, sort_keys=False)


@PROPERTY
@given(rows_strategy, st.booleans(), st.booleans())
def test_yaml(rows, allow_unicode, flow):
    content = yaml_dump({"prompts": [as_mapping(row) for row in rows]}, allow_unicode, flow)
    records = [Written(0, row.text, row.category, row.id, row.label) for row in rows]
    check(".yaml", content, records, exact_lines=False)


@PROPERTY
@given(rows_strategy, st.booleans(), st.booleans())
def test_category_mapping_yaml_and_json(rows, allow_unicode, flow):
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(row.category or "", []).append(row.text)
    if set(groups) & {"prompts", "name", "description"}:
        return  # keys with a meaning of their own at the top level
    records = [Written(0, text, category) for category, group in groups.items() for text in group]
    check(".yaml", yaml_dump(groups, allow_unicode, flow), records, exact_lines=False)
    check(".json", json.dumps(groups, ensure_ascii=not allow_unicode), records, exact_lines=False)


def text_file_can_hold(row: Row) -> bool:
    """A text file has one prompt per line and `# category` headers: no line breaks, no blank or `#` prompts."""
    return ("\n" not in row.text and not row.text.endswith("\r") and bool(row.text.strip())
            and not row.text.lstrip().startswith("#") and "\n" not in (row.category or ""))


@PROPERTY
@given(rows_strategy, st.sampled_from(["\n", "\r\n"]))
def test_txt(rows, newline):
    rows = [row for row in rows if text_file_can_hold(row)]
    if not rows:
        return
    lines, records = [], []
    for row in rows:
        lines.append(f"# {row.category}" if row.category is not None else "#")
        header_line = len(lines)
        lines.append(row.text)
        records.append(Written(len(lines), row.text, row.category, category_line=header_line))
    # A line holding a control character (but a tab) is refused first, before any prompt is checked.
    for number, line in enumerate(lines, start=1):
        # The loader takes one "\r" off a line's end ("\r\n" endings); a "\r" left is a control character.
        if LINE_CONTROL.search(line if newline == "\r\n" else line.removesuffix("\r")):
            records = [Written(number, "\x00", None)]  # expected() refuses it at that line
            break
    check(".txt", newline.join(lines) + newline, records, exact_lines=True)


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".jsonl", ".csv", ".tsv", ".txt"])
def test_every_format_is_exercised(suffix):
    """A fixed example per format, so the property tests above cannot all pass by skipping."""
    rows = [Row("say \"hi\", then\tgo", " math ", None, "1"), Row("x = 1", "code", "c1", None)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"p{suffix}"
        if suffix in (".csv", ".tsv"):
            content, _ = write_table(rows, "excel" if suffix == ".csv" else "excel-tab", header=True)
        elif suffix == ".jsonl":
            content = "".join(json.dumps(as_mapping(row)) + "\n" for row in rows)
        elif suffix == ".json":
            content = json.dumps([as_mapping(row) for row in rows])
        elif suffix == ".yaml":
            content = yaml_dump({"prompts": [as_mapping(row) for row in rows]}, True, False)
        else:
            content = "".join(f"# {row.category}\n{row.text}\n" for row in rows)
        path.write_text(content, encoding="utf-8", newline="")
        loaded = load_prompt_file(path)
    assert loaded.texts == [row.text for row in rows]
    assert loaded.categories == ["math", "code"]
    if suffix != ".txt":
        assert loaded.ids == [derive_id("math", rows[0].text), "c1"] and loaded.labels == ["1", ""]
