"""Does the ranking of presses transfer? Rank agreement between models and between datasets, with its uncertainty.

For every ratio (and cache precision `kv_quant`, where measured) each table — one model on one dataset, read from
its `*_kv_windows.csv` — gives each press's Δ perplexity against the float, uncompressed baseline. Two tables are
compared by Kendall's τ (τ-b: ties allowed) of the presses they share: between two models on the same dataset, and
between two datasets for the same model. τ's 95% interval comes from a bootstrap over windows: each table's windows
are resampled on their own (the two tables hold different windows: other tokenizers, other text), the same draw for
every press of a table (a press and the baseline are scored on the same windows, so Δ is paired).

A press is called the best of a table only where the paired bootstrap interval of (next press's Δ − its Δ) lies
above zero; otherwise the leaders are reported as tied. No scipy: τ-b is computed with numpy, vectorised over the
resamples.
"""

from __future__ import annotations

import itertools
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd

from kvlib.analysis import tables, validate
from kvlib.analysis.charts import method_color, method_shape
from kvlib.analysis.stats import BOOTSTRAP_SAMPLES

BASELINE_METHOD = "none"
FLOAT = "none"  # kv_quant of the float cache (tables written before precisions existed have no such column)
TAU_COLUMNS = [
    "comparison", "a", "b", "shared", "kv_quant", "compression_ratio", "n_presses", "tau", "tau_low", "tau_high",
    "n_windows_a", "n_windows_b",
]  # fmt: skip


@dataclass(frozen=True)
class Group:
    """One table's presses at one ratio and precision: point Δppl and its bootstrap replicates."""

    methods: list[str]
    delta: np.ndarray  # [presses]
    replicates: np.ndarray  # [resamples, presses]
    n_windows: int


# ------------------------------------------------------------------------------------------------- reading


