"""The smoke study sequentially vs on a local Ray instance with 2 workers (2 CPUs, one task each), wall time.

    .venv/bin/python benchmarks/ray_executor.py [--preset smoke] [--workers 2]

Each run writes into a fresh temporary output directory (nothing is resumed), so both do all the work: the
sequential run is `python -m kvlib study` in a fresh interpreter; the Ray run starts its Ray instance in a fresh
interpreter too (the start is included in its time and also printed alone). On a machine with fewer cores than
workers the tasks share them and little is gained; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_line

REPO = Path(__file__).resolve().parents[1]
RAY_RUN = """
import sys, time
import ray
from kvlib import pipeline
started = time.perf_counter()
ray.init(num_cpus={workers}, include_dashboard=False)
print(f"ray start {{time.perf_counter() - started:.1f}}", file=sys.stderr, flush=True)
pipeline.run_preset({preset!r}, {output!r}, executor="ray", log=lambda line: print(line, file=sys.stderr))
ray.shutdown()
"""


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if completed.returncode != 0:
        sys.exit(f"{' '.join(command[:4])} failed:\n{completed.stderr[-3000:]}")
    return time.perf_counter() - started, completed.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(machine_line())
    with tempfile.TemporaryDirectory() as folder:
        sequential = str(Path(folder) / "sequential")
        wall_sequential, _ = timed([sys.executable, "-m", "kvlib", "study", "--preset", args.preset,
                                    "--output_dir", sequential])  # fmt: skip
        on_ray = str(Path(folder) / "ray")
        script = RAY_RUN.format(workers=args.workers, preset=args.preset, output=on_ray)
        wall_ray, log = timed([sys.executable, "-c", script])
    start = re.search(r"ray start ([\d.]+)", log)
    print(
        f"{args.preset} preset: sequential {wall_sequential:.1f} s; Ray with {args.workers} workers "
        f"{wall_ray:.1f} s (of which Ray's start {float(start[1]) if start else float('nan'):.1f} s); "
        f"speedup {wall_sequential / wall_ray:.2f}x"
    )


if __name__ == "__main__":
    main()
