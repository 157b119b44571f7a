"""Where compression pays: the context-length sweep's table, the bound on what removing cache entries can buy,
its charts and observations. Reads stored results only (no torch).

Decode time per token has a part that grows with the cache (reading and appending its keys and values) and a
part that does not (the weights, the Python around them); a press can only shrink the first. The bound is
measured, not assumed: from the baseline's median TPOT at each context length n we fit, by least squares,

    TPOT(n) = w + c * n        (w: seconds per token whatever the cache; c: seconds per cached position)

and report the fit's residuals (RMS, R^2). A press at ratio r on an n-token prompt keeps k = n - int(n * r)
positions per head, so the best it can do is decode like an uncompressed cache of k positions: TPOT(k). Per
method x ratio x length the table gives

- `tpot_speedup` = baseline median TPOT / press median TPOT (baseline runs interleaved with the press's own);
- `bound_speedup` = fit(n) / fit(k): what removing those cache entries could buy at best;
- `fraction_of_bound` = achieved saving / possible saving = (1 - t_press / t_base) / (1 - fit(k) / fit(n)):
  1 = the whole possible gain, 0 = none, negative = slower than the baseline; NaN where the fit allows no gain
  (c <= 0) or has fewer than two lengths;
- `prefill_overhead` = press prefill time / baseline prefill time - 1 (scoring and pruning cost; 0.05 = 5% slower);
- `kv_bytes` after prefill and `peak_memory`, the median over runs of how far the process grew during a run
  (RSS above its start on CPU, the allocator's peak on CUDA; see `kvlib.measure.memory`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from kvlib.analysis import charts, tables, validate
from kvlib.analysis.stats import median_iqr, ratio
from kvlib.files import slug

KIND = "scaling"
BASELINE = tables.BASELINE
is_baseline = tables.is_baseline
SAVING_TARGET = 0.10  # an observation names where a press first saves this fraction of the decode time
MIN_RUNS_FOR_SPREAD = 3  # fewer timed runs per cell than this: the observations say that no spread was measured
COLUMNS = [
    "model",
    "dataset",
    "method",
    "compression_ratio",
    "prefill_chunk",
    "positions",
    "kv_budget",
    "context_length",
    "kept_length",
    "prefill_time",
    "prefill_time_iqr",
    "baseline_prefill_time",
    "prefill_overhead",
    "tpot",
    "tpot_iqr",
    "baseline_tpot",
    "tpot_speedup",
    "bound_speedup",
    "fraction_of_bound",
    "fit_tpot",
    "fit_tpot_kept",
    "kv_bytes",
    "kv_bytes_ratio",
    "cache_length",
    "peak_memory",
    "peak_memory_iqr",
    "baseline_peak_memory",
    "n_timing_runs",
    "timing_spread",
    "other_cpu",
    "timing_flag",
    "fit_w",
    "fit_c",
    "fit_rms",
    "fit_r2",
    "fit_points",
]


def kept_length(context_length: int, compression_ratio: float) -> int:
    """Positions per head a press at `compression_ratio` keeps of an `context_length`-token prefix."""
    return int(context_length) - int(int(context_length) * float(compression_ratio))


# --------------------------------------------------------------------------------------------------- the fit


@dataclass
class TpotFit:
    """TPOT(n) = w + c * n fitted to the baseline's median TPOT at each context length (seconds)."""

    w: float
    c: float
    rms: float  # root mean square of the residuals, seconds
    r2: float  # 1 - SS_res / SS_tot (NaN when every TPOT is the same)
    lengths: list[int] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)  # measured - fitted, per length

    def __call__(self, n: float) -> float:
        return self.w + self.c * n

    @property
    def n_points(self) -> int:
        return len(self.lengths)


