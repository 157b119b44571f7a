"""How busy the machine was while something ran: CPU time of other processes, and the load average.

On 2 cores a second busy process slows torch's threads 10-20x; every timed run records this so that a table can
flag what was measured on a busy machine instead of charting it silently.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_STAT = Path("/proc/stat")
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_seconds() -> float | None:
    """CPU seconds all processes spent busy since boot (Linux), or None elsewhere."""
    try:
        fields = _STAT.read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _HZ


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


class LoadMeter:
    """Measures one span: `with LoadMeter() as meter: ...`, then `meter.record()`."""

    def __enter__(self) -> LoadMeter:
        self.wall = time.perf_counter()
        self.busy = _busy_seconds()
        self.own = _own_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall
        busy = _busy_seconds()
        self.busy = None if busy is None or self.busy is None else busy - self.busy
        self.own = _own_seconds() - self.own

    def record(self) -> dict[str, float]:
        """other_cpu: cores kept busy by other processes during the span (0 on a quiet machine; NaN where the
        system does not say); loadavg: the 1-minute load average at its end."""
        if self.busy is None or self.wall <= 0:
            other = float("nan")
        else:
            other = max(0.0, self.busy - self.own) / self.wall
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        return {"other_cpu": round(other, 4), "loadavg": round(load, 2)}
