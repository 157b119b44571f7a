"""The shareable report: charts that render with no network, observations computed from the results, the
summary table, the export of the executed analysis notebook to one self-contained HTML file, and the
ipywidgets explorer for JupyterLab."""

from __future__ import annotations

import functools
import html as html_lib
import json
import math
import os
import re
import uuid
from pathlib import Path

import altair as alt
import pandas as pd

from kvlib.files import atomic_write, slug

RENDERER = "kvlib-offline"
INTERACTIVE_ONLY_TAG = "interactive-only"  # cells (widgets) dropped from the HTML report
EMBED_OPTIONS = {"renderer": "svg", "actions": {"export": True, "source": False, "compiled": False, "editor": False}}
BUNDLE_ATTRIBUTE = "data-kvlib-vega-bundle"


# ------------------------------------------------------------------------------------------------- rendering


@functools.cache
def _vega_bundle() -> tuple[str, str]:
    """Vega, Vega-Lite and Vega-Embed as one script (shipped inside vl-convert), and its Vega-Lite version."""
    import vl_convert
    from altair.utils._importers import vl_version_for_vl_convert

    version = vl_version_for_vl_convert()
    bundle = vl_convert.javascript_bundle(vl_version=version)
    if "</script" in bundle.lower():
        raise RuntimeError("the Vega bundle cannot be inlined: it contains '</script'")
    return bundle, version


def _script_json(value) -> str:
    """JSON that is safe inside a <script> element."""
    return json.dumps(value).replace("</", "<\\/").replace("<!--", "<\\!--")


def chart_html(spec: dict, embed_options: dict | None = None) -> str:
    """One chart as an HTML fragment that draws with no network, any number of times in one page.

    The Vega bundle is inlined, wrapped in a function (its top-level `const`s stay local) and guarded by a
    global keyed by its version, so it runs once per page however many charts or re-runs a page sees; the
    chart's own script is wrapped too and finds its element by a unique id (next to itself first). JupyterLab
    (trusted outputs) and the exported report run both scripts as they are; `export_html` keeps only the first
    bundle."""
    bundle, version = _vega_bundle()
    key = f"__kvlibVegaEmbed_{re.sub(r'[^0-9A-Za-z]', '_', version)}"
    element = f"kvlib-chart-{uuid.uuid4().hex}"
    options = {**EMBED_OPTIONS, **(embed_options or {})}
    return (
        "<style>.kvlib-chart .vega-bind { font: 13px sans-serif; margin: 4px 0; }</style>\n"
        f'<div class="kvlib-chart" id="{element}"></div>\n'
        f'<script type="text/javascript" {BUNDLE_ATTRIBUTE}="{version}">\n'
        f'if (typeof window["{key}"] !== "function") {{\n(function () {{\n{bundle}\n}}).call(window);\n'
        f'window["{key}"] = window.vegaEmbed;\n}}\n</script>\n'
        '<script type="text/javascript">\n(function () {\n'
        "  var script = document.currentScript;\n"  # its own output first: a cloned view of it holds the same id
        f'  var element = (script && script.parentNode && script.parentNode.querySelector("#{element}"))\n'
        f'    || document.getElementById("{element}");\n'
        f"  var spec = {_script_json(spec)};\n"
        f'  window["{key}"](element, spec, {_script_json(options)}).catch(function (error) {{\n'
        '    console.error("kvlib chart failed to draw:", error);\n'
        '    element.textContent = "This chart failed to draw: " + error;\n'
        "  });\n})();\n</script>\n"
    )


def _offline_renderer(spec: dict, **metadata) -> dict:
    return {"text/html": chart_html(spec, metadata.get("embed_options"))}


def use_offline_charts() -> None:
    """Make every Altair chart shown from now on self-contained: it draws with no CDN, in JupyterLab (after
    running the cell: JupyterLab runs scripts of trusted outputs only) and in the exported HTML alike."""
    if RENDERER not in alt.renderers.names():
        alt.renderers.register(RENDERER, _offline_renderer)
    alt.renderers.enable(RENDERER)


# ------------------------------------------------------------------------------------------------ the table


