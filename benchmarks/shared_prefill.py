"""The PPL phase with one shared prefill per window vs a prefill per cell, and the model's start cold vs warm.

    .venv/bin/python benchmarks/shared_prefill.py [--windows 2] [--length 1024] [--ratios 0.5]

PPL phase: the baseline and the five original presses at each ratio, on the same SmolLM2-135M windows, once
with every cell prefilling each window itself (`window_nll`, the per-cell path) and once with one prefill per
window that every press prunes a copy of (`shared_window_nll`); the per-window records must be identical.
Model start: a fresh interpreter loading SmolLM2 from its GGUF file with an empty model cache (cold, which
also fills the cache) and again with that cache (warm). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
from common import machine_line, wikitext_windows

import kvlib
from kvlib import models
from kvlib.measure import ppl

METHODS = ("knorm", "snapkv", "streaming_llm", "lagkv", "random")
START = (
    "import time; t = time.perf_counter(); from kvlib import models; i = time.perf_counter() - t; "
    "models.load_model('smollm2', device='cpu', dtype='float32'); "
    "print(f'{i:.2f} {time.perf_counter() - t - i:.2f}')"
)


def model_start(cache_dir: str) -> tuple[float, float]:
    """(import seconds, load seconds) in a fresh interpreter."""
    env = {**os.environ, "KVLIB_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", START], env=env, capture_output=True, text=True, check=True).stdout
    imported, loaded = out.split()[-2:]
    return float(imported), float(loaded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    args = parser.parse_args()

    print(f"# {machine_line()}")
    with tempfile.TemporaryDirectory() as cache:
        cold, warm = model_start(cache), model_start(cache)
    print(f"model start (fresh interpreter): cold import {cold[0]:.1f} s + load {cold[1]:.1f} s; "
          f"warm import {warm[0]:.1f} s + load {warm[1]:.1f} s; load speedup {cold[1] / warm[1]:.1f}x")  # fmt: skip

    model, tokenizer = models.load_model("smollm2", device="cpu", dtype="float32")
    windows = wikitext_windows(tokenizer, args.length, args.windows)
    prefix = ppl.prefix_length(args.length, 0.5)
    presses = {"none": kvlib.load_press("none")}
    presses |= {f"{m} {r}": kvlib.load_press(m, compression_ratio=r) for m in METHODS for r in args.ratios}
    ids = [torch.as_tensor(w)[None] for w in windows]

    started = time.perf_counter()
    per_cell = {label: [ppl.window_nll(model, x, press, prefix) for x in ids] for label, press in presses.items()}
    per_cell_time = time.perf_counter() - started
    started = time.perf_counter()
    shared_records = [ppl.shared_window_nll(model, x, presses, prefix) for x in ids]
    shared_time = time.perf_counter() - started
    shared = {label: [records[label] for records in shared_records] for label in presses}
    kept = kvlib.SharedPrefill.run(model, ids[0][:, :prefix], list(presses.values()))
    cache_bytes = kvlib.kv_bytes(kept.cache)
    identical = shared == per_cell

    print(f"PPL phase, {len(presses)} cells (baseline + {len(METHODS)} presses x ratios {args.ratios}) on "
          f"{args.windows} windows of {args.length} tokens: per-cell {per_cell_time:.1f} s, shared "
          f"{shared_time:.1f} s, ratio {per_cell_time / shared_time:.2f}x; records identical: {identical}")  # fmt: skip
    print(f"shared prefill of {prefix} tokens holds the full cache ({cache_bytes / 1e6:.1f} MB) and queries for its "
          f"presses ({kept.query_bytes() / 1e6:.2f} MB)")  # fmt: skip
    if not identical:
        sys.exit("the shared prefill changed a number")


if __name__ == "__main__":
    main()
