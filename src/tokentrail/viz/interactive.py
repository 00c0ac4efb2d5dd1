"""Interactive trajectories (plotly), 2-D and 3-D, that work offline.

Plotly renders hover text and trace text as a small HTML subset, so every piece of untrusted text (prompts,
categories, labels, tokens, the model name) is HTML-escaped here before it reaches a figure. The figure JSON
itself is safe inside a <script>: plotly's serializer writes `<`, `>` and `/` as \\u escapes.
"""

from __future__ import annotations

import html
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from tokentrail.atomic import atomic_write_bytes, atomic_write_text
from tokentrail.viz import (
    FigureMeta,
    category_styles,
    display_labels,
    final_layer_index,
    layer_name,
)

__all__ = ["escape", "hover_texts", "plotly_config", "trajectories_figure", "trajectories_html"]

_WRAP = 60


def escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _wrapped(text: str, width: int = _WRAP, max_lines: int = 6) -> str:
    """Escaped text broken into <br>-joined lines, so a long prompt gives a readable, bounded tooltip."""
    lines = textwrap.wrap(str(text), width=width, replace_whitespace=True, drop_whitespace=True) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 1] + "…"
    return "<br>".join(escape(line) for line in lines)


def _token_repr(token: str) -> str:
    # repr() shows whitespace-only and control-character tokens unambiguously.
    return escape(repr(str(token)))


def hover_texts(result: Any, meta: FigureMeta, prompt: int) -> list[str]:
    """One hover label per point of a prompt's trajectory (all untrusted parts escaped)."""
    layers = np.asarray(result.layers).astype(int)
    final = final_layer_index(result)
    names = display_labels(meta)
    bif_layer = getattr(result, "bifurcation_layer", None)
    bif = int(bif_layer[prompt]) if bif_layer is not None and prompt < len(bif_layer) else -1
    toward_list = getattr(result, "bifurcation_toward", None) or []
    toward = toward_list[prompt] if prompt < len(toward_list) else ""
    head = (
        f"<b>#{escape(names[prompt])}</b> · {escape(meta.categories[prompt])}"
        f"<br><i>{_wrapped(meta.prompts[prompt])}</i>"
    )
    out = []
    for layer in layers:
        parts = [head, f"layer: {escape(layer_name(result, layer))}"]
        if meta.lens_tokens is not None:
            # The final-norm state reads out like the last layer: the lens already applies the final norm.
            lens_layer = min(int(layer), final - 1)
            row = meta.lens_tokens[prompt]
            if lens_layer < len(row):
                token = f"lens top token: {_token_repr(row[lens_layer])}"
                if meta.lens_probs is not None:
                    p = float(np.asarray(meta.lens_probs)[prompt, lens_layer])
                    if np.isfinite(p):
                        token += f" (p = {p:.2f})"
                parts.append(token)
        if int(layer) == bif >= 0:
            parts.append("<b>bifurcates here</b>" + (f" toward {escape(toward)}" if toward else ""))
        out.append("<br>".join(parts))
    return out


def _axis_title(ratio: Any, i: int) -> str:
    ratio = np.asarray(ratio, dtype=float).ravel()
    if i < ratio.size and np.isfinite(ratio[i]):
        return f"PC{i + 1} ({100 * ratio[i]:.1f}% of variance)"
    return f"PC{i + 1}"


