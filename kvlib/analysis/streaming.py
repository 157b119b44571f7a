"""Streaming perplexity results: the table, its per-bucket records, the charts and what they say. No torch: the report
reads the stored tables only (`kvlib.measure.streaming` says what was measured).

Table: one row per reading (method, kv_budget, prefill_chunk, positions, kv_quant) with the perplexity over the
whole stream and its 95% bootstrap interval over buckets of `bucket` tokens (segments of one text: they are
neighbours, not independent samples, so the interval is a guide to the spread along the text, not over texts),
the perplexity within and beyond the model's trained context, the ratio to the `recompute` reference, the wall
time and its ratio to the reference's, and the peak memory (cache bytes from the tensors, process growth).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd

from kvlib.analysis import validate
from kvlib.stats import perplexity

KIND = "streaming"
REFERENCE = "recompute"
RESAMPLES = 1000
TABLE_COLUMNS = [
    "method",
    "compression_ratio",
    "kv_quant",
    "kv_budget",
    "prefill_chunk",
    "positions",
    "tokens",
    "ppl",
    "ci_low",
    "ci_high",
    "ppl_within",
    "ppl_beyond",
    "trained_context",
    "ppl_vs_reference",
    "wall_time",
    "time_vs_reference",
    "peak_cache_bytes",
    "peak_memory",
]
RECORD_COLUMNS = ["method", "positions", "bucket", "start", "end", "nll_sum", "n_tokens", "ppl", "cache_bytes"]


def _ppl(records: list[dict]) -> float:
    """`kvlib.stats.perplexity`, NaN for no records (a stream that never passes the trained context)."""
    return perplexity(records) if records else np.nan


def bucket_interval(records: list[dict], seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the stream's perplexity, resampling its buckets."""
    nll = np.array([r["nll_sum"] for r in records])
    tokens = np.array([r["n_tokens"] for r in records])
    if len(nll) < 2:
        return np.nan, np.nan
    draws = np.random.default_rng(seed).integers(0, len(nll), size=(RESAMPLES, len(nll)))
    ppl = np.exp(nll[draws].sum(axis=1) / tokens[draws].sum(axis=1))
    low, high = np.percentile(ppl, [2.5, 97.5])
    return float(low), float(high)


def _readings(cells: list[dict]) -> list[tuple[dict, dict]]:
    return [(cell, reading) for cell in cells if cell["kind"] == KIND for reading in cell["readings"]]


