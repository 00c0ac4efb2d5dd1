"""One self-contained HTML page per run: settings, every figure, the analysis tables and the prompts.

Security model (prompts, categories, tokens and table cells are untrusted):

* All markup comes from the Jinja2 template with autoescaping on; nothing is assembled by string
  concatenation. Only three kinds of values are marked safe: base64 data URIs we encoded, JSON written by
  `_script_json`/plotly (which escape `<`, `>`, `/` and `&` so no `</script>` can appear) and plotly.js itself.
* Interactive figures are shipped as `<script type="application/json">` data blocks read by one loader
  script, so no untrusted text ever sits in executable code.
* A Content-Security-Policy with a per-page nonce allows only our own scripts and no network access, as a
  second line of defence should anything slip through.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from markupsafe import Markup

from tokentrail.atomic import atomic_write_text
from tokentrail.viz import FigureMeta, category_order, category_styles, display_labels, final_layer_index

__all__ = ["FIGURE_INFO", "build_report", "render_report"]

_TEMPLATE_DIR = Path(__file__).parent / "templates"
_IMAGE_TYPES = {
    ".png": "image/png",
    ".gif": "image/gif",
    ".svg": "image/svg+xml",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
}
# Preferred embedded format when a figure was written in several.
_IMAGE_PREFERENCE = (".png", ".gif", ".svg", ".webp", ".jpg", ".jpeg")

# Known figures: (section, title, caption). Captions say how to read a figure, since the report is often
# read without the code at hand.
FIGURE_INFO: dict[str, tuple[str, str, str]] = {
    "trajectories": (
        "trajectories",
        "Trajectories in the PC1/PC2 plane",
        (
            "Each line is one prompt's last-token residual state after every layer, projected on the first two "
            "principal components. Open circles mark layer 0, the filled marker and the number the end; diamonds "
            "mark the layer where a prompt bifurcates from its category."
        ),
    ),
    "depth": (
        "trajectories",
        "Depth view",
        (
            "Depth on the x axis, one component of the RMS-normalised, per-layer-centred state on the y axis: "
            "depth is explicit here instead of being read off PC1."
        ),
    ),
    "thought_evolution": (
        "trajectories",
        "Thought evolution",
        "The same trajectories growing one layer per frame, on fixed axes.",
    ),
    "dynamics": (
        "dynamics",
        "Dynamics by layer",
        (
            "Per category: mean (line) and ±1 standard deviation (band) of each quantity by layer (the axis "
            "score's band is the 95 % bootstrap interval of the mean); per-prompt scalars as dots with the "
            "category mean as a bar."
        ),
    ),
    "separation": (
        "dynamics",
        "Category separation by layer",
        (
            "Silhouette of the categories and leave-one-out kNN accuracy at each layer; filled points are "
            "significant in the permutation test, the dashed line is chance; bands are 95 % bootstrap intervals "
            "over prompts resampled within categories."
        ),
    ),
    "intervals": (
        "dynamics",
        "Category readings with intervals",
        (
            "Each category's place along the axis at the last layer (with the range of ranks it takes in 95 % "
            "of resamples), its own kNN accuracy at the best-separating layer, the share of its prompts that "
            "bifurcate, and what share of each principal component's variance lies between categories, layer "
            "by layer. Dots and lines are the readings; bars and bands their 95 % bootstrap intervals over "
            "prompts resampled within categories."
        ),
    ),
    "logit_lens": (
        "dynamics",
        "Logit lens",
        "The top-1 next token read out after each layer (cell text) and its probability (colour).",
    ),
}
_INTERACTIVE_KEYS = ("trajectories_2d", "trajectories_3d")


# --------------------------------------------------------------------------------------------- helpers


def _script_json(value: Any) -> Markup:
    """JSON that is safe inside a <script> element: `<`, `>`, `&`, `/` and line separators are escaped."""
    text = json.dumps(value, default=_json_default, ensure_ascii=False, allow_nan=False)
    for raw, escaped in (
        ("&", "\\u0026"),
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("/", "\\u002f"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, escaped)
    return Markup(text)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _clean(value: Any) -> Any:
    """Plain JSON-able Python values with NaN/inf replaced by None (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (list, tuple, set)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _format_cell(value: Any) -> str:
    value = _clean(value)
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _data_uri(path: Path) -> str:
    mime = _IMAGE_TYPES[path.suffix.lower()]
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _relative(path: Path, run_dir: Path) -> str | None:
    """A link relative to the report, or None when the file lies outside the run directory."""
    try:
        resolved = Path(path).resolve()
        rel = resolved.relative_to(run_dir.resolve())
    except (OSError, ValueError):
        return None
    return rel.as_posix()


def _table(rows: Sequence[Mapping[str, Any]] | None) -> dict[str, Any] | None:
    """Rows of dicts as columns (union of keys, first-seen order) and formatted cells."""
    if not rows:
        return None
    normalized = [{str(k): v for k, v in row.items()} for row in rows]
    columns = list(dict.fromkeys(key for row in normalized for key in row))
    body = [[_format_cell(row.get(col)) for col in columns] for row in normalized]
    # Numbers are right-aligned so that digits line up.
    numeric = [all(_is_number(row[col]) for row in normalized if row.get(col) is not None) for col in columns]
    return {"columns": columns, "rows": body, "numeric": numeric}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@lru_cache(maxsize=1)
def _plotly_js() -> Markup:
    from plotly.offline import get_plotlyjs

    source = get_plotlyjs()
    # Inlined verbatim in a <script>; a closing tag or comment opener inside would break out of it.
    lowered = source.lower()
    if "</script" in lowered or "<!--" in lowered:
        raise RuntimeError("the bundled plotly.js cannot be inlined safely")
    return Markup(source)


def _plotly_payload(fig: Any) -> Markup:
    """A plotly figure as script-safe JSON (plotly's serializer escapes `<`, `>` and `/`)."""
    import plotly.io as pio

    text = pio.to_json(fig, validate=False, pretty=False)
    if "</" in text:  # plotly always escapes these; a future version that did not must not pass silently
        raise RuntimeError("plotly produced JSON that is unsafe inside <script>")
    return Markup(text)


def _figure_item(key: str, paths: Sequence[Path], run_dir: Path) -> dict[str, Any] | None:
    """Pick the file to embed for one figure and the relative links to all its files."""
    paths = [Path(p) for p in paths]
    existing = [p for p in paths if p.is_file()]
    images = sorted(
        (p for p in existing if p.suffix.lower() in _IMAGE_TYPES),
        key=lambda p: _IMAGE_PREFERENCE.index(p.suffix.lower()),
    )
    pages = [p for p in existing if p.suffix.lower() in (".html", ".htm")]
    section, title, caption = FIGURE_INFO.get(key, ("other", key.replace("_", " "), ""))
    links = [{"href": rel, "name": p.name} for p in existing if (rel := _relative(p, run_dir)) is not None]
    if not images and not pages:
        return None
    item: dict[str, Any] = {
        "key": key,
        "section": section,
        "title": title,
        "caption": caption,
        "links": links,
        "image": None,
        "frame": None,
    }
    if images:
        item["image"] = Markup(_data_uri(images[0]))
        item["alt"] = f"{title} ({images[0].name})"
    elif pages:
        item["frame"] = _relative(pages[0], run_dir)
    return item


def _extra_section(index: int, section: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """Normalise a caller's extra section: {title, text?, html_figures?, figures?, plotly_figures?, table?}."""
    figures: list[dict[str, Any]] = []
    plots: list[dict[str, Any]] = []
    sources: list[Any] = list(section.get("figures") or []) + list(section.get("html_figures") or [])
    for j, item in enumerate(sources):
        if hasattr(item, "to_plotly_json"):
            plots.append({"id": f"extra-{index}-plot-{j}", "payload": _plotly_payload(item)})
            continue
        path = Path(item)
        entry = _figure_item(path.stem, [path], run_dir)
        if entry is not None:
            entry["title"] = path.stem.replace("_", " ")
            entry["caption"] = ""
            figures.append(entry)
    for j, fig in enumerate(section.get("plotly_figures") or []):
        plots.append({"id": f"extra-{index}-fig-{j}", "payload": _plotly_payload(fig)})
    tables = []
    if section.get("table"):
        tables.append({"title": "", "table": _table(section["table"])})
    for name, rows in (section.get("tables") or {}).items():
        tables.append({"title": str(name), "table": _table(rows)})
    return {
        "id": f"extra-{index}",
        "title": str(section.get("title") or f"Section {index + 1}"),
        "text": str(section.get("text") or ""),
        "figures": figures,
        "plots": plots,
        "tables": [t for t in tables if t["table"]],
    }


def _prompt_rows(result: Any, meta: FigureMeta) -> list[dict[str, Any]]:
    styles = category_styles(meta.categories)
    names = display_labels(meta)
    bif = getattr(result, "bifurcation_layer", None) if result is not None else None
    toward = (getattr(result, "bifurcation_toward", None) or []) if result is not None else []
    rows = []
    for i in range(meta.n_prompts):
        b = int(bif[i]) if bif is not None and i < len(bif) else -1
        lens = ""
        if meta.lens_tokens is not None and meta.lens_tokens[i]:
            lens = repr(str(meta.lens_tokens[i][-1]))
            if meta.lens_probs is not None:
                p = float(np.asarray(meta.lens_probs)[i, len(meta.lens_tokens[i]) - 1])
                if math.isfinite(p):
                    lens += f" ({p:.2f})"
        rows.append(
            {
                "number": names[i],
                "id": meta.prompt_ids[i],
                "category": meta.categories[i],
                "color": styles[meta.categories[i]].color,
                "text": meta.prompts[i],
                "bifurcation": ""
                if b < 0
                else (f"{b} → {toward[i]}" if i < len(toward) and toward[i] else str(b)),
                "lens": lens,
            }
        )
    return rows


def _settings(run_info: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, value in run_info.items():
        value = _clean(value)
        block = isinstance(value, (dict, list))
        out.append(
            {
                "key": str(key),
                "value": json.dumps(value, indent=2, ensure_ascii=False) if block else _format_cell(value),
                "block": block,
            }
        )
    return out


@lru_cache(maxsize=1)
def _visible_controls(value: Any) -> Any:
    """Show a NUL as the visible symbol for it: browsers drop a raw NUL, hiding that the prompt holds one."""
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\u2400")
    return value


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_TEMPLATE_DIR)),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,  # a typo in the template fails loudly instead of printing nothing
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_visible_controls,
    )
    env.filters["script_json"] = _script_json
    return env


