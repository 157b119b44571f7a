"""Feeding tokens after a (possibly pruned, possibly quantized) prefix, and measuring what a cache holds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import AttentionInterface

from kvlib.cache.layers import eager_function, is_sliding


def extend(model: nn.Module, input_ids: torch.Tensor, cache: Cache, start: int) -> torch.Tensor:
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
def _mask_per_layer(model: nn.Module, cache: Cache) -> Iterator[None]:
    """Fit the attention mask to each layer's own keys while the full-attention layers differ in length.

    transformers builds one mask, sized for the first full-attention layer. Its cached columns are all visible
    (kvlib caches hold no padding), so a shorter layer takes the mask's last columns and a longer one repeats
    its first column. Layers of equal length (every press with one budget for all layers) change nothing.
    """
    lengths = {layer.get_seq_length() for layer in cache.layers if not is_sliding(layer) and layer.is_initialized}
    if len(lengths) < 2:
        yield
        return

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
        inner = original if original is not None else eager_function(module)
        return inner(module, query, key, value, attention_mask, **kwargs)

    registry[implementation] = attention
    try:
        yield
    finally:
        if had_entry:
            registry[implementation] = original
        else:
            registry.pop(implementation, None)


def kv_bytes(cache: Cache) -> int:
    """Bytes the cache really holds: float keys and values, and for a quantized layer its packed integers, scales,
    zero points and full-precision residual, read from the backend's own tensors."""
    return sum(layer_bytes(layer) for layer in cache.layers)


def layer_bytes(layer) -> int:
    """Bytes one cache layer holds (see `kv_bytes`)."""
    held = ("keys", "values", "_quantized_keys", "_quantized_values")
    return sum(_tensor_bytes(getattr(layer, name, None)) for name in held)


def _tensor_bytes(obj) -> int:
    """Bytes of every tensor inside `obj` (dicts, tuples, lists, attributes of a layer). A tensor subclass that
    wraps others (optimum-quanto's packed integer tensors) is counted by its inner tensors: asked its own size, it
    reports the unpacked one."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(obj, name)) for name in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(value) for value in obj)
    return 0


def cache_length(cache: Cache) -> int:
    """Positions held by the longest layer (a pruned full-attention layer holds fewer than were fed; a quantized
    one counts its quantized and residual positions; a sliding-window layer at most its window)."""
    return max((_held(layer) for layer in cache.layers), default=0)


def _held(layer) -> int:
    if not layer.is_initialized:
        return 0
    if is_sliding(layer) or not hasattr(layer, "cumulative_length"):
        return layer.keys.shape[-2] if layer.keys.dim() == 4 else 0
    return layer.get_seq_length()
