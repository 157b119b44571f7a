"""What the benchmarks share: the bundled model, real text windows, and interleaved timing with medians/IQR."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kvlib.stats import median_iqr  # noqa: F401  (the benchmarks summarise timings as the study does)

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> str:
    return os.environ.get("KVLIB_DATA_DIR") or str(REPO.parent / "shared" / "data")


def wikitext_windows(tokenizer, length: int, count: int) -> np.ndarray:
    from kvlib import data

    return data.load_windows("wikitext", tokenizer, length, max_samples=count, data_dir=data_dir())


def interleaved(configs: dict[str, Callable[[], object]], repetitions: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each config, run round-robin (a, b, c, c, b, a, a, b, ...) so drift hits all alike and
    no config always runs right after the same one."""
    for _ in range(warmup):
        for call in configs.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in configs}
    for round_ in range(repetitions):
        order = list(configs.items())
        for name, call in order if round_ % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return times


def machine_line() -> str:
    import torch

    load = os.getloadavg()[0]
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, load avg {load:.2f}"
