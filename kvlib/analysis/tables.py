"""The metrics tables: one row per method x ratio, built from the stored results of one settings set.

The study hands over exactly the results whose identity matches the run's settings (`kvlib.study.cells`), so a
table never mixes settings, models or text; its baseline row has the same identity as the others.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvlib.analysis import validate
from kvlib.analysis.stats import median_iqr, perplexity, ppl_delta_ci, ratio
from kvlib.files import atomic_write, slug
from kvlib.stats import TIMING_FIELDS

BASELINE = ("none", 0.0, "none")  # (method, ratio, kv_quant): the uncompressed float cache
# Cache precisions from most to fewest bits (kvlib.cache.storage names them; kept here so analysis needs no torch).
PRECISION_ORDER = (
    "none",
    "fp8",
    "hqq-int8",
    "quanto-int4",
    "hqq-int4",
    "hqq-int3",
    "quanto-int2",
    "hqq-int2",
    "hqq-int1",
)


def is_baseline(frame: pd.DataFrame) -> pd.Series:
    """Rows of the uncompressed float cache (tables written before precisions existed have no kv_quant column)."""
    precision = frame["kv_quant"] if "kv_quant" in frame else "none"
    return (frame["method"] == BASELINE[0]) & (precision == BASELINE[2])


# How a prefix was read (kvlib.cache.chunked): (prefill_chunk, positions, kv_budget); the default is one forward
# pass, original positions and the ratio's budget (and every result stored before reading modes existed).
DEFAULT_READING = (None, "original", None)


def reading_of(cell: dict) -> tuple[int | None, str, int | None]:
    return cell.get("prefill_chunk"), cell.get("positions", "original"), cell.get("kv_budget")


def cell_key(cell: dict) -> tuple:
    """A result's row: (method, ratio, kv_quant, prefill_chunk, positions, kv_budget); results stored before
    precisions existed are float (`none`), before reading modes one-shot."""
    return (cell["method"], float(cell["compression_ratio"]), cell.get("kv_quant", "none"), *reading_of(cell))


BASELINE_KEY = (*BASELINE, *DEFAULT_READING)


def default_reading(frame: pd.DataFrame) -> pd.Series:
    """Rows read the study's default way: one forward pass, original positions, the ratio's budget (tables written
    before reading modes existed: every row)."""
    plain = pd.Series(True, index=frame.index)
    for column in ("prefill_chunk", "kv_budget"):
        if column in frame:
            plain &= frame[column].isna()
    if "positions" in frame:
        plain &= frame["positions"].fillna("original") == "original"
    return plain


METRIC_COLUMNS = [
    "method",
    "compression_ratio",
    "kv_quant",
    "ppl",
    "ppl_delta",
    "prefill_time",
    "ttft",
    "tpot",
    "throughput",
    "decode_time",
    "total_generation_time",
    "prefill_speedup",
    "ttft_speedup",
    "tpot_speedup",
    "throughput_ratio",
]
# A timed cell is flagged when other processes kept this much of a core busy (median over its runs and its
# baseline's), or when its prefill or TPOT spread (IQR / median) exceeds SPREAD_LIMIT.
BUSY_LIMIT = 0.25
SPREAD_LIMIT = 0.10


def _timing_flag(runs: list[dict], baseline_runs: list[dict]) -> tuple[float, float, str]:
    spreads = []
    for field in ("prefill_time", "tpot"):
        for group in (runs, baseline_runs):
            median, iqr = median_iqr([r[field] for r in group])
            spreads.append(iqr / median if median else math.nan)
    spread = float(np.nanmax(spreads)) if spreads else math.nan
    busy_values = [r.get("other_cpu", math.nan) for r in runs + baseline_runs]
    busy = float(np.nanmedian(busy_values)) if not all(math.isnan(v) for v in busy_values) else math.nan
    reasons = []
    if busy > BUSY_LIMIT:
        reasons.append(f"busy machine ({busy:.2f} other cores)")
    if spread > SPREAD_LIMIT:
        reasons.append(f"spread {100 * spread:.0f}%")
    return spread, busy, "; ".join(reasons)


def metrics_table(cells: list[dict]) -> pd.DataFrame:
    """One row per method x ratio x cache precision (`kv_quant`) from `ppl` and `latency` results of one settings
    set; every Δ and speedup is against the float, uncompressed baseline."""
    by_kind: dict[str, dict[tuple, dict]] = {"ppl": {}, "latency": {}}
    for cell in cells:
        if cell["kind"] in by_kind:
            by_kind[cell["kind"]][cell_key(cell)] = cell
    ppl_cells, latency_cells = by_kind["ppl"], by_kind["latency"]
    order = {name: i for i, name in enumerate(PRECISION_ORDER)}
    keys = sorted(
        set(ppl_cells) | set(latency_cells),
        key=lambda k: (k != BASELINE_KEY, order.get(k[2], len(order)), k[0] != "none", k[0], k[1], k[3] or 0, k[4],
                       k[5] or 0),
    )  # fmt: skip
    base_ppl = ppl_cells.get(BASELINE_KEY)
    rows = []
    for key in keys:
        method, compression_ratio, precision, chunk, positions, budget = key
        row: dict[str, Any] = {"method": method, "compression_ratio": compression_ratio, "kv_quant": precision}
        ppl_cell, latency_cell = ppl_cells.get(key), latency_cells.get(key)
        row["prefill_chunk"] = chunk  # None: one forward pass (and results before chunks)
        row["positions"] = positions
        row["kv_budget"] = budget  # None: the ratio's budget
        for cell in (ppl_cell, latency_cell):
            if cell:
                row.update({"options": json.dumps(cell["options"], sort_keys=True), **cell["settings"]})
                row.update(cell.get("identity_columns", {}))
        if ppl_cell:
            records = ppl_cell["records"]
            row["ppl"] = perplexity(records)
            row["n_ppl_windows"] = len(records)
            row["n_ppl_tokens"] = sum(r["n_tokens"] for r in records)
            row["cache_length"] = float(np.mean([r["cache_length"] for r in records]))
            row["ppl_effective_ratio"] = ppl_cell.get("effective_ratio", math.nan)
            if base_ppl and all("kv_bytes" in r for r in records + base_ppl["records"]):
                # What the cache holds after the prefix (the quality rows' own cache), against the baseline's.
                row["kv_bytes"] = float(np.mean([r["kv_bytes"] for r in records]))
                row["kv_bytes_ratio"] = ratio(
                    row["kv_bytes"], float(np.mean([r["kv_bytes"] for r in base_ppl["records"]]))
                )
                row["kv_bytes_per_token"] = ratio(row["kv_bytes"], row["cache_length"])
            if base_ppl:
                row["ppl_delta"] = row["ppl"] - perplexity(base_ppl["records"])
                seed = ppl_cell["settings"].get("seed", 0)
                row["ppl_delta_ci_low"], row["ppl_delta_ci_high"] = ppl_delta_ci(records, base_ppl["records"], seed)
        if latency_cell:
            runs, baseline_runs = latency_cell["runs"], latency_cell["baseline_runs"]
            for field in TIMING_FIELDS:
                row[field], row[f"{field}_iqr"] = median_iqr([r[field] for r in runs])
                row[f"baseline_{field}"] = median_iqr([r[field] for r in baseline_runs])[0]
            if "kv_bytes" not in row:  # rows with perplexity report the bytes of the perplexity prefix
                row["kv_bytes"] = runs[0]["kv_bytes"]
                row["kv_bytes_ratio"] = ratio(runs[0]["kv_bytes"], baseline_runs[0]["kv_bytes"])
                row["kv_bytes_per_token"] = ratio(runs[0]["kv_bytes"], runs[0]["cache_length"])
            row["n_timing_runs"] = len(runs)
            row["timing_spread"], row["other_cpu"], row["timing_flag"] = _timing_flag(runs, baseline_runs)
            # Against the baseline runs interleaved with this cell's own (same notebook, same rounds).
            row["prefill_speedup"] = ratio(row["baseline_prefill_time"], row["prefill_time"])
            row["ttft_speedup"] = ratio(row["baseline_ttft"], row["ttft"])
            row["tpot_speedup"] = ratio(row["baseline_tpot"], row["tpot"])
            row["throughput_ratio"] = ratio(row["throughput"], row["baseline_throughput"])
        row.update((latency_cell or ppl_cell)["provenance"])
        rows.append(row)

    table = pd.DataFrame(rows)
    for column in METRIC_COLUMNS:
        if column not in table:
            table[column] = math.nan
    rest = [c for c in table.columns if c not in METRIC_COLUMNS]
    return table[METRIC_COLUMNS + rest]


def window_records(cells: list[dict]) -> pd.DataFrame:
    """Per-window PPL records and per-run timings, one row each."""
    frames = []
    for cell in cells:
        key = {"ppl": "records", "latency": "runs"}.get(cell["kind"])
        if key is None:
            continue
        frame = pd.DataFrame(cell[key])
        frame.insert(0, "kind", cell["kind"])
        frame.insert(1, "method", cell["method"])
        frame.insert(2, "compression_ratio", cell["compression_ratio"])
        frame.insert(3, "kv_quant", cell.get("kv_quant", "none"))
        chunk, positions, budget = reading_of(cell)
        frame.insert(4, "prefill_chunk", chunk)
        frame.insert(5, "positions", positions)
        frame.insert(6, "kv_budget", budget)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# The kinds whose results share the metrics table (one row per method x ratio at `max_length`). Every other kind
# sweeps context lengths and has a table of its own, built by the functions `kind_builders` lists.
METRIC_KINDS = ("ppl", "latency")


def kind_builders() -> dict[str, tuple]:
    """kind -> (table builder, per-record builder), each taking that kind's stored cells: the one list of the
    kinds with a table of their own. Their modules import this one, so they are imported here when first asked."""
    from kvlib.analysis import retrieval, scaling, streaming

    return {
        scaling.KIND: (scaling.scaling_table, scaling.scaling_records),
        retrieval.KIND: (retrieval.retrieval_table, retrieval.retrieval_records),
        streaming.KIND: (streaming.streaming_table, streaming.streaming_records),
    }


def table_paths(output_dir: str | os.PathLike, model: str, dataset: str, kind: str | None = None) -> dict[str, Path]:
    """Where the tables of one model and dataset go: the metrics table, or (with `kind`) that kind's table and
    the per-run records beside it."""
    stem = Path(output_dir) / f"{slug(model)}_{dataset}"
    if kind is not None and kind not in METRIC_KINDS:
        return {
            "csv": Path(f"{stem}_kv_{kind}.csv"),
            "json": Path(f"{stem}_kv_{kind}.json"),
            "records": Path(f"{stem}_kv_{kind}_records.csv"),
        }
    return {
        "csv": Path(f"{stem}_kv_metrics.csv"),
        "json": Path(f"{stem}_kv_metrics.json"),
        "windows": Path(f"{stem}_kv_windows.csv"),
    }


def kind_table(kind: str, cells: list[dict]) -> pd.DataFrame:
    return kind_builders()[kind][0](cells)


def kind_records(kind: str, cells: list[dict]) -> pd.DataFrame:
    return kind_builders()[kind][1](cells)


def write_table(table: pd.DataFrame, csv_path: Path, json_path: Path) -> list[Path]:
    with atomic_write(csv_path) as handle:
        table.to_csv(handle, index=False)
    with atomic_write(json_path) as handle:
        handle.write(table.to_json(orient="records", indent=2))
    return [csv_path, json_path]


REQUIRED_COLUMNS = ("model", "dataset", "method", "compression_ratio")


def read_metrics_csv(path: str | os.PathLike) -> pd.DataFrame:
    """A metrics table written by kvlib; a clear error for anything else."""
    path = Path(path)
    table = validate.read_table(path, validate.METRICS, "metrics table")  # every column's type and range, by row
    if "kv_quant" not in table:  # written before cache precisions existed: every row is a float cache
        table.insert(METRIC_COLUMNS.index("kv_quant"), "kv_quant", "none")
    missing = [c for c in (*REQUIRED_COLUMNS, *METRIC_COLUMNS) if c not in table]
    if missing:
        raise ValueError(f"{path} is not a kvlib metrics table: it lacks the columns {', '.join(missing)}")
    return table


def read_tables(results_dir: str | os.PathLike) -> pd.DataFrame:
    """Every per-dataset metrics table under `results_dir` (not the combined `_all_` ones), stacked."""
    folder = Path(results_dir).resolve()
    paths = sorted(p for p in folder.glob("*_kv_metrics.csv") if not p.name.endswith("_all_kv_metrics.csv"))
    if not paths:
        raise FileNotFoundError(f"no *_kv_metrics.csv files in {folder}")
    return pd.concat([read_metrics_csv(p) for p in paths], ignore_index=True)
