"""Result files: atomic writes, provenance, per-cell records, and the metrics tables built from them.

A grid is a set of cells (measurement kind x method x ratio). Each finished cell is one JSON file under
`<output_dir>/cells/<model>_<dataset>/<kind>/`, written atomically; the tables are rebuilt from the cells, so a
grid killed midway loses nothing that had finished and a rerun skips what is there.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from kvlib.measure import TIMING_FIELDS, perplexity

BASELINE = ("none", 0.0)
METRIC_COLUMNS = [
    "method",
    "compression_ratio",
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
BOOTSTRAP_SAMPLES = 2000


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Write to a temporary file beside `path` and move it into place only once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; results are meant to be shared
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(_jsonable(data), handle, indent=2, allow_nan=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def slug(model: str) -> str:
    """File-name form of a model name: a hub id with '/' replaced by '_'; a local directory or GGUF file by its
    own name (an absolute path would make unreadable file names)."""
    path = Path(model)
    if model.endswith(".gguf"):
        return path.stem
    if path.is_dir():
        return path.resolve().name
    return model.replace("/", "_")


# Paths whose changes can change a number; edits elsewhere (docs, tests) do not make a run "dirty".
RESULT_AFFECTING_PATHS = ("kvlib", "notebooks", "pyproject.toml", "requirements.txt")


def git_commit() -> str:
    """HEAD's commit, with "-dirty" when code or notebooks differ from it."""
    repo = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(repo)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", "--", *RESULT_AFFECTING_PATHS],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return (
        f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    )


