"""Altair charts of the metrics tables: interactive in notebooks and the report, PNG from the command line.

Three charts, each one view (no concatenation), one panel per dataset (and model):
- `ppl_chart`: suffix perplexity vs compression ratio, log scale, the baseline dashed;
- `ppl_delta_chart`: how far perplexity moved from the baseline, |Δ| on a log scale, with its 95% interval;
- `speed_chart`: a time metric (median, IQR bars, baseline dashed) beside its speedup (1.0 marked); with
  `interactive=True` a menu switches the metric and the title names it.
Every chart has a legend that selects methods (click; shift-click adds or removes one; the others dim).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd

from kvlib.analysis.tables import read_metrics_csv
from kvlib.stats import TIMING_FIELDS

TIME_METRICS = TIMING_FIELDS  # every field a timed run records can be charted
# How each time metric is named and scaled on screen: (label, unit shown, factor from the table's unit, seconds).
DISPLAY = {
    "prefill_time": ("prefill time", "s", 1.0),
    "ttft": ("TTFT", "s", 1.0),
    "tpot": ("TPOT", "ms", 1000.0),
    "throughput": ("throughput", "tokens/s", 1.0),
    "decode_time": ("decode time", "s", 1.0),
    "total_generation_time": ("total generation time", "s", 1.0),
}
HIGHER_IS_FASTER = {"throughput"}
PANEL = (300, 200)  # width, height of one panel: two datasets side by side fit a laptop screen
DIMMED = 0.12  # opacity of the methods not selected in the legend
FLAG_COLOR = "#d62728"
FLAG_LEGEND = "busy machine or wide spread"
SPEED_PANELS = ("median (bars: IQR)", "speedup vs baseline")


def check_time_metric(metric: str) -> None:
    if metric not in TIME_METRICS:
        raise ValueError(f"unknown time metric {metric!r}; choose one of {', '.join(TIME_METRICS)}")


def metric_label(metric: str) -> str:
    label, unit, _ = DISPLAY[metric]
    return f"{label} ({unit})"


# ---------------------------------------------------------------------------------------------------- helpers


READING = " · "  # joins a series' press to how it read the prefix (`snapkv · chunks of 512`)


def chart_series(table: pd.DataFrame) -> pd.DataFrame:
    """The table with one chart series per configuration in `method`: a press at a quantized precision becomes
    `press+precision` (a combination), the uncompressed cache at one becomes the precision's name, and only the
    float baseline stays `none` — so lines never join rows of two precisions."""
    precision = (table["kv_quant"] if "kv_quant" in table else pd.Series("none", index=table.index)).fillna("none")
    precision = precision.astype(str)
    method = table["method"].where(precision == "none", table["method"] + "+" + precision)
    method = method.where((table["method"] != "none") | (precision == "none"), precision)
    # A press read another way (chunked, re-rotated, an absolute budget) is a series of its own, too.
    if "prefill_chunk" in table:
        chunk = table["prefill_chunk"]
        method = method.where(chunk.isna(), method + READING + "chunks of " + chunk.fillna(0).astype(int).astype(str))
    if "positions" in table:
        method = method.where(table["positions"].fillna("original") == "original", method + READING + "re-rotated")
    if "kv_budget" in table:
        budget = table["kv_budget"]
        method = method.where(budget.isna(), method + READING + budget.fillna(0).astype(int).astype(str) + " kept")
    return table.assign(method=method)


def series_press(series: str) -> str:
    """The press (or `press+precision`) of a `chart_series` name, without its reading mode."""
    return series.split(READING)[0]


def _methods(table: pd.DataFrame) -> list[str]:
    """The methods a chart's colours are assigned to: `table.attrs["methods"]` when set (the explorer keeps each
    method's colour while some are filtered out), else those in the table."""
    return list(table.attrs.get("methods") or sorted(set(table["method"]) - {"none"}))


