"""Checks of every table the analysis reads back from a results folder: columns, types and ranges.

A table kvlib wrote always passes; one edited by hand (a column removed or renamed, a number replaced by text,
an accuracy emptied) fails on load with one line naming the file, the column and the row, instead of a bare
`KeyError` deep in a chart, or a point silently missing from it. Rows are counted from 1 after the header, so row
`n` is line `n + 1` of the CSV file. Imports neither torch nor any other part of kvlib.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

TEXT, NUMBER, INTEGER, BOOLEAN = "text", "number", "integer", "boolean"


class TableError(ValueError):
    """A results table that is not what kvlib wrote (edited by hand, truncated, or another program's)."""


@dataclass(frozen=True)
class Column:
    """One column of a table: its type, whether a row may leave it empty, and its allowed range."""

    name: str
    kind: str = NUMBER
    required: bool = True  # the column must be present (older tables may lack the optional ones)
    empty_ok: bool = True  # a row may leave the cell empty (NaN), e.g. a latency-only row has no perplexity
    minimum: float | None = None
    maximum: float | None = None
    below_maximum: bool = False  # the maximum itself is excluded (a compression ratio is < 1)

    def allowed(self) -> str:
        low = "-inf" if self.minimum is None else f"{self.minimum:g}"
        high = "inf" if self.maximum is None else f"{self.maximum:g}"
        kind = "an integer" if self.kind == INTEGER else "a number"
        return f"{kind} in [{low}, {high}{')' if self.below_maximum else ']'}"


def _fail(path: Path, column: str, row: int, value, why: str) -> TableError:
    return TableError(f"{path}: column {column!r}, row {row} (line {row + 1}): {value!r} {why}")


def _empty(path: Path, column: str, row: int, allowed: str) -> TableError:
    return TableError(f"{path}: column {column!r}, row {row} (line {row + 1}) is empty or NaN; it must be {allowed}")


def _check_numbers(frame: pd.DataFrame, column: Column, path: Path) -> pd.Series:
    raw = frame[column.name]
    numbers = pd.to_numeric(raw, errors="coerce")
    for row, (value, number) in enumerate(zip(raw.tolist(), numbers.tolist(), strict=True), start=1):
        empty = value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""
        if empty or (isinstance(value, str) and value.strip().lower() == "nan"):
            if not column.empty_ok:
                raise _empty(path, column.name, row, column.allowed())
            continue
        if pd.isna(number) or isinstance(value, bool):
            raise _fail(path, column.name, row, value, f"is not a number; it must be {column.allowed()}")
        above = column.maximum is not None and (
            number >= column.maximum if column.below_maximum else number > column.maximum
        )
        out_of_range = above or (column.minimum is not None and number < column.minimum)
        if column.kind == INTEGER and not float(number).is_integer():
            raise _fail(path, column.name, row, value, f"is not an integer; it must be {column.allowed()}")
        if out_of_range:
            raise _fail(path, column.name, row, value, f"is out of range; it must be {column.allowed()}")
    # A column pandas parsed as numbers is kept as parsed (integers stay integers); only text becomes numbers.
    return numbers.astype(float) if raw.dtype == object else raw


def _check_booleans(frame: pd.DataFrame, column: Column, path: Path) -> pd.Series:
    truth = {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}
    values = []
    for position, value in enumerate(frame[column.name], start=1):
        key = str(value).strip().lower()
        if isinstance(value, bool):
            values.append(value)
        elif key in truth:
            values.append(truth[key])
        else:
            raise _fail(path, column.name, position, value, "is not true or false")
    return frame[column.name] if frame[column.name].dtype == bool else pd.Series(values, frame.index, dtype=bool)


def validate_table(
    frame: pd.DataFrame, path: str | os.PathLike, columns: tuple[Column, ...], what: str
) -> pd.DataFrame:
    """`frame` (read from `path`) with its checked columns converted to their types; TableError naming the file,
    the column and the row at the first cell that is missing, not of its type, or out of its range. Columns not
    listed are left as they are."""
    path = Path(path)
    names = list(frame.columns)
    missing = [column.name for column in columns if column.required and column.name not in names]
    if missing:
        raise TableError(
            f"{path} is not a kvlib {what}: column {missing[0]!r} is missing (renamed or removed?); it needs "
            f"{', '.join(column.name for column in columns if column.required)}"
        )
    checked = frame.copy()
    for column in columns:
        if column.name not in names:
            continue
        if column.kind in (NUMBER, INTEGER):
            checked[column.name] = _check_numbers(frame, column, path)
        elif column.kind == BOOLEAN:
            checked[column.name] = _check_booleans(frame, column, path)
        elif not column.empty_ok:
            for position, value in enumerate(frame[column.name], start=1):
                if pd.isna(value) or str(value).strip() == "":
                    raise _empty(path, column.name, position, "a name")
    return checked


def read_table(path: str | os.PathLike, columns: tuple[Column, ...], what: str, **read_csv) -> pd.DataFrame:
    """A CSV table, checked (`validate_table`); a clear error for a file that is not CSV at all."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path.resolve()}")
    try:
        frame = pd.read_csv(path, **read_csv)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise TableError(f"{path} is not a kvlib {what} ({type(error).__name__}: {error})") from error
    return validate_table(frame, path, columns, what)


# ----------------------------------------------------------------------------------------------- the schemas

_IDENTITY = (Column("model", TEXT, empty_ok=False), Column("dataset", TEXT, empty_ok=False))
_ROW = (
    Column("method", TEXT, empty_ok=False),
    Column("compression_ratio", empty_ok=False, minimum=0, maximum=1, below_maximum=True),
    Column("kv_quant", TEXT, required=False),
)
_TIMES = ("prefill_time", "ttft", "tpot", "decode_time", "total_generation_time")

# The metrics table (`*_kv_metrics.csv`): perplexity and latency per method x ratio; either part may be absent
# from a row (a kind not measured), so those cells may be empty, never text.
METRICS = (
    *_IDENTITY,
    *_ROW,
    Column("ppl", minimum=1),
    Column("ppl_delta"),
    *(Column(name, minimum=0) for name in _TIMES),
    Column("throughput", minimum=0),
    *(Column(name, minimum=0) for name in ("prefill_speedup", "ttft_speedup", "tpot_speedup", "throughput_ratio")),
    *(Column(f"{name}_iqr", required=False, minimum=0) for name in (*_TIMES, "throughput")),
    *(Column(f"baseline_{name}", required=False, minimum=0) for name in (*_TIMES, "throughput")),
    Column("ppl_delta_ci_low", required=False),
    Column("ppl_delta_ci_high", required=False),
    Column("kv_bytes", required=False, minimum=0),
    Column("kv_bytes_ratio", required=False, minimum=0),
    Column("cache_length", required=False, minimum=0),
)

# The context-length sweep (`*_kv_scaling.csv`): every row was timed, so its times are required.
SCALING = (
    *_IDENTITY,
    *_ROW,
    Column("context_length", INTEGER, empty_ok=False, minimum=1),
    Column("kept_length", INTEGER, empty_ok=False, minimum=0),
    Column("prefill_chunk", INTEGER, required=False, minimum=1),  # empty: one forward pass
    Column("positions", TEXT, required=False),
    Column("kv_budget", INTEGER, required=False, minimum=1),
    Column("prefill_time", empty_ok=False, minimum=0),
    Column("tpot", empty_ok=False, minimum=0),
    Column("baseline_prefill_time", minimum=0),
    Column("baseline_tpot", minimum=0),
    Column("prefill_time_iqr", minimum=0),
    Column("tpot_iqr", minimum=0),
    Column("prefill_overhead"),
    Column("tpot_speedup", minimum=0),
    Column("bound_speedup"),
    Column("fraction_of_bound"),
    Column("fit_tpot"),
    Column("fit_tpot_kept"),
    Column("kv_bytes", minimum=0),
    Column("kv_bytes_ratio", minimum=0),
    Column("cache_length", minimum=0),
    Column("peak_memory", minimum=0),
    Column("n_timing_runs", INTEGER, empty_ok=False, minimum=1),
    Column("fit_w"),
    Column("fit_c"),
    Column("fit_rms", minimum=0),
    Column("fit_r2"),
    Column("fit_points", INTEGER, minimum=0),
)

# Needle retrieval (`*_kv_retrieval.csv`): `length` is a token count or "all" (every length together).
RETRIEVAL = (
    *_IDENTITY,
    *_ROW,
    Column("length", TEXT, empty_ok=False),
    Column("accuracy", empty_ok=False, minimum=0, maximum=1),
    Column("ci_low", empty_ok=False, minimum=0, maximum=1),
    Column("ci_high", empty_ok=False, minimum=0, maximum=1),
    Column("correct", INTEGER, empty_ok=False, minimum=0),
    Column("n_trials", INTEGER, empty_ok=False, minimum=1),
)

# One row per retrieval trial (`*_kv_retrieval_records.csv`), what the depth heatmap counts.
RETRIEVAL_RECORDS = (
    Column("method", TEXT, empty_ok=False),
    Column("compression_ratio", empty_ok=False, minimum=0, maximum=1, below_maximum=True),
    Column("length", INTEGER, empty_ok=False, minimum=1),
    Column("depth", empty_ok=False, minimum=0, maximum=1),
    Column("correct", BOOLEAN),
)

# Per-window perplexity records and per-run timings (`*_kv_windows.csv`): a perplexity row leaves the timing
# columns empty and a timing row the perplexity ones, so only types and ranges are checked, not presence.
WINDOW_RECORDS = (
    Column("kind", TEXT, required=False),
    Column("method", TEXT, empty_ok=False),
    Column("compression_ratio", empty_ok=False, minimum=0, maximum=1, below_maximum=True),
    Column("window", INTEGER, required=False, minimum=0),
    Column("nll_sum", required=False, minimum=0),
    Column("n_tokens", INTEGER, required=False, minimum=1),
    *(Column(name, required=False, minimum=0) for name in (*_TIMES, "throughput")),
)


# Streaming perplexity (`*_kv_streaming.csv`): one row per reading of the text.
STREAMING = (
    *_IDENTITY,
    Column("method", TEXT, empty_ok=False),
    Column("positions", TEXT, empty_ok=False),
    Column("tokens", INTEGER, empty_ok=False, minimum=2),
    Column("prefill_chunk", INTEGER, empty_ok=False, minimum=1),
    Column("kv_budget", INTEGER, minimum=1),
    Column("ppl", empty_ok=False, minimum=1),
    Column("ci_low", minimum=1),
    Column("ci_high", minimum=1),
    Column("ppl_within", minimum=1),
    Column("ppl_beyond", minimum=1),
    Column("trained_context", INTEGER, minimum=1),
    Column("ppl_vs_reference"),
    Column("wall_time", empty_ok=False, minimum=0),
    Column("time_vs_reference", minimum=0),
    Column("peak_cache_bytes", INTEGER, empty_ok=False, minimum=0),
    Column("peak_memory", minimum=0),
)

# One row per bucket of tokens of every reading (`*_kv_streaming_records.csv`).
STREAMING_RECORDS = (
    Column("method", TEXT, empty_ok=False),
    Column("positions", TEXT, empty_ok=False),
    Column("start", INTEGER, empty_ok=False, minimum=0),
    Column("end", INTEGER, empty_ok=False, minimum=1),
    Column("nll_sum", empty_ok=False, minimum=0),
    Column("n_tokens", INTEGER, empty_ok=False, minimum=1),
    Column("ppl", empty_ok=False, minimum=1),
    Column("cache_bytes", INTEGER, empty_ok=False, minimum=0),
)


def check_retrieval_rows(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """What the columns alone cannot say: every `length` is a token count or "all", and no row counts more correct
    answers than trials."""
    for position, (length, correct, trials) in enumerate(
        zip(table["length"], table["correct"], table["n_trials"], strict=True), start=1
    ):
        if str(length) != "all" and not str(length).isdigit():
            raise _fail(Path(path), "length", position, length, "is neither a token count nor 'all'")
        if correct > trials:
            raise _fail(Path(path), "correct", position, int(correct), f"exceeds n_trials ({int(trials)})")
