"""Prompt files in every format, presets checked against the seed write-up itself."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tokentrail import prompts as prompts_module
from tokentrail.errors import PromptFileError
from tokentrail.prompts import derive_id, load_preset, load_prompt_file, preset_names, resolve_prompts

SEED_DIR = Path(__file__).resolve().parents[2] / "shared" / "seeds"


def seed_prompts() -> list[str]:
    """Every quoted prompt of the seed post, in order, with its markdown escapes undone."""
    candidates = sorted(SEED_DIR.glob("*.txt"))
    if not candidates:
        pytest.skip(f"seed write-up not found under {SEED_DIR}")
    text = candidates[0].read_text(encoding="utf-8")
    found = []
    for line in text.splitlines():
        match = re.match(r'^\s*(?:\d+:)?\s*"(.*)",?(?:\s*-->.*)?(?:<br>)?\s*$', line.replace("<br>", ""))
        if match:
            found.append(match.group(1).replace("\\_", "_"))
    return found


def test_presets_listed():
    assert preset_names() == ["categories-large", "seed-categories", "seed-spectrum", "spectrum-large"]


def test_presets_match_seed_character_for_character():
    seed = seed_prompts()
    categories = load_preset("seed-categories")
    spectrum = load_preset("seed-spectrum")
    assert len(seed) == 46
    assert categories.texts == seed[:25]
    assert spectrum.texts == seed[25:]
    assert len(set(categories.categories)) == 5 and all(categories.categories.count(c) == 5 for c in categories.categories)
    assert spectrum.labels == [str(i) for i in range(1, 22)]
    assert len(set(spectrum.categories)) == 7
    assert spectrum.texts[18] == "class Love(Emotion): def __init__(self):"
    assert spectrum.texts[14] == "''' This class handles user authentication '''"


def test_yaml_json_csv_txt_agree(tmp_path):
    rows = [("math", "1 + 1 =", "m1"), ("code", "import os", "c1"), ("code", 'print("a, b")', "c2")]
    (tmp_path / "p.yaml").write_text(
        "prompts:\n" + "".join(f"  - {{id: {i}, category: {c}, text: {json.dumps(t)}}}\n" for c, t, i in rows)
    )
    (tmp_path / "p.json").write_text(json.dumps([{"id": i, "category": c, "text": t} for c, t, i in rows]))
    (tmp_path / "p.csv").write_text(
        "category,prompt,id\n" + "".join(f'{c},"{t.replace(chr(34), chr(34) * 2)}",{i}\n' for c, t, i in rows)
    )
    (tmp_path / "p.txt").write_text("# math\n1 + 1 =\n\n# code\nimport os\nprint(\"a, b\")\n")
    sets = {ext: load_prompt_file(tmp_path / f"p.{ext}") for ext in ("yaml", "json", "csv", "txt")}
    for prompt_set in sets.values():
        assert prompt_set.texts == [t for _, t, _ in rows]
        assert prompt_set.categories == [c for c, _, _ in rows]
    assert sets["csv"].ids == ["m1", "c1", "c2"] == sets["yaml"].ids
    # The text file gives no ids: they are derived from content and stable.
    assert sets["txt"].ids == [derive_id(c, t) for c, t, _ in rows]
    assert load_prompt_file(tmp_path / "p.txt").ids == sets["txt"].ids


def test_mapping_of_categories(tmp_path):
    (tmp_path / "p.yaml").write_text("story: [Once upon a time, The sun set]\ncode: ['def f():']\n")
    prompt_set = load_prompt_file(tmp_path / "p.yaml")
    assert prompt_set.categories == ["story", "story", "code"]
    assert prompt_set.name == "p"


def test_csv_without_header_and_with_label(tmp_path):
    (tmp_path / "a.csv").write_text("math,2+2=\ncode,x = 1\n")
    assert load_prompt_file(tmp_path / "a.csv").texts == ["2+2=", "x = 1"]
    (tmp_path / "b.csv").write_text("category,prompt,id,label\nmath,2+2=,m,7\n")
    assert load_prompt_file(tmp_path / "b.csv").labels == ["7"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "prompts file is empty"),
        ("blank.txt", "   \n\n", "prompts file is empty"),
        ("bad.yaml", "a: 1\n  b: 2\n", "line 2: malformed YAML"),
        ("bad.json", '{"prompts": [\n  "a",\n  ]\n}', "line 3: malformed JSON"),
        ("bad.csv", "category,prompt\nmath,1,2,3,4,5\n", "line 2: expected columns"),
        ("ws.yaml", "prompts:\n  - {text: '   ', category: a}\n", "empty or whitespace-only prompt"),
        ("dup.json", '[{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]', "duplicate prompt id 'x'"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PromptFileError, match=re.escape(message)):
        load_prompt_file(path)


def test_non_utf8_and_missing(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match="line 2: not valid UTF-8"):
        load_prompt_file(path)
    with pytest.raises(PromptFileError, match="prompts file not found"):
        load_prompt_file(tmp_path / "nope.yaml")


def test_resolve_prompts_rules(tmp_path):
    assert resolve_prompts(None, None, "seed-spectrum").name == "seed-spectrum"
    with pytest.raises(PromptFileError, match="unknown preset 'x'"):
        resolve_prompts(None, "x", "seed-spectrum")
    (tmp_path / "a.txt").write_text("hello\n")
    with pytest.raises(PromptFileError, match="not both"):
        resolve_prompts(tmp_path / "a.txt", "seed-spectrum", "seed-spectrum")


# ---- issue 14, part 3: files are read strictly, and every refusal names the file line that is wrong ----------


def refused(tmp_path, name: str, content: str | bytes) -> str:
    """The one-line message loading `content` as `name` gives; it must be a PromptFileError."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    with pytest.raises(PromptFileError) as info:
        load_prompt_file(path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: "):]


def loads(tmp_path, name: str, content: str):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8", newline="")
    return load_prompt_file(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("cat.yaml", "story: [a, b]\ncode: [c]\nstory: [d]\n", "line 3: repeated key 'story' (first at line 1)"),
        ("text.yaml", "prompts:\n  - text: a\n    id: x\n    text: b\n", "line 4: repeated key 'text' (first at line 2)"),
        ("id.yaml", "prompts:\n  - {text: a,\n     id: x, id: y}\n", "line 3: repeated key 'id' (first at line 3)"),
        ("top.yaml", "prompts: [a]\nname: n\nprompts: [b]\n", "line 3: repeated key 'prompts' (first at line 1)"),
        ("cat.json", '{\n "story": ["a"],\n "code": ["b"],\n  "story": ["c"]\n}', "line 4: repeated key 'story'"),
        ("text.json", '[\n {"text": "a",\n  "text": "b"}\n]', "line 3: repeated key 'text' (first at line 2)"),
        ("id.json", '[{"text": "a", "id": "x",\n\n "id"\n : "y"}]', "line 3: repeated key 'id' (first at line 1)"),
        ("top.json", '{"prompts": ["a"],\n"name": "n",\n"name": "m"}', "line 3: repeated key 'name'"),
    ],
)
def test_repeated_keys_refused_at_the_second(tmp_path, name, content, message):
    assert refused(tmp_path, name, content).startswith(message)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("ws.yaml", "prompts:\n  - {text: a}\n\n  - {text: '  '}\n", "line 4: empty or whitespace-only prompt"),
        ("int.yaml", "prompts:\n  - text: a\n  - category: c\n    text: 42\n",
         "line 4: prompt text must be a string, got integer 42; quote it"),
        ("date.yaml", "story:\n  - a\n  - 2024-01-01\n", "line 3: prompt text must be a string, got date"),
        ("flow.yaml", "code: [a,\n  b,\n  '']\n", "line 3: empty or whitespace-only prompt"),
        ("bool.yaml", "story: [a]\nyes: [b]\n", "line 2: category must be a string, got boolean True; quote it"),
        ("raw.yaml", "story: [a]\ncode: [\"b\x1bc\"]\n", "line 2: malformed YAML (the character '\\x1b' is not"),
        ("badval.yaml", "prompts:\n  - {text: a}\n  - {text: b, id: 2024-13-45}\n", "line 3: malformed YAML"),
        ("ws.json", '[\n"a",\n\n" "\n]', "line 4: empty or whitespace-only prompt"),
        ("item.json", '[\n"a",\n7\n]', "line 3: expected a prompt string or a mapping, got integer 7"),
        ("nested.json", "[" * 50000, "line 1: malformed JSON (nested too deeply)"),
        ("notext.json", '[\n{"text": "a"},\n{"category": "b"}]', "line 3: a prompt mapping has no 'text'"),
    ],
)
def test_yaml_and_json_prompts_name_their_line(tmp_path, name, content, message):
    assert refused(tmp_path, name, content).startswith(message)