# Methods grouped by family: one hue per family from the Okabe-Ito palette (told apart with the common colour
# vision deficiencies), two shades alternating inside a family, and a mark shape (points) and dash (lines) per
# member, so that two members of one family differ in shape even where their shades look alike.
FAMILIES = {
    "score-based eviction": ("snapkv", "knorm", "tova", "expected_attention", "observed_attention", "keydiff",
                             "kvzip", "pyramidkv", "lagkv"),
    "position-based eviction": ("streaming_llm",),
    "control": ("random",),
}  # fmt: skip
FAMILY_COLORS = {
    "score-based eviction": ("#0072B2", "#56B4E9", "#1B3A5C"),  # blue, sky blue, navy
    "position-based eviction": ("#E69F00", "#D55E00"),  # orange, vermillion
    "precision": ("#009E73", "#66C2A5"),  # bluish green
    "combinations": ("#CC79A7", "#882255"),  # reddish purple
    "control": ("#7F7F7F", "#BBBBBB"),  # grey: the random floor
}
STAR = "M0,-1L0.29,-0.4L0.95,-0.31L0.48,0.15L0.59,0.81L0,0.5L-0.59,0.81L-0.48,0.15L-0.95,-0.31L-0.29,-0.4Z"
SHAPES = ("circle", "square", "triangle-up", "diamond", "cross", "triangle-down", "triangle-left", STAR,
          "triangle-right")  # fmt: skip
DASHES = ([1, 0], [6, 3], [2, 2], [8, 3, 2, 3], [4, 4], [1, 3], [10, 4], [3, 6], [12, 2])


def family(method: str) -> str:
    """The family a chart groups `method` in. A method named `press+precision` (a quantised cache under an
    eviction press) is a combination; a bare precision name (no eviction) is a precision; a press read another way
    (`snapkv · chunks of 512`, see `chart_series`) stays in its press's family."""
    method = series_press(method)
    for name, members in FAMILIES.items():
        if method in members:
            return name
    if "+" in method:
        return "combinations"
    if method.startswith(("fp8", "int", "quanto", "hqq")):
        return "precision"
    return "score-based eviction"  # presses added later are scored unless listed otherwise


def method_styles(methods: list[str]) -> dict[str, tuple[str, str, list[int]]]:
    """method -> (colour, shape, dash): families together in the order of FAMILY_COLORS, members in name order."""
    styles = {}
    for name, shades in FAMILY_COLORS.items():
        members = sorted(m for m in methods if family(m) == name)
        for i, method in enumerate(members):
            styles[method] = (shades[i % len(shades)], SHAPES[i % len(SHAPES)], DASHES[i % len(DASHES)])
    return styles


def _ordered(methods: list[str]) -> list[str]:
    """Methods in legend order: by family, then name."""
    return list(method_styles(methods))


def method_color(methods: list[str], title: str = "method (click)") -> alt.Color:
    """The family palette as a colour encoding of `method`."""
    styles = method_styles(methods)
    return alt.Color("method:N", title=title,
                     scale=alt.Scale(domain=list(styles), range=[s[0] for s in styles.values()]))  # fmt: skip


def method_shape(methods: list[str], title: str = "method (click)") -> alt.Shape:
    """The members' marks; it merges with `method_color` into one legend (same field, same title)."""
    styles = method_styles(methods)
    return alt.Shape("method:N", title=title,
                     scale=alt.Scale(domain=list(styles), range=[s[1] for s in styles.values()]))  # fmt: skip


def method_dash(methods: list[str], title: str = "method (click)") -> alt.StrokeDash:
    styles = method_styles(methods)
    return alt.StrokeDash("method:N", title=title,
                          scale=alt.Scale(domain=list(styles), range=[s[2] for s in styles.values()]))  # fmt: skip


def method_marks(table: pd.DataFrame) -> dict:
    """Colour, point shape and line dash of each method: the encodings a line chart with points needs."""
    methods = _methods(table)
    return {"color": method_color(methods), "shape": method_shape(methods), "strokeDash": method_dash(methods)}


def _color(table: pd.DataFrame) -> alt.Color:
    """One colour per method, the same in every chart of the same table, grouped by family."""
    return method_color(_methods(table))


def _methods_selection() -> alt.Parameter:
    return alt.selection_point(name="methods", fields=["method"], bind="legend")


def _dim(chart: alt.Chart, selection: alt.Parameter) -> alt.Chart:
    return chart.encode(opacity=alt.condition(selection, alt.value(1.0), alt.value(DIMMED)))


RATIO_MARGIN = 0.1  # the x range around a table's only ratio