def fit_points(lengths, tpots) -> TpotFit:
    """Least-squares fit of w + c * length to (length, TPOT) pairs; at least two distinct lengths."""
    x = np.asarray(lengths, dtype=float)
    y = np.asarray(tpots, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(np.unique(x)) < 2:
        raise ValueError(f"fitting TPOT = w + c * length needs the baseline at two lengths or more; got {x.tolist()}")
    design = np.stack([np.ones_like(x), x], axis=1)
    (w, c), *_ = np.linalg.lstsq(design, y, rcond=None)
    residuals = y - (w + c * x)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residuals**2).sum()) / total if total > 0 else math.nan
    rms = float(np.sqrt(np.mean(residuals**2)))
    return TpotFit(float(w), float(c), rms, r2, [int(v) for v in x], [float(v) for v in residuals])


def fit(table: pd.DataFrame) -> TpotFit:
    """The fit of one model and dataset's scaling table: its baseline rows' median TPOT per context length."""
    if {"model", "dataset"} <= set(table.columns) and len(table[["model", "dataset"]].drop_duplicates()) > 1:
        raise ValueError("fit one model and dataset at a time (group the table by model and dataset)")
    base = table[is_baseline(table) & table["tpot"].notna()].sort_values("context_length")
    return fit_points(base["context_length"], base["tpot"])


def _apply_fit(rows: pd.DataFrame) -> pd.DataFrame:
    """Bound columns of one model and dataset's rows, from the fit of its baseline rows."""
    rows = rows.copy()
    try:
        line = fit(rows)
    except ValueError:
        for column in ("fit_tpot", "fit_tpot_kept", "bound_speedup", "fraction_of_bound", "fit_w", "fit_c",
                       "fit_rms", "fit_r2"):  # fmt: skip
            rows[column] = math.nan
        rows["fit_points"] = int(rows.loc[is_baseline(rows), "context_length"].nunique())
        return rows
    rows["fit_tpot"] = line(rows["context_length"].astype(float))
    rows["fit_tpot_kept"] = line(rows["kept_length"].astype(float))
    rows["bound_speedup"] = rows["fit_tpot"] / rows["fit_tpot_kept"]
    possible = 1.0 - rows["fit_tpot_kept"] / rows["fit_tpot"]
    achieved = 1.0 - rows["tpot"] / rows["baseline_tpot"]
    rows["fraction_of_bound"] = (achieved / possible).where(possible > 0)
    rows["fit_w"], rows["fit_c"], rows["fit_rms"], rows["fit_r2"] = line.w, line.c, line.rms, line.r2
    rows["fit_points"] = line.n_points
    return rows


# ------------------------------------------------------------------------------------------------ the tables


def _length(cell: dict) -> int:
    return int(cell.get("prompt_length") or cell["settings"]["max_length"])


def scaling_table(cells: list[dict]) -> pd.DataFrame:
    """One row per method x ratio x context length from `scaling` results of one settings set (several lengths)."""
    rows = []
    for cell in cells:
        if cell["kind"] != KIND:
            continue
        runs, baseline_runs = cell["runs"], cell["baseline_runs"]
        length, compression_ratio = _length(cell), float(cell["compression_ratio"])
        row: dict[str, Any] = {
            **cell.get("identity_columns", {}),
            "method": cell["method"],
            "compression_ratio": compression_ratio,
            "kv_quant": cell.get("kv_quant", "none"),
            **dict(zip(("prefill_chunk", "positions", "kv_budget"), tables.reading_of(cell), strict=True)),
            "context_length": length,
            "kept_length": kept_length(length, compression_ratio),
        }
        for name in ("prefill_time", "tpot", "peak_memory"):
            values = [r.get(name, math.nan) for r in runs]
            row[name], row[f"{name}_iqr"] = median_iqr(values)
            row[f"baseline_{name}"] = median_iqr([r.get(name, math.nan) for r in baseline_runs])[0]
        row["prefill_overhead"] = ratio(row["prefill_time"], row["baseline_prefill_time"]) - 1.0
        row["tpot_speedup"] = ratio(row["baseline_tpot"], row["tpot"])
        row["kv_bytes"] = runs[0]["kv_bytes"]
        row["kv_bytes_ratio"] = ratio(runs[0]["kv_bytes"], baseline_runs[0]["kv_bytes"])
        row["cache_length"] = runs[0].get("cache_length", math.nan)
        row["n_timing_runs"] = len(runs)
        row["timing_spread"], row["other_cpu"], row["timing_flag"] = tables._timing_flag(runs, baseline_runs)
        row["options"] = json.dumps(cell["options"], sort_keys=True)
        row.update({k: v for k, v in cell["settings"].items() if k != "max_length"})
        row.update(cell["provenance"])
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    table = pd.DataFrame(rows)
    table = pd.concat([_apply_fit(part) for _, part in table.groupby(["model", "dataset"], sort=True)])
    table = table.assign(_base=~is_baseline(table))
    table = table.sort_values(
        ["model", "dataset", "context_length", "_base", "method", "compression_ratio", "prefill_chunk"]
    )
    table = table.drop(columns="_base").reset_index(drop=True)
    for column in COLUMNS:
        if column not in table:
            table[column] = math.nan
    return table[COLUMNS + [c for c in table.columns if c not in COLUMNS]]


