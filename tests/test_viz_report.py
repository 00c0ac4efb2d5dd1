"""report.html: self-contained, escaped, and working in a real headless Chromium."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

from tokentrail.viz import make_all_figures
from tokentrail.viz.interactive import trajectories_figure
from tokentrail.viz.report import build_report
from viz_fixtures import HOSTILE, fake_meta, fake_result, load_in_chromium, needs_chromium

ESCAPED_HOSTILE = "&lt;script&gt;alert(1)&lt;/script&gt;"


class _Page(HTMLParser):
    """Start tags with attributes, plus the raw text of <script> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._in_script: dict[str, str | None] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script = dict(attrs)
            self.scripts.append((self._in_script, ""))

    def handle_data(self, data):
        if self._in_script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = None


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    result = fake_result()
    meta = fake_meta(result)
    figures = make_all_figures(result, meta, run_dir, fps=5)
    tables = {
        "separation_by_layer": [
            {"layer": i, "silhouette": float(s), "knn": float(k), "significant": bool(p < 0.05)}
            for i, (s, k, p) in enumerate(
                zip(
                    result.separation["silhouette"],
                    result.separation["knn_accuracy"],
                    result.separation["p_value"],
                )
            )
        ],
        "bifurcations": [{"prompt": HOSTILE, "layer": 3, "toward": "code"}],
    }
    extra = [
        {
            "title": "Steering <b>math</b>",
            "text": "alpha & beta </section>",
            "html_figures": [figures["trajectories_2d"][0], figures["depth"][0]],
            "plotly_figures": [trajectories_figure(result, meta, dims=2)],
            "table": [{"alpha": 0.5, "moved_toward": "</script><script>alert(3)</script>"}],
        }
    ]
    run_info = {
        "model": meta.model_name,
        "prompt_file": HOSTILE,
        "layers": {"include_final": True},
        "seed": 0,
    }
    path = build_report(run_dir, run_info, result, meta, figures, tables, extra)
    return {"dir": run_dir, "path": path, "result": result, "meta": meta, "figures": figures}


def test_make_all_figures_writes_every_figure(run):
    figures = run["figures"]
    assert set(figures) == {
        "trajectories",
        "depth",
        "dynamics",
        "separation",
        "logit_lens",
        "trajectories_2d",
        "trajectories_3d",
        "thought_evolution",
    }
    for paths in figures.values():
        for path in paths:
            assert path.parent == run["dir"] / "figures"
            assert path.is_file() and path.stat().st_size > 1000
    assert [p.suffix for p in figures["trajectories"]] == [".png", ".svg"]
    with Image.open(figures["thought_evolution"][0]) as gif:
        assert gif.n_frames == len(run["result"].layers)


def test_every_resource_is_embedded_or_local(run):
    page = _parse(run["path"])
    run_dir = run["dir"].resolve()
    references = [
        (tag, attr, value)
        for tag, attrs in page.tags
        for attr, value in attrs.items()
        if attr in ("src", "href", "srcset", "data", "action", "poster") and value is not None
    ]
    assert references
    for tag, attr, value in references:
        if value.startswith(("data:", "#")):
            continue
        parsed = urlparse(value)
        assert not parsed.scheme and not parsed.netloc, (tag, attr, value)
        target = (run_dir / unquote(parsed.path)).resolve()
        assert target.is_relative_to(run_dir) and target.is_file(), (tag, attr, value)
    scripts_with_src = [attrs for attrs, _ in page.scripts if "src" in attrs]
    assert not scripts_with_src
    assert not [attrs for tag, attrs in page.tags if tag == "link"]
    # plotly.js itself is inlined once.
    assert sum(len(text) > 1_000_000 for _, text in page.scripts) == 1


def test_untrusted_text_is_escaped_everywhere(run):
    raw = run["path"].read_text(encoding="utf-8")
    assert HOSTILE not in raw
    assert "<script>alert(3)</script>" not in raw
    assert "<img src=x" not in raw
    assert ESCAPED_HOSTILE in raw  # settings, prompts table, tables
    assert "Steering &lt;b&gt;math&lt;/b&gt;" in raw
    page = _parse(run["path"])
    nonce = re.search(r"script-src 'nonce-([^']+)'", raw).group(1)
    csp = next(
        a["content"] for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"
    )
    assert "default-src 'none'" in csp and "connect-src 'none'" in csp
    for attrs, text in page.scripts:
        # Every script either carries this page's nonce or is inert JSON data.
        assert attrs.get("nonce") == nonce or attrs.get("type") == "application/json"
        if attrs.get("type") == "application/json":
            assert "</" not in text and "<!--" not in text
            json.loads(text)
    images = [a for t, a in page.tags if t == "img"]
    assert images and all(a["src"].startswith("data:image/") for a in images)


