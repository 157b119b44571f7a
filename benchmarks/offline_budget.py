"""What the offline preset's perplexity and latency cells cost at least on this machine, from measured unit costs.

    .venv/bin/python benchmarks/offline_budget.py

Reads the offline preset (model, protocol, methods, ratios, datasets) and measures on one wikitext window of its
length: one shared prefill for all its presses at all its ratios (KVzip's extra passes included), each cell's
suffix pass from its pruned copy, and one timed generation (prefill + `gen_tokens` tokens, no press). From those it
prints the time the preset's perplexity and latency measurements need at the least: perplexity = datasets x
n_ppl x (shared prefill + every cell's pruning and suffix pass), latency = datasets x (warm-up + timed rounds) x
timed configurations x one generation. Model loads, data preparation, notebooks and the report come on top.
Run it alone on the machine.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import machine_line, wikitext_windows

import kvlib
from kvlib import models, pipeline, study
from kvlib.measure import latency, ppl


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
    main()