def scaling_records(cells: list[dict]) -> pd.DataFrame:
    """One row per timed run: its method, ratio and context length, and everything the run recorded."""
    frames = []
    for cell in cells:
        if cell["kind"] != KIND:
            continue
        frame = pd.DataFrame(cell["runs"])
        frame.insert(0, "method", cell["method"])
        frame.insert(1, "compression_ratio", float(cell["compression_ratio"]))
        frame.insert(2, "context_length", _length(cell))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def read_tables(results_dir: str | os.PathLike) -> pd.DataFrame:
    """Every `*_kv_scaling.csv` under `results_dir`, stacked; an empty table when there is none."""
    paths = sorted(Path(results_dir).resolve().glob(f"*_kv_{KIND}.csv"))
    frames = [validate.read_table(p, validate.SCALING, "scaling table") for p in paths]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


# ------------------------------------------------------------------------------------------------- the text


def _ms(seconds: float, spec: str = ".1f") -> str:
    return "n/a" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:{spec}} ms"


def _mb(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value / 1e6:.3g} MB"


def _name(model) -> str:
    """A model as the report names it: a hub id or a file or directory name, not a whole path."""
    return slug(str(model))


def _range(values: pd.Series, spec: str) -> str:
    values = values.dropna()
    if values.empty:
        return "n/a"
    low, high = values.min(), values.max()
    return f"{low:{spec}}" if format(low, spec) == format(high, spec) else f"{low:{spec}}–{high:{spec}}"


def fit_summary(table: pd.DataFrame) -> str:
    """Markdown: the fit of each model and dataset, and what share of the baseline's TPOT the cache is."""
    lines = []
    for (model, dataset), part in table.groupby(["model", "dataset"], sort=True):
        try:
            line = fit(part)
        except ValueError as error:
            lines.append(f"- **{_name(model)} / {dataset}**: no fit ({error}).")
            continue
        longest = max(line.lengths)
        share = line.c * longest / line(longest) if line(longest) else math.nan
        sign = "+" if line.c >= 0 else "−"
        text = (
            f"- **{_name(model)} / {dataset}**: baseline TPOT ≈ {_ms(line.w)} {sign} {abs(line.c) * 1e6:.2f} µs × "
            f"cached positions (least squares over {line.n_points} lengths, {min(line.lengths)}–{longest} tokens; "
            f"residual RMS {_ms(line.rms, '.2f')}, R² {line.r2:.3f})."
        )
        if line.c > 0:
            text += (
                f" At {longest} tokens the part that grows with the cache is {100 * share:.0f}% of the fitted "
                "TPOT: the most any press could remove there."
            )
        else:
            text += " The fit finds no decode cost growing with the cache here: by it, no press can gain."
        lines.append(text)
    return "\n".join(lines)


