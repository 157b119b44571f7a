"""Needle retrieval results: the accuracy table, its per-trial records, the charts, and how its ranking of the
methods compares with perplexity's. No torch here: the report reads the stored tables only.

Table: one row per method x ratio x context length, plus an "all" row per method x ratio over every length, with
the accuracy (fraction of trials whose answer contains the pass key) and its 95% Wilson interval.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd

from kvlib.analysis import charts, tables, validate
from kvlib.analysis.stats import wilson_interval

KIND = "retrieval"
ALL = "all"  # the `length` of the rows over every context length
TABLE_COLUMNS = [
    "method",
    "compression_ratio",
    "kv_quant",
    "length",
    "accuracy",
    "ci_low",
    "ci_high",
    "correct",
    "n_trials",
]
PANEL = (300, 200)


def _row(cells: list[dict], length) -> dict:
    records = [r for cell in cells for r in cell["records"]]
    correct, n = sum(bool(r["correct"]) for r in records), len(records)
    low, high = wilson_interval(correct, n)
    first = cells[0]
    settings = {k: v for k, v in first["settings"].items() if k != "max_length"}
    return {
        "method": first["method"],
        "compression_ratio": float(first["compression_ratio"]),
        "kv_quant": first.get("kv_quant", "none"),
        "length": length,
        "accuracy": correct / n if n else np.nan,
        "ci_low": low,
        "ci_high": high,
        "correct": correct,
        "n_trials": n,
        "kv_bytes": float(np.mean([r["kv_bytes"] for r in records])) if records else np.nan,
        "effective_ratio": float(np.mean([c.get("effective_ratio", np.nan) for c in cells])),
        "options": json.dumps(first["options"], sort_keys=True),
        **{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in settings.items()},
        **first.get("identity_columns", {}),
        **first["provenance"],
    }


def _order(cell: dict) -> tuple:
    return (
        cell.get("kv_quant", "none") != "none",
        cell["method"] != "none",
        cell["method"],
        float(cell["compression_ratio"]),
    )


def retrieval_table(cells: list[dict]) -> pd.DataFrame:
    """Accuracy with its 95% Wilson interval per method x ratio x length, and per method x ratio over all
    lengths (`length` "all"); the baseline first."""
    groups: dict[tuple, list[dict]] = {}
    for cell in sorted((c for c in cells if c["kind"] == KIND), key=_order):
        groups.setdefault((cell["method"], float(cell["compression_ratio"]), cell.get("kv_quant", "none")), []).append(
            cell
        )
    rows = []
    for group in groups.values():
        by_length = sorted(group, key=lambda c: c["settings"]["max_length"])
        rows += [_row([cell], str(cell["settings"]["max_length"])) for cell in by_length]
        rows.append(_row(by_length, ALL))
    table = pd.DataFrame(rows, columns=None if rows else TABLE_COLUMNS)
    rest = [c for c in table.columns if c not in TABLE_COLUMNS]
    return table[TABLE_COLUMNS + rest]


def retrieval_records(cells: list[dict]) -> pd.DataFrame:
    """One row per trial: method, ratio, length, and the trial's record."""
    frames = []
    for cell in sorted((c for c in cells if c["kind"] == KIND), key=_order):
        frame = pd.DataFrame(cell["records"])
        frame.insert(0, "method", cell["method"])
        frame.insert(1, "compression_ratio", float(cell["compression_ratio"]))
        frame.insert(2, "length", cell["settings"]["max_length"])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ----------------------------------------------------------------------------------------------------- reading


