"""Altair charts of the metrics tables: interactive in notebooks and the report, PNG from the command line."""

from __future__ import annotations

import os
from pathlib import Path

import altair as alt
import pandas as pd

TIME_METRICS = ("prefill_time", "ttft", "tpot", "throughput", "decode_time", "total_generation_time")
UNITS = {"throughput": "tokens/s"}


def check_time_metric(metric: str) -> None:
    if metric not in TIME_METRICS:
        raise ValueError(f"unknown time metric {metric!r}; choose one of {', '.join(TIME_METRICS)}")


def read_tables(results_dir: str | os.PathLike) -> pd.DataFrame:
    """Every per-dataset metrics table under `results_dir` (not the combined `_all_` ones), stacked."""
    paths = sorted(p for p in Path(results_dir).glob("*_kv_metrics.csv") if not p.name.endswith("_all_kv_metrics.csv"))
    if not paths:
        raise FileNotFoundError(f"no *_kv_metrics.csv files in {results_dir}")
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


def _method_selection(name: str) -> alt.Parameter:
    return alt.selection_point(name=name, fields=["method"], bind="legend")


def _facet(chart: alt.LayerChart, table: pd.DataFrame) -> alt.FacetChart | alt.LayerChart:
    """One panel per dataset (and per model when several were run), each small enough for a laptop screen."""
    chart = chart.properties(width=320, height=220)
    column = alt.Column("dataset:N", title=None) if table["dataset"].nunique() > 1 else alt.Undefined
    row = alt.Row("model:N", title=None) if table["model"].nunique() > 1 else alt.Undefined
    if column is alt.Undefined and row is alt.Undefined:
        return chart
    return chart.facet(column=column, row=row)


def _lines(y: alt.Y, tooltip: list, selection: alt.Parameter | None) -> alt.Chart:
    """Pressed rows (the baseline is drawn as a rule), one line per method, dimmed when not selected."""
    chart = (
        alt.Chart()
        .transform_filter(alt.datum.method != "none")
        .mark_line(point=True)
        .encode(
            x=alt.X("compression_ratio:Q", title="compression ratio (fraction of prefix KV removed)"),
            y=y,
            color=alt.Color("method:N", title="method"),
            tooltip=tooltip,
        )
    )
    if selection is None:
        return chart
    return chart.encode(opacity=alt.condition(selection, alt.value(1.0), alt.value(0.15))).add_params(selection)


def _baseline_rule(field: str, title: str) -> alt.Chart:
    return (
        alt.Chart()
        .transform_filter(alt.datum.method == "none")
        .mark_rule(strokeDash=[4, 4], color="black")
        .encode(y=f"{field}:Q", tooltip=[alt.Tooltip(f"{field}:Q", title=title, format=".4g")])
    )


def ppl_chart(table: pd.DataFrame, interactive: bool = True) -> alt.Chart:
    """Suffix perplexity vs compression ratio, one line per method; the baseline as a dashed rule."""
    tooltip = [
        "method",
        "compression_ratio",
        alt.Tooltip("ppl:Q", format=".3f"),
        alt.Tooltip("ppl_delta:Q", format="+.3f"),
    ]
    # Log scale: a collapsed method (perplexity in the hundreds) must not flatten the ones that work.
    y = alt.Y("ppl:Q", title="suffix perplexity (log scale)", scale=alt.Scale(type="log"))
    lines = _lines(y, tooltip, _method_selection("ppl_methods") if interactive else None)
    chart = alt.layer(lines, _baseline_rule("ppl", "baseline ppl"), data=table)
    return _facet(chart, table).properties(title="Quality: perplexity after compression (dashed: no compression)")


