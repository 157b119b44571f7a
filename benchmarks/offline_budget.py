"""What the offline preset's perplexity and latency cells cost at least on this machine, from measured unit costs.

    .venv/bin/python benchmarks/offline_budget.py

Reads the offline preset (model, protocol, methods, ratios, datasets) and measures on one wikitext window of its
length: one shared prefill for all its presses at all its ratios (KVzip's extra passes included), each cell's
suffix pass from its pruned copy, and one timed generation (prefill + `gen_tokens` tokens, no press). From those it
prints the time the preset's perplexity and latency measurements need at the least: perplexity = datasets x
n_ppl x (shared prefill + every cell's pruning and suffix pass), latency = datasets x (warm-up + timed rounds) x
timed configurations x one generation. Model loads, data preparation, notebooks and the report come on top.
Run it alone on the machine.

    .venv/bin/python benchmarks/offline_budget.py --run DIR

reads a finished run of the preset instead (`python -m kvlib study --preset offline --output_dir DIR`, from an
empty DIR to time all of it): its wall time per step (DIR/logs/run-times-*.csv, the newest), the time to its first
report, and its measured compute floor, the measuring time of the cells it stored (each group of cells from the
start of its measurement to its last cell: model loads, text preparation, notebook starts and reports come on top).
Targets: wall / floor <= 1.10, the first report within 30% of the wall time.
"""

from __future__ import annotations

import argparse
import csv
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import torch
from common import machine_line, wikitext_windows

import kvlib
from kvlib import models, pipeline, study
from kvlib.measure import latency, ppl
from kvlib.progress import group_seconds

WALL_OVER_FLOOR = 1.10  # targets (issue: answer first)
FIRST_REPORT_SHARE = 0.30


def run_budget(output: Path) -> None:
    """The wall time of a finished run against the measuring time of the cells it stored."""
    found = sorted((output / "logs").glob("run-times-*.csv"))
    if not found:
        raise SystemExit(f"no run-times-*.csv in {output / 'logs'}: run `python -m kvlib study --preset offline "
                         f"--output_dir {output}` to the end first")  # fmt: skip
    path = found[-1]
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    wall = max(float(row["elapsed"]) for row in rows)
    # The cells this run measured: groups created since it began (the file is written as it ends).
    began = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc) - timedelta(seconds=wall + 1)
    since = began.isoformat(timespec="seconds")
    floor_of: dict[str, float] = {}
    cells = 0
    for folder in sorted((output / "cells").glob("*/*")):
        walls, count = group_seconds(folder, since)
        if count:
            label = f"{folder.parent.name} {folder.name}"
            floor_of[label] = sum(walls)
            cells += count
    floor = sum(floor_of.values())
    print(f"# run {path} ({len(rows)} steps, {cells} cells measured)")
    steps: dict[str, float] = {}
    for row in rows:
        steps[row["step"]] = steps.get(row["step"], 0.0) + float(row["seconds"])
    print("\n| step | minutes | share of the run |\n|---|---|---|")
    for step, seconds in steps.items():
        print(f"| {step} | {seconds / 60:.1f} | {seconds / wall:.0%} |")
    print(f"| (between steps: locks, planning, tables) | {(wall - sum(steps.values())) / 60:.1f} | "
          f"{(wall - sum(steps.values())) / wall:.0%} |")  # fmt: skip
    print("\n| cells (model_dataset kind) | measuring minutes |\n|---|---|")
    for label, seconds in floor_of.items():
        print(f"| {label} | {seconds / 60:.1f} |")
    print(
        f"\nwall time {wall / 60:.1f} min; measured compute floor {floor / 60:.1f} min; wall / floor "
        f"{wall / floor:.2f} (target <= {WALL_OVER_FLOOR:.2f})"
        if floor
        else "no cells measured in this run"
    )
    first = [float(row["elapsed"]) for row in rows if row["step"] == "first report"]
    if first:
        print(f"first report after {first[0] / 60:.1f} min = {first[0] / wall:.0%} of the wall time "
              f"(target <= {FIRST_REPORT_SHARE:.0%})")  # fmt: skip
    else:
        print("no first report: nothing was left to measure after the quality results, or none was to measure")


def main() -> None:
    preset = pipeline.presets()["offline"]
    settings = preset.settings
    print(f"# {machine_line()}")
    model, tokenizer = models.load_model(settings.model, device="cpu", dtype="float32")
    window = torch.as_tensor(wikitext_windows(tokenizer, settings.max_length, 1)[0])[None]
    prefix = ppl.prefix_length(settings.max_length, settings.prefix_ratio)
    grid = study.cells(preset.methods, preset.ratios)
    presses = {f"{m} {r}": study.build_press(settings, m, r) for m, r in grid}

    with torch.no_grad():
        started = time.perf_counter()
        shared = kvlib.SharedPrefill.run(model, window[:, :prefix], list(presses.values()))
        shared_time = time.perf_counter() - started
        cell_times = []
        for press in presses.values():
            started = time.perf_counter()
            cache = press.prune(shared)
            ppl._suffix_record(model, window, prefix, shared.logits, cache)
            cell_times.append(time.perf_counter() - started)
        none = kvlib.load_press("none")
        latency.time_generation(model, window, none, settings.gen_tokens)  # warm-up
        runs = [latency.time_generation(model, window, none, settings.gen_tokens) for _ in range(3)]
    generation = float(np.median([r["total_generation_time"] for r in runs]))

    datasets = len(preset.datasets)
    timed = len(study.cells(preset.latency_methods or preset.methods, preset.ratios))
    ppl_floor = datasets * settings.n_ppl * (shared_time + sum(cell_times))
    latency_floor = datasets * (settings.warmup_times + settings.n_timing) * timed * generation
    print(f"one window of {settings.max_length} tokens, {len(grid)} perplexity cells "
          f"({len(preset.methods)} presses x ratios {preset.ratios} + baseline):")  # fmt: skip
    print(f"  shared prefill of {prefix} tokens for all of them: {shared_time:.2f} s")
    print(f"  per cell (prune + suffix pass of {settings.max_length - prefix} tokens): median "
          f"{np.median(cell_times):.2f} s, min {min(cell_times):.2f} s, max {max(cell_times):.2f} s, "
          f"sum {sum(cell_times):.1f} s")  # fmt: skip
    print(f"  one generation ({settings.max_length}-token prefill + {settings.gen_tokens} tokens): {generation:.2f} s")
    print(f"perplexity floor: {datasets} datasets x {settings.n_ppl} windows -> {ppl_floor / 60:.1f} min")
    print(f"latency floor: {datasets} datasets x {settings.warmup_times + settings.n_timing} rounds x {timed} "
          f"configurations -> {latency_floor / 60:.1f} min")  # fmt: skip
    print(f"measurement floor of the offline preset's perplexity and latency: {(ppl_floor + latency_floor) / 60:.1f} "
          "min (goal for the whole preset: 25 min)")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a finished run's output directory: its budget, nothing measured")
    arguments = parser.parse_args()
    if arguments.run:
        run_budget(arguments.run)
    else:
        main()