def provenance(device: str, dtype: str) -> dict[str, str]:
    import torch
    import transformers

    import kvlib

    return {
        "kvlib_version": kvlib.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
        "device": device,
        "device_name": device_name(device),
        "dtype": dtype,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --- cells -----------------------------------------------------------------------------------------------------


def windows_path(output_dir: str | os.PathLike, model: str, dataset: str, max_length: int) -> Path:
    """Where the token windows of a run are kept ([n_windows, max_length] .npy)."""
    return Path(output_dir) / "windows" / f"{slug(model)}_{dataset}_{max_length}.npy"


def cell_path(output_dir: str | os.PathLike, model: str, dataset: str, kind: str, method: str, ratio: float) -> Path:
    return Path(output_dir) / "cells" / f"{slug(model)}_{dataset}" / kind / f"{method}_{ratio:g}.json"


def read_cell(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def load_cells(output_dir: str | os.PathLike, model: str, dataset: str, kind: str) -> dict[tuple[str, float], dict]:
    folder = Path(output_dir) / "cells" / f"{slug(model)}_{dataset}" / kind
    cells = {}
    for path in sorted(folder.glob("*.json")):
        cell = read_cell(path)
        if cell is not None:
            cells[(cell["method"], float(cell["compression_ratio"]))] = cell
    return cells


# --- statistics ------------------------------------------------------------------------------------------------


def median_iqr(values: list[float]) -> tuple[float, float]:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return float(median), float(q3 - q1)


def ppl_delta_ci(method: list[dict], baseline: list[dict], seed: int = 0) -> tuple[float, float]:
    """95% interval of ppl(method) - ppl(baseline) by paired bootstrap over windows (same windows resampled
    for both)."""
    if [r["window"] for r in method] != [r["window"] for r in baseline]:
        raise ValueError("paired bootstrap needs the same windows for method and baseline")
    nll = np.array([[r["nll_sum"] for r in method], [r["nll_sum"] for r in baseline]])
    tokens = np.array([r["n_tokens"] for r in method], dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(tokens), size=(BOOTSTRAP_SAMPLES, len(tokens)))
    ppl = np.exp(nll[:, picks].sum(axis=-1) / tokens[picks].sum(axis=-1))  # [2, samples]
    low, high = np.percentile(ppl[0] - ppl[1], [2.5, 97.5])
    return float(low), float(high)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator and not math.isnan(denominator) else math.nan


# --- tables ----------------------------------------------------------------------------------------------------


def metrics_table(output_dir: str | os.PathLike, model: str, dataset: str) -> pd.DataFrame:
    """One row per method x ratio from the finished cells, with metrics relative to the baseline row."""
    ppl_cells = load_cells(output_dir, model, dataset, "ppl")
    latency_cells = load_cells(output_dir, model, dataset, "latency")
    keys = sorted(set(ppl_cells) | set(latency_cells), key=lambda k: (k != BASELINE, k[0], k[1]))
    base_ppl = ppl_cells.get(BASELINE)
    rows = []
    for method, ratio in keys:
        row: dict[str, Any] = {"method": method, "compression_ratio": ratio}
        ppl_cell, latency_cell = ppl_cells.get((method, ratio)), latency_cells.get((method, ratio))
        for cell in (ppl_cell, latency_cell):
            if cell:
                row.update({"options": json.dumps(cell["options"], sort_keys=True), **cell["settings"]})
        if ppl_cell:
            records = ppl_cell["records"]
            row["ppl"] = perplexity(records)
            row["n_ppl_windows"] = len(records)
            row["n_ppl_tokens"] = sum(r["n_tokens"] for r in records)
            row["cache_length"] = float(np.mean([r["cache_length"] for r in records]))
            row["ppl_effective_ratio"] = ppl_cell.get("effective_ratio", math.nan)
            if base_ppl:
                row["ppl_delta"] = row["ppl"] - perplexity(base_ppl["records"])
                seed = ppl_cell["settings"].get("seed", 0)
                row["ppl_delta_ci_low"], row["ppl_delta_ci_high"] = ppl_delta_ci(records, base_ppl["records"], seed)
        if latency_cell:
            runs = latency_cell["runs"]
            for field in TIMING_FIELDS:
                row[field], row[f"{field}_iqr"] = median_iqr([r[field] for r in runs])
            row["kv_bytes"] = runs[0]["kv_bytes"]
            row["n_timing_runs"] = len(runs)
        rows.append(row)
        provenance_of = latency_cell or ppl_cell
        row.update(provenance_of["provenance"])

    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=METRIC_COLUMNS)
    base = table[(table.method == BASELINE[0]) & (table.compression_ratio == BASELINE[1])]
    base = base.iloc[0] if len(base) else pd.Series(dtype=float)

    def relative(column: str, invert: bool) -> pd.Series:
        if column not in table or column not in base:
            return pd.Series(math.nan, index=table.index)
        return table[column].map(lambda v: _ratio(base[column], v) if invert else _ratio(v, base[column]))

    table["prefill_speedup"] = relative("prefill_time", invert=True)
    table["ttft_speedup"] = relative("ttft", invert=True)
    table["tpot_speedup"] = relative("tpot", invert=True)
    table["throughput_ratio"] = relative("throughput", invert=False)
    table["kv_bytes_ratio"] = relative("kv_bytes", invert=False)
    for column in METRIC_COLUMNS:
        if column not in table:
            table[column] = math.nan
    rest = [c for c in table.columns if c not in METRIC_COLUMNS]
    return table[METRIC_COLUMNS + rest]


def window_records(output_dir: str | os.PathLike, model: str, dataset: str) -> pd.DataFrame:
    """Per-window PPL records and per-run timings, one row each."""
    frames = []
    for kind, key in (("ppl", "records"), ("latency", "runs")):
        for (method, ratio), cell in load_cells(output_dir, model, dataset, kind).items():
            frame = pd.DataFrame(cell[key])
            frame.insert(0, "kind", kind)
            frame.insert(1, "method", method)
            frame.insert(2, "compression_ratio", ratio)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def table_paths(output_dir: str | os.PathLike, model: str, dataset: str) -> dict[str, Path]:
    stem = Path(output_dir) / f"{slug(model)}_{dataset}"
    return {
        "csv": Path(f"{stem}_kv_metrics.csv"),
        "json": Path(f"{stem}_kv_metrics.json"),
        "windows": Path(f"{stem}_kv_windows.csv"),
    }


def write_tables(output_dir: str | os.PathLike, model: str, datasets: list[str]) -> list[Path]:
    """Write each dataset's metrics CSV/JSON and per-window records; with several datasets also a combined pair."""
    written, tables = [], []
    for dataset in datasets:
        table = metrics_table(output_dir, model, dataset)
        paths = table_paths(output_dir, model, dataset)
        written += _write_table(table, paths["csv"], paths["json"])
        with atomic_write(paths["windows"]) as handle:
            window_records(output_dir, model, dataset).to_csv(handle, index=False)
        written.append(paths["windows"])
        tables.append(table)
    if len(datasets) > 1:
        paths = table_paths(output_dir, model, "all")
        written += _write_table(pd.concat(tables, ignore_index=True), paths["csv"], paths["json"])
    return written


def _write_table(table: pd.DataFrame, csv_path: Path, json_path: Path) -> list[Path]:
    with atomic_write(csv_path) as handle:
        table.to_csv(handle, index=False)
    with atomic_write(json_path) as handle:
        handle.write(table.to_json(orient="records", indent=2))
    return [csv_path, json_path]