def _fmt(value: float, spec: str = ".2f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_seconds(value: float) -> str:
    """3 significant digits in s, ms or µs."""
    if _missing(value):
        return ""
    for unit, factor in (("s", 1.0), ("ms", 1e3), ("µs", 1e6)):
        if abs(value) * factor >= 1 or unit == "µs":
            return f"{value * factor:#.3g}".rstrip(".") + f" {unit}"
    return ""


def _signed(value: float) -> str:
    """+1.23 / -1.23, and +0.00 rather than -0.00."""
    return f"{value + 0.0 if round(value, 2) else 0.0:+.2f}"


def _baseline_first(table: pd.DataFrame) -> pd.DataFrame:
    return (
        table.assign(_baseline=table["method"] != "none", model=table["model"].map(slug))
        .sort_values(["model", "dataset", "_baseline", "method", "compression_ratio"])
        .drop(columns="_baseline")
        .reset_index(drop=True)
    )


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """The columns a reader needs first, the baseline first in each model and dataset (numbers unrounded;
    `table_view` formats them)."""
    columns = ["model", "dataset", "method", "compression_ratio", "ppl", "ppl_delta", "ppl_delta_ci_low",
               "ppl_delta_ci_high", "prefill_time", "ttft", "tpot", "throughput", "prefill_speedup", "tpot_speedup",
               "throughput_ratio", "kv_bytes_ratio", "timing_flag"]  # fmt: skip
    return _baseline_first(table)[[c for c in columns if c in table]]


def table_view(table: pd.DataFrame):
    """The summary table for reading: units and sensible precision per column, Δppl with its interval in one
    cell, the baseline first, timing cells flagged (busy machine, wide spread) shaded with the reason."""
    rows = summary_table(table)
    get = rows.get
    flags = get("timing_flag", pd.Series("", index=rows.index)).fillna("").astype(str).str.strip()

    def delta(row) -> str:
        if row["method"] == "none":
            return "baseline"
        if _missing(row.get("ppl_delta")):
            return ""
        text = _signed(row["ppl_delta"])
        low, high = row.get("ppl_delta_ci_low"), row.get("ppl_delta_ci_high")
        if not (_missing(low) or _missing(high)):
            text += f" [{_signed(low)}, {_signed(high)}]"
        return text

    def series(name: str, format_value) -> pd.Series:
        values = get(name, pd.Series(math.nan, index=rows.index))
        return values.map(lambda v: "" if _missing(v) else format_value(v))

    view = pd.DataFrame(
        {
            "model": rows["model"],
            "dataset": rows["dataset"],
            "method": rows["method"],
            "ratio": rows["compression_ratio"].map(lambda v: f"{v:g}"),
            "perplexity": series("ppl", lambda v: f"{v:.2f}"),
            "Δ perplexity [95% CI]": rows.apply(delta, axis=1),
            "prefill": series("prefill_time", format_seconds),
            "TTFT": series("ttft", format_seconds),
            "TPOT": series("tpot", format_seconds),
            "throughput": series("throughput", lambda v: f"{v:#.3g}".rstrip(".") + " tok/s"),
            "prefill speedup": series("prefill_speedup", lambda v: f"{v:.2f}×"),
            "TPOT speedup": series("tpot_speedup", lambda v: f"{v:.2f}×"),
            "KV cache": series("kv_bytes_ratio", lambda v: f"{100 * v:.0f}%"),
            "timing": flags.map(lambda f: f"⚠ {f}" if f else ""),
        }
    )
    for column in ("model", "dataset"):
        if view[column].nunique() == 1:
            view = view.drop(columns=column)
    if not (flags != "").any():
        view = view.drop(columns="timing")
    timing = [c for c in ("prefill", "TTFT", "TPOT", "throughput", "prefill speedup", "TPOT speedup", "timing")
              if c in view]  # fmt: skip
    flagged_style = "background-color: #fde2e1; color: #8a1c1c"
    left = ("model", "dataset", "method", "timing")

    def shade(frame: pd.DataFrame) -> pd.DataFrame:
        styles = pd.DataFrame("", index=frame.index, columns=frame.columns)
        styles.loc[flags.values != "", timing] = flagged_style
        styles.loc[(rows["method"] == "none").values, :] += "; font-weight: bold"
        return styles

    return (
        view.style.apply(shade, axis=None)
        .hide(axis="index")
        .set_table_styles(
            [{"selector": "td, th", "props": "padding: 2px 8px"}]
            + [{"selector": f"th.col{i}", "props": "text-align: left"} for i, c in enumerate(view) if c in left]
        )
        .set_properties(subset=[c for c in view if c != "timing"], **{"white-space": "nowrap"})
        .set_properties(subset=[c for c in left[:3] if c in view], **{"text-align": "left"})
        .set_properties(subset=[c for c in ("timing",) if c in view], **{"text-align": "left", "min-width": "14em"})
    )


def explorable_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The full table for sorting and filtering: numbers kept numeric (rounded) so that they sort as numbers,
    the Δ interval and the timing flag in columns of their own."""
    rows = _baseline_first(table)
    get = rows.get
    nan = pd.Series(math.nan, index=rows.index)

    def number(name: str, digits: int, factor: float = 1.0) -> pd.Series:
        return (get(name, nan).astype(float) * factor).round(digits)

    frame = pd.DataFrame(
        {
            "model": rows["model"],
            "dataset": rows["dataset"],
            "method": rows["method"],
            "ratio": rows["compression_ratio"].astype(float),
            "precision": get("kv_quant", pd.Series("none", index=rows.index)).fillna("none"),
            "perplexity": number("ppl", 3),
            "Δ perplexity": number("ppl_delta", 3),
            "Δ 95% CI low": number("ppl_delta_ci_low", 3),
            "Δ 95% CI high": number("ppl_delta_ci_high", 3),
            "KV cache %": number("kv_bytes_ratio", 1, 100.0),
            "prefill s": number("prefill_time", 3),
            "TTFT s": number("ttft", 3),
            "TPOT ms": number("tpot", 2, 1000.0),
            "TPOT IQR ms": number("tpot_iqr", 2, 1000.0),
            "prefill speedup": number("prefill_speedup", 2),
            "TPOT speedup": number("tpot_speedup", 2),
            "timing flag": get("timing_flag", pd.Series("", index=rows.index)).fillna("").astype(str),
        }
    )
    if "prefill_chunk" in rows:
        frame.insert(5, "prefill chunk", rows["prefill_chunk"])
    return frame


def explorable_table(table: pd.DataFrame):
    """The full table, sortable (click a header) and filterable (the search box, and one box per column), with
    itables' DataTables bundle inlined: it works offline in the exported HTML and in JupyterLab (trusted)."""
    from IPython.display import HTML
    from itables import javascript, options, to_html_datatable

    frame = explorable_frame(table)
    init = javascript.generate_init_offline_itables_html(options.dt_bundle)
    body = to_html_datatable(
        frame,
        connected=False,
        column_filters="footer",
        scrollX=True,
        lengthMenu=[25, 50, 100, -1],
        pageLength=25,
        classes="display compact nowrap",
        showIndex=False,
        maxBytes=0,
        layout={"topStart": "pageLength", "topEnd": "search", "bottomStart": "info", "bottomEnd": "paging"},
    )
    return HTML(f'<div class="kvlib-table">{init}{body}</div>')


# ------------------------------------------------------------------------------------------ the observations


def observations(table: pd.DataFrame) -> str:
    """Markdown bullet points read off this run's table: nothing in them is written by hand."""
    lines = []
    for (model, dataset), part in table.groupby(["model", "dataset"], sort=True):
        base = part[part.method == "none"]
        pressed = part[part.method != "none"].dropna(subset=["ppl_delta"])
        if base.empty or pressed.empty:
            lines.append(f"- **{model} / {dataset}**: no baseline or no compressed row yet; nothing to compare.")
            continue
        base_ppl = base.ppl.iloc[0]
        lines.append(f"- **{model} / {dataset}**: uncompressed suffix perplexity {_fmt(base_ppl, '.3f')}.")
        for ratio, at_ratio in pressed.groupby("compression_ratio"):
            best = at_ratio.loc[at_ratio.ppl_delta.idxmin()]
            worst = at_ratio.loc[at_ratio.ppl_delta.idxmax()]
            significant = best.ppl_delta_ci_low > 0 or best.ppl_delta_ci_high < 0
            lines.append(
                f"  - ratio {ratio:g}: best **{best.method}** (Δppl {_fmt(best.ppl_delta, '+.3f')}, 95% CI "
                f"[{_fmt(best.ppl_delta_ci_low, '+.3f')}, {_fmt(best.ppl_delta_ci_high, '+.3f')}]"
                f"{'' if significant else ', not distinguishable from the baseline'}), worst **{worst.method}** "
                f"(Δppl {_fmt(worst.ppl_delta, '+.3f')})."
            )
            ranked = at_ratio.sort_values("ppl_delta")
            lines.append(
                "    - ranking by Δppl [95% CI]: "
                + " · ".join(
                    f"{r.method} {_fmt(r.ppl_delta, '+.2f')} [{_fmt(r.ppl_delta_ci_low, '+.2f')}, "
                    f"{_fmt(r.ppl_delta_ci_high, '+.2f')}]"
                    for r in ranked.itertuples()
                )
            )
            random = at_ratio[at_ratio.method == "random"]
            if not random.empty:
                beaten = at_ratio[(at_ratio.method != "random") & (at_ratio.ppl_delta > random.ppl_delta.iloc[0])]
                if not beaten.empty:
                    lines.append(f"    - worse than the random floor here: {', '.join(sorted(beaten.method))}.")
        if "tpot_speedup" in pressed and pressed.tpot_speedup.notna().any():
            top = pressed[pressed.compression_ratio == pressed.compression_ratio.max()]
            lines.append(
                f"  - speed at ratio {top.compression_ratio.iloc[0]:g}: TPOT speedup "
                f"{_fmt(top.tpot_speedup.min())}–{_fmt(top.tpot_speedup.max())}x, prefill speedup "
                f"{_fmt(top.prefill_speedup.min())}–{_fmt(top.prefill_speedup.max())}x (scoring costs prefill time), "
                f"KV cache {_fmt(100 * top.kv_bytes_ratio.median(), '.0f')}% of the baseline's."
            )
        if "tpot" in part and part.tpot.notna().any():
            untimed = sorted(set(pressed.method) - set(part.dropna(subset=["tpot"]).method))
            if untimed:
                lines.append(f"  - latency not measured (the run's latency subset) for: {', '.join(untimed)}.")
        if "timing_flag" in part:
            flagged = part[part.timing_flag.fillna("").astype(str).str.strip() != ""]
            if not flagged.empty:
                lines.append(
                    f"  - timing flagged in {len(flagged)} of {len(part)} cells (busy machine or wide spread; "
                    "shaded in the table, ringed in the speed chart): read their times with care."
                )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- export


def report_title(notebook) -> str:
    """The first Markdown heading of the notebook."""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^#\s+(.+)$", cell.source, re.M)
            if match:
                return match.group(1).strip()
    return "kvlib report"


def _keep_first_bundle(body: str) -> str:
    """Every chart output carries the Vega bundle; the page needs it once, in the first chart (scripts run in
    document order). The later copies are guarded no-ops: drop them."""
    pattern = re.compile(rf"<script[^>]*{BUNDLE_ATTRIBUTE}=[^>]*>.*?</script>", re.S)
    seen = False

    def keep(match: re.Match) -> str:
        nonlocal seen
        if seen:
            return ""
        seen = True
        return match.group(0)

    return pattern.sub(keep, body)


def export_html(notebook: str | os.PathLike, html: str | os.PathLike, title: str | None = None) -> Path:
    """The executed analysis notebook as one HTML file: no code, no interactive-only cells, no external scripts,
    the Vega bundle once; its <title> is `title` or the notebook's first heading and the run it shows."""
    import nbformat
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    config = Config()
    config.TagRemovePreprocessor.remove_cell_tags = {INTERACTIVE_ONLY_TAG}
    config.TagRemovePreprocessor.enabled = True
    exporter = HTMLExporter(config=config, exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    node = nbformat.read(str(notebook), as_version=4)
    node.metadata["title"] = title or report_title(node)
    body, _ = exporter.from_notebook_node(node, resources={"metadata": {"name": node.metadata["title"]}})
    # Drop the template's CDN scripts (MathJax, require.js): the report uses neither, and must open offline.
    body = re.sub(r"<script[^>]*\bsrc=\"https?://[^\"]*\"[^>]*>\s*</script>", "", body)
    body = _keep_first_bundle(body)
    html = Path(html)
    with atomic_write(html) as handle:
        handle.write(body)
    return html


def external_references(html: str) -> list[str]:
    """Scripts, stylesheets or images the page would fetch from the network."""
    return re.findall(r"<(?:script|link|img)[^>]*\b(?:src|href)=\"(https?://[^\"]+)\"", html)


def page_title(html: str) -> str:
    match = re.search(r"<title>(.*?)</title>", html, re.S)
    return html_lib.unescape(match.group(1).strip()) if match else ""


# ------------------------------------------------------------------------------------------------ explorer


def explorer(table: pd.DataFrame):
    """ipywidgets controls (dataset, methods, view: Δ perplexity, perplexity or a time metric with its speedup)
    over one chart, redrawn whenever a control changes; for JupyterLab sessions."""
    import ipywidgets as widgets
    from IPython.display import display

    from kvlib.analysis import charts

    views = {"Δ perplexity (with 95% CI)": "delta", "perplexity": "ppl"}
    views.update({f"speed: {charts.metric_label(m)}": m for m in charts.TIME_METRICS if m in table})
    methods = sorted(set(table.method) - {"none"})
    dataset = widgets.Dropdown(options=sorted(set(table.dataset)), description="dataset")
    chosen = widgets.SelectMultiple(options=methods, value=tuple(methods), description="methods", rows=len(methods))
    view = widgets.Dropdown(options=list(views), value=next(iter(views)), description="view")
    output = widgets.Output()

    def draw(_=None) -> None:
        part = table[(table.dataset == dataset.value) & table.method.isin(("none", *chosen.value))].copy()
        part.attrs["methods"] = methods  # colours stay with their method whatever is filtered out
        name = views[view.value]
        if part[part.method != "none"].empty:
            chart = None
        elif name == "delta":
            chart = charts.ppl_delta_chart(part, interactive=False)
        elif name == "ppl":
            chart = charts.ppl_chart(part, interactive=False)
        else:
            chart = charts.speed_chart(part, name, interactive=False)
        with output:
            output.clear_output(wait=True)
            if chart is None:
                print("Select at least one method.")
            else:
                display(chart)

    for control in (dataset, chosen, view):
        control.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([widgets.VBox([dataset, view]), chosen]), output])