def _ratio_x(table: pd.DataFrame) -> alt.X:
    """The compression ratio axis, ticked at the ratios measured. With a single ratio, Vega's automatic domain
    collapses to that value and its one tick is labelled by a rounded "nice" number (0.5 showed as "1"): the
    domain is then set around it."""
    ratios = sorted({float(r) for r in table.loc[table["method"] != "none", "compression_ratio"].dropna()})
    scale = alt.Scale(zero=False, padding=14)
    if len(ratios) == 1:
        only = ratios[0]
        scale = alt.Scale(zero=False, nice=False, domain=[max(0.0, only - RATIO_MARGIN), min(1.0, only + RATIO_MARGIN)])
    axis = alt.Axis(labelAngle=0, values=ratios, format="~g") if ratios else alt.Axis(labelAngle=0, tickMinStep=0.1)
    return alt.X("compression_ratio:Q", title="compression ratio (fraction of prefix KV removed)", scale=scale,
                 axis=axis)  # fmt: skip


def _panel_rows(table: pd.DataFrame) -> pd.Series:
    """The facet a row is drawn in: its dataset, prefixed by the model when several models are in the table."""
    if table["model"].nunique() > 1:
        return table["model"].astype(str) + " · " + table["dataset"].astype(str)
    return table["dataset"].astype(str)


def _facet(chart: alt.LayerChart, data: pd.DataFrame, panel: tuple[int, int], column: str | None = None):
    """One panel per dataset (columns), or per dataset (rows) x `column` (columns) when given."""
    chart = chart.properties(width=panel[0], height=panel[1])
    header = alt.Header(labelFontSize=13, labelFontWeight="bold", labelAngle=0)
    several = data["panel"].nunique() > 1
    if column is None:
        if not several:
            return chart
        return chart.facet(column=alt.Column("panel:N", title=None, header=header)).resolve_scale(y="independent")
    facets = {"column": alt.Column(f"{column}:N", title=None, header=header, sort=list(SPEED_PANELS))}
    if several:
        facets["row"] = alt.Row("panel:N", title=None, header=alt.Header(labelFontSize=13, labelFontWeight="bold"))
    return chart.facet(**facets).resolve_scale(y="independent")


def _title(text, subtitle: list[str] | str | None = None) -> alt.TitleParams:
    return alt.TitleParams(text=text, subtitle=subtitle or alt.Undefined, anchor="start", fontSize=14,
                           subtitleColor="#444")  # fmt: skip


def _flags(table: pd.DataFrame) -> pd.Series:
    if "timing_flag" not in table:
        return pd.Series("", index=table.index)
    return table["timing_flag"].fillna("").astype(str).str.strip()


# ----------------------------------------------------------------------------------------------------- quality


def ppl_chart(table: pd.DataFrame, interactive: bool = True, panel: tuple[int, int] = PANEL) -> alt.Chart:
    """Suffix perplexity vs compression ratio, one line per method; the baseline as a dashed rule. Log scale: a
    collapsed method (perplexity in the hundreds) must not flatten the ones that work. (`interactive` is kept
    for symmetry: the legend selection is always there, and this chart has no menu.)"""
    table = chart_series(table)
    data = table.assign(panel=_panel_rows(table))
    selection = _methods_selection()
    tooltip = [
        alt.Tooltip("method:N"),
        alt.Tooltip("compression_ratio:Q", title="ratio", format="~g"),
        alt.Tooltip("ppl:Q", title="perplexity", format=".2f"),
        alt.Tooltip("ppl_delta:Q", title="Δ perplexity", format="+.2f"),
    ]
    lines = (
        alt.Chart()
        .transform_filter(alt.datum.method != "none")
        .mark_line(point=alt.OverlayMarkDef(size=50, filled=True))
        .encode(
            x=_ratio_x(table),
            y=alt.Y(
                "ppl:Q", title="suffix perplexity (log scale)", scale=alt.Scale(type="log"), axis=alt.Axis(format="~g")
            ),  # fmt: skip
            color=_color(table),
            shape=method_shape(_methods(table)),
            strokeDash=method_dash(_methods(table)),
            tooltip=tooltip,
        )
    )
    baseline = (
        alt.Chart()
        .transform_filter(alt.datum.method == "none")
        .mark_rule(strokeDash=[5, 4], color="black")
        .encode(y="ppl:Q", tooltip=[alt.Tooltip("ppl:Q", title="baseline perplexity", format=".2f")])
    )
    chart = alt.layer(_dim(lines, selection).add_params(selection), baseline, data=data)
    return _facet(chart, data, panel).properties(
        title=_title("Quality: suffix perplexity after compression", "dashed: no compression · lower is better")
    )


