"""The shareable report: charts that render with no network, observations computed from the results, and the
export of the executed analysis notebook to one self-contained HTML file."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import altair as alt
import pandas as pd

RENDERER = "kvlib-offline"
INTERACTIVE_ONLY_TAG = "interactive-only"  # cells (widgets) dropped from the HTML report


def _offline_renderer(spec: dict, **metadata) -> dict:
    from altair.utils.display import HTMLRenderer
    from altair.vegalite.v6.display import VEGA_VERSION, VEGAEMBED_VERSION, VEGALITE_VERSION

    # The "inline" template carries the Vega/Vega-Lite/Vega-Embed bundle (from vl-convert) inside the output.
    renderer = HTMLRenderer(
        mode="vega-lite",
        template="inline",
        vega_version=VEGA_VERSION,
        vegaembed_version=VEGAEMBED_VERSION,
        vegalite_version=VEGALITE_VERSION,
    )
    return renderer(spec, **metadata)


def use_offline_charts() -> None:
    """Make every Altair chart shown from now on self-contained: it draws with no CDN, in JupyterLab and in
    the exported HTML alike (each chart output carries about 1 MB of JavaScript, so show few, combined ones)."""
    if RENDERER not in alt.renderers.names():
        alt.renderers.register(RENDERER, _offline_renderer)
    alt.renderers.enable(RENDERER)


def _fmt(value: float, spec: str = ".2f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


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
    return "\n".join(lines)


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """The columns a reader needs first, rounded for display."""
    columns = ["model", "dataset", "method", "compression_ratio", "ppl", "ppl_delta", "ppl_delta_ci_low",
               "ppl_delta_ci_high", "prefill_time", "ttft", "tpot", "throughput", "prefill_speedup", "tpot_speedup",
               "throughput_ratio", "kv_bytes_ratio"]  # fmt: skip
    from kvlib.results import slug

    present = [c for c in columns if c in table]
    shown = table[present].assign(model=table["model"].map(slug))
    return shown.sort_values(["model", "dataset", "method", "compression_ratio"]).round(4)


def export_html(notebook: str | os.PathLike, html: str | os.PathLike) -> Path:
    """The executed analysis notebook as one HTML file: no code, no interactive-only cells, no external scripts."""
    import nbformat
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    from kvlib.results import atomic_write

    config = Config()
    config.TagRemovePreprocessor.remove_cell_tags = {INTERACTIVE_ONLY_TAG}
    config.TagRemovePreprocessor.enabled = True
    exporter = HTMLExporter(config=config, exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))
    # Drop the template's CDN scripts (MathJax, require.js): the report uses neither, and must open offline.
    body = re.sub(r"<script[^>]*\bsrc=\"https?://[^\"]*\"[^>]*>\s*</script>", "", body)
    html = Path(html)
    with atomic_write(html) as handle:
        handle.write(body)
    return html


def external_references(html: str) -> list[str]:
    """Scripts, stylesheets or images the page would fetch from the network."""
    return re.findall(r"<(?:script|link|img)[^>]*\b(?:src|href)=\"(https?://[^\"]+)\"", html)


def explorer(table: pd.DataFrame):
    """ipywidgets controls (dataset, methods, time metric) over static charts, for JupyterLab sessions."""
    import ipywidgets as widgets
    from IPython.display import display

    from kvlib import plots

    methods = sorted(set(table.method) - {"none"})
    dataset = widgets.Dropdown(options=sorted(set(table.dataset)), description="dataset")
    chosen = widgets.SelectMultiple(options=methods, value=tuple(methods), description="methods")
    metric = widgets.Dropdown(options=plots.TIME_METRICS, value="tpot", description="time metric")

    def show(dataset: str, methods: tuple[str, ...], metric: str) -> None:
        part = table[(table.dataset == dataset) & table.method.isin(("none", *methods))]
        charts = plots.ppl_chart(part, interactive=False), plots.time_chart(part, metric, interactive=False)
        display(alt.hconcat(*charts))

    return widgets.interactive(show, dataset=dataset, methods=chosen, metric=metric)
