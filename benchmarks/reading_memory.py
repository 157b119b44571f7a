"""Peak memory and time of reading a long context: one-shot prefill vs chunked prefill compressed as it reads, and
streaming at a fixed budget as the text grows.

    .venv/bin/python benchmarks/reading_memory.py [--lengths 4096 8192 16384] [--rounds 3] [--rounds_longest 1]
                                                  [--stream 8192 16384 32768]

Part 1, on SmolLM2-135M and the first PG-19 tokens: at each length, interleaved, the plain one-shot prefill (no
press), one-shot prefill under a press at ratio 0.75 (the press prunes after the full forward: the peak is the
same), and the same press with `prefill_chunk` 512 (the press prunes after every chunk; no layer holds more than
the ratio's budget of the final length + 512). Every prefill keeps only the last logit. Per config: the median
(and IQR) of the process's peak memory growth (`kvlib.measure.memory.PeakMemory`: RSS sampled every 2 ms above the
RSS at the start, after handing freed memory back) and of the wall time; then chunked / one-shot ratios.

Part 2: StreamingLLM (4 sinks + window, re-rotated) against the re-computation reference on the same 8k tokens,
interleaved. Part 3: the same StreamingLLM reading 8k, 16k and 32k tokens in chunks of 512 into 1024 positions:
peak memory growth should stay flat and time grow linearly with the text (seconds per 1k tokens).

The process's peak growth depends on the C allocator as much as on the tensors. glibc's default malloc raises its
mmap threshold (up to 32 MB) each time a large block is freed, after which large tensors come from the heap, and
memory freed there mid-forward stays resident: the RSS then holds the high-water mark of a fragmented heap, not the
tensors alive at the peak. Run it again with `MALLOC_TRIM_THRESHOLD_=0` (the threshold fixed at glibc's 128 KiB,
the heap's free top handed back at once) to see the peak the tensors themselves reach; the first line says which
allocator setting the run had.

Run it alone on the machine: a second busy process slows torch's threads many times over.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from common import data_dir, interleaved, machine_line, median_iqr

from kvlib import data, load_press, models
from kvlib.cache import CachePolicy
from kvlib.measure import streaming
from kvlib.measure.memory import PeakMemory

CHUNK = 512
RATIO = 0.75
PRESSES = ("streaming_llm", "snapkv")


def pg19_ids(tokenizer, length: int) -> torch.Tensor:
    windows = data.load_windows("pg19", tokenizer, 1024, max_samples=length // 1024 + 1, data_dir=data_dir())
    return torch.as_tensor(windows.reshape(-1)[:length])[None]


def measured(call) -> tuple[float, float, object]:
    """(peak memory growth in bytes, seconds, what the call returned) of one call."""
    started = time.perf_counter()
    with PeakMemory("cpu") as peak:
        returned = call()
    return peak.peak, time.perf_counter() - started, returned


def prefill_configs(model, ids) -> dict:
    configs = {"one-shot, no press": lambda: CachePolicy(load_press("none")).prefill(model, ids)}
    for name in PRESSES:
        press = load_press(name, RATIO)
        configs[f"one-shot, {name} {RATIO}"] = lambda press=press: CachePolicy(press).prefill(model, ids)
        configs[f"chunked {CHUNK}, {name} {RATIO}"] = lambda press=press: CachePolicy(
            press, prefill_chunk=CHUNK
        ).prefill(model, ids)
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192, 16384], help="none: skip part 1")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per length")
    parser.add_argument("--rounds_longest", type=int, default=1, help="timed rounds at the longest length")
    parser.add_argument("--stream", type=int, nargs="*", default=[8192, 16384, 32768], help="none: skip part 3")
    parser.add_argument("--versus", type=int, default=8192, help="tokens of part 2 (0: skip it)")
    args = parser.parse_args()

    print(machine_line())
    print(f"allocator: {allocator_line()}")
    model, tokenizer = models.load_model("smollm2", device="cpu", dtype="float32")
    print(f"\n## One-shot vs chunked prefill (SmolLM2-135M, PG-19, chunk {CHUNK}, ratio {RATIO}, last logit only)\n")
    print("| tokens | config | peak memory growth MB (IQR) | time s (IQR) | memory vs one-shot | time vs one-shot |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        ids = pg19_ids(tokenizer, length)
        configs = prefill_configs(model, ids)
        rounds = args.rounds_longest if length == max(args.lengths) else args.rounds
        memory: dict[str, list[float]] = {name: [] for name in configs}
        seconds: dict[str, list[float]] = {name: [] for name in configs}
        for round_ in range(rounds):
            order = list(configs.items())
            for name, call in order if round_ % 2 == 0 else order[::-1]:
                grown, took, _ = measured(call)
                memory[name].append(grown)
                seconds[name].append(took)
        for name in configs:
            mem, mem_iqr = median_iqr(memory[name])
            sec, sec_iqr = median_iqr(seconds[name])
            reference = name.replace(f"chunked {CHUNK}", "one-shot")
            vs_mem = vs_sec = ""
            if reference != name:
                vs_mem = f"{mem / median_iqr(memory[reference])[0]:.2f}"
                vs_sec = f"{sec / median_iqr(seconds[reference])[0]:.2f}"
            print(f"| {length} | {name} | {mem / 1e6:.0f} ({mem_iqr / 1e6:.0f}) | {sec:.1f} ({sec_iqr:.1f}) "
                  f"| {vs_mem} | {vs_sec} |", flush=True)  # fmt: skip

    if args.versus:
        versus(model, tokenizer, args.versus, args.rounds)
    if args.stream:
        stream(model, tokenizer, args.stream)


def allocator_line() -> str:
    """The C allocator settings this process started with (glibc reads its MALLOC_*_ variables at start)."""
    tuned = {name: value for name, value in os.environ.items() if name.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    if not tuned:
        return "the C library's defaults (glibc: dynamic mmap threshold; freed heap memory may stay resident)"
    return ", ".join(f"{name}={value}" for name, value in sorted(tuned.items()))


def versus(model, tokenizer, tokens: int, rounds: int) -> None:
    print(f"\n## Sinks + window against re-computation ({tokens} tokens, interleaved, {rounds} rounds)\n")
    ids = pg19_ids(tokenizer, tokens)
    policy = CachePolicy(load_press("streaming_llm"), prefill_chunk=CHUNK, kv_budget=1024, positions="rerotate")
    times = interleaved(
        {
            "sinks + window, re-rotated": lambda: streaming.read(model, ids, policy),
            "recompute (window 1024)": lambda: streaming.recompute(model, ids, CHUNK, 1024),
        },
        rounds,
        warmup=0,
    )
    for name, values in times.items():
        median, iqr = median_iqr(values)
        print(f"- {name}: {median:.1f} s (IQR {iqr:.1f})")
    ratio = median_iqr(times["recompute (window 1024)"])[0] / median_iqr(times["sinks + window, re-rotated"])[0]
    print(f"- recompute / sinks + window: {ratio:.2f}x")


def stream(model, tokenizer, lengths: list[int]) -> None:
    print(f"\n## Streaming at a fixed budget (streaming_llm, 1024 positions, chunk {CHUNK}, re-rotated)\n")
    print("| tokens | peak memory growth MB | peak cache MB | time s | s per 1k tokens | ppl |")
    print("|---|---|---|---|---|---|")
    for length in lengths:
        ids = pg19_ids(tokenizer, length)
        policy = CachePolicy(load_press("streaming_llm"), prefill_chunk=CHUNK, kv_budget=1024, positions="rerotate")
        grown, took, scores = measured(lambda ids=ids, policy=policy: streaming.read(model, ids, policy))
        records = scores.records()
        ppl = float(np.exp(sum(r["nll_sum"] for r in records) / sum(r["n_tokens"] for r in records)))
        cache = max(r["cache_bytes"] for r in records)
        print(f"| {length} | {grown / 1e6:.0f} | {cache / 1e6:.0f} | {took:.1f} | {took / length * 1000:.2f} "
              f"| {ppl:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