# --------------------------------------------------------------------------------------------- public API


def render_report(
    run_dir: Path,
    run_info: Mapping[str, Any],
    result: Any,
    meta: FigureMeta,
    figures: Mapping[str, Sequence[Path]],
    tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    extra_sections: Iterable[Mapping[str, Any]] | None = None,
) -> str:
    """The report page as a string (see `build_report`)."""
    run_dir = Path(run_dir)
    items = [
        item
        for key, paths in figures.items()
        if key not in _INTERACTIVE_KEYS
        for item in [_figure_item(key, paths, run_dir)]
        if item is not None
    ]
    order = list(FIGURE_INFO)
    items.sort(key=lambda it: order.index(it["key"]) if it["key"] in order else len(order))
    sections = {
        name: [it for it in items if it["section"] == name] for name in ("trajectories", "dynamics", "other")
    }

    plots = []
    standalone = {
        key: [
            {"href": rel, "name": Path(p).name}
            for p in figures.get(key, [])
            if (rel := _relative(Path(p), run_dir)) is not None
        ]
        for key in _INTERACTIVE_KEYS
    }
    if result is not None:
        from tokentrail.viz.interactive import plotly_config, trajectories_figure

        for dims in (2, 3):
            if np.asarray(result.projection).shape[-1] < dims:
                continue
            fig = trajectories_figure(result, meta, dims=dims)
            plots.append(
                {
                    "id": f"trajectories-{dims}d",
                    "title": f"Interactive trajectories ({dims}-D)",
                    "payload": _plotly_payload(fig),
                    "links": standalone[f"trajectories_{dims}d"],
                }
            )
        config = plotly_config()
    else:
        config = {}
    extras = [_extra_section(i, s, run_dir) for i, s in enumerate(extra_sections or [])]
    all_plots = plots + [p for e in extras for p in e["plots"]]

    n_layers = final_layer_index(result) - 1 if result is not None else None
    summary = _clean(getattr(result, "summary", None) or {}) if result is not None else {}
    context = {
        "title": f"tokentrail · {meta.model_name}" if meta.model_name else "tokentrail report",
        "model_name": meta.model_name,
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": _version(),
        "n_prompts": meta.n_prompts,
        "n_categories": len(category_order(meta.categories)),
        "n_layers": n_layers,
        "categories": [
            {"name": c, "color": s.color, "count": meta.categories.count(c)}
            for c, s in category_styles(meta.categories).items()
        ],
        "settings": _settings(run_info),
        "warnings": [str(w) for w in (getattr(result, "warnings", None) or [])] if result is not None else [],
        "sections": sections,
        "plots": plots,
        "plotly_js": _plotly_js() if all_plots else None,
        "plotly_config": config,
        "tables": [
            {"title": str(name).replace("_", " "), "table": t}
            for name, rows in (tables or {}).items()
            if (t := _table(rows))
        ],
        "prompts": _prompt_rows(result, meta),
        "has_lens": meta.lens_tokens is not None,
        "extras": extras,
        "summary_json": json.dumps(summary, indent=2, ensure_ascii=False) if summary else "",
        # A fresh nonce per page: only scripts carrying it may run (see the module docstring).
        "nonce": secrets.token_urlsafe(18),
    }
    return _environment().get_template("report.html").render(**context)


def build_report(
    run_dir: Path,
    run_info: dict,
    result: Any,
    meta: FigureMeta,
    figures: dict[str, list[Path]],
    tables: dict[str, list[dict]] | None = None,
    extra_sections: list[dict] | None = None,
) -> Path:
    """Write `run_dir/report.html`, a single page that needs no network (plotly.js is inlined).

    `figures` maps a figure name (as returned by `make_all_figures`) to its files; images are embedded as
    data URIs, `trajectories_2d`/`trajectories_3d` are redrawn live from `result`. `tables` maps a title
    to rows (dicts). Each `extra_sections` item is a dict with `title` and any of `text`, `figures` /
    `html_figures` (image or HTML paths, or plotly figures), `plotly_figures`, `table` (rows) and
    `tables` (title → rows).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    page = render_report(run_dir, run_info, result, meta, figures, tables, extra_sections)
    path = run_dir / "report.html"
    # Write then rename, so a reader never sees half a report.
    atomic_write_text(path, page)
    return path


def _version() -> str:
    try:
        from tokentrail._version import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover - the package always has it
        return "unknown"