def streaming_table(cells: list[dict]) -> pd.DataFrame:
    """One row per reading of every streaming cell: the references (dense, window, recompute) first."""
    rows = []
    for cell, reading in _readings(cells):
        records, trained = reading["records"], cell["trained_context"]
        low, high = bucket_interval(records, cell["settings"].get("seed", 0))
        row = {
            "method": reading["method"],
            "compression_ratio": 0.0 if reading["method"] in ("none", REFERENCE) else cell["compression_ratio"],
            "kv_quant": cell.get("kv_quant", "none"),
            "kv_budget": np.nan if reading["method"] == "none" else cell["kv_budget"],
            "prefill_chunk": cell["prefill_chunk"],
            "positions": reading["positions"],
            "tokens": cell["tokens"],
            "ppl": reading["ppl"],
            "ci_low": low,
            "ci_high": high,
            "ppl_within": _ppl([r for r in records if trained is None or r["end"] <= trained]),
            "ppl_beyond": _ppl([r for r in records if trained is not None and r["start"] >= trained]),
            "trained_context": trained if trained is not None else np.nan,
            "wall_time": reading["wall_time"],
            "peak_cache_bytes": reading["peak_cache_bytes"],
            "peak_memory": reading["peak_memory"],
            "options": json.dumps(cell["options"], sort_keys=True),
        }
        settings = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in cell["settings"].items()}
        rows.append(
            {
                **row,
                **{k: v for k, v in settings.items() if k not in row},
                **cell.get("identity_columns", {}),
                **cell["provenance"],
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    reference = table[table["method"] == REFERENCE]
    base_ppl = reference["ppl"].iloc[0] if len(reference) else np.nan
    base_time = reference["wall_time"].iloc[0] if len(reference) else np.nan
    table["ppl_vs_reference"] = table["ppl"] / base_ppl - 1
    table["time_vs_reference"] = table["wall_time"] / base_time
    order = {"none": 0, REFERENCE: 1, "window": 2}
    table = table.sort_values(
        ["method", "positions"], key=lambda column: column.map(lambda v: (order.get(v, 3), v)), kind="stable"
    ).reset_index(drop=True)
    rest = [c for c in table.columns if c not in TABLE_COLUMNS]
    return table[TABLE_COLUMNS + rest]


def streaming_records(cells: list[dict]) -> pd.DataFrame:
    """One row per bucket of every reading: its perplexity and the largest cache held while it was read."""
    rows = [
        {"method": reading["method"], "positions": reading["positions"], **record, "ppl": _ppl([record])}
        for _, reading in _readings(cells)
        for record in reading["records"]
    ]
    return pd.DataFrame(rows, columns=RECORD_COLUMNS)


# ----------------------------------------------------------------------------------------------------- reading


def read_streaming(results_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every streaming table and its records under `results_dir`, stacked (records carry model and dataset)."""
    frames, records = [], []
    for path in sorted(Path(results_dir).glob(f"*_kv_{KIND}.csv")):
        frame = validate.read_table(path, validate.STREAMING, "streaming table")
        if frame.empty:
            continue
        frames.append(frame)
        record_path = path.with_name(path.name.replace(f"_kv_{KIND}.csv", f"_kv_{KIND}_records.csv"))
        if record_path.is_file():
            part = validate.read_table(record_path, validate.STREAMING_RECORDS, "streaming records table")
            records.append(part.assign(model=frame["model"].iloc[0], dataset=frame["dataset"].iloc[0]))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return table, pd.concat(records, ignore_index=True) if records else pd.DataFrame()


# ------------------------------------------------------------------------------------------------------ charts


def _label(frame: pd.DataFrame) -> pd.Series:
    return frame["method"].astype(str) + " · " + frame["positions"].astype(str)


def perplexity_chart(records: pd.DataFrame, table: pd.DataFrame, width: int = 560, height: int = 300) -> alt.Chart:
    """Perplexity per bucket against position in the text (log scale), one line per method and position mode
    (dashed: original positions), the model's trained context marked."""
    data = records.assign(reading=_label(records), position=(records["start"] + records["end"]) / 2)
    selection = alt.selection_point(fields=["reading"], bind="legend")
    lines = (
        alt.Chart(data)
        .mark_line(point=True)
        .encode(
            x=alt.X("position:Q", title="position in the text (tokens)"),
            y=alt.Y("ppl:Q", scale=alt.Scale(type="log"), title="perplexity per bucket (log)"),
            color=alt.Color("reading:N", title="method · positions"),
            strokeDash=alt.StrokeDash("positions:N", title="positions"),
            opacity=alt.condition(selection, alt.value(1), alt.value(0.12)),
            tooltip=["method", "positions", "start", "end", alt.Tooltip("ppl:Q", format=".1f")],
        )
        .add_params(selection)
    )
    trained = table["trained_context"].dropna().unique()
    layers = [lines]
    if len(trained):
        rule = pd.DataFrame({"position": [float(trained[0])], "label": [f"trained context ({int(trained[0])})"]})
        layers.append(alt.Chart(rule).mark_rule(strokeDash=[4, 4], color="black").encode(x="position:Q"))
        layers.append(alt.Chart(rule).mark_text(align="left", dx=4, dy=-120).encode(x="position:Q", text="label:N"))
    return alt.layer(*layers).properties(width=width, height=height, title="Streaming perplexity along the text")


def memory_chart(records: pd.DataFrame, width: int = 560, height: int = 220) -> alt.Chart:
    """The largest cache held (MB, from the tensors) against position in the text: the dense cache grows, a bounded
    one stays flat."""
    data = records.assign(reading=_label(records), cache_mb=records["cache_bytes"] / 1e6)
    selection = alt.selection_point(fields=["reading"], bind="legend")
    return (
        alt.Chart(data)
        .mark_line()
        .encode(
            x=alt.X("end:Q", title="tokens read"),
            y=alt.Y("cache_mb:Q", title="cache held (MB)"),
            color=alt.Color("reading:N", title="method · positions"),
            opacity=alt.condition(selection, alt.value(1), alt.value(0.12)),
            tooltip=["method", "positions", "end", alt.Tooltip("cache_mb:Q", format=".1f")],
        )
        .add_params(selection)
        .properties(width=width, height=height, title="Peak cache held while reading")
    )


def observations(table: pd.DataFrame) -> list[str]:
    """What the streaming table says, in sentences generated from it."""
    lines = []
    for (model, dataset), group in table.groupby(["model", "dataset"], sort=False):
        reference = group[group["method"] == REFERENCE]
        if reference.empty:
            continue
        ref = reference.iloc[0]
        trained = group["trained_context"].dropna()
        where = f"{model} on {dataset}, {int(ref['tokens'])} tokens"
        lines.append(
            f"{where}: the re-computation reference reads at perplexity {ref['ppl']:.2f} "
            f"in {ref['wall_time']:.0f} s (window {int(ref['kv_budget'])}, chunks of {int(ref['prefill_chunk'])})."
        )
        if len(trained):
            for _, row in group[group["method"].isin(["none", "window", "streaming_llm"])].iterrows():
                lines.append(
                    f"{row['method']} ({row['positions']} positions): perplexity {row['ppl_within']:.1f} within the "
                    f"trained context of {int(row['trained_context'])} tokens, {row['ppl_beyond']:.1f} beyond it; "
                    f"{row['ppl_vs_reference']:+.1%} against the reference over the stream."
                )
        sinks = group[(group["method"] == "streaming_llm") & (group["positions"] == "rerotate")]
        if len(sinks):
            row = sinks.iloc[0]
            within = abs(row["ppl_vs_reference"]) <= 0.02
            faster = 1 / row["time_vs_reference"] if row["time_vs_reference"] else np.nan
            lines.append(
                f"Sinks + window with re-rotated positions is {row['ppl_vs_reference']:+.1%} against the reference "
                f"({'within' if within else 'outside'} 2%) and runs {faster:.1f}x as fast "
                f"({'at least' if faster >= 2 else 'less than'} 2x)."
            )
        pressed = group[~group["method"].isin(["none", "window", REFERENCE])]
        if len(pressed):
            best = pressed.sort_values("ppl").iloc[0]
            lines.append(
                f"Best press over the stream: {best['method']} ({best['positions']} positions), perplexity "
                f"{best['ppl']:.2f} [{best['ci_low']:.2f}, {best['ci_high']:.2f}], "
                f"{best['ppl_vs_reference']:+.1%} against the reference."
            )
    return lines


SHOWN = ["model", "dataset", "method", "positions", "kv_budget", "ppl", "ci_low", "ci_high", "ppl_within",
         "ppl_beyond", "ppl_vs_reference", "time_vs_reference", "peak_cache_bytes", "peak_memory"]  # fmt: skip


def section(results_dir: str | os.PathLike):
    """The report's streaming section, displayed: what the table says, the perplexity chart along the text, the
    cache held, and the table. Nothing is displayed when `results_dir` holds no streaming table."""
    from IPython.display import Markdown, display

    table, records = read_streaming(results_dir)
    if table.empty:
        return
    display(Markdown(
        "## Reading past the trained context\n\nA long text read in chunks into a cache bounded to *kv_budget* "
        "positions per layer, the press pruning after every chunk (`07_streaming`): every token is scored from the "
        "cache as it stands when it is read. *original* positions keep counting past the model's trained context; "
        "*rerotate* gives the kept keys contiguous positions. *recompute* (each chunk re-read after the budget's "
        "tokens before it) is the quality reference; *none* the dense cache; *window* the recent positions without "
        "sinks. Intervals: 95% bootstrap over 1024-token buckets of the text (neighbouring segments of one text, "
        "so a guide to the spread along it, not over texts).\n\n"
        + "\n".join(f"- {line}" for line in observations(table))
    ))  # fmt: skip
    for (model, dataset), group in table.groupby(["model", "dataset"], sort=False):
        chosen = records[(records["model"] == model) & (records["dataset"] == dataset)]
        if not chosen.empty:
            display(perplexity_chart(chosen, group).properties(title=f"Streaming perplexity · {model} · {dataset}"))
            display(memory_chart(chosen))
    view = table[[c for c in SHOWN if c in table]].copy()
    if view["model"].nunique() == 1:
        view = view.drop(columns="model")
    for column in ("peak_cache_bytes", "peak_memory"):
        view[column] = view[column].map(lambda v: f"{v / 1e6:.0f} MB")
    for column in ("ppl_vs_reference",):
        view[column] = view[column].map(lambda v: f"{v:+.1%}")
    display(view.style.hide(axis="index").format(precision=2))