def trajectories_figure(result: Any, meta: FigureMeta, dims: int = 2) -> go.Figure:
    """One trace per prompt; traces share a legendgroup per category so one legend click hides a category."""
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    proj = np.asarray(result.projection, dtype=float)
    if proj.shape[-1] < dims:
        raise ValueError(f"the projection has {proj.shape[-1]} components; a {dims}-D plot needs {dims}")
    n_prompts, n_points = proj.shape[0], proj.shape[1]
    styles = category_styles(meta.categories)
    names = display_labels(meta)
    shown: set[str] = set()
    traces = []
    for i in range(n_prompts):
        cat = meta.categories[i]
        s = styles[cat]
        first_of_category = cat not in shown
        shown.add(cat)
        # Bigger marker and the prompt's number at the end, like the static figure.
        sizes = [4] * (n_points - 1) + [9]
        sizes[0] = 6
        end_text = [""] * (n_points - 1) + [escape(names[i])]
        common: dict[str, Any] = {
            "name": escape(cat),
            "legendgroup": cat,
            "showlegend": first_of_category,
            "mode": "lines+markers+text",
            "text": end_text,
            "hovertext": hover_texts(result, meta, i),
            "hoverinfo": "text",
            "hoverlabel": {"align": "left"},
            "customdata": [meta.prompt_ids[i]] * n_points,
            "uid": f"prompt-{i}",
        }
        if dims == 2:
            traces.append(
                go.Scatter(
                    x=proj[i, :, 0],
                    y=proj[i, :, 1],
                    line={"color": s.color, "dash": s.dash, "width": 2},
                    marker={"size": sizes, "symbol": s.symbol, "color": s.color},
                    textposition="middle right",
                    textfont={"color": s.color, "size": 12},
                    **common,
                )
            )
        else:
            traces.append(
                go.Scatter3d(
                    x=proj[i, :, 0],
                    y=proj[i, :, 1],
                    z=proj[i, :, 2],
                    line={"color": s.color, "dash": s.dash, "width": 4},
                    marker={"size": [v / 2 for v in sizes], "symbol": s.symbol_3d, "color": s.color},
                    textposition="middle right",
                    textfont={"color": s.color, "size": 11},
                    **common,
                )
            )
    fig = go.Figure(traces)
    ratio = result.explained_variance_ratio
    title = (
        f"{meta.model_name}: last-token trajectories ({dims}-D PCA)"
        if meta.model_name
        else (f"last-token trajectories ({dims}-D PCA)")
    )
    fig.update_layout(
        title={"text": escape(title), "x": 0.01},
        template="plotly_white",
        hovermode="closest",
        legend={
            "title": {"text": "category (click to hide)"},
            "groupclick": "togglegroup",
            "itemclick": "toggle",
            "itemdoubleclick": "toggleothers",
        },
        margin={"l": 60, "r": 20, "t": 60, "b": 50},
        height=700,
    )
    if dims == 2:
        fig.update_xaxes(title_text=_axis_title(ratio, 0), zeroline=False)
        fig.update_yaxes(title_text=_axis_title(ratio, 1), zeroline=False)
    else:
        fig.update_layout(
            scene={
                "xaxis": {"title": {"text": _axis_title(ratio, 0)}},
                "yaxis": {"title": {"text": _axis_title(ratio, 1)}},
                "zaxis": {"title": {"text": _axis_title(ratio, 2)}},
            }
        )
    return fig


def plotly_config() -> dict[str, Any]:
    # No links to plotly's servers and no logo: the page must make no network requests.
    return {
        "displaylogo": False,
        "showSendToCloud": False,
        "responsive": True,
        "toImageButtonOptions": {"format": "svg"},
    }


def trajectories_html(
    result: Any, meta: FigureMeta, path: Path, dims: int = 2, include_plotlyjs: bool | str = True
) -> Path:
    """Write a standalone HTML page; plotly.js is inlined by default so the file works offline on its own.

    `include_plotlyjs="directory"` writes one shared `plotly.min.js` beside the page instead (smaller when
    many pages sit in one folder); a CDN is never used.
    """
    if include_plotlyjs == "cdn" or (isinstance(include_plotlyjs, str) and "://" in include_plotlyjs):
        raise ValueError("tokentrail pages must work offline: use include_plotlyjs=True or 'directory'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = trajectories_figure(result, meta, dims)
    page = fig.to_html(
        include_plotlyjs=include_plotlyjs,
        include_mathjax=False,
        full_html=True,
        config=plotly_config(),
        div_id=f"trajectories-{dims}d",
    )
    if include_plotlyjs == "directory":  # the page loads plotly.min.js from beside it
        bundle = path.parent / "plotly.min.js"
        script = get_plotlyjs().encode("utf-8")
        if not bundle.is_file() or bundle.read_bytes() != script:
            atomic_write_bytes(bundle, script)
    atomic_write_text(path, page)  # never half a page where the last good one was
    return path