def test_figures_tables_and_prompts_are_all_there(run):
    page = _parse(run["path"])
    raw = run["path"].read_text(encoding="utf-8")
    ids = {a.get("id") for _, a in page.tags}
    for key in ("trajectories", "depth", "thought_evolution", "dynamics", "separation", "logit_lens"):
        assert f"fig-{key}" in ids
    figure_blocks = [json.loads(text) for attrs, text in page.scripts if "data-plot" in attrs]
    # 2-D, 3-D, and the plotly figure of the extra section; one trace per prompt in each.
    assert len(figure_blocks) == 3
    assert all(len(block["data"]) == run["meta"].n_prompts for block in figure_blocks)
    assert {block["data"][0]["type"] for block in figure_blocks} == {"scatter", "scatter3d"}
    assert "separation by layer" in raw and "<th>silhouette</th>" in raw
    prompt_rows = re.search(r'<table class="prompts">(.*?)</table>', raw, re.DOTALL).group(1).count("<tr>")
    assert prompt_rows == run["meta"].n_prompts + 1  # plus the header
    frames = [a for t, a in page.tags if t == "iframe"]
    assert [f["src"] for f in frames] == ["figures/trajectories_2d.html"]
    assert frames[0]["sandbox"] == "allow-scripts"


def test_report_without_optional_analyses(tmp_path):
    result = fake_result(with_separation=False, k=2)
    meta = fake_meta(result, with_lens=False)
    figures = make_all_figures(result, meta, tmp_path, fps=4)
    assert "separation" not in figures and "logit_lens" not in figures and "trajectories_3d" not in figures
    path = build_report(tmp_path, {}, result, meta, figures)
    raw = path.read_text(encoding="utf-8")
    assert "final lens token" not in raw and "No settings were recorded." in raw
    blocks = [json.loads(t) for a, t in _parse(path).scripts if "data-plot" in a]
    assert len(blocks) == 1


@pytest.mark.browser
@needs_chromium
def test_report_in_headless_chromium(run, tmp_path):
    shot = tmp_path / "report.png"
    hover_js = """
      (function () {
        var gd = document.getElementById('trajectories-2d');
        Plotly.Fx.hover(gd, [{curveNumber: 1, pointNumber: 3}]);
        var layer = gd.querySelector('.hoverlayer');
        return JSON.stringify({text: layer.textContent,
                               scripts: layer.querySelectorAll('script').length});
      })()
    """
    seen = load_in_chromium(
        run["path"].as_uri(),
        screenshot=shot,
        evaluate={
            "plots": "document.querySelectorAll('.js-plotly-plot .main-svg').length",
            "images": "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length",
            "all_images": "document.images.length",
            "scripts": "document.scripts.length",
            "hover": hover_js,
        },
    )
    assert seen["exceptions"] == [] and seen["console_errors"] == []
    assert seen["log_errors"] == []
    assert seen["dialogs"] == []  # no alert() ran
    run_dir = run["dir"].resolve()
    for url in seen["requests"]:
        parsed = urlparse(url)
        assert parsed.scheme in ("data", "file"), url
        if parsed.scheme == "file":
            assert Path(unquote(parsed.path)).resolve().is_relative_to(run_dir), url
    # The hostile prompt is shown as text, in the page and in plotly's hover label.
    assert HOSTILE in seen["text"]
    assert "</script><script>alert(3)</script>" in seen["text"]
    hover = json.loads(seen["hover"])
    assert HOSTILE in hover["text"] and hover["scripts"] == 0
    # Nothing the prompts carry became an element: every image is one of the embedded figures.
    assert seen["all_images"] == seen["images"] == 7
    page = _parse(run["path"])
    assert seen["scripts"] == len(page.scripts)
    assert seen["plots"] >= 3
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10  # a rendered page, not a blank one
