"""The two measurements of the study, on one model and one press.

Suffix perplexity: prefill the first `int(max_length * prefix_ratio)` tokens of a window under the press, then
score every suffix token from the resulting cache, positions continuing from the uncompressed prefix length.
The first suffix token is predicted by the last prefix logit.

Generation latency: prefill a `max_length`-token prompt under the press, then decode exactly `gen_tokens`
tokens greedily (no early stop), outside the press.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from kvlib.cache import cache_length, extend, kv_bytes, new_cache
from kvlib.presses import Press

TIMING_FIELDS = ("prefill_time", "ttft", "tpot", "throughput", "decode_time", "total_generation_time")


def prefix_length(max_length: int, prefix_ratio: float) -> int:
    return int(max_length * prefix_ratio)


@torch.no_grad()
def window_nll(model: torch.nn.Module, ids: torch.Tensor, press: Press, prefix_len: int) -> dict:
    """NLL of the suffix of one window ([1, length] token ids) after a pressed prefix prefill."""
    cache = new_cache(model)
    with press(model):
        last_prefix_logits = model(ids[:, :prefix_len], cache=cache, use_cache=True, logits_to_keep=1).logits
    kept = cache_length(cache)
    held_bytes = kv_bytes(cache)
    suffix_logits = extend(model, ids[:, prefix_len:-1], cache, prefix_len)  # the last token predicts nothing
    logits = torch.cat([last_prefix_logits[:, -1:], suffix_logits], dim=1).float()
    targets = ids[:, prefix_len:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return {"nll_sum": nll.item(), "n_tokens": targets.numel(), "cache_length": kept, "kv_bytes": held_bytes}


def suffix_ppl(
    model: torch.nn.Module,
    windows: np.ndarray,
    press: Press,
    prefix_ratio: float,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Per-window records over `windows` ([n, max_length]); ppl = exp(sum nll_sum / sum n_tokens)."""
    device = next(model.parameters()).device
    prefix_len = prefix_length(windows.shape[1], prefix_ratio)
    records = []
    for i, window in enumerate(windows):
        ids = torch.as_tensor(window, device=device)[None]
        records.append({"window": i, **window_nll(model, ids, press, prefix_len)})
        log(f"  window {i + 1}/{len(windows)}: suffix NLL/token {records[-1]['nll_sum'] / records[-1]['n_tokens']:.4f}")
    return records


def perplexity(records: list[dict]) -> float:
    return float(np.exp(sum(r["nll_sum"] for r in records) / sum(r["n_tokens"] for r in records)))


@torch.no_grad()
def time_generation(model: torch.nn.Module, prompt: torch.Tensor, press: Press, gen_tokens: int) -> dict:
    """One timed greedy generation of exactly `gen_tokens` tokens after a pressed prefill of `prompt` [1, n]."""
    if gen_tokens < 2:
        raise ValueError(f"gen_tokens must be at least 2 (TPOT needs a token after the first); got {gen_tokens}")
    synchronize = torch.cuda.synchronize if prompt.device.type == "cuda" else (lambda: None)
    cache = new_cache(model)
    synchronize()
    start = time.perf_counter()
    with press(model):
        logits = model(prompt, cache=cache, use_cache=True, logits_to_keep=1).logits
    synchronize()
    prefill_end = time.perf_counter()
    token = logits[:, -1].argmax(dim=-1, keepdim=True)
    synchronize()
    first_token = time.perf_counter()
    held_bytes = kv_bytes(cache)  # read outside the timed spans

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
    }


def latency_runs(
    model: torch.nn.Module,
    prompt: np.ndarray,
    press: Press,
    gen_tokens: int,
    warmup_times: int,
    n_timing: int,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """`warmup_times` discarded runs, then `n_timing` measured ones, all on the same prompt."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt, device=device)[None]
    for _ in range(warmup_times):
        time_generation(model, ids, press, gen_tokens)
    runs = []
    for i in range(n_timing):
        runs.append({"run": i, **time_generation(model, ids, press, gen_tokens)})
        log(f"  run {i + 1}/{n_timing}: ttft {runs[-1]['ttft'] * 1e3:.1f} ms, tpot {runs[-1]['tpot'] * 1e3:.1f} ms")
    return runs