def ppl_delta_chart(table: pd.DataFrame) -> alt.Chart:
    """ppl - baseline ppl with its paired-bootstrap 95% interval."""
    base = (
        alt.Chart()
        .transform_filter(alt.datum.method != "none")
        .encode(
            x=alt.X("compression_ratio:O", title="compression ratio"),
            xOffset=alt.XOffset("method:N"),
            color=alt.Color("method:N", title="method"),
        )
    )
    points = base.mark_point(filled=True).encode(
        y=alt.Y("ppl_delta:Q", title="Δ perplexity vs baseline (symlog)", scale=alt.Scale(type="symlog")),
        tooltip=[
            "method",
            "compression_ratio",
            alt.Tooltip("ppl_delta:Q", format="+.3f"),
            alt.Tooltip("ppl_delta_ci_low:Q", title="95% CI low", format="+.3f"),
            alt.Tooltip("ppl_delta_ci_high:Q", title="95% CI high", format="+.3f"),
        ],
    )
    bars = base.mark_rule().encode(y="ppl_delta_ci_low:Q", y2="ppl_delta_ci_high:Q")
    chart = alt.layer(bars, points, data=table)
    return _facet(chart, table).properties(title="Quality cost: Δ perplexity with its 95% paired-bootstrap CI")


def time_chart(table: pd.DataFrame, metric: str = "tpot", interactive: bool = True) -> alt.Chart:
    """A time metric (median of the timed runs) vs compression ratio; the interactive chart has a selector for
    every time metric."""
    check_time_metric(metric)
    tooltip = ["method", "compression_ratio", alt.Tooltip("value:Q", title="median", format=".4g")]
    if interactive:
        chosen = alt.param(
            name="time_metric", value=metric, bind=alt.binding_select(options=list(TIME_METRICS), name="time metric ")
        )
        y = alt.Y("value:Q", title="selected time metric (s; throughput in tokens/s)", scale=alt.Scale(zero=False))
        lines = _lines(y, tooltip, _method_selection("time_methods")).add_params(chosen)
        baseline = _baseline_rule("value", "baseline")
        chart = alt.layer(lines, baseline, data=table).transform_fold(list(TIME_METRICS), as_=["metric", "value"])
        chart = chart.transform_filter(alt.datum.metric == chosen)
    else:
        y = alt.Y(f"{metric}:Q", title=f"{metric} ({UNITS.get(metric, 's')})", scale=alt.Scale(zero=False))
        tooltip[-1] = alt.Tooltip(f"{metric}:Q", title="median", format=".4g")
        chart = alt.layer(_lines(y, tooltip, None), _baseline_rule(metric, "baseline"), data=table)
    return _facet(chart, table).properties(title="Speed after compression (dashed: no compression)")


def dashboard(table: pd.DataFrame, metric: str = "tpot") -> alt.VConcatChart:
    """The report's figure: quality, its uncertainty, and speed, in one self-contained chart."""
    return alt.vconcat(ppl_chart(table), ppl_delta_chart(table), time_chart(table, metric)).resolve_scale(
        color="shared"
    )


def save_pngs(csv: str | os.PathLike, time_metric: str = "tpot") -> list[Path]:
    """<csv_parent>/plots/<dataset>/<model>_<dataset>_ppl_vs_compression.png and ..._<metric>_vs_compression.png."""
    check_time_metric(time_metric)
    csv = Path(csv)
    if not csv.is_file():
        raise FileNotFoundError(f"metrics CSV not found: {csv}")
    table = pd.read_csv(csv)
    written = []
    for dataset, part in table.groupby("dataset"):
        stem = csv.name.removesuffix("_kv_metrics.csv")
        model_slug = stem.removesuffix(f"_{dataset}") if stem.endswith(f"_{dataset}") else stem
        folder = csv.parent / "plots" / str(dataset)
        folder.mkdir(parents=True, exist_ok=True)
        charts = {
            "ppl": ppl_chart(part, interactive=False),
            time_metric: time_chart(part, time_metric, interactive=False),
        }
        for name, chart in charts.items():
            path = folder / f"{model_slug}_{dataset}_{name}_vs_compression.png"
            tmp = path.with_suffix(".tmp.png")
            chart.properties(width=480, height=300).save(tmp, scale_factor=2)
            tmp.replace(path)
            written.append(path)
    return written