def test_jsonl_loads(tmp_path):
    content = ('{"text": "1 + 1 =", "category": "math", "id": "m1", "label": "one"}\r\n\n   \n'
               '{"prompt": "line\\nbreak\\ttab \\u2028", "category": "code"}\n{"text": "x", "id": 3}')
    prompt_set = loads(tmp_path, "p.jsonl", content)
    assert prompt_set.texts == ["1 + 1 =", "line\nbreak\ttab \u2028", "x"]
    assert prompt_set.categories == ["math", "code", "uncategorized"]
    assert prompt_set.ids == ["m1", derive_id("code", "line\nbreak\ttab \u2028"), "3"]
    assert prompt_set.labels == ["one", "", ""]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a"}\n\n["b"]\n', "line 3: expected one JSON object per line, got a list"),
        ('{"text": "a"}\n"b"\n', "line 2: expected one JSON object per line, got str"),
        ('{"text": "a"}\n{"text": "b",\n', "line 2: malformed JSON"),
        ('{"text": "a"}\n{"text": "b"} {"text": "c"}\n', "line 2: malformed JSON (Extra data)"),
        ('{"text": "a"}\n\n{"text": "b", "category": "x", "category": "y"}\n', "line 3: repeated key 'category'"),
        ('{"text": "a"}\n{"text": "b", "tags": []}\n', "line 2: unknown key 'tags' in a prompt"),
        ('{"text": "a", "id": "k"}\n{"text": "b", "id": "k"}\n', "line 2: duplicate prompt id 'k'"),
    ],
)
def test_jsonl_refusals_name_the_line(tmp_path, content, message):
    assert refused(tmp_path, "p.jsonl", content).startswith(message)