def delta_frame(table: pd.DataFrame) -> tuple[pd.DataFrame, float, float]:
    """The rows of the Δ chart: |Δ perplexity| and its 95% interval mapped onto a log axis, and that axis'
    domain. An interval that contains 0 is drawn from the bottom of the axis (no log scale reaches 0)."""
    rows = table[(table["method"] != "none") & table["ppl_delta"].notna()].copy()
    rows["panel"] = _panel_rows(rows)
    nan = pd.Series(np.nan, index=rows.index)
    low = rows["ppl_delta_ci_low"].astype(float) if "ppl_delta_ci_low" in rows else nan
    high = rows["ppl_delta_ci_high"].astype(float) if "ppl_delta_ci_high" in rows else nan
    delta = rows["ppl_delta"].astype(float)
    # The axis starts at the decade below the smallest |Δ|: interval ends closer to 0 are drawn at its bottom.
    points, ends = delta.abs(), pd.concat([low.abs(), high.abs()])
    smallest = float(points[points > 0].min()) if (points > 0).any() else 0.01
    largest = float(max(points.max(), ends.max())) if not rows.empty else 1.0
    largest = largest if largest > 0 and not math.isnan(largest) else 1.0
    floor = 10.0 ** math.floor(math.log10(smallest))
    top = 10.0 ** math.ceil(math.log10(largest)) if largest > floor else floor * 10
    includes_zero = (low <= 0) & (high >= 0)
    rows["abs_delta"] = delta.abs().clip(lower=floor)
    rows["direction"] = np.where(delta < 0, "below (better)", "above (worse)")
    rows["ci_bottom"] = np.maximum(np.where(includes_zero, floor, np.minimum(low.abs(), high.abs())), floor)
    rows["ci_top"] = np.maximum(np.maximum(low.abs(), high.abs()), floor)
    rows["ci"] = np.where(includes_zero, "contains 0", "excludes 0")
    rows.loc[low.isna() | high.isna(), ["ci_bottom", "ci_top"]] = np.nan
    return rows, floor, top


