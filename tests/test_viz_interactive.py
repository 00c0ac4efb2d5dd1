"""Interactive plotly trajectories: traces, legend groups, hover text, offline HTML."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import plotly.graph_objects as go
import pytest

from tokentrail.viz import category_styles, interactive
from viz_fixtures import HOSTILE, fake_result, meta_fixture, result_fixture  # noqa: F401  (fixtures)


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_one_trace_per_prompt_grouped_by_category(result, meta):
    fig = interactive.trajectories_figure(result, meta, dims=2)
    assert len(fig.data) == meta.n_prompts
    assert all(isinstance(t, go.Scatter) for t in fig.data)
    assert [t.legendgroup for t in fig.data] == meta.categories
    # Exactly one legend entry per category, so a click hides the whole group.
    shown = [t.name for t in fig.data if t.showlegend]
    assert shown == ["math", "code", "poetry", "logic"]
    assert fig.layout.legend.groupclick == "togglegroup"
    styles = category_styles(meta.categories)
    for i, trace in enumerate(fig.data):
        np.testing.assert_allclose(trace.x, result.projection[i, :, 0])
        np.testing.assert_allclose(trace.y, result.projection[i, :, 1])
        assert trace.line.color == styles[meta.categories[i]].color
        assert trace.text[-1] == meta.labels[i] and not any(trace.text[:-1])
    assert fig.layout.xaxis.title.text == "PC1 (55.0% of variance)"


def test_hover_shows_prompt_category_layer_and_lens_token(result, meta):
    fig = interactive.trajectories_figure(result, meta, dims=2)
    trace = fig.data[0]
    assert len(trace.hovertext) == len(result.layers)
    layer3 = trace.hovertext[3]
    assert "prompt 0 about math costs $5 &amp; more" in layer3
    assert "math" in layer3 and "layer: 3" in layer3
    assert meta.lens_tokens[0][3] == " 42" and "lens top token: &#x27; 42&#x27;" in layer3
    assert "bifurcates here</b> toward code" in layer3
    assert "layer: final norm" in trace.hovertext[-1]


def test_hover_escapes_untrusted_text(result, meta):
    fig = interactive.trajectories_figure(result, meta, dims=2)
    hostile = fig.data[1].hovertext
    assert all("&lt;script&gt;alert(1)&lt;/script&gt;" in h for h in hostile)
    assert not any("<script" in h for h in hostile)
    # The hostile lens token at the last raw layer is escaped too.
    assert "&lt;script&gt;" in hostile[-2].split("lens top token")[1]
    other = fig.data[2].hovertext[0]
    assert "&lt;/script&gt;&lt;img src=x" in other and "<img" not in other
    # Only plotly's own formatting tags remain.
    for text in hostile + fig.data[2].hovertext:
        stripped = text
        for allowed in ("<br>", "<b>", "</b>", "<i>", "</i>"):
            stripped = stripped.replace(allowed, "")
        assert "<" not in stripped and ">" not in stripped


def test_three_d_figure(result, meta):
    fig = interactive.trajectories_figure(result, meta, dims=3)
    assert len(fig.data) == meta.n_prompts
    assert all(isinstance(t, go.Scatter3d) for t in fig.data)
    np.testing.assert_allclose(fig.data[5].z, result.projection[5, :, 2])
    assert fig.layout.scene.zaxis.title.text == "PC3 (7.0% of variance)"
    flat = fake_result(k=2)
    with pytest.raises(ValueError, match="2 components"):
        interactive.trajectories_figure(flat, meta, dims=3)
    with pytest.raises(ValueError):
        interactive.trajectories_figure(result, meta, dims=4)


def test_html_is_offline_and_script_safe(tmp_path, result, meta):
    path = interactive.trajectories_html(result, meta, tmp_path / "t.html", dims=2)
    page = path.read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(page)
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    # plotly.js inline, the figure call: no external source, and no tag injected by a prompt.
    assert scripts and all("src" not in attrs for attrs in scripts)
    assert len(scripts) == 3  # plotly config, plotly.js, the newPlot call
    assert len(page) > 1_000_000  # plotly.js itself is inside
    assert HOSTILE not in page and "onerror=alert(2)>" not in page
    assert not [attrs for tag, attrs in parser.tags if tag == "img"]
    assert "Plotly.newPlot" in page
    with pytest.raises(ValueError, match="offline"):
        interactive.trajectories_html(result, meta, tmp_path / "cdn.html", include_plotlyjs="cdn")


def test_html_can_share_one_plotly_file(tmp_path, result, meta):
    interactive.trajectories_html(result, meta, tmp_path / "a.html", include_plotlyjs="directory")
    assert (tmp_path / "plotly.min.js").is_file()
    parser = _Tags()
    parser.feed((tmp_path / "a.html").read_text(encoding="utf-8"))
    sources = [attrs["src"] for tag, attrs in parser.tags if tag == "script" and "src" in attrs]
    assert sources == ["plotly.min.js"]
