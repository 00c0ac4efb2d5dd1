"""Untrusted text end to end: hostile prompts traced by a real (tiny) model, reported, opened in Chromium."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokentrail import cli
from tokentrail.viz.report import build_report
from viz_fixtures import fake_meta, fake_result, load_in_chromium, needs_chromium

HOSTILE_PROMPTS = [
    "<script>alert(1)</script>",
    "</textarea><script>alert(2)</script>",
    '" onmouseover="alert(3)" x="',
    "</title><img src=x onerror=alert(4)>",
    "bidi \u202eevil\u202c text \u2066isolate\u2069",
    "</script><svg onload=alert(5)>",
]


@pytest.mark.browser
@needs_chromium
def test_hostile_prompts_render_as_text(tmp_path, tiny_model_dir):
    rows = [{"category": f"c{i % 2}", "text": text} for i, text in enumerate(HOSTILE_PROMPTS)]
    (tmp_path / "hostile.json").write_text(json.dumps(rows))
    assert cli.main(["run", str(tmp_path / "hostile.json"), "--model", str(tiny_model_dir), "--out",
                     str(tmp_path / "run"), "-q", "--permutations", "10"]) == 0
    page = tmp_path / "run" / "report.html"
    raw = page.read_text(encoding="utf-8")
    for text in HOSTILE_PROMPTS[:4]:
        assert text not in raw  # never written unescaped
    seen = load_in_chromium(page.as_uri(), evaluate={
        "images": "document.images.length",
        "textareas": "document.querySelectorAll('textarea').length",
        "handlers": "document.querySelectorAll('[onmouseover],[onerror],[onload]').length",
    })
    assert seen["dialogs"] == [] and seen["exceptions"] == [] and seen["console_errors"] == []
    assert seen["textareas"] == 0 and seen["handlers"] == 0
    for text in HOSTILE_PROMPTS:
        assert text in seen["text"], text
    # The SVG figures carry the prompts' labels only as escaped text.
    for svg in (tmp_path / "run" / "figures").glob("*.svg"):
        assert "<script" not in svg.read_text(encoding="utf-8")


@pytest.mark.browser
@needs_chromium
def test_nul_in_a_prompt_from_the_api_renders_as_text(tmp_path):
    """Files refuse NUL; a prompt given through the Python API still must not break the page."""
    result = fake_result()
    meta = fake_meta(result)
    meta.prompts[0] = "before\x00after <b>not bold</b>"
    build_report(tmp_path, {"model": "fake"}, result, meta, figures={})
    seen = load_in_chromium((tmp_path / "report.html").as_uri(),
                            evaluate={"bold": "document.querySelectorAll('td b').length"})
    assert seen["dialogs"] == [] and seen["exceptions"] == []
    assert "before\u2400after <b>not bold</b>" in seen["text"] and seen["bold"] == 0
    assert Path(tmp_path / "report.html").read_text(encoding="utf-8").count("\x00") == 0
