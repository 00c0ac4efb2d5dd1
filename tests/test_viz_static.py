"""Static matplotlib figures: what is drawn, not only that files appear."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.lines import Line2D
from matplotlib.text import Annotation, Text
from PIL import Image

from tokentrail.viz import OKABE_ITO, category_styles, display_labels, static
from viz_fixtures import HOSTILE, fake_meta, fake_result, meta_fixture, result_fixture  # noqa: F401  (fixtures)

SVG_NS = "{http://www.w3.org/2000/svg}"


def _by_gid(fig, prefix: str) -> list:
    return [a for a in fig.findobj(lambda a: (a.get_gid() or "").startswith(prefix))]


def _svg_texts(path: Path) -> list[str]:
    root = ET.parse(path).getroot()  # raises on malformed XML
    return ["".join(t.itertext()) for t in root.iter(f"{SVG_NS}text")]


def test_one_line_per_prompt_coloured_by_category(result, meta):
    fig = static.draw_trajectories(result, meta)
    lines = _by_gid(fig, "trajectory-")
    assert len(lines) == meta.n_prompts
    assert all(isinstance(line, Line2D) for line in lines)
    styles = category_styles(meta.categories)
    n_raw = result.depth_projection.shape[1]
    for line in lines:
        i = int(line.get_gid().split("-")[1])
        assert to_hex(line.get_color()) == styles[meta.categories[i]].color.lower()
        # The raw layers 0..L are one line; the final-norm state is drawn as its own dotted step.
        np.testing.assert_allclose(line.get_xdata(), result.projection[i, :n_raw, 0])
        np.testing.assert_allclose(line.get_ydata(), result.projection[i, :n_raw, 1])
    assert len(_by_gid(fig, "final-segment-")) == meta.n_prompts


def test_legend_has_one_entry_per_category_and_axes_show_variance(result, meta):
    fig = static.draw_trajectories(result, meta)
    ax = fig.axes[0]
    legend = next(
        a for a in ax.artists + [ax.get_legend()] if a is not None and a.get_gid() == "category-legend"
    )
    entries = [t.get_text() for t in legend.get_texts()]
    assert entries == [f"{c} (3)" for c in ["math", "code", "poetry", "logic"]]
    assert ax.get_xlabel() == "PC1 (55.0% of variance)"
    assert ax.get_ylabel() == "PC2 (21.0% of variance)"


def test_each_line_end_carries_its_label(result, meta):
    fig = static.draw_trajectories(result, meta)
    labels = {a.get_gid(): a for a in _by_gid(fig, "label-")}
    assert len(labels) == meta.n_prompts
    for i, name in enumerate(display_labels(meta)):
        label = labels[f"label-{i}"]
        assert isinstance(label, Annotation)
        assert label.get_text() == name
        # The annotation points at the end of the trajectory (the last traced state).
        np.testing.assert_allclose(label.xy, result.projection[i, -1, :2])


def test_unlabelled_prompts_are_numbered():
    res = fake_result()
    m = fake_meta(res, numbered=False)
    fig = static.draw_trajectories(res, m)
    texts = sorted(a.get_text() for a in _by_gid(fig, "label-"))
    assert texts == sorted(str(i + 1) for i in range(m.n_prompts))


def test_bifurcation_markers_sit_on_the_bifurcation_layer(result, meta):
    fig = static.draw_trajectories(result, meta)
    markers = {a.get_gid(): a for a in _by_gid(fig, "bifurcation-")}
    assert set(markers) == {"bifurcation-0", "bifurcation-3"}
    np.testing.assert_allclose(
        [markers["bifurcation-0"].get_xdata()[0], markers["bifurcation-0"].get_ydata()[0]],
        result.projection[0, 3, :2],
    )
    assert not _by_gid(static.draw_trajectories(result, meta, show_bifurcations=False), "bifurcation-")


def test_layer_ticks_mark_every_layer(result, meta):
    fig = static.draw_trajectories(result, meta, layer_ticks=True)
    assert all(line.get_marker() == "." for line in _by_gid(fig, "trajectory-"))
    assert _by_gid(fig, "layer-tick")
    assert not _by_gid(static.draw_trajectories(result, meta), "layer-tick")


def test_png_and_svg_are_written_and_svg_keeps_labels_as_escaped_text(tmp_path, result, meta):
    meta.categories = [c if c != "logic" else 'lo<g>ic & "$x$"' for c in meta.categories]
    paths = static.plot_trajectories(result, meta, tmp_path / "trajectories")
    assert [p.name for p in paths] == ["trajectories.png", "trajectories.svg"]
    with Image.open(paths[0]) as png:
        assert png.format == "PNG" and png.width > 1000 and png.height > 700
    texts = _svg_texts(paths[1])
    for name in display_labels(meta):
        assert name in texts
    # Category text arrives intact through XML escaping, and `$` does not switch on mathtext.
    assert 'lo<g>ic & "$x$" (3)' in texts
    raw = paths[1].read_text(encoding="utf-8")
    assert "lo<g>ic" not in raw and "lo&lt;g&gt;ic" in raw
    # Prompts are never drawn into static figures.
    assert not any("costs" in t or "alert" in t for t in texts)
    assert HOSTILE not in raw


def test_fifty_prompts_stay_readable():
    res = fake_result(n_categories=10, per_category=5, n_raw=25)
    m = fake_meta(res, n_categories=10, per_category=5)
    fig = static.draw_trajectories(res, m)
    assert len(_by_gid(fig, "trajectory-")) == 50
    styles = category_styles(m.categories)
    # Beyond Okabe-Ito's eight colours the line style changes, so categories 9 and 10 stay distinguishable.
    assert [s.color for s in list(styles.values())[:8]] == list(OKABE_ITO)
    assert styles["cat8"].linestyle != styles["math"].linestyle
    assert len({(s.color, str(s.linestyle)) for s in styles.values()}) == 10
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    # Text's own extent: an Annotation's would include its leader line.
    boxes = [Text.get_window_extent(a, renderer) for a in _by_gid(fig, "label-")]
    overlaps = [
        (a, b)
        for a, b in itertools.combinations(boxes, 2)
        if min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1
    ]
    assert not overlaps


def test_depth_view_puts_layers_on_x(result, meta):
    fig = static.draw_depth(result, meta, component=1)
    lines = _by_gid(fig, "trajectory-")
    assert len(lines) == meta.n_prompts
    n_raw = result.depth_projection.shape[1]
    for line in lines:
        i = int(line.get_gid().split("-")[1])
        np.testing.assert_array_equal(line.get_xdata(), np.arange(n_raw))
        np.testing.assert_allclose(line.get_ydata(), result.depth_projection[i, :, 1])
    assert sorted(a.get_text() for a in _by_gid(fig, "label-")) == sorted(display_labels(meta))
    assert "depth PC2 (12.0% of variance)" in fig.axes[0].get_ylabel()
    with pytest.raises(ValueError, match="component 5"):
        static.draw_depth(result, meta, component=5)


def test_dynamics_show_category_means(tmp_path, result, meta):
    fig = static.draw_dynamics(result, meta)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles[0].startswith("step size") and titles[1].startswith("dPC2 / dPC1")
    step_ax = fig.axes[0]
    means = {
        line.get_gid(): line for line in step_ax.get_lines() if (line.get_gid() or "").startswith("mean-")
    }
    assert set(means) == {"mean-math", "mean-code", "mean-poetry", "mean-logic"}
    cats = np.array(meta.categories)
    np.testing.assert_allclose(
        means["mean-code"].get_ydata(), result.dynamics["step_size"][cats == "code"].mean(axis=0)
    )
    np.testing.assert_array_equal(
        means["mean-code"].get_xdata(), np.arange(1, result.depth_projection.shape[1])
    )
    assert len(step_ax.collections) == 4  # one spread band per category
    paths = static.plot_dynamics(result, meta, tmp_path / "dynamics")
    assert all(p.stat().st_size > 1000 for p in paths)


def test_separation_draws_chance_or_nothing(tmp_path, result, meta):
    fig = static.draw_separation(result, meta)
    knn_ax = fig.axes[1]
    chance = next(line for line in knn_ax.get_lines() if line.get_gid() == "chance")
    assert chance.get_ydata()[0] == pytest.approx(0.25)
    knn = next(line for line in knn_ax.get_lines() if line.get_gid() == "knn_accuracy")
    np.testing.assert_allclose(knn.get_ydata(), result.separation["knn_accuracy"])
    result.separation = None
    assert static.plot_separation(result, meta, tmp_path / "separation") == []
    assert not list(tmp_path.iterdir())


def test_logit_lens_cells_show_tokens_literally(tmp_path, result, meta):
    fig = static.draw_logit_lens(meta)
    cells = {a.get_gid(): a for a in _by_gid(fig, "cell-")}
    n_raw = result.depth_projection.shape[1]
    assert len(cells) == meta.n_prompts * n_raw
    assert cells["cell-0-1"].get_text() == "\\n"  # whitespace made visible
    assert cells["cell-0-0"].get_text() == "␣the"
    paths = static.plot_logit_lens(meta, tmp_path / "lens")
    texts = _svg_texts(paths[1])
    assert "$x$" in texts  # a literal dollar token, not mathtext
    assert "<script…" in texts  # the hostile token, cut to the cell and escaped as XML
    meta.lens_tokens = None
    assert static.plot_logit_lens(meta, tmp_path / "none") == []