def test_tsv_loads_with_and_without_header(tmp_path):
    with_header = 'category\tprompt\tid\tlabel\nmath\t2, 2\tm1\t7\ncode\t"a\tb ""q"""\tc1\t\n'
    prompt_set = loads(tmp_path, "a.tsv", with_header)
    assert prompt_set.texts == ["2, 2", 'a\tb "q"']
    assert prompt_set.ids == ["m1", "c1"] and prompt_set.labels == ["7", ""]
    assert loads(tmp_path, "b.tsv", "math\t2+2=\ncode\tx = 1\n").categories == ["math", "code"]
    # Never plain text: a line without a tab is a row of one field, refused.
    assert refused(tmp_path, "c.tsv", "math\t2+2=\njust a line\n").startswith(
        "line 2: expected columns category<TAB>prompt[<TAB>id][<TAB>label], got 1 fields")


def test_csv_unterminated_quote_names_the_line_it_opened(tmp_path):
    content = 'category,prompt\nmath,"two\nlines"\nmath,"never closed\nmore,stuff\nx,y\n'
    assert refused(tmp_path, "a.csv", content).startswith("line 4: unterminated quoted field")
    # The quote opens in a later field of a record that started lines before.
    content = 'category,prompt,id\nmath,"a\nb\nc",x\nmath,b,"m\n1\n'
    assert refused(tmp_path, "b.csv", content).startswith("line 5: unterminated quoted field")
    content = 'category,prompt,id\nmath,"a\nb","m\n'
    assert refused(tmp_path, "c.csv", content).startswith("line 3: unterminated quoted field")


