"""Which positions the kept keys claim: their original ones, or contiguous ones by re-rotating them.

A pruned cache keeps each key at the position it was computed at (`original`, kvlib's default): later tokens
go at the true positions after the whole context, so a bounded cache still reaches positions beyond the model's
trained context. `rerotate` (StreamingLLM's position shift, kvpress's KeyRerotationPress) gives the kept keys of
each full-attention layer contiguous positions ending just before the next token: key k at position p becomes
R(p') R(p)^-1 k at its new position p', computed with the model's own rotary module of that layer's type (so
partial rotary, GPT-NeoX's rotary_pct, and Gemma 3's local and global bases are the model's own), and the next
tokens continue from the cache length. Sliding-window layers are not pruned: their window moves with the same
shift, so every distance inside it, and to the next tokens, stays what it was.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn
from transformers.cache_utils import Cache

from kvlib.cache.layers import is_sliding

POSITION_MODES = ("original", "rerotate")


def check_positions(positions: str) -> None:
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {', '.join(POSITION_MODES)}; got {positions!r}")


def config_has_rotary(config) -> bool:
    """Whether a transformers config describes rotary position embeddings (read before any weights load)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "rope_parameters", None))


_ROTARY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its rotary module, found once


def rotary_module(model: nn.Module) -> nn.Module:
    """The model's rotary embedding module (ValueError for a model without rotary positions). Looked up once per
    model: a stream re-rotates every layer after every chunk, and walking the modules each time cost ~5% of it."""
    if model not in _ROTARY:
        modules = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
        if not modules:
            raise ValueError(
                f"positions='rerotate' re-rotates keys with the model's rotary embedding; {type(model).__name__} "
                "has none (its positions are not rotary); use positions='original'"
            )
        _ROTARY[model] = modules[0]
    return _ROTARY[model]


def rotary_tables(model: nn.Module, layer_idx: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own rotary tables (cos, sin) [batch, m, rotary_dim] in float32 at `positions` [batch, m] for the
    attention layer `layer_idx` (Gemma 3 gives sliding and full layers different bases: the layer's type picks)."""
    module = rotary_module(model)
    like = torch.empty(0, dtype=torch.float32, device=positions.device)
    if "layer_type" in inspect.signature(module.forward).parameters:
        layer_type = model.config.get_text_config().layer_types[layer_idx]
        cos, sin = module(like, positions, layer_type=layer_type)
    else:
        cos, sin = module(like, positions)
    return cos.float(), sin.float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerotate_keys(
    keys: torch.Tensor, old: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Keys [batch, heads, k, dim] rotated at the positions of the `old` tables, rotated instead at those of `new`
    (tables [batch, heads, k, rotary_dim], transformers' rotate_half layout); dims past rotary_dim are left alone.

    A rotary key is s R(p) k0 (s: the rope type's attention scaling, 1 for most); the old tables undo it
    (dividing by s^2 = cos^2 + sin^2) and the new ones apply the model's own rotation at the new position.
    """
    (old_cos, old_sin), (new_cos, new_sin) = old, new
    rotary_dim = old_cos.shape[-1]
    if rotary_dim > keys.shape[-1] or rotary_dim % 2:
        raise ValueError(f"rotary tables cover {rotary_dim} dims; keys have {keys.shape[-1]}")
    rotated, rest = keys[..., :rotary_dim].float(), keys[..., rotary_dim:]
    plain = (rotated * old_cos - _rotate_half(rotated) * old_sin) / (old_cos.square() + old_sin.square())
    turned = plain * new_cos + _rotate_half(plain) * new_sin
    return torch.cat((turned.to(keys.dtype), rest), dim=-1)


def _tables_at(model: nn.Module, layer_idx: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables at per-head positions [batch, heads, k] -> [batch, heads, k, rotary_dim]."""
    batch, heads, k = positions.shape
    cos, sin = rotary_tables(model, layer_idx, positions.reshape(batch, heads * k))
    return cos.view(batch, heads, k, -1), sin.view(batch, heads, k, -1)


def rerotate_cache(
    model: nn.Module, cache: Cache, current: dict[int, torch.Tensor], next_position: int
) -> tuple[dict[int, torch.Tensor], int]:
    """Give the keys of every full-attention layer contiguous positions ending just before the new next position.

    `current[layer]` [batch, kv_heads, held] is the rotary position each held key of that layer was computed at
    (after the press pruned it); `next_position` is where the next token would have gone. The new next position
    is the longest full-attention layer's length; each full layer's keys take the positions just before it, and
    sliding-window layers shift by the same amount. Returns the new positions per full layer and the new next one.
    """
    if not current:
        return current, next_position
    new_next = max(positions.shape[-1] for positions in current.values())
    moved = {}
    for layer_idx, old in current.items():
        layer = cache.layers[layer_idx]
        held = old.shape[-1]
        new = torch.arange(new_next - held, new_next, device=old.device).expand_as(old)
        if not torch.equal(old, new):
            layer.keys = rerotate_keys(layer.keys, _tables_at(model, layer_idx, old), _tables_at(model, layer_idx, new))
        moved[layer_idx] = new
    shift = new_next - next_position
    for layer_idx, layer in enumerate(cache.layers):
        if shift and is_sliding(layer) and layer.is_initialized and layer.keys.numel():
            batch, heads, held, _ = layer.keys.shape
            old = torch.arange(next_position - held, next_position, device=layer.keys.device)
            old = old.expand(batch, heads, held)
            layer.keys = rerotate_keys(
                layer.keys, _tables_at(model, layer_idx, old), _tables_at(model, layer_idx, old + shift)
            )
    return moved, new_next


def held_next_position(cache: Cache) -> int:
    """Where the next token goes in a re-rotated cache: the longest full-attention layer's length."""
    return max((layer.get_seq_length() for layer in cache.layers if not is_sliding(layer)), default=0)
