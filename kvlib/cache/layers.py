"""The cache kvlib builds, forks and prunes: transformers' `Cache` of per-layer classes, laid out as the model's
config says (full attention: `DynamicLayer`; sliding window: `DynamicSlidingWindowLayer`)."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer


def new_cache(model: nn.Module) -> DynamicCache:
    """An empty float cache laid out for `model` (sliding-window layers where its config has them)."""
    return DynamicCache(config=model.config)


def is_sliding(layer) -> bool:
    """Whether a cache layer keeps only a window of recent positions (presses leave those alone)."""
    return isinstance(layer, DynamicSlidingWindowLayer)


def fork_cache(cache: Cache) -> Cache:
    """A cache that starts from the same tensors but grows on its own: layers only ever replace their tensors
    (cat, gather, slice, quantize), never write into them, so sharing the prefix tensors is safe."""
    forked = copy.copy(cache)
    forked.layers = [copy.copy(layer) for layer in cache.layers]
    return forked


def prune_cache(cache: Cache, kept: dict[int, torch.Tensor]) -> tuple[int, int]:
    """Keep `kept[layer]` positions ([batch, kv_heads, n_kept] indices) of each listed layer; return the KV entries
    (positions x layers) held before and after."""
    before = after = 0
    for layer_idx, layer in enumerate(cache.layers):
        stored = layer.keys.shape[-2] if layer.keys is not None and layer.keys.numel() else 0
        before += stored
        indices = kept.get(layer_idx)
        if indices is None:
            after += stored
            continue
        if type(layer) is not DynamicLayer:
            raise TypeError(
                f"kvlib presses prune DynamicCache layers; layer {layer_idx} is a {type(layer).__name__} "
                "(use transformers.DynamicCache; kvlib quantizes a pruned cache afterwards, see kvlib.cache.storage)"
            )
        layer.keys = layer.keys.gather(2, indices[..., None].expand(-1, -1, -1, layer.keys.shape[-1]))
        layer.values = layer.values.gather(2, indices[..., None].expand(-1, -1, -1, layer.values.shape[-1]))
        after += indices.shape[-1]
    return before, after


def eager_function(module: nn.Module) -> Callable:
    """The model's own eager attention, which transformers calls when no implementation is registered."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise TypeError(
            f"{type(module).__name__} defines no `eager_attention_forward`; load the model with "
            "attn_implementation='sdpa' to use kvlib presses"
        )
    return function