def ppl_delta_chart(table: pd.DataFrame, interactive: bool = True, panel: tuple[int, int] = PANEL) -> alt.Chart:
    """|ppl - baseline ppl| on a log axis with its paired-bootstrap 95% interval, per ratio and method: small
    and large changes are both readable where they are."""
    table = chart_series(table)
    rows, floor, top = delta_frame(table)
    selection = _methods_selection()
    methods = _methods(table)
    x = alt.X("compression_ratio:O", title="compression ratio", axis=alt.Axis(labelAngle=0, format="~g"))
    y_scale = alt.Scale(type="log", domain=[floor, top], clamp=True)
    base = alt.Chart().encode(x=x, xOffset=alt.XOffset("method:N", scale=alt.Scale(domain=methods)),
                              color=_color(table))  # fmt: skip
    tooltip = [
        alt.Tooltip("method:N"),
        alt.Tooltip("compression_ratio:Q", title="ratio", format="~g"),
        alt.Tooltip("ppl_delta:Q", title="Δ perplexity", format="+.3f"),
        alt.Tooltip("ppl_delta_ci_low:Q", title="95% CI low", format="+.3f"),
        alt.Tooltip("ppl_delta_ci_high:Q", title="95% CI high", format="+.3f"),
    ]
    bars = base.mark_rule(strokeWidth=2).encode(
        y=alt.Y("ci_bottom:Q", scale=y_scale),
        y2="ci_top:Q",
        strokeDash=alt.StrokeDash("ci:N", title="95% CI",
                                  scale=alt.Scale(domain=["excludes 0", "contains 0"], range=[[1, 0], [3, 2]])),
        tooltip=tooltip,
    )  # fmt: skip
    points = base.mark_point(size=70, strokeWidth=2, filled=True).encode(
        y=alt.Y("abs_delta:Q", title="|Δ perplexity| vs baseline (log scale)", scale=y_scale,
                axis=alt.Axis(format="~g")),
        shape=alt.Shape("direction:N", title="vs baseline",
                        scale=alt.Scale(domain=["above (worse)", "below (better)"], range=["circle", "triangle-down"])),
        tooltip=tooltip,
    )  # fmt: skip
    chart = alt.layer(_dim(points, selection).add_params(selection), _dim(bars, selection), data=rows)
    return _facet(chart, rows if not rows.empty else table.assign(panel=""), panel).properties(
        title=_title(
            "Quality cost: how far perplexity moved from the baseline (|Δ|, log scale)",
            ["bars: 95% paired-bootstrap interval · dashed, down to the axis: it contains 0 (this run cannot tell"
             " the method from no compression)", "triangle: perplexity below the baseline's"],
        )
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- memory-quality


def memory_quality_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Every measured configuration with its memory (`kv_bytes_ratio`, estimated from cache lengths where not
    recorded) and Δppl, and `frontier` True on each panel's Pareto frontier (no other row has less memory and
    a lower Δppl)."""
    from kvlib.analysis import summary

    rows = summary.configurations(table)
    rows = rows[~summary.is_baseline(rows) & rows["ppl_delta"].notna() & rows["kv_bytes_ratio"].notna()].copy()
    rows = chart_series(rows)  # a precision, or press+precision, is a series of its own
    rows["panel"] = _panel_rows(rows)
    rows["frontier"] = False
    for _, part in rows.groupby("panel"):
        rows.loc[summary.pareto_frontier(part).index, "frontier"] = True
    rows["memory_note"] = np.where(rows["memory_estimated"], "estimated from cache length", "measured bytes")
    keep = ["panel", "model", "dataset", "method", "compression_ratio", "kv_quant", "configuration", "kv_bytes_ratio",
            "ppl_delta", "ppl_delta_ci_low", "ppl_delta_ci_high", "frontier", "memory_note"]  # fmt: skip
    return rows[[c for c in keep if c in rows]]


def memory_quality_chart(table: pd.DataFrame, panel: tuple[int, int] = (420, 280)) -> alt.Chart:
    """Δ perplexity against the cache's share of the baseline's bytes, every measured configuration one point
    (its 95% interval as a bar), the Pareto frontier as a line, the summary's budgets as vertical rules. The
    y axis is symmetric-log: Δ of 0.1 and of 100 are both readable, negative Δ too."""
    from kvlib.analysis import summary

    data = memory_quality_frame(table)
    methods = list(table.attrs.get("methods") or sorted(set(data["method"])))
    selection = _methods_selection()
    x = alt.X("kv_bytes_ratio:Q", title="KV cache, share of the baseline's bytes (lower: less memory)",
              axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1.02], nice=False))  # fmt: skip
    y_scale = alt.Scale(type="symlog", constant=0.1, nice=False)
    tooltip = [
        alt.Tooltip("configuration:N"),
        alt.Tooltip("kv_bytes_ratio:Q", title="KV cache", format=".0%"),
        alt.Tooltip("memory_note:N", title="memory"),
        alt.Tooltip("ppl_delta:Q", title="Δ perplexity", format="+.3f"),
        alt.Tooltip("ppl_delta_ci_low:Q", title="95% CI low", format="+.3f"),
        alt.Tooltip("ppl_delta_ci_high:Q", title="95% CI high", format="+.3f"),
    ]
    base = alt.Chart().transform_filter("isValid(datum.ppl_delta)").encode(x=x)
    bars = base.mark_rule(strokeWidth=1.2).encode(
        y=alt.Y("ppl_delta_ci_low:Q", scale=y_scale), y2="ppl_delta_ci_high:Q", color=method_color(methods)
    )
    points = base.mark_point(size=70, filled=True, strokeWidth=1).encode(
        y=alt.Y("ppl_delta:Q", title="Δ perplexity vs baseline (symmetric log; lower is better)", scale=y_scale),
        color=method_color(methods),
        shape=method_shape(methods),
        tooltip=tooltip,
    )
    frontier = (
        base.transform_filter(alt.datum.frontier)
        .mark_line(color="black", strokeWidth=1.5, interpolate="step-after", opacity=0.7)
        .encode(y=alt.Y("ppl_delta:Q", scale=y_scale), order="kv_bytes_ratio:Q")
    )
    # The budgets and the zero line as rows of every panel: a faceted layer chart shares one data set.
    panels = data["panel"].unique() if not data.empty else [""]
    guides = pd.DataFrame([{"panel": p, "budget": b} for p in panels for b in summary.BUDGETS])
    drawn = pd.concat([data, guides], ignore_index=True)
    budgets = (
        alt.Chart()
        .transform_filter("isValid(datum.budget)")
        .mark_rule(color="#999", strokeDash=[2, 3])
        .encode(x="budget:Q", tooltip=[alt.Tooltip("budget:Q", title="budget", format=".0%")])
    )
    zero = alt.Chart().transform_filter("isValid(datum.budget)").mark_rule(color="#444").encode(y=alt.datum(0))
    layers = [_dim(points, selection).add_params(selection), _dim(bars, selection), frontier]
    chart = alt.layer(budgets, zero, *layers, data=drawn)
    return _facet(chart, drawn, panel).properties(
        title=_title(
            "Memory against quality: every measured configuration",
            ["black line: the frontier (nothing else has less memory and a lower Δ) · bars: 95% interval · "
             "dotted: the summary's budgets"],
        )
    )  # fmt: skip


def save_memory_quality_png(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """results/plots/memory_quality.png: the chart the README shows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    memory_quality_chart(table).save(tmp, scale_factor=2)
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------------------- speed


