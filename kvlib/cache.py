"""Feeding tokens after a (possibly pruned) prefix, and measuring what a cache holds."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache


def new_cache(model: nn.Module) -> DynamicCache:
    """An empty cache laid out for `model` (sliding-window layers where its config has them)."""
    return DynamicCache(config=model.config)


def extend(model: nn.Module, input_ids: torch.Tensor, cache: DynamicCache, start: int) -> torch.Tensor:
    """Run `input_ids` after `start` tokens already seen by `cache`; return the logits.

    This is the one way kvlib feeds tokens to a cache. After a press the cache holds fewer than `start`
    positions, so transformers' default positions (the cache length) would be wrong: the new tokens get their
    true positions `start, start + 1, ...` here, while the mask still spans exactly what the cache holds.
    """
    length = input_ids.shape[1]
    positions = torch.arange(start, start + length, device=input_ids.device).expand(input_ids.shape[0], -1)
    return model(input_ids, cache=cache, position_ids=positions, use_cache=True).logits


def kv_bytes(cache: DynamicCache) -> int:
    """Bytes held by the keys and values of every layer."""
    total = 0
    for layer in cache.layers:
        for states in (layer.keys, layer.values):
            if states is not None:
                total += states.numel() * states.element_size()
    return total


def cache_length(cache: DynamicCache) -> int:
    """Positions held by the longest layer (a pruned full-attention layer holds fewer than were fed)."""
    return max(
        (layer.keys.shape[-2] for layer in cache.layers if layer.keys is not None and layer.keys.dim() == 4), default=0
    )
