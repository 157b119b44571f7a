"""Statistics of the study: perplexity, medians with their spread, the paired bootstrap, ratios."""

from __future__ import annotations

import math

import numpy as np

from kvlib.stats import median_iqr, perplexity  # noqa: F401  (defined once, beside what measure needs)

BOOTSTRAP_SAMPLES = 2000


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


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator and not math.isnan(denominator) else math.nan


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion `correct / n` (95% for z = 1.96): unlike the normal approximation it
    stays inside [0, 1] and is not empty at 0/n or n/n, which retrieval accuracies often are."""
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, n]; got {correct} of {n}")
    p = correct / n
    denominator = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