def _baseline_values(table: pd.DataFrame, metric: str) -> pd.Series:
    """The baseline's median for each row: from the baseline runs interleaved with that cell's own when the
    table has them (`baseline_<metric>`), else the `none` row of the same model and dataset."""
    if f"baseline_{metric}" in table and table[f"baseline_{metric}"].notna().any():
        return table[f"baseline_{metric}"].astype(float)
    base_rows = table[table["method"] == "none"].drop_duplicates(["model", "dataset"]).set_index(["model", "dataset"])
    keys = zip(table["model"], table["dataset"], strict=True)
    return pd.Series([base_rows[metric].get(key, np.nan) for key in keys], index=table.index, dtype=float)


def speed_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Long form of the timing columns for `speed_chart`: per method x ratio x time metric, two rows (the median
    with its interquartile range, in display units; the speedup against the baseline), and the timing flag."""
    frames = []
    flags = _flags(table)
    panel = _panel_rows(table)
    for metric in TIME_METRICS:
        if metric not in table or table[metric].isna().all():
            continue
        label, unit, factor = DISPLAY[metric]
        value = table[metric].astype(float)
        iqr = table[f"{metric}_iqr"].astype(float) if f"{metric}_iqr" in table else pd.Series(np.nan, table.index)
        baseline = _baseline_values(table, metric)
        speedup = (value / baseline if metric in HIGHER_IS_FASTER else baseline / value).where(
            table["method"] != "none", 1.0
        )
        common = {
            "panel": panel,
            "method": table["method"],
            "compression_ratio": table["compression_ratio"].astype(float),
            "metric": metric,
            "metric_label": metric_label(metric),
            "flag": np.where(flags != "", FLAG_LEGEND, ""),
            "timing_flag": flags,
        }
        frames.append(pd.DataFrame({**common, "kind": SPEED_PANELS[0], "value": value * factor,
                                    "iqr": iqr * factor, "low": (value - iqr / 2) * factor,
                                    "high": (value + iqr / 2) * factor}))  # fmt: skip
        frames.append(pd.DataFrame({**common, "kind": SPEED_PANELS[1], "value": speedup}))
    if not frames:
        return pd.DataFrame(columns=["panel", "method", "compression_ratio", "metric", "kind", "value"])
    return pd.concat(frames, ignore_index=True)


def _metric_menu(metric: str) -> alt.Parameter:
    return alt.param(
        name="time_metric",
        value=metric,
        bind=alt.binding_select(options=list(TIME_METRICS), labels=[metric_label(m) for m in TIME_METRICS],
                                name="time metric: "),
    )  # fmt: skip


def speed_chart(
    table: pd.DataFrame, metric: str = "tpot", interactive: bool = True, panel: tuple[int, int] = PANEL
) -> alt.Chart:
    """Left: a time metric (median of the timed runs) vs compression ratio, its interquartile range as bars, the
    baseline's median dashed and its IQR shaded. Right: the speedup against the baseline runs of the same rounds
    (baseline / method; method / baseline for throughput), the 1.0 line marked. Cells whose timing is flagged
    (busy machine, wide spread) are ringed in red. Interactive: a menu of every time metric; the title names the
    one shown."""
    table = chart_series(table)
    check_time_metric(metric)
    data = speed_frame(table)
    selection = _methods_selection()
    menu = _metric_menu(metric) if interactive else None
    shown = alt.datum.metric == (menu if menu is not None else metric)
    tooltip = [
        alt.Tooltip("method:N"),
        alt.Tooltip("compression_ratio:Q", title="ratio", format="~g"),
        alt.Tooltip("metric_label:N", title="metric"),
        alt.Tooltip("kind:N", title="shown"),
        alt.Tooltip("value:Q", title="value", format=".4~g"),
        alt.Tooltip("iqr:Q", title="IQR", format=".2~g"),
        alt.Tooltip("timing_flag:N", title="flagged"),
    ]
    timed = alt.datum.kind == SPEED_PANELS[0]
    pressed = alt.Chart().transform_filter(shown & (alt.datum.method != "none"))
    pressed = pressed.encode(x=_ratio_x(table), tooltip=tooltip)
    y = alt.Y("value:Q", title=None, scale=alt.Scale(zero=False))  # Vega's default labels: 70, 3.5, 0.99
    lines = pressed.mark_line(point=alt.OverlayMarkDef(size=50, filled=True)).encode(
        y=y, color=_color(table), shape=method_shape(_methods(table)), strokeDash=method_dash(_methods(table))
    )
    errors = (
        pressed.transform_filter(timed).mark_rule(strokeWidth=1.5).encode(y="low:Q", y2="high:Q", color=_color(table))
    )
    flags = (
        pressed.transform_filter(alt.datum.flag != "")
        .mark_point(size=260, strokeWidth=2, filled=False)
        .encode(
            y="value:Q",
            stroke=alt.Stroke(
                "flag:N",
                title="timing flagged",
                scale=alt.Scale(domain=[FLAG_LEGEND], range=[FLAG_COLOR]),
                legend=alt.Legend(labelLimit=240),
            ),
        )
    )
    baseline = alt.Chart().transform_filter(shown & (alt.datum.method == "none"))
    band = (
        baseline.transform_filter(timed)
        .mark_rect(color="#888", opacity=0.2)
        .encode(y="low:Q", y2="high:Q", tooltip=[alt.Tooltip("iqr:Q", title="baseline IQR", format=".2~g")])
    )
    rule = baseline.mark_rule(strokeDash=[5, 4], color="black").encode(
        y="value:Q", tooltip=[alt.Tooltip("value:Q", title="baseline", format=".4~g")]
    )
    one_label = (
        baseline.transform_filter(alt.datum.kind == SPEED_PANELS[1])
        .mark_text(align="right", baseline="bottom", dy=-2, fontSize=11)
        .encode(x=alt.value(panel[0] - 2), y="value:Q", text=alt.value("1.0 = no change"))
    )
    layers = [_dim(lines, selection).add_params(selection), _dim(errors, selection), band, rule, one_label, flags]
    chart = _facet(alt.layer(*layers, data=data), data, panel, column="kind")
    if menu is not None:
        chart = chart.add_params(menu)
        names = ", ".join(f"'{m}': '{metric_label(m)}'" for m in TIME_METRICS)
        text = {"expr": f"'Speed: ' + ({{{names}}})[time_metric] + ', median of the timed runs, and its speedup'"}
    else:
        text = f"Speed: {metric_label(metric)}, median of the timed runs, and its speedup"
    return chart.properties(
        title=_title(text, ["bars: interquartile range · dashed: no compression (grey: its IQR) · speedup > 1: "
                            "faster · red ring: timing flagged (busy machine or wide spread)"])
    )  # fmt: skip


def save_pngs(csv: str | os.PathLike, time_metric: str = "tpot") -> list[Path]:
    """<csv_parent>/plots/<dataset>/<model>_<dataset>_ppl_vs_compression.png and ..._<metric>_vs_compression.png."""
    check_time_metric(time_metric)
    csv = Path(csv)
    table = read_metrics_csv(csv)
    written = []
    for dataset, part in table.groupby("dataset"):
        stem = csv.name.removesuffix("_kv_metrics.csv")
        model_slug = stem.removesuffix(f"_{dataset}") if stem.endswith(f"_{dataset}") else stem
        folder = csv.parent / "plots" / str(dataset)
        folder.mkdir(parents=True, exist_ok=True)
        charts = {
            "ppl": ppl_chart(part, interactive=False, panel=(480, 300)),
            time_metric: speed_chart(part, time_metric, interactive=False, panel=(420, 300)),
        }
        for name, chart in charts.items():
            path = folder / f"{model_slug}_{dataset}_{name}_vs_compression.png"
            tmp = path.with_suffix(".tmp.png")
            chart.save(tmp, scale_factor=2)
            tmp.replace(path)
            written.append(path)
    return written