def test_csv_errors_name_file_lines_not_records(tmp_path):
    content = 'category,prompt\nmath,"one\ntwo\nthree"\n\nmath,"  "\n'
    assert refused(tmp_path, "a.csv", content).startswith("line 6: empty or whitespace-only prompt")
    content = 'category,prompt\nmath,"one\ntwo"\nmath,"x"y\n'
    assert refused(tmp_path, "b.csv", content).startswith("line 4: malformed CSV (text after the closing quote")
    content = 'category,prompt,id\nmath,"a\nb",k\nmath,c,k\n'
    assert refused(tmp_path, "c.csv", content) == (
        f"line 4: duplicate prompt id 'k' (also at {tmp_path / 'c.csv'}: line 2); ids must be unique")
    assert refused(tmp_path, "d.csv", "math,a\rb,c\n").startswith("line 1: malformed CSV (a carriage return")


@pytest.mark.parametrize("character", ["\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\x1b",
                                       "\x7f", "\x9b", "\x00", "\r"])
def test_txt_control_characters_refused_naming_the_line(tmp_path, character):
    message = refused(tmp_path, "p.txt", f"# math\r\n2 + 2 =\r\nbefore{character}after\r\nlast\r\n")
    assert message.startswith(f"line 3: the control character {character!r} is inside the line")


def test_txt_headers_blank_lines_and_line_endings(tmp_path):
    content = "first\r\n  # math  \r\n\t2 + 2 =\t\r\n\n   \n7 * 6 =\n#\nlast\n#   story\n# code\nx = 1"
    prompt_set = loads(tmp_path, "p.txt", content)
    assert prompt_set.texts == ["first", "\t2 + 2 =\t", "7 * 6 =", "last", "x = 1"]
    assert prompt_set.categories == ["uncategorized", "math", "math", "uncategorized", "code"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("cat.yaml", "prompts:\n  - text: a\n  - text: b\n    category: [x]\n",
         "line 4: category must be a string, got a list"),
        ("id.yaml", "prompts:\n  - text: a\n    id: {k: v}\n", "line 3: id must be a string, got a mapping"),
        ("label.json", '[{"text": "a",\n"label": ["x"]}]', "line 2: label must be a string, got a list"),
        ("text.json", '[\n{"text": ["a"]}]', "line 2: prompt text must be a string, got a list"),
        ("float.json", '[\n{"text": "a", "id": 1.0}]', "line 2: id must be a string, got number 1.0; quote it"),
        ("bool.jsonl", '{"text": "a", "label": true}\n', "line 1: label must be a string, got boolean True"),
        ("float.yaml", "1.5: [a]\n", "line 1: category must be a string, got number 1.5; quote it"),
        ("null.yaml", "~: [a]\n", "line 1: a category key is null"),
        ("catmap.yaml", "story: {a: b}\n", "line 1: category 'story' must map to a list of prompt strings"),
        ("name.yaml", "prompts: [a]\nname: [x]\n", "line 2: name must be a string, got a list"),
        ("desc.json", '{"prompts": ["a"],\n"description": 5}', "line 2: description must be a string"),
    ],
)
def test_non_strings_where_strings_belong_refused(tmp_path, name, content, message):
    assert refused(tmp_path, name, content).startswith(message)


def test_integers_are_names_exactly(tmp_path):
    prompt_set = loads(tmp_path, "p.yaml", "prompts:\n  - {text: a, id: 12345678901234567890, label: 3, category: 7}\n")
    assert (prompt_set.ids, prompt_set.labels, prompt_set.categories) == (["12345678901234567890"], ["3"], ["7"])
    assert loads(tmp_path, "p.json", '{"2024": ["a"]}').categories == ["2024"]


def test_text_keeps_control_characters_names_refuse_them(tmp_path):
    text = "line one\nline\ttwo \x1b[31m red \x7f \x85 \u2028 end\r"
    rows = [{"text": text, "category": " math ", "id": " m1 ", "label": " 1 "}]
    for name, content in [("p.json", json.dumps(rows)), ("p.jsonl", json.dumps(rows[0]) + "\n"),
                          ("p.yaml", yaml_dump({"prompts": rows})), ("p.csv", f'math,"{text}",m1,1\n'),
                          ("p.tsv", f'math\t"{text}"\tm1\t1\n')]:
        prompt_set = loads(tmp_path, name, content)
        assert prompt_set.texts == [text], name
        assert (prompt_set.categories, prompt_set.ids, prompt_set.labels) == (["math"], ["m1"], ["1"]), name
    assert refused(tmp_path, "n.json", '[\n{"text": "a\\u0000b"}]').startswith("line 2: prompt contains a NUL byte")
    assert refused(tmp_path, "n.csv", "math,a\x00b\n").startswith("line 1: prompt contains a NUL byte")
    for field, value in [("category", "a\x1bb"), ("id", "x\ny"), ("label", "l\u2028m"), ("category", "a\tb")]:
        content = json.dumps([{"text": "a"}, {"text": "b", field: value}], indent=1)
        message = refused(tmp_path, "c.json", content)
        assert message.startswith(f"line 7: {field} {value!r} contains the control character"), message
    assert refused(tmp_path, "c.csv", "a,b\n\"x\ny\",c\n").startswith("line 2: category 'x\\ny' contains")
    assert refused(tmp_path, "c.txt", "# a\tb\nprompt\n").startswith("line 1: category 'a\\tb' contains")