def observations(table: pd.DataFrame) -> str:
    """Markdown bullet points read off the scaling table: nothing in them is written by hand."""
    lines = []
    one_pass = tables.default_reading(table)
    table = charts.chart_series(table)  # a press read in chunks is a method of its own here
    for (model, dataset), part in table.groupby(["model", "dataset"], sort=True):
        pressed = part[~is_baseline(part) & part["tpot_speedup"].notna()]
        lengths = sorted(part["context_length"].unique())
        lines.append(f"- **{_name(model)} / {dataset}** at {', '.join(str(int(n)) for n in lengths)} tokens:")
        if pressed.empty:
            lines.append("  - no compressed row yet; nothing to compare.")
            continue
        longest = int(lengths[-1])
        for compression_ratio, at_ratio in pressed.groupby("compression_ratio"):
            saves = 1.0 - 1.0 / at_ratio["tpot_speedup"]
            first, never = [], []
            for method, rows in at_ratio.assign(saves=saves).groupby("method"):
                reached = rows[rows["saves"] >= SAVING_TARGET].sort_values("context_length")
                if reached.empty:
                    never.append(method)
                else:
                    first.append(f"{method} from {int(reached['context_length'].iloc[0])} tokens")
            parts = []
            if first:
                parts.append("saves ≥ " + f"{100 * SAVING_TARGET:.0f}% of the decode time: " + ", ".join(first))
            if never:
                parts.append(f"never saves {100 * SAVING_TARGET:.0f}% up to {longest} tokens: " + ", ".join(never))
            at_longest = at_ratio[at_ratio["context_length"] == longest]
            bound = at_longest["bound_speedup"].dropna()
            lines.append(
                f"  - ratio {compression_ratio:g}: " + "; ".join(parts) + f". At {longest} tokens: TPOT speedup "
                f"{_range(at_longest['tpot_speedup'], '.2f')}x against a bound of "
                f"{'n/a' if bound.empty else format(bound.iloc[0], '.2f')}x (fraction of the bound "
                f"{_range(at_longest['fraction_of_bound'], '.2f')}); prefill "
                f"{_range(100 * at_longest['prefill_overhead'], '+.0f')}% vs the baseline."
            )
        base = part[is_baseline(part) & (part["context_length"] == longest)]
        top = pressed[(pressed["context_length"] == longest) & one_pass.loc[pressed.index]]
        top = top[top["compression_ratio"] == top["compression_ratio"].max()]
        if not base.empty and not top.empty:
            lines.append(
                f"  - memory at {longest} tokens: the baseline's cache holds {_mb(base['kv_bytes'].iloc[0])} and its "
                f"run grew the process by {_mb(base['peak_memory'].iloc[0])}; at ratio "
                f"{top['compression_ratio'].iloc[0]:g} the cache holds {_mb(top['kv_bytes'].median())} and the "
                f"run's peak is {_range(top['peak_memory'] / 1e6, '.3g')} MB (the prefill's activations and the "
                "full cache before pruning come first)."
            )
        lines += _reading_lines(part, one_pass, longest)
        runs = int(part["n_timing_runs"].min())
        if runs < MIN_RUNS_FOR_SPREAD:
            # With one or two runs per cell there is no spread to flag by; the baseline's scatter about its own
            # fit (the table's fit_rms) is the only noise scale the run itself gives.
            rms = part["fit_rms"].iloc[0]
            if math.isnan(rms):
                scatter = "the baseline has too few lengths to fit"
            else:
                median_tpot = part.loc[is_baseline(part), "tpot"].median()
                scatter = f"the baseline's TPOT scatters about its fit by {_ms(rms, '.1f')} RMS " \
                          f"({100 * rms / median_tpot:.0f}% of its median TPOT)"  # fmt: skip
            lines.append(
                f"  - {runs} timed run(s) per cell: no interquartile range to judge the spread by; {scatter}, "
                "so savings and fractions of the bound within that margin of 1 are not resolved by this run."
            )
        flagged = part[part["timing_flag"].fillna("").astype(str).str.strip() != ""]
        if not flagged.empty:
            lines.append(
                f"  - timing flagged in {len(flagged)} of {len(part)} rows (busy machine or wide spread): read "
                "their times with care."
            )
    return "\n".join(lines)


