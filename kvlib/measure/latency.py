"""Generation latency: prefill a `max_length`-token prompt under the press, then decode exactly `gen_tokens`
tokens greedily (no early stop), outside the press.

Runs are interleaved: baseline, press 1, press 2, ..., baseline, press 1, ... so that drift on a shared machine
hits all of them alike; each result keeps the baseline runs it was interleaved with, and its speedups are
computed against those. Every run records how busy the machine was (`LoadMeter`) and how far the process grew
above where it stood when the run began (`PeakMemory`: RSS sampled on CPU, the allocator's peak on CUDA).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from kvlib.cache import cache_length, extend, kv_bytes, new_cache
from kvlib.measure.machine import LoadMeter
from kvlib.measure.memory import PeakMemory
from kvlib.presses import Press, load_press

SETTINGS = ("gen_tokens", "warmup_times", "n_timing")
TIMING_FIELDS = ("prefill_time", "ttft", "tpot", "throughput", "decode_time", "total_generation_time")
BASELINE = "none"


def check(settings, presses: list[Press]) -> None:
    if settings.gen_tokens < 2:
        raise ValueError(
            f"gen_tokens must be at least 2 (TPOT needs a token after the first); got {settings.gen_tokens}"
        )
    for press in presses:
        press.check_prefix_length(settings.max_length)


@torch.no_grad()
def time_generation(model: torch.nn.Module, prompt: torch.Tensor, press: Press, gen_tokens: int) -> dict:
    """One timed greedy generation of exactly `gen_tokens` tokens after a pressed prefill of `prompt` [1, n]."""
    if gen_tokens < 2:
        raise ValueError(f"gen_tokens must be at least 2 (TPOT needs a token after the first); got {gen_tokens}")
    synchronize = torch.cuda.synchronize if prompt.device.type == "cuda" else (lambda: None)
    peak = PeakMemory(prompt.device)
    with peak, LoadMeter() as meter:
        cache = new_cache(model)  # inside the span: the cache is part of what the run grows the process by
        synchronize()
        start = time.perf_counter()
        with press(model):
            logits = model(prompt, cache=cache, use_cache=True, logits_to_keep=1).logits
        synchronize()
        prefill_end = time.perf_counter()
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        synchronize()
        first_token = time.perf_counter()
        held_bytes, held_length = kv_bytes(cache), cache_length(cache)  # read outside the timed spans

        synchronize()
        decode_start = time.perf_counter()
        position = prompt.shape[1]
        for step in range(gen_tokens - 1):
            token = extend(model, token, cache, position + step)[:, -1].argmax(dim=-1, keepdim=True)
        synchronize()
        decode_time = time.perf_counter() - decode_start

    ttft = first_token - start
    total = ttft + decode_time
    return {
        "prefill_time": prefill_end - start,
        "ttft": ttft,
        "tpot": decode_time / (gen_tokens - 1),
        "throughput": gen_tokens / total,
        "decode_time": decode_time,
        "total_generation_time": total,
        "kv_bytes": held_bytes,
        "cache_length": held_length,
        **meter.record(),
        **peak.record(),
    }


def interleaved_runs(
    model: torch.nn.Module,
    prompt: np.ndarray,
    presses: dict[str, Press],
    gen_tokens: int,
    warmup_times: int,
    n_timing: int,
    log: Callable[[str], None] = print,
) -> dict[str, list[dict]]:
    """`warmup_times` discarded rounds, then `n_timing` timed ones; a round runs every press once, in order."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt, device=device)[None]
    for _ in range(warmup_times):
        for press in presses.values():
            time_generation(model, ids, press, gen_tokens)
    runs: dict[str, list[dict]] = {label: [] for label in presses}
    for i in range(n_timing):
        for label, press in presses.items():
            runs[label].append({"run": i, **time_generation(model, ids, press, gen_tokens)})
        tpots = ", ".join(f"{label} {r[-1]['tpot'] * 1e3:.1f}" for label, r in runs.items())
        log(f"  round {i + 1}/{n_timing}: tpot ms {tpots}")
    return runs


def measure(
    model: torch.nn.Module,
    tokenizer,
    windows: np.ndarray,
    presses: dict[str, Press],
    settings,
    log: Callable[[str], None] = print,
) -> Iterator[tuple[str, dict]]:
    """Timed runs of each press on the first window, interleaved with the baseline's; each result carries the
    baseline runs of its round (`baseline_runs`)."""
    baseline = next((label for label, press in presses.items() if press.name == BASELINE), BASELINE)
    group = {baseline: load_press(BASELINE), **{k: v for k, v in presses.items() if k != baseline}}
    runs = interleaved_runs(
        model, windows[0], group, settings.gen_tokens, settings.warmup_times, settings.n_timing, log
    )
    for label in presses:
        yield label, {"runs": runs[label], "baseline_runs": runs[baseline]}
