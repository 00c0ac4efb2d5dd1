"""Prompt files in every format, presets checked against the seed write-up itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

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
    assert preset_names() == ["seed-categories", "seed-spectrum"]


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