def _reading_lines(part: pd.DataFrame, one_pass: pd.Series, length: int) -> list[str]:
    """Per press read in chunks (`part` with chart-series methods): its peak memory and prefill time at `length`
    against the uncompressed one-pass prefill timed beside it (same runs, same machine state), and the peak of the
    same press read in one pass where the table has it (measured in its own runs)."""
    at_length = part[part["context_length"] == length]
    chunked = at_length[at_length["prefill_chunk"].notna()] if "prefill_chunk" in part else at_length.iloc[:0]
    lines = []
    for _, row in chunked.iterrows():
        text = (
            f"  - {row['method']} at ratio {row['compression_ratio']:g}, {length} tokens: the run's peak is "
            f"{_mb(row['peak_memory'])} against {_mb(row['baseline_peak_memory'])} for the uncompressed prefill in "
            f"one pass timed beside it ({ratio(row['peak_memory'], row['baseline_peak_memory']):.2f} of it: the "
            f"press prunes after every chunk, so no layer holds more than its budget and one chunk); prefill "
            f"{row['prefill_time']:.3g} s against {row['baseline_prefill_time']:.3g} s."
        )
        plain_name = charts.series_press(row["method"])
        same = at_length[one_pass.loc[at_length.index] & (at_length["method"] == plain_name)
                         & (at_length["compression_ratio"] == row["compression_ratio"])]  # fmt: skip
        if not same.empty:
            alone = _mb(same["peak_memory"].iloc[0])
            text += f" Read in one pass, {plain_name} peaked at {alone} (it prunes after the whole forward)."
        lines.append(text)
    return lines


def table_view(table: pd.DataFrame) -> pd.DataFrame:
    """The columns a reader needs, formatted: one row per model, dataset, context length, method (a press read in
    chunks is a method of its own) and ratio."""
    table = charts.chart_series(table)
    view = pd.DataFrame(
        {
            "model": table["model"].map(_name),
            "dataset": table["dataset"],
            "length": table["context_length"].astype(int),
            "method": table["method"],
            "ratio": table["compression_ratio"].map(lambda v: f"{v:g}"),
            "kept": table["kept_length"].astype(int),
            "prefill": table["prefill_time"].map(lambda v: f"{v:.3g} s"),
            "prefill overhead": (100 * table["prefill_overhead"]).map(lambda v: f"{v:+.0f}%"),
            "TPOT (IQR)": [
                f"{t * 1e3:.1f} ({i * 1e3:.1f}) ms" for t, i in zip(table["tpot"], table["tpot_iqr"], strict=True)
            ],
            "TPOT speedup": table["tpot_speedup"].map(lambda v: f"{v:.2f}"),
            "bound": table["bound_speedup"].map(lambda v: "n/a" if math.isnan(v) else f"{v:.2f}"),
            "fraction of bound": table["fraction_of_bound"].map(lambda v: "" if math.isnan(v) else f"{v:.2f}"),
            "KV cache": table["kv_bytes"].map(_mb),
            "peak memory": table["peak_memory"].map(_mb),
            "timing": table["timing_flag"].fillna(""),
        }
    )
    return view.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- the charts


def _length_x(table: pd.DataFrame) -> alt.X:
    lengths = sorted(int(n) for n in table["context_length"].unique())
    return alt.X("context_length:Q", title="context length (tokens, log scale)",
                 scale=alt.Scale(type="log", base=2, domain=[lengths[0], lengths[-1]], nice=False),
                 axis=alt.Axis(values=lengths, format="d", labelAngle=0))  # fmt: skip


def _panels(table: pd.DataFrame) -> pd.Series:
    return charts._panel_rows(table)


