"""The few numbers both the measuring side and the analysis agree on: the fields a timed run records, perplexity
from per-window NLL records, and the median with its interquartile range.

Pure numpy, no torch and no other part of kvlib: `kvlib.measure` imports it without importing the analysis, and
`kvlib.analysis` without importing torch.
"""

from __future__ import annotations

import numpy as np

# What one timed generation records (`kvlib.measure.latency.time_generation`), in seconds except throughput
# (generated tokens per second); the metrics table has the median and IQR of each.
TIMING_FIELDS = ("prefill_time", "ttft", "tpot", "throughput", "decode_time", "total_generation_time")


def perplexity(records: list[dict]) -> float:
    """exp(sum of suffix NLL / sum of suffix tokens) over per-window records."""
    return float(np.exp(sum(r["nll_sum"] for r in records) / sum(r["n_tokens"] for r in records)))


def median_iqr(values: list[float]) -> tuple[float, float]:
    """The median of `values` and their interquartile range (q3 - q1)."""
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return float(median), float(q3 - q1)
