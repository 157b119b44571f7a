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

from kvlib.cache import CachePolicy, as_policy, cache_length, extend, kv_bytes
from kvlib.measure.machine import LoadMeter
from kvlib.measure.memory import PeakMemory
from kvlib.presses import Press, load_press
from kvlib.stats import TIMING_FIELDS  # noqa: F401  (what a timed run records; defined once)

SETTINGS = ("gen_tokens", "warmup_times", "n_timing")
BASELINE = "none"


def check(settings, presses: list[Press]) -> None:
    if settings.gen_tokens < 2:
        raise ValueError(
            f"gen_tokens must be at least 2 (TPOT needs a token after the first); got {settings.gen_tokens}"
        )
    for press in presses:
        press.check_prefix_length(settings.max_length)


@torch.no_grad()
def time_generation(model: torch.nn.Module, prompt: torch.Tensor, policy: Press | CachePolicy, gen_tokens: int) -> dict:
    """One timed greedy generation of exactly `gen_tokens` tokens after prefilling `prompt` [1, n] under a cache
    policy (or a press stored in float). Quantizing the kept prefix is part of the prefill, as in transformers."""
    policy = as_policy(policy)
    if gen_tokens < 2:
        raise ValueError(f"gen_tokens must be at least 2 (TPOT needs a token after the first); got {gen_tokens}")
    synchronize = torch.cuda.synchronize if prompt.device.type == "cuda" else (lambda: None)
    peak = PeakMemory(prompt.device)
    with peak, LoadMeter() as meter:
        synchronize()  # the cache is built inside the span: it is part of what the run grows the process by
        start = time.perf_counter()
        logits, cache = policy.prefill(model, prompt)
        synchronize()
        prefill_end = time.perf_counter()
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        synchronize()
        first_token = time.perf_counter()
        held_bytes, held_length = kv_bytes(cache), cache_length(cache)  # read outside the timed spans
        position = policy.next_position(cache, prompt.shape[1])

        synchronize()
        decode_start = time.perf_counter()
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
    policies: dict[str, Press | CachePolicy],
    gen_tokens: int,
    warmup_times: int,
    n_timing: int,
    log: Callable[[str], None] = print,
) -> dict[str, list[dict]]:
    """`warmup_times` discarded rounds, then `n_timing` timed ones; a round runs every policy once, in order."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt, device=device)[None]
    for _ in range(warmup_times):
        for policy in policies.values():
            time_generation(model, ids, policy, gen_tokens)
    runs: dict[str, list[dict]] = {label: [] for label in policies}
    for i in range(n_timing):
        for label, policy in policies.items():
            runs[label].append({"run": i, **time_generation(model, ids, policy, gen_tokens)})
        tpots = ", ".join(f"{label} {r[-1]['tpot'] * 1e3:.1f}" for label, r in runs.items())
        log(f"  round {i + 1}/{n_timing}: tpot ms {tpots}")
    return runs


def measure(
    model: torch.nn.Module,
    tokenizer,
    windows: np.ndarray,
    policies: dict[str, CachePolicy],
    settings,
    log: Callable[[str], None] = print,
) -> Iterator[tuple[str, dict]]:
    """Timed runs of each cache policy on the first window, interleaved with the float baseline's; each result
    carries the baseline runs of its round (`baseline_runs`)."""
    policies = {label: as_policy(policy) for label, policy in policies.items()}
    baseline = next((label for label, p in policies.items() if _is_baseline(p)), BASELINE)
    group = {baseline: CachePolicy(load_press(BASELINE)), **{k: v for k, v in policies.items() if k != baseline}}
    runs = interleaved_runs(
        model, windows[0], group, settings.gen_tokens, settings.warmup_times, settings.n_timing, log
    )
    for label in policies:
        yield label, {"runs": runs[label], "baseline_runs": runs[baseline]}


def _is_baseline(policy: CachePolicy) -> bool:
    """The uncompressed float cache: no press, no quantization."""
    return policy.press.name == BASELINE and not policy.identity()