def _by_ratio(table: pd.DataFrame, baseline_too: bool = False) -> pd.DataFrame:
    """The pressed rows with a facet label per ratio; with `baseline_too`, the baseline rows repeated in each."""
    pressed = table[~is_baseline(table)]
    frames = [pressed]
    if baseline_too:
        base = table[is_baseline(table)]
        frames += [base.assign(compression_ratio=r) for r in sorted(pressed["compression_ratio"].unique())]
    data = pd.concat(frames, ignore_index=True)
    return data.assign(panel=_panels(data), ratio_label="ratio " + data["compression_ratio"].map(lambda v: f"{v:g}"))


def _facet(chart, data: pd.DataFrame, panel: tuple[int, int], column: str = "ratio_label"):
    chart = chart.properties(width=panel[0], height=panel[1])
    header = alt.Header(labelFontSize=13, labelFontWeight="bold", labelAngle=0)
    facets = {"column": alt.Column(f"{column}:N", title=None, header=header)}
    if data["panel"].nunique() > 1:
        facets["row"] = alt.Row("panel:N", title=None, header=header)
    return chart.facet(**facets)


SMALL_PANEL = (240, 200)


def speedup_chart(table: pd.DataFrame, panel: tuple[int, int] = SMALL_PANEL) -> alt.Chart:
    """TPOT speedup vs context length, one panel per compression ratio, one line per press; the bound
    fit(n) / fit(kept) dashed black, 1.0 (no gain) grey."""
    table = charts.chart_series(table)  # a press read in chunks is a line of its own
    data = _by_ratio(table)
    selection = charts._methods_selection()
    tooltip = [
        alt.Tooltip("method:N"),
        alt.Tooltip("compression_ratio:Q", title="ratio", format="~g"),
        alt.Tooltip("context_length:Q", title="context length", format="d"),
        alt.Tooltip("tpot_speedup:Q", title="TPOT speedup", format=".2f"),
        alt.Tooltip("bound_speedup:Q", title="bound", format=".2f"),
        alt.Tooltip("fraction_of_bound:Q", title="fraction of bound", format=".2f"),
        alt.Tooltip("timing_flag:N", title="flagged"),
    ]
    x = _length_x(table)
    y = alt.Y("tpot_speedup:Q", title="TPOT speedup (baseline / press)", scale=alt.Scale(zero=False))
    lines = (
        alt.Chart()
        .mark_line(point=alt.OverlayMarkDef(size=50, filled=True))
        .encode(x=x, y=y, **charts.method_marks(table), tooltip=tooltip)
    )
    bound = (
        alt.Chart()
        .transform_filter("isValid(datum.bound_speedup)")
        .transform_aggregate(bound="mean(bound_speedup)", groupby=["context_length"])
        .mark_line(color="black", strokeDash=[5, 4], point=alt.OverlayMarkDef(color="black", size=20))
        .encode(x=x, y="bound:Q", tooltip=[alt.Tooltip("bound:Q", title="bound: fit(n) / fit(kept)", format=".2f")])
    )
    one = alt.Chart().mark_rule(color="#888").encode(y=alt.datum(1.0))
    chart = alt.layer(charts._dim(lines, selection).add_params(selection), bound, one, data=data)
    return _facet(chart, data, panel).properties(
        title=charts._title(
            "Decode: TPOT speedup vs context length",
            "dashed black: the bound, fit(n) / fit(kept) from the baseline's TPOT = w + c·n · grey: 1.0, no gain",
        )
    )


def memory_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Long form for `memory_chart`: KV cache after prefill and the run's peak memory, in MB."""
    data = _by_ratio(table, baseline_too=True)
    frames = []
    for column, label in (("kv_bytes", "KV cache after prefill"), ("peak_memory", "peak memory of the run")):
        frames.append(data.assign(quantity=label, megabytes=data[column].astype(float) / 1e6))
    return pd.concat(frames, ignore_index=True)