def find_tables(results_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per (model, dataset) table under `results_dir` that has per-window records: its model as the file
    names spell it (the slug), the model as the settings name it, the dataset and the windows file."""
    folder = Path(results_dir)
    rows = []
    for metrics in sorted(folder.glob("*_kv_metrics.csv")):
        if metrics.name.endswith("_all_kv_metrics.csv"):
            continue
        windows = metrics.with_name(metrics.name.replace("_kv_metrics.csv", "_kv_windows.csv"))
        head = pd.read_csv(metrics, usecols=lambda c: c in ("model", "dataset"), nrows=1)
        if not windows.is_file() or head.empty or "dataset" not in head:
            continue
        dataset = str(head["dataset"].iloc[0])
        stem = metrics.name[: -len("_kv_metrics.csv")]
        label = stem[: -len(f"_{dataset}")] if stem.endswith(f"_{dataset}") else stem
        rows.append({"model": label, "model_setting": str(head["model"].iloc[0]), "dataset": dataset,
                     "windows": windows})  # fmt: skip
    return pd.DataFrame(rows, columns=["model", "model_setting", "dataset", "windows"])


def ppl_records(windows_csv: str | os.PathLike) -> pd.DataFrame:
    """The perplexity rows of a `*_kv_windows.csv`: method, compression_ratio, kv_quant, window, nll_sum,
    n_tokens (kv_quant `none` where the file predates precisions)."""
    records = validate.read_table(windows_csv, validate.WINDOW_RECORDS, "per-window records table")
    if "kind" in records:
        records = records[records["kind"] == "ppl"]
    # The ranking compares presses read the study's default way: one forward pass at original positions.
    records = records[tables.default_reading(records)].copy()
    records["kv_quant"] = records["kv_quant"].fillna(FLOAT) if "kv_quant" in records else FLOAT
    records["compression_ratio"] = records["compression_ratio"].astype(float)
    return records[["method", "compression_ratio", "kv_quant", "window", "nll_sum", "n_tokens"]]


# --------------------------------------------------------------------------------------- Δppl and bootstrap


def table_seed(seed: int, model: str, dataset: str) -> np.random.SeedSequence:
    """Each table's own resampling stream: reproducible, and never the same draw for two tables that happen to
    hold as many windows (that would couple resamples the method assumes independent)."""
    return np.random.SeedSequence([seed, zlib.crc32(f"{model}\0{dataset}".encode())])


def press_groups(
    records: pd.DataFrame, rng_seed: np.random.SeedSequence, samples: int = BOOTSTRAP_SAMPLES
) -> dict[tuple[str, float], Group]:
    """(kv_quant, ratio) -> the presses' Δppl against the float baseline, on the windows every press of that group
    and the baseline share, with `samples` bootstrap replicates (one draw of windows for the whole table)."""
    baseline = records[(records["method"] == BASELINE_METHOD) & (records["kv_quant"] == FLOAT)]
    if baseline.empty:
        return {}
    base = baseline.groupby("window")[["nll_sum", "n_tokens"]].sum()
    presses = records[records["method"] != BASELINE_METHOD]
    windows = np.array(sorted(base.index))
    picks = np.random.default_rng(rng_seed).integers(0, len(windows), size=(samples, len(windows)))
    groups = {}
    for (precision, ratio), group in presses.groupby(["kv_quant", "compression_ratio"], sort=True):
        nll = group.pivot_table(index="window", columns="method", values="nll_sum", aggfunc="sum")
        tokens = group.pivot_table(index="window", columns="method", values="n_tokens", aggfunc="sum")
        shared = nll.dropna().index.intersection(base.index)
        if len(shared) != len(windows):
            continue  # a group scored on other windows than the baseline cannot be paired with it
        methods = [str(m) for m in nll.columns]  # pivot_table's column order, which the arrays below keep
        nll, tokens, b = nll.loc[windows].to_numpy(float), tokens.loc[windows].to_numpy(float), base.loc[windows]
        b_nll, b_tokens = b["nll_sum"].to_numpy(float), b["n_tokens"].to_numpy(float)
        delta = np.exp(nll.sum(0) / tokens.sum(0)) - math.exp(b_nll.sum() / b_tokens.sum())
        replicates = (
            np.exp(nll[picks].sum(1) / tokens[picks].sum(1))
            - np.exp(b_nll[picks].sum(1) / b_tokens[picks].sum(1))[:, None]
        )
        groups[(str(precision), float(ratio))] = Group(methods, delta, replicates, len(windows))
    return groups


def kendall_tau(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's τ-b of x and y along the last axis (leading axes: independent samples); NaN where either is
    constant. τ-b corrects for ties, which a press at the baseline's value on two tables can produce."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = x.shape[-1]
    upper = np.triu_indices(n, k=1)
    dx = np.sign(x[..., :, None] - x[..., None, :])[..., upper[0], upper[1]]
    dy = np.sign(y[..., :, None] - y[..., None, :])[..., upper[0], upper[1]]
    pairs_x, pairs_y = (dx != 0).sum(-1), (dy != 0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (dx * dy).sum(-1) / np.sqrt(pairs_x * pairs_y)


MIN_PRESSES = 3


def compare(a: Group, b: Group) -> dict:
    """τ of the presses two groups share, with its 95% bootstrap interval (independent resamples of each)."""
    shared = sorted(set(a.methods) & set(b.methods))
    ia, ib = [a.methods.index(m) for m in shared], [b.methods.index(m) for m in shared]
    row = {"n_presses": len(shared), "n_windows_a": a.n_windows, "n_windows_b": b.n_windows}
    if len(shared) < MIN_PRESSES:  # two presses give τ = ±1 whatever the data: no ranking to compare
        return row | {"tau": math.nan, "tau_low": math.nan, "tau_high": math.nan}
    tau = float(kendall_tau(a.delta[ia], b.delta[ib]))
    replicates = kendall_tau(a.replicates[:, ia], b.replicates[:, ib])
    low, high = np.nanpercentile(replicates, [2.5, 97.5]) if np.isfinite(replicates).any() else (math.nan,) * 2
    return row | {"tau": tau, "tau_low": float(low), "tau_high": float(high)}


def all_groups(
    results_dir: str | os.PathLike, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES
) -> dict[tuple[str, str], dict[tuple[str, float], Group]]:
    """(model, dataset) -> its press groups, for every table under `results_dir`."""
    found = find_tables(results_dir)
    return {
        (row.model, row.dataset): press_groups(
            ppl_records(row.windows), table_seed(seed, row.model, row.dataset), samples
        )  # fmt: skip
        for row in found.itertuples()
    }


def agreement_table(
    results_dir: str | os.PathLike,
    seed: int = 0,
    samples: int = BOOTSTRAP_SAMPLES,
    groups: dict | None = None,
) -> pd.DataFrame:
    """Kendall's τ of the presses' Δppl for every pair of models on each dataset (`comparison` "models"; `shared`
    names the dataset) and every pair of datasets for each model ("datasets"; `shared` names the model), per
    kv_quant and ratio, with 95% bootstrap intervals. Any number of models: all pairs."""
    groups = all_groups(results_dir, seed, samples) if groups is None else groups
    rows = []
    models = sorted({m for m, _ in groups})
    datasets = sorted({d for _, d in groups})
    pairs = [
        ("models", dataset, (m1, dataset), (m2, dataset))
        for dataset in datasets
        for m1, m2 in itertools.combinations(models, 2)
    ]
    pairs += [("datasets", model, (model, d1), (model, d2)) for model in models
              for d1, d2 in itertools.combinations(datasets, 2)]  # fmt: skip
    for comparison, shared, key_a, key_b in pairs:
        if key_a not in groups or key_b not in groups:
            continue
        a_side = key_a[0] if comparison == "models" else key_a[1]
        b_side = key_b[0] if comparison == "models" else key_b[1]
        for precision, ratio in sorted(set(groups[key_a]) & set(groups[key_b])):
            row = {"comparison": comparison, "a": a_side, "b": b_side, "shared": shared, "kv_quant": precision,
                   "compression_ratio": ratio}  # fmt: skip
            rows.append(row | compare(groups[key_a][(precision, ratio)], groups[key_b][(precision, ratio)]))
    return pd.DataFrame(rows, columns=TAU_COLUMNS)


def delta_table(groups: dict[tuple[str, str], dict[tuple[str, float], Group]]) -> pd.DataFrame:
    """Tidy Δppl per model, dataset, kv_quant, ratio and press, with its 95% bootstrap interval."""
    rows = []
    for (model, dataset), by_group in groups.items():
        for (precision, ratio), group in by_group.items():
            low, high = np.percentile(group.replicates, [2.5, 97.5], axis=0)
            for i, method in enumerate(group.methods):
                rows.append({"model": model, "dataset": dataset, "kv_quant": precision, "compression_ratio": ratio,
                             "method": method, "ppl_delta": float(group.delta[i]), "ci_low": float(low[i]),
                             "ci_high": float(high[i])})  # fmt: skip
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ "best", honestly


def best_press(group: Group) -> dict:
    """The press with the smallest Δppl, and whether it is *separated* from the runner-up: the paired bootstrap
    interval of (runner-up's Δ − its Δ), over the same resampled windows, lies above zero. `tied` lists the
    presses whose difference from the leader's interval includes zero."""
    order = np.argsort(group.delta, kind="stable")
    leader = order[0]
    gaps = group.replicates - group.replicates[:, [leader]]  # [resamples, presses]: Δ_other − Δ_leader
    low = np.percentile(gaps, 2.5, axis=0)
    tied = [group.methods[i] for i in order[1:] if not low[i] > 0]
    runner_up = group.methods[order[1]] if len(order) > 1 else None
    return {"best": group.methods[leader], "runner_up": runner_up, "separated": runner_up is not None and not tied,
            "tied": tied, "delta": float(group.delta[leader])}  # fmt: skip


def conclusions(groups: dict[tuple[str, str], dict[tuple[str, float], Group]]) -> pd.DataFrame:
    """Per model, dataset, kv_quant and ratio: the leading press, and whether it may be called the best."""
    rows = []
    for (model, dataset), by_group in sorted(groups.items()):
        for (precision, ratio), group in sorted(by_group.items()):
            if len(group.methods) >= 1:
                rows.append({"model": model, "dataset": dataset, "kv_quant": precision, "compression_ratio": ratio,
                             **best_press(group)})  # fmt: skip
    return pd.DataFrame(rows)


def conclusion_lines(table: pd.DataFrame) -> list[str]:
    """The conclusions in words, per model: "best" only where the interval separates the leader."""
    lines = []
    for model, rows in table.groupby("model", sort=True):
        lines.append(f"**{model}**")
        for row in rows.itertuples():
            where = f"{row.dataset}, ratio {row.compression_ratio:g}" + (
                f", kv_quant {row.kv_quant}" if row.kv_quant != FLOAT else ""
            )
            if row.separated:
                text = f"best: **{row.best}** (Δppl {row.delta:+.2f}; its interval separates it from {row.runner_up})"
            elif row.runner_up is None:
                text = f"only {row.best} measured"
            else:
                text = (f"no single best: {row.best} leads (Δppl {row.delta:+.2f}) but is not separated from "
                        f"{', '.join(row.tied)}")  # fmt: skip
            lines.append(f"- {where}: {text}")
    return lines


# ----------------------------------------------------------------------------------------------- the chart


def transfer_chart(
    deltas: pd.DataFrame,
    model_a: str,
    model_b: str,
    dataset: str,
    kv_quant: str = FLOAT,
    panel: tuple[int, int] = (260, 260),
) -> alt.Chart:
    """Each press's Δppl on `model_a` (x) against `model_b` (y) on one dataset, one panel per ratio: points with
    their 95% interval bars both ways, and the diagonal (a press on it costs both models the same). Symmetric-log
    axes: Δ runs from hundredths to tens. A press above the diagonal costs model B more."""
    keep = (deltas["dataset"] == dataset) & (deltas["kv_quant"] == kv_quant)
    a = deltas[keep & (deltas["model"] == model_a)].drop(columns=["model"])
    b = deltas[keep & (deltas["model"] == model_b)].drop(columns=["model"])
    joined = a.merge(b, on=["dataset", "kv_quant", "compression_ratio", "method"], suffixes=("_a", "_b"))
    if joined.empty:
        raise ValueError(f"no press measured on both {model_a!r} and {model_b!r} for {dataset!r} ({kv_quant})")
    methods = sorted(joined["method"].unique())
    low = float(min(joined[["ci_low_a", "ci_low_b"]].min().min(), 0.0))
    high = float(joined[["ci_high_a", "ci_high_b"]].max().max())
    scale = alt.Scale(type="symlog", domain=[low, high], nice=False)
    x = alt.X("ppl_delta_a:Q", title=f"Δppl on {model_a}", scale=scale)
    y = alt.Y("ppl_delta_b:Q", title=f"Δppl on {model_b}", scale=scale)
    tooltip = ["method", "compression_ratio", alt.Tooltip("ppl_delta_a:Q", format="+.3f"),
               alt.Tooltip("ppl_delta_b:Q", format="+.3f")]  # fmt: skip
    panels = []
    for ratio, rows in joined.groupby("compression_ratio", sort=True):
        base = alt.Chart(rows).properties(width=panel[0], height=panel[1], title=f"ratio {ratio:g}")
        diagonal = alt.Chart(pd.DataFrame({"ppl_delta_a": [low, high], "ppl_delta_b": [low, high]})).mark_line(
            color="gray", strokeDash=[4, 4]
        ).encode(x=x, y=y)  # fmt: skip
        color = method_color(methods, "method")  # one title for every layer: one legend
        x_low = alt.X("ci_low_a:Q", scale=scale, title=f"Δppl on {model_a}")
        y_low = alt.Y("ci_low_b:Q", scale=scale, title=f"Δppl on {model_b}")
        bars_x = base.mark_rule(opacity=0.6).encode(x=x_low, x2="ci_high_a:Q", y=y, color=color)
        bars_y = base.mark_rule(opacity=0.6).encode(x=x, y=y_low, y2="ci_high_b:Q", color=color)
        points = base.mark_point(filled=True, size=60).encode(
            x=x, y=y, color=color, shape=method_shape(methods, "method"), tooltip=tooltip
        )
        panels.append(alt.layer(diagonal, bars_x, bars_y, points))
    title = f"Does the ranking transfer? {model_a} vs {model_b}, {dataset}" + (
        f", kv_quant {kv_quant}" if kv_quant != FLOAT else ""
    )
    return alt.hconcat(*panels).properties(title=title)


# ------------------------------------------------------------------------------------------- report section


def _interval(row) -> str:
    if math.isnan(row.tau):
        return "—"
    return f"{row.tau:+.2f} [{row.tau_low:+.2f}, {row.tau_high:+.2f}]"


def tau_view(table: pd.DataFrame) -> pd.DataFrame:
    """The τ table as a reader wants it: one row per comparison and ratio, τ with its interval in one column."""
    if table.empty:
        return pd.DataFrame(columns=["comparison", "shared", "kv_quant", "ratio", "presses", "τ [95% interval]"])
    view = table.assign(pair=table["a"] + " vs " + table["b"], interval=[_interval(r) for r in table.itertuples()])
    view = view.rename(columns={"compression_ratio": "ratio", "n_presses": "presses", "interval": "τ [95% interval]"})
    return view[["comparison", "pair", "shared", "kv_quant", "ratio", "presses", "τ [95% interval]"]]


def agreement_section(results_dir: str | os.PathLike, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> str:
    """The report's transfer section as Markdown: what τ means, the τ table with intervals, and the conclusions
    stated per model. Empty string when `results_dir` holds no per-window records."""
    groups = all_groups(results_dir, seed, samples)
    if not any(groups.values()):
        return ""
    tau = agreement_table(results_dir, seed, samples, groups=groups)
    parts = [
        "## Does the ranking transfer?",
        "",
        "Kendall's τ between the presses' Δ perplexity on two models (same dataset) or two datasets (same model), "
        "per ratio: 1 is the same order, 0 no relation, −1 the reverse. The interval (95%) comes from "
        f"{samples:,} bootstrap resamples of each table's windows, drawn independently for each table.",
        "",
    ]
    if tau.empty:
        parts.append("Only one model and one dataset: nothing to compare yet.")
    else:
        parts.append(_markdown(tau_view(tau)))
    parts += ["", "### Conclusions per model", "",
              "A press is called best only where the paired bootstrap interval of the runner-up's Δ minus its own "
              "lies above zero.", ""]  # fmt: skip
    parts += conclusion_lines(conclusions(groups))
    return "\n".join(parts) + "\n"


def _markdown(table: pd.DataFrame) -> str:
    """A Markdown table without `tabulate` (pandas needs it for to_markdown)."""
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in row) + " |"
            for row in table.itertuples(index=False)]  # fmt: skip
    return "\n".join([header, rule, *body])
