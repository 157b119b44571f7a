"""Feeding tokens after a (possibly pruned) prefix, and measuring what a cache holds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import AttentionInterface


def new_cache(model: nn.Module) -> DynamicCache:
    """An empty cache laid out for `model` (sliding-window layers where its config has them)."""
    return DynamicCache(config=model.config)


def extend(model: nn.Module, input_ids: torch.Tensor, cache: DynamicCache, start: int) -> torch.Tensor:
    """Run `input_ids` after `start` tokens already seen by `cache`; return the logits.

    This is the one way kvlib feeds tokens to a cache. After a press the cache holds fewer than `start`
    positions, so transformers' default positions (the cache length) would be wrong: the new tokens get their
    true positions `start, start + 1, ...` here, while the mask still spans exactly what the cache holds (also
    when a press left its full-attention layers with different lengths: see `_mask_per_layer`).
    """
    length = input_ids.shape[1]
    positions = torch.arange(start, start + length, device=input_ids.device).expand(input_ids.shape[0], -1)
    with _mask_per_layer(model, cache):
        return model(input_ids, cache=cache, position_ids=positions, use_cache=True).logits


@contextmanager
def _mask_per_layer(model: nn.Module, cache: DynamicCache) -> Iterator[None]:
    """Fit the attention mask to each layer's own keys while the full-attention layers differ in length.

    transformers builds one mask, sized for the first full-attention layer. Its cached columns are all visible
    (kvlib caches hold no padding), so a shorter layer takes the mask's last columns and a longer one repeats
    its first column. Layers of equal length (every press with one budget for all layers) change nothing.
    """
    lengths = {layer.keys.shape[-2] for layer in cache.layers if type(layer) is DynamicLayer and layer.is_initialized}
    if len(lengths) < 2:
        yield
        return
    from kvlib.presses.base import _eager_function

    implementation = model.config._attn_implementation
    registry = AttentionInterface._global_mapping
    had_entry, original = implementation in registry, registry.get(implementation)

    def attention(module, query, key, value, attention_mask, **kwargs):
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            extra = key.shape[-2] - attention_mask.shape[-1]
            if extra < 0:
                attention_mask = attention_mask[..., -key.shape[-2] :]
            elif extra > 0:
                first = attention_mask[..., :1].expand(*attention_mask.shape[:-1], extra)
                attention_mask = torch.cat((first, attention_mask), dim=-1)
        inner = original if original is not None else _eager_function(module)
        return inner(module, query, key, value, attention_mask, **kwargs)

    registry[implementation] = attention
    try:
        yield
    finally:
        if had_entry:
            registry[implementation] = original
        else:
            registry.pop(implementation, None)


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