def read_retrieval(results_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every retrieval table and its records under `results_dir`, stacked; two empty frames when there are none."""
    folder = Path(results_dir)
    paths = sorted(p for p in folder.glob(f"*_kv_{KIND}.csv") if not p.name.endswith(f"_all_kv_{KIND}.csv"))
    frames, records = [], []
    for path in paths:
        frame = validate.read_table(path, validate.RETRIEVAL, "retrieval table", dtype={"length": str})
        validate.check_retrieval_rows(frame, path)
        if frame.empty:
            continue
        frames.append(frame)
        record_path = path.with_name(path.name.replace(f"_kv_{KIND}.csv", f"_kv_{KIND}_records.csv"))
        if record_path.is_file():
            part = validate.read_table(
                record_path, validate.RETRIEVAL_RECORDS, "retrieval records table", dtype={"needle": str, "answer": str}
            )
            records.append(part.assign(model=frame["model"].iloc[0], dataset=frame["dataset"].iloc[0]))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return table, pd.concat(records, ignore_index=True) if records else pd.DataFrame()


# ------------------------------------------------------------------------------------------------------ charts


def _panel(table: pd.DataFrame) -> pd.Series:
    if table["model"].nunique() > 1:
        return table["model"].astype(str) + " · " + table["dataset"].astype(str)
    return table["dataset"].astype(str)


def _color(methods: list[str]) -> alt.Color:
    return charts.method_color(methods)  # the family palette of every other chart


def accuracy_chart(table: pd.DataFrame, length: str = ALL, panel: tuple[int, int] = PANEL) -> alt.Chart:
    """Retrieval accuracy vs compression ratio, one line per method, its 95% Wilson interval as bars; the
    uncompressed baseline's accuracy dashed and its interval shaded. One panel per dataset."""
    rows = table[table["length"].astype(str) == str(length)].assign(panel=lambda t: _panel(t))
    methods = sorted(set(rows["method"]) - {"none"})
    selection = alt.selection_point(name="methods", fields=["method"], bind="legend")
    x = alt.X("compression_ratio:Q", title="compression ratio (fraction of context KV removed)",
              scale=alt.Scale(zero=False, padding=14), axis=alt.Axis(labelAngle=0, tickMinStep=0.1))  # fmt: skip
    y = alt.Y("accuracy:Q", title="retrieval accuracy", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"))
    tooltip = [
        alt.Tooltip("method:N"),
        alt.Tooltip("compression_ratio:Q", title="ratio", format="~g"),
        alt.Tooltip("accuracy:Q", format=".0%"),
        alt.Tooltip("ci_low:Q", title="95% CI low", format=".0%"),
        alt.Tooltip("ci_high:Q", title="95% CI high", format=".0%"),
        alt.Tooltip("n_trials:Q", title="trials"),
    ]
    opacity = alt.condition(selection, alt.value(1.0), alt.value(0.12))
    pressed = alt.Chart().transform_filter(alt.datum.method != "none").encode(x=x, color=_color(methods))
    lines = pressed.mark_line(point=alt.OverlayMarkDef(size=50, filled=True)).encode(
        y=y, tooltip=tooltip, opacity=opacity, shape=charts.method_shape(methods)
    )
    bars = pressed.mark_rule(strokeWidth=1.5).encode(y="ci_low:Q", y2="ci_high:Q", opacity=opacity, tooltip=tooltip)
    baseline = alt.Chart().transform_filter(alt.datum.method == "none")
    band = baseline.mark_rect(color="#888", opacity=0.2).encode(y="ci_low:Q", y2="ci_high:Q")
    rule = baseline.mark_rule(strokeDash=[5, 4], color="black").encode(
        y="accuracy:Q", tooltip=[alt.Tooltip("accuracy:Q", title="baseline accuracy", format=".0%")]
    )
    chart = alt.layer(lines.add_params(selection), bars, band, rule, data=rows).properties(
        width=panel[0], height=panel[1]
    )
    if rows["panel"].nunique() > 1:
        chart = chart.facet(column=alt.Column("panel:N", title=None))
    where = "all context lengths" if str(length) == ALL else f"{length}-token contexts"
    return chart.properties(
        title=alt.TitleParams(
            f"Needle retrieval: accuracy after compression ({where})",
            subtitle="bars: 95% Wilson interval · dashed: no compression (grey: its interval) · higher is better",
            anchor="start", fontSize=14, subtitleColor="#444",
        )
    )  # fmt: skip


def depth_frame(records: pd.DataFrame, ratio: float) -> pd.DataFrame:
    """Accuracy per method x depth x length at one compression ratio (and the baseline's), from the records."""
    chosen = records[(records["compression_ratio"] == ratio) | (records["method"] == "none")]
    grouped = chosen.groupby(["dataset", "method", "length", "depth"], as_index=False)
    frame = grouped.agg(correct=("correct", "sum"), n_trials=("correct", "size"))
    frame["accuracy"] = frame["correct"] / frame["n_trials"]
    frame["method"] = np.where(frame["method"] == "none", "none (no compression)", frame["method"])
    return frame


def depth_heatmap(records: pd.DataFrame, ratio: float, panel: tuple[int, int] = (130, 90)) -> alt.Chart:
    """Accuracy by needle depth (x) and context length (y), one small panel per method (the baseline first) at
    compression `ratio`, one row per dataset: where in the context a press loses the needle."""
    frame = depth_frame(records, ratio)
    methods = ["none (no compression)"] + sorted(set(frame["method"]) - {"none (no compression)"})
    base = alt.Chart(frame).encode(
        x=alt.X("depth:O", title="needle depth", axis=alt.Axis(labelAngle=0, format="~g")),
        y=alt.Y("length:O", title="context length", sort="descending"),
    )
    cells = base.mark_rect().encode(
        color=alt.Color("accuracy:Q", title="accuracy", scale=alt.Scale(domain=[0, 1], scheme="redyellowgreen"),
                        legend=alt.Legend(format="%")),
        tooltip=[alt.Tooltip("method:N"), alt.Tooltip("depth:Q", format="~g"), alt.Tooltip("length:O"),
                 alt.Tooltip("accuracy:Q", format=".0%"), alt.Tooltip("correct:Q"),
                 alt.Tooltip("n_trials:Q", title="trials")],
    )  # fmt: skip
    text = base.mark_text(fontSize=10).encode(text=alt.Text("correct:Q"))
    facets = {"column": alt.Column("method:N", title=None, sort=methods, header=alt.Header(labelAngle=0))}
    if frame["dataset"].nunique() > 1:
        facets["row"] = alt.Row("dataset:N", title=None)
    chart = alt.layer(cells, text).properties(width=panel[0], height=panel[1]).facet(**facets)
    return chart.properties(
        title=alt.TitleParams(
            f"Needle retrieval by depth and context length, compression ratio {ratio:g}",
            subtitle="colour: accuracy · number: correct trials",
            anchor="start", fontSize=14, subtitleColor="#444",
        )
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- observations


def _ranks(values: pd.Series, ascending: bool) -> pd.Series:
    return values.rank(ascending=ascending, method="average")


def ranking_comparison(retrieval: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Per model x dataset x ratio: the methods ordered by retrieval accuracy (all lengths) and by Δ perplexity
    (smallest first), and the Spearman correlation of the two rankings (1: the same order)."""
    if retrieval.empty or metrics.empty or "ppl_delta" not in metrics:
        return pd.DataFrame()
    # A press at a precision is its own series on both sides (`press+precision`, as the charts name it).
    left = charts.chart_series(retrieval[(retrieval["length"].astype(str) == ALL) & (retrieval["method"] != "none")])
    right = charts.chart_series(metrics[(metrics["method"] != "none") & tables.default_reading(metrics)])
    right = right[["model", "dataset", "method", "compression_ratio", "ppl_delta"]]
    joined = left.merge(right, on=["model", "dataset", "method", "compression_ratio"]).dropna(subset=["ppl_delta"])
    rows = []
    for (model, dataset, ratio), group in joined.groupby(["model", "dataset", "compression_ratio"]):
        if len(group) < 2:
            continue
        by_accuracy = group.sort_values(["accuracy", "method"], ascending=[False, True])
        by_ppl = group.sort_values(["ppl_delta", "method"])
        a, b = _ranks(group["accuracy"], ascending=False), _ranks(group["ppl_delta"], ascending=True)
        rho = float(np.corrcoef(a, b)[0, 1]) if a.nunique() > 1 and b.nunique() > 1 else np.nan
        rows.append({
            "model": model, "dataset": dataset, "compression_ratio": ratio, "methods": len(group),
            "by_retrieval": ", ".join(f"{m} {acc:.0%}" for m, acc in
                                      zip(by_accuracy["method"], by_accuracy["accuracy"], strict=True)),
            "by_ppl_delta": ", ".join(f"{m} {d:+.2f}" for m, d in
                                      zip(by_ppl["method"], by_ppl["ppl_delta"], strict=True)),
            "spearman": rho,
        })  # fmt: skip
    return pd.DataFrame(rows)


def observations(comparison: pd.DataFrame) -> str:
    """Where the ranking by retrieval accuracy disagrees with the ranking by Δ perplexity, in words."""
    if comparison.empty:
        return "No ratio has both retrieval and perplexity results for two or more methods: nothing to compare."
    lines = []
    several = comparison["model"].nunique() > 1
    for row in comparison.itertuples():
        where = f"{row.model} · {row.dataset}" if several else row.dataset
        if np.isnan(row.spearman):
            agreement = "Spearman ρ undefined: every method ties on one of the two measures"
        elif row.spearman > 0.8:
            agreement = f"Spearman ρ = {row.spearman:.2f}: the two rankings mostly agree"
        else:
            agreement = (
                f"Spearman ρ = {row.spearman:.2f}: the rankings differ, perplexity does not predict which press "
                "keeps the needle"
            )
        lines.append(
            f"- **{where}, ratio {row.compression_ratio:g}** ({row.methods} methods; {agreement}).  \n"
            f"  by retrieval: {row.by_retrieval}  \n  by Δ perplexity: {row.by_ppl_delta}"
        )
    return "\n".join(lines)


def section(results_dir: str | os.PathLike, metrics: pd.DataFrame | None = None, ratio: float | None = None):
    """The report's retrieval section, displayed: the table, the charts and the ranking comparison. Nothing is
    displayed when `results_dir` holds no retrieval table."""
    from IPython.display import Markdown, display

    table, records = read_retrieval(results_dir)
    if table.empty:
        return
    display(Markdown(
        "## Retrieval\n\nA pass key hidden at a chosen depth of a real-text context, the context compressed, then "
        "the question asked after it: *accuracy* is the fraction of trials whose greedy answer contains the key, "
        "with its 95% Wilson interval (*n*: trials). Perplexity barely notices a press that drops one fact far "
        "back; this does."
    ))  # fmt: skip
    shown = ["model", "dataset", "method", "compression_ratio", "length", "accuracy", "ci_low", "ci_high", "n_trials"]
    if table["model"].nunique() == 1:
        shown.remove("model")  # one model: its name (often a long path) is in the provenance above
    view = table[[c for c in shown if c in table]].copy()
    view["compression_ratio"] = view["compression_ratio"].map(lambda v: f"{v:g}")
    for column in ("accuracy", "ci_low", "ci_high"):
        view[column] = view[column].map(lambda v: f"{v:.0%}")
    display(view.style.hide(axis="index"))
    display(accuracy_chart(table))
    if not records.empty:
        ratios = sorted(set(records["compression_ratio"]) - {0.0})
        if ratios:
            display(depth_heatmap(records, ratio if ratio is not None else min(ratios, key=lambda r: abs(r - 0.5))))
    if metrics is not None:
        display(Markdown("**Retrieval vs perplexity.** " + "Per ratio, the methods by retrieval accuracy (all "
                         "lengths) and by Δ perplexity (smallest first):\n\n"
                         + observations(ranking_comparison(table, metrics))))  # fmt: skip