def yaml_dump(data) -> str:
    import yaml

    return yaml.safe_dump(data, allow_unicode=False)


def test_non_regular_files_refused_without_blocking(tmp_path):
    for device in ("/dev/zero", "/dev/urandom"):
        if Path(device).exists():
            with pytest.raises(PromptFileError, match=re.escape(f"{device}: is not a regular file")):
                load_prompt_file(device)
    fifo = tmp_path / "prompts.txt"
    os.mkfifo(fifo)  # nothing ever writes to it: opening it for a blocking read would hang
    with pytest.raises(PromptFileError, match=re.escape(f"{fifo}: is not a regular file")):
        load_prompt_file(fifo)


def test_size_limit_and_unreadable_files(tmp_path, monkeypatch):
    (tmp_path / "big.txt").write_text("a prompt\n" * 10)
    monkeypatch.setattr(prompts_module, "MAX_PROMPT_FILE_BYTES", 50)
    with pytest.raises(PromptFileError, match=r"big\.txt: prompts file is larger than 50 bytes"):
        load_prompt_file(tmp_path / "big.txt")
    monkeypatch.undo()
    (tmp_path / "ok.txt").write_text("a prompt\n")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(prompts_module.os, "open", denied)
    with pytest.raises(PromptFileError) as info:
        load_prompt_file(tmp_path / "ok.txt")
    assert str(info.value) == (f"{tmp_path / 'ok.txt'}: cannot read the prompts file (Permission denied); check it "
                               "and its permissions")


def test_extensions(tmp_path):
    for name in ("p.txt", "p.TEXT", "prompts"):
        assert loads(tmp_path, name, "# math\n2 + 2 =\n").categories == ["math"]
    for name in ("p.md", "p.yaml.bak", "p.xml"):
        message = refused(tmp_path, name, "2 + 2 =\n")
        assert message.startswith(f"unknown prompts file extension {Path(name).suffix!r}; use .yaml, .yml, .json")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("typo.yaml", "prompts:\n  - text: a\n    categry: b\n", "line 3: unknown key 'categry' in a prompt"),
        ("both.json", '[\n{"text": "a",\n "prompt": "b"}]', "line 3: a prompt has both 'text' and 'prompt'"),
        ("extra.yaml", "prompts: [a]\nmath: [b]\n", "line 2: unknown top-level key 'math' next to 'prompts'"),
        ("name.yaml", "name: my set\nstory: [a, b]\n", "line 1: 'name' is read only next to 'prompts'"),
        ("hdr.csv", "category,prompt,notes\nmath,a,b\n", "line 1: the header row has an unknown column 'notes'"),
        ("hdr2.csv", "\n\ncategory,prompt,text\nmath,a,b\n", "line 3: the header row names the column 'prompt'"),
    ],
)
def test_unknown_keys_and_columns_refused(tmp_path, name, content, message):
    assert refused(tmp_path, name, content).startswith(message)


def test_csv_header_any_order_and_text_column(tmp_path):
    prompt_set = loads(tmp_path, "p.csv", " Label ,TEXT,Category,id\n1,2+2=,math,m1\n2,x = 1,code\n")
    assert prompt_set.texts == ["2+2=", "x = 1"] and prompt_set.labels == ["1", "2"]
    assert prompt_set.ids == ["m1", derive_id("code", "x = 1")]
