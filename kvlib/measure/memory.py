"""Peak memory of one span: how far the process grew above where it stood when the span began.

On CUDA the allocator says exactly: `max_memory_allocated` after `reset_peak_memory_stats`, less what was allocated
at the start. On CPU nothing counts tensors for us, so a background thread samples the resident set size
(`/proc/self/statm`) every `interval` seconds and keeps the largest value; the peak is that largest value less the
RSS at the start. Memory an earlier span freed but the allocator kept would be reused without growing the RSS
(hiding what this span needs), so on glibc the span starts by handing freed memory back to the system
(`malloc_trim(0)`, before any timing starts); every run starts alike, so runs compare fairly. Caveats: a peak
shorter than the interval can be missed, and without glibc the figure is a lower bound. Where /proc is missing
the peak is NaN. Inside the span glibc's defaults keep memory that large temporaries freed resident (its mmap
threshold rises after each large free, so later ones come from the heap), so a CPU peak is the heap's high-water
mark, above what the tensors alive at that moment hold; started with `MALLOC_TRIM_THRESHOLD_=0` in the
environment, a process hands freed memory back at once and its peaks follow the tensors, at some cost in time
(`benchmarks/reading_memory.py` measures both).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import threading
from pathlib import Path

import torch

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
INTERVAL = 0.002  # seconds between RSS samples on CPU


def rss_bytes() -> int | None:
    """The process's resident set size, or None where /proc/self/statm is missing."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return the memory the C allocator holds but no one uses to the system (glibc; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class PeakMemory:
    """`with PeakMemory(device) as peak: ...`, then `peak.record()` -> {"peak_memory": bytes above the start}."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = INTERVAL):
        self.device = torch.device(device)
        self.interval = interval
        self.peak = math.nan
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._observe()

    def _observe(self) -> None:
        rss = rss_bytes()
        if rss is not None and rss > self._highest:
            self._highest = rss

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        release_freed_memory()
        start = rss_bytes()
        self._start = self._highest = start if start is not None else -1
        if start is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="kvlib-peak-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = float(torch.cuda.max_memory_allocated(self.device) - self._start)
            return
        if self._thread is None:
            return  # no /proc: the peak stays NaN
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._observe()  # the end itself may be the highest point
        self.peak = float(max(0, self._highest - self._start))

    def record(self) -> dict[str, float]:
        """peak_memory: bytes the span grew the process (CUDA: allocated memory) above its start; NaN if unknown."""
        return {"peak_memory": self.peak}