def memory_chart(table: pd.DataFrame, panel: tuple[int, int] = SMALL_PANEL) -> alt.Chart:
    """KV cache bytes after prefill and the run's peak memory vs context length, per ratio (rows: quantity);
    the baseline dashed black in every panel."""
    table = charts.chart_series(table)  # a press read in chunks is a line of its own
    data = memory_frame(table)
    selection = charts._methods_selection()
    x = _length_x(table)
    y = alt.Y("megabytes:Q", title="MB")
    tooltip = [
        alt.Tooltip("method:N"),
        alt.Tooltip("quantity:N"),
        alt.Tooltip("context_length:Q", title="context length", format="d"),
        alt.Tooltip("megabytes:Q", title="MB", format=".1f"),
    ]
    pressed = (
        alt.Chart()
        .transform_filter(alt.datum.method != BASELINE[0])
        .mark_line(point=alt.OverlayMarkDef(size=40, filled=True))
        .encode(x=x, y=y, **charts.method_marks(table), tooltip=tooltip)
    )
    base = (
        alt.Chart()
        .transform_filter(alt.datum.method == BASELINE[0])
        .mark_line(color="black", strokeDash=[5, 4], point=alt.OverlayMarkDef(color="black", size=20))
        .encode(x=x, y=y, tooltip=tooltip)
    )
    data["row_label"] = data["quantity"] if data["panel"].nunique() < 2 else data["panel"] + " · " + data["quantity"]
    subtitle = ["dashed black: no compression · peak: how far a run grew the process (CPU: RSS above its start)"]
    if "prefill_chunk" in table and table["prefill_chunk"].notna().any():
        subtitle.append("'chunks of N': the prompt read N tokens at a time, the press pruning after every chunk")
    chart = alt.layer(charts._dim(pressed, selection).add_params(selection), base, data=data)
    header = alt.Header(labelFontSize=12, labelFontWeight="bold", labelAngle=0)
    return (
        chart.properties(width=panel[0], height=panel[1])
        .facet(column=alt.Column("ratio_label:N", title=None, header=header),
               row=alt.Row("row_label:N", title=None, header=alt.Header(labelFontSize=12, labelFontWeight="bold")))
        .resolve_scale(y="independent")
        .properties(
            title=charts._title("Memory vs context length", subtitle)
        )
    )  # fmt: skip


def prefill_chart(table: pd.DataFrame, panel: tuple[int, int] = SMALL_PANEL) -> alt.Chart:
    """Prefill time under the press relative to the baseline's (% extra) vs context length, per ratio."""
    table = charts.chart_series(table)  # a press read in chunks is a line of its own
    data = _by_ratio(table).assign(overhead_percent=lambda d: 100 * d["prefill_overhead"])
    selection = charts._methods_selection()
    x = _length_x(table)
    tooltip = [
        alt.Tooltip("method:N"),
        alt.Tooltip("context_length:Q", title="context length", format="d"),
        alt.Tooltip("overhead_percent:Q", title="prefill overhead %", format="+.1f"),
        alt.Tooltip("prefill_time:Q", title="prefill time (s)", format=".3g"),
    ]
    lines = (
        alt.Chart()
        .mark_line(point=alt.OverlayMarkDef(size=50, filled=True))
        .encode(x=x, y=alt.Y("overhead_percent:Q", title="prefill time vs baseline (% extra)"),
                **charts.method_marks(table), tooltip=tooltip)
    )  # fmt: skip
    zero = alt.Chart().mark_rule(color="#888").encode(y=alt.datum(0))
    chart = alt.layer(charts._dim(lines, selection).add_params(selection), zero, data=data)
    return _facet(chart, data, panel).properties(
        title=charts._title("Prefill: what scoring and pruning cost vs context length", "grey: the baseline's time")
    )


def show(table: pd.DataFrame) -> None:
    """The report section: the fit, the table, the three charts and the observations (IPython display)."""
    from IPython.display import Markdown, display

    display(Markdown(fit_summary(table)))
    display(table_view(table))
    for chart in (speedup_chart(table), memory_chart(table), prefill_chart(table)):
        display(chart)
    heading = "**Observations** (computed from the table above when this notebook ran)"
    display(Markdown(f"{heading}\n\n{observations(table)}"))
