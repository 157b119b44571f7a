"""Streaming perplexity: read a text far longer than the cache may hold, chunk by chunk, as a bounded cache would.

The text is the first `stream_tokens` tokens of the dataset's token stream (the run's windows, joined back: they are
consecutive slices of it, so anyone can score the same tokens from the saved windows file). It enters `chunk`
tokens at a time (`prefill_chunk`, default 512) through `kvlib.cache.chunked.chunked_prefill`: after each chunk the
press prunes every full-attention layer to `kv_budget` positions (default: `max_length`, the window every other
kind reads), so no layer ever holds more than budget + chunk. Every token after the first is scored from the cache
as it stands when that token is read: a chunk's logits predict its own next tokens, and its last logit predicts the
next chunk's first token.

Each pressed cell is read twice, at both position modes (`original`: the kept keys keep their positions and new
tokens go on counting past the trained context; `rerotate`: contiguous positions, StreamingLLM's shift), because
that comparison is the point of the kind. The uncompressed cell ("none") holds the references every press is
compared with, on the same tokens:
- `none`: the dense cache, every position kept (memory grows with the text);
- `window`: the most recent `kv_budget` positions and no sinks, at both position modes;
- `recompute`: the quality reference. Each chunk is read afresh after the `kv_budget` tokens before it, at
  positions 0, 1, ... (sliding window with re-computation at chunk granularity: no position past the trained context,
  no evicted sink; every chunk costs budget + chunk tokens of compute).
The kind always reads in float: quantized storage applies to a finished prefill (`kvlib.cache.storage`).

Per reading it records, per bucket of `BUCKET` scored tokens (by position in the text), the summed NLL, the tokens
and the largest cache (bytes, from the tensors) held while that bucket was read; and in all its wall time and the
process's peak memory growth (`kvlib.measure.memory`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import torch
from torch.nn import functional as F

from kvlib.cache import CachePolicy, kv_bytes
from kvlib.cache.chunked import check_policy, chunk_bounds, chunked_prefill
from kvlib.cache.layers import new_cache
from kvlib.cache.positions import POSITION_MODES, config_has_rotary
from kvlib.cache.storage import FLOAT
from kvlib.measure.memory import PeakMemory
from kvlib.models import context_length
from kvlib.presses import Press, load_press
from kvlib.stats import perplexity

SETTINGS = ("stream_tokens", "kv_budget", "prefill_chunk")
STREAM_CHUNK = 512  # tokens read at a time when `prefill_chunk` is not set
BUCKET = 1024  # scored tokens per perplexity bucket
TRAINED_CONTEXTS = 4  # the default stream: this many times the model's trained context
REFERENCES = ("none", "window", "recompute")


def budget(settings) -> int:
    """Positions each full-attention layer keeps while streaming."""
    return settings.kv_budget if settings.kv_budget is not None else settings.max_length


def chunk(settings) -> int:
    return settings.prefill_chunk if settings.prefill_chunk is not None else STREAM_CHUNK


def min_windows(settings) -> int:
    return math.ceil(settings.stream_tokens / settings.max_length) if settings.stream_tokens else 1


def resolve(settings, trained: int | None):
    """The settings with `stream_tokens` resolved (default: 4x the model's trained context `trained`) and checked
    against the windows the run may read."""
    if settings.stream_tokens is None:
        if trained is None:
            raise ValueError(f"{settings.model}'s config gives no trained context; set stream_tokens")
        settings = replace(settings, stream_tokens=TRAINED_CONTEXTS * trained)
    needed = min_windows(settings)
    if settings.max_samples is not None and needed > settings.max_samples:
        raise ValueError(
            f"stream_tokens {settings.stream_tokens} needs {needed} windows of {settings.max_length} tokens; "
            f"max_samples is {settings.max_samples} (raise it to {needed})"
        )
    return settings


def window_press() -> Press:
    """A plain recent window: StreamingLLM without sinks."""
    return load_press("streaming_llm", 0.0, n_sink=0)


def check(settings, presses: list[Press]) -> None:
    """The stream, budget and chunk, and every press, from the settings alone (`stream_tokens` None is resolved
    from the model's trained context once its config is read)."""
    stream = settings.stream_tokens
    if stream is not None and (isinstance(stream, bool) or not isinstance(stream, int) or stream < 2):
        raise ValueError(f"stream_tokens must be an integer >= 2 (tokens read); got {stream!r}")
    if list(settings.kv_quant) != [FLOAT]:
        raise ValueError(
            f"the streaming kind reads in float; kv_quant {list(settings.kv_quant)} applies to a finished prefill "
            "(run streaming with kv_quant none)"
        )
    ratios = {press.compression_ratio for press in presses if press.name != "none"}
    if len(ratios) > 1:
        raise ValueError(
            f"the streaming kind compares every press at one budget of kv_budget positions (default max_length); "
            f"the ratio does not change it, so give one ratio, not {sorted(ratios)}"
        )
    size, positions = chunk(settings), budget(settings)
    if stream is not None and stream <= size:
        raise ValueError(f"stream_tokens {stream} must exceed the chunk of {size} tokens (prefill_chunk)")
    for press in [*presses, window_press()]:
        if press.name == "none":
            check_policy(press, size)
        else:
            check_policy(press, size, positions, context_length=stream)


def _readings(settings, policy: CachePolicy, has_rotary: bool) -> list[tuple[str, str, CachePolicy | None]]:
    """(method, positions, policy) of every reading of one cell; the recompute reference has no policy."""
    size, positions = chunk(settings), budget(settings)
    modes = POSITION_MODES if has_rotary else ("original",)
    if policy.press.name == "none":
        dense = CachePolicy(policy.press, prefill_chunk=size)
        window = [
            ("window", mode, CachePolicy(window_press(), prefill_chunk=size, kv_budget=positions, positions=mode))
            for mode in modes
        ]
        return [("none", "original", dense), *window, ("recompute", "original", None)]
    return [
        (policy.press.name, mode, CachePolicy(policy.press, prefill_chunk=size, kv_budget=positions, positions=mode))
        for mode in modes
    ]


class _Scores:
    """Per-token NLL of a stream and the largest cache held per bucket, filled chunk by chunk."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        self.n = ids.shape[1]
        self.nll = np.full(self.n, np.nan)  # nll[t]: token t predicted from the tokens before it (t >= 1)
        self.cache_bytes = np.zeros(math.ceil(self.n / BUCKET), dtype=np.int64)

    def add(self, start: int, end: int, logits: torch.Tensor, held: int) -> None:
        """Logits of tokens start..end-1 predict tokens start+1..end (the last one the next chunk's first token);
        `held`: the bytes the cache held once the chunk was in it."""
        targets = self.ids[0, start + 1 : min(end + 1, self.n)]
        if len(targets):
            nll = F.cross_entropy(logits[0, : len(targets)].float(), targets, reduction="none")
            self.nll[start + 1 : start + 1 + len(targets)] = nll.double().cpu().numpy()
        for bucket in range(start // BUCKET, (end - 1) // BUCKET + 1):
            self.cache_bytes[bucket] = max(self.cache_bytes[bucket], held)

    def records(self) -> list[dict]:
        records = []
        for bucket, held in enumerate(self.cache_bytes):
            first, last = max(1, bucket * BUCKET), min(self.n, (bucket + 1) * BUCKET)
            scored = self.nll[first:last]
            if np.isnan(scored).any():
                raise RuntimeError(f"tokens {first}..{last} of the stream were not all scored")
            records.append(
                {
                    "bucket": bucket,
                    "start": bucket * BUCKET,
                    "end": last,
                    "nll_sum": float(scored.sum()),
                    "n_tokens": int(len(scored)),
                    "cache_bytes": int(held),
                }
            )
        return records


@torch.no_grad()
def read(model: torch.nn.Module, ids: torch.Tensor, policy: CachePolicy) -> _Scores:
    """Score every token of `ids` [1, n] after the first, read chunk by chunk under `policy` (its prefill_chunk)."""
    scores = _Scores(ids)
    chunked_prefill(
        model, ids, policy.press, policy.prefill_chunk, policy.kv_budget, policy.positions, on_chunk=scores.add
    )
    return scores


@torch.no_grad()
def recompute(model: torch.nn.Module, ids: torch.Tensor, size: int, window: int) -> _Scores:
    """Score every token after the first, each `size`-token chunk read afresh after the `window` tokens before it."""
    scores = _Scores(ids)
    for start, end in chunk_bounds(ids.shape[1], size):
        cache = new_cache(model)
        logits = model(ids[:, max(0, start - window) : end], cache=cache, use_cache=True, logits_to_keep=end - start)
        scores.add(start, end, logits.logits, kv_bytes(cache))
    return scores


def measure(
    model: torch.nn.Module,
    tokenizer,
    windows: np.ndarray,
    policies: dict[str, CachePolicy],
    settings,
    log: Callable[[str], None] = print,
) -> Iterator[tuple[str, dict]]:
    """Per cell: one reading per position mode (the references for the uncompressed cell), each with its
    per-bucket records, overall perplexity, wall time and peak memory."""
    device = next(model.parameters()).device
    stream = windows.reshape(-1)[: settings.stream_tokens]
    if len(stream) < settings.stream_tokens:
        raise ValueError(f"the text gives {len(stream)} tokens; stream_tokens {settings.stream_tokens} were asked for")
    ids = torch.as_tensor(stream, device=device)[None]
    size, positions = chunk(settings), budget(settings)
    has_rotary = config_has_rotary(model.config)
    for label, policy in policies.items():
        readings = []
        for method, mode, reading in _readings(settings, policy, has_rotary):
            started = time.perf_counter()
            with PeakMemory(device) as peak:
                scores = read(model, ids, reading) if reading is not None else recompute(model, ids, size, positions)
            records = scores.records()
            readings.append(
                {
                    "method": method,
                    "positions": mode,
                    "records": records,
                    "ppl": perplexity(records),
                    "wall_time": time.perf_counter() - started,
                    "peak_cache_bytes": int(max(record["cache_bytes"] for record in records)),
                    **peak.record(),
                }
            )
            log(f"  {label}: {method} ({mode} positions) ppl {readings[-1]['ppl']:.3f}")
        yield (
            label,
            {
                "readings": readings,
                "tokens": int(ids.shape[1]),
                "kv_budget": positions,
                "prefill_chunk": size,
                "bucket": BUCKET,
                "trained_context": context_length(model.config),
            },
        )
