"""Chunked prefill: the context enters the cache `chunk` tokens at a time, compressed after every chunk.

Each chunk is fed with explicit positions (as `kvlib.cache.extend` feeds tokens), and at the end of its forward
the press prunes every full-attention layer holding more than its budget down to it, so no layer ever holds
more than budget + chunk positions. The budget is `kv_budget` positions per layer, or the press's own budget of
the *final* context length (`press.budget(n, layer)`, i.e. `n_kept(n, ratio)` for a ratio), capped at what the
layer holds. With a chunk at least as long as the context this is, bit for bit, today's one-shot prefill.

With a storage, every chunk is pruned in float and the kept positions are quantized once, at the end.

What each press scores with at the end of a chunk: the keys and values of the whole current cache (what was kept
so far, then the chunk) and the queries of the current chunk only.

| press              | chunk by chunk                                                                          |
|--------------------|-----------------------------------------------------------------------------------------|
| knorm              | key norms of the whole current cache (as one-shot: it reads no queries)                 |
| keydiff            | anchor = mean normalised key of the current cache, not of the whole context             |
| random             | the same seeded draw over the positions held (a different subset than one-shot)         |
| streaming_llm      | sinks + the most recent positions held: exactly StreamingLLM's cache                    |
| tova               | attention of the current chunk's last query                                             |
| snapkv             | window = the last `window_size` queries of the current chunk (chunk >= 2 window - 1:     |
|                    | the last chunk borrows tokens from the one before so it holds a whole window)           |
| pyramidkv          | as snapkv, per-layer budgets of the final length (refused with `kv_budget`)             |
| observed_attention | attention received from the current chunk's queries only (no accumulation over chunks), |
|                    | each position's sum divided by the chunk queries that could see it                      |
| expected_attention | statistics of the current chunk's pre-RoPE queries (the sinks left out in the first     |
|                    | chunk only), future rotations from the position after the chunk                        |
| lagkv              | refused: its partitions would be re-cut over an already pruned cache                    |
| kvzip              | refused (as any press overriding `rescore`): it re-reads the whole context              |
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.cache_utils import Cache

from kvlib.cache.feed import _mask_per_layer, layer_bytes
from kvlib.cache.layers import is_sliding, new_cache
from kvlib.cache.positions import check_positions, config_has_rotary, rerotate_cache

if TYPE_CHECKING:  # the cache package drives a press without depending on the press package
    from kvlib.presses.base import PrefillLayer, Press


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prunes(press: Press, kv_budget: int | None) -> bool:
    return kv_budget is not None or press.compression_ratio > 0


def min_chunk(press: Press) -> int:
    """Shortest `prefill_chunk` a press can score: every chunk, the last one included, must hold the press's
    `chunk_tokens()` (SnapKV's window); a shorter last chunk borrows from the one before (see `chunk_bounds`),
    which still holds them when chunks are at least 2 m - 1 long."""
    tokens = press.chunk_tokens()
    return 2 * tokens - 1 if tokens > 1 else 1


def chunk_bounds(length: int, chunk: int, min_last: int = 1) -> list[tuple[int, int]]:
    """[start, end) of each chunk of `length` tokens, at most `chunk` each; a last chunk shorter than
    `min_last` takes its missing tokens from the end of the one before."""
    bounds = [(start, min(length, start + chunk)) for start in range(0, length, chunk)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_last:
        borrow = min_last - (bounds[-1][1] - bounds[-1][0])
        (first, middle), (_, last) = bounds[-2], bounds[-1]
        bounds[-2:] = [(first, middle - borrow), (middle - borrow, last)]
    return bounds


def check_policy(
    press: Press,
    prefill_chunk: int | None = None,
    kv_budget: int | None = None,
    positions: str = "original",
    model_config=None,
    context_length: int | None = None,
) -> None:
    """Refuse a cache policy that cannot run, before any weights load: ValueError with one line naming the
    value and what is allowed. `model_config` (a transformers config) and `context_length` are checked when given.
    """
    check_positions(positions)
    if prefill_chunk is not None and (not _is_count(prefill_chunk) or prefill_chunk < 1):
        raise ValueError(
            f"prefill_chunk must be a positive number of tokens (or None: one shot); got {prefill_chunk!r}"
        )
    if kv_budget is not None:
        if not _is_count(kv_budget) or kv_budget < 1:
            raise ValueError(f"kv_budget must be a positive number of positions per layer; got {kv_budget!r}")
        if press.name == "none":
            raise ValueError(f"kv_budget {kv_budget} needs a press that chooses positions; the 'none' press keeps all")
        if press.name == "pyramidkv":
            raise ValueError(
                f"kv_budget {kv_budget} is one budget for every layer; pyramidkv sets its own per-layer budgets "
                "from compression_ratio (leave kv_budget unset)"
            )
        protected = press.protected_positions()
        if kv_budget < protected:
            raise ValueError(
                f"kv_budget {kv_budget} is below the {protected} positions the {press.name} press always keeps "
                f"({press.options()}); use kv_budget >= {protected}"
            )
        if context_length is not None and kv_budget > context_length:
            raise ValueError(
                f"kv_budget {kv_budget} is larger than the context of {context_length} tokens; "
                f"use kv_budget <= {context_length}"
            )
    if (prefill_chunk is not None or kv_budget is not None) and _prunes(press, kv_budget):
        refusal = press.chunk_refusal()
        if refusal is not None:
            setting = "prefill_chunk" if prefill_chunk is not None else "kv_budget"
            raise ValueError(f"{setting} is not available for the {press.name} press: {refusal}")
        if prefill_chunk is not None and prefill_chunk < min_chunk(press):
            raise ValueError(
                f"prefill_chunk {prefill_chunk} is too short for the {press.name} press, which scores every chunk "
                f"with at least {press.chunk_tokens()} of its tokens; use prefill_chunk >= {min_chunk(press)}"
            )
    if positions == "rerotate" and model_config is not None and not config_has_rotary(model_config):
        raise ValueError(
            f"positions='rerotate' needs rotary position embeddings; {type(model_config).__name__} has none "
            "(use positions='original')"
        )


@torch.no_grad()
def chunked_prefill(
    model: nn.Module,
    ids: torch.Tensor,
    press: Press,
    chunk: int,
    kv_budget: int | None = None,
    positions: str = "original",
    logits_to_keep: int = 1,
    on_chunk: Callable[[int, int, torch.Tensor, int], None] | None = None,
) -> tuple[torch.Tensor | None, Cache]:
    """Prefill `ids` [batch, n] `chunk` tokens at a time, the press pruning every full-attention layer to its
    budget after each chunk; with `positions="rerotate"` the kept keys then take contiguous positions (see
    `kvlib.cache.positions`). Returns the last `logits_to_keep` logits (0: all) and the float cache;
    `press.last_report` holds the kept positions of the whole context (original token positions).

    `on_chunk(start, end, logits, peak_bytes)`, if given, receives every chunk's logits [batch, end - start, vocab],
    computed with the cache as it stood when the chunk was read, and the bytes the cache held once the chunk was in
    it, before the press pruned it (its largest moment: every layer's bytes per position, from its tensors, times
    the positions it held); the logits are not kept, and the
    prefill returns None for the logits (a long text scored token by token never holds all its logits)."""
    check_policy(press, chunk, kv_budget, positions)
    batch, length = ids.shape
    prunes = _prunes(press, kv_budget)
    if prunes and kv_budget is None:
        press.check_prefix_length(length)  # the final budget: as one-shot would check it

    def budget(layer: PrefillLayer) -> int:
        return kv_budget if kv_budget is not None else press.budget(length, layer)

    wanted = length if logits_to_keep == 0 else min(logits_to_keep, length)
    cache = new_cache(model)
    if prunes and all(is_sliding(layer) for layer in cache.layers):
        raise ValueError("no layer of this model could be compressed: every attention layer uses a sliding window")
    origin: dict[int, torch.Tensor] = {}  # full layer -> [batch, kv_heads, held]: token position of each held key
    current: dict[int, torch.Tensor] = {}  # the same keys' rotary positions (differ from origin once re-rotated)
    next_position = 0
    pieces = []
    context = press.within_budget(model, budget) if prunes else nullcontext()
    with context:
        for start, end in chunk_bounds(length, chunk, press.chunk_tokens() if prunes else 1):
            size = end - start
            keep = size if on_chunk is not None else max(0, end - max(start, length - wanted))
            # One row for the whole batch, as transformers' own default positions (rotary tables of shape [1, ...]).
            position_ids = torch.arange(next_position, next_position + size, device=ids.device)[None]
            with _mask_per_layer(model, cache):
                output = model(
                    ids[:, start:end], cache=cache, use_cache=True, position_ids=position_ids, logits_to_keep=keep or 1
                )
            kept = press.last_report.kept_indices if prunes else {}
            peak_bytes = 0  # what the cache held at the end of this forward, before the press pruned it
            for layer_idx, layer in enumerate(cache.layers):
                if is_sliding(layer):
                    peak_bytes += layer_bytes(layer) if on_chunk is not None else 0
                    continue
                heads = layer.keys.shape[1]
                appended = torch.arange(size, device=ids.device).expand(batch, heads, size)
                for held, first in ((origin, start), (current, next_position)):
                    previous = held.get(layer_idx, appended[..., :0])
                    joined = torch.cat((previous, appended + first), dim=-1)
                    held[layer_idx] = joined if layer_idx not in kept else joined.gather(-1, kept[layer_idx])
                if on_chunk is not None:  # a float layer holds the same bytes per position before and after pruning
                    peak_bytes += layer_bytes(layer) * joined.shape[-1] // max(1, layer.keys.shape[-2])
            if on_chunk is not None:
                on_chunk(start, end, output.logits, peak_bytes)
            elif keep:
                pieces.append(output.logits)
            del output
            next_position += size
            if positions == "rerotate":
                current, next_position = rerotate_cache(model, cache, current, next_position)
    if prunes:
        _report_whole_context(press, cache, origin, length)
    logits = None if not pieces else pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
    return logits, cache


def _report_whole_context(press: Press, cache: Cache, origin: dict[int, torch.Tensor], length: int) -> None:
    """Turn the last chunk's report into the whole prefill's, in the terms of a one-shot `PressReport`: the kept
    token positions per full-attention layer, and the KV entries held without the press (every position in a
    full layer) and with it."""
    before = after = 0
    for layer in cache.layers:
        held = layer.keys.shape[-2] if layer.is_initialized and layer.keys.numel() else 0
        before += held if is_sliding(layer) else length
        after += held
    report = press.last_report
    report.prefix_length, report.kept_indices = length, dict(origin)
    report.entries_before, report.entries_after = before, after
