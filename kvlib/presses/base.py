"""The press mechanism: how a scoring function becomes a pruned KV cache.

A press is a dataclass with a `compression_ratio` and a `score` method. Using it as a context manager,

    with press(model):
        model(prefix_ids, cache=cache, use_cache=True)   # or past_key_values=cache

prunes `cache` at the end of that prefill: in every full-attention layer each KV head keeps the
`n - int(n * compression_ratio)` prefix positions with the highest scores.

Why the attention interface: transformers hands every attention implementation the post-RoPE queries and
the layer's full keys and values, whatever the architecture (GPT-NeoX's fused, partially rotated QKV
included). kvlib wraps that function for the duration of the context, scores there, and prunes the
returned cache once the model's forward has finished. Outside the context nothing of the press remains.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_utils import AttentionInterface


@dataclass
class PressReport:
    """What the last prefill under a press did to the cache."""

    prefix_length: int
    kept_indices: dict[int, torch.Tensor]  # layer -> [batch, kv_heads, n_kept] prefix positions, ascending
    entries_before: int  # KV entries (positions x layers) the cache would hold without the press
    entries_after: int

    @property
    def effective_ratio(self) -> float:
        """Fraction of the whole cache removed (sliding-window layers count as kept)."""
        return 1.0 - self.entries_after / self.entries_before if self.entries_before else 0.0


def n_kept(n: int, compression_ratio: float) -> int:
    """Positions each KV head keeps out of `n`: the ratio is the fraction removed, rounded down."""
    return n - int(n * compression_ratio)


def check_ratio(compression_ratio: float) -> None:
    if not isinstance(compression_ratio, (int, float)) or not 0 <= compression_ratio < 1:
        raise ValueError(
            f"compression_ratio must be in [0, 1) (fraction of KV pairs removed); got {compression_ratio!r}"
        )


@dataclass
class Press:
    """Base of all presses. Subclasses define `score` and, when they need one, `min_prefix_length`."""

    compression_ratio: float = 0.0
    name: ClassVar[str] = ""
    last_report: PressReport | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_ratio(self.compression_ratio)

    # --- what a press is -----------------------------------------------------------------------------------
    def score(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        """Importance of each prefix position, higher = kept.

        queries [batch, q_heads, n, d] (post-RoPE), keys/values [batch, kv_heads, n, d] -> [batch, kv_heads, n].
        """
        raise NotImplementedError

    def min_prefix_length(self) -> int:
        """Shortest prefix this press can score; shorter ones raise ValueError before any work."""
        return 1

    def check_prefix_length(self, n: int) -> None:
        need = self.min_prefix_length()
        if n < need:
            raise ValueError(
                f"{self.name} press needs a prefix of at least {need} tokens with {self.options()}; got {n}"
            )

    def options(self) -> dict[str, Any]:
        """The press's own parameters (everything but compression_ratio)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name != "compression_ratio"}

    # --- how it is applied ---------------------------------------------------------------------------------
    def keep(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        """Indices of the kept positions, [batch, kv_heads, n_kept], ascending."""
        n = keys.shape[-2]
        self.check_prefix_length(n)
        scores = self.score(queries, keys, values, scaling)
        return scores.topk(n_kept(n, self.compression_ratio), dim=-1).indices.sort(dim=-1).values

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[nn.Module]:
        with _pressed(model, self):
            yield model


def _attention_implementation(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation is None:
        raise TypeError(
            f"{type(model).__name__} is not a transformers model with an attention implementation "
            "(config._attn_implementation is missing); kvlib presses need one"
        )
    return implementation


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if not modules:
        raise TypeError(
            f"{type(model).__name__} has no attention modules with a `layer_idx` (transformers' cache-aware "
            "attention); kvlib presses cannot prune its cache"
        )
    return modules


def _eager_function(module: nn.Module) -> Callable:
    """The model's own eager attention, which transformers calls when no implementation is registered."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise TypeError(
            f"{type(module).__name__} defines no `eager_attention_forward`; load the model with "
            "attn_implementation='sdpa' to use kvlib presses"
        )
    return function


class _PressState:
    """Per-context bookkeeping: kept indices by layer, filled by the attention wrapper during one forward."""

    def __init__(self, press: Press, modules: list[nn.Module]):
        self.press = press
        self.modules = {id(m) for m in modules}
        self.kept: dict[int, torch.Tensor] = {}
        self.prefix_length = 0

    def observe(self, module: nn.Module, queries, keys, values, kwargs: dict) -> None:
        n = keys.shape[-2]
        if id(module) not in self.modules or queries.shape[-2] == 1:
            return  # decoding step, or another model: nothing to do
        if n != queries.shape[-2]:
            raise ValueError(
                f"a press compresses a prefill into an empty cache; layer {module.layer_idx} already held "
                f"{n - queries.shape[-2]} positions"
            )
        self.prefix_length = n
        if kwargs.get("sliding_window") is not None or self.press.compression_ratio == 0:
            return  # sliding-window layers keep their window
        self.kept[module.layer_idx] = self.press.keep(queries, keys, values, kwargs["scaling"])

    def prune(self, cache: Cache) -> PressReport:
        before = after = 0
        for layer_idx, layer in enumerate(cache.layers):
            stored = layer.keys.shape[-2] if layer.keys is not None and layer.keys.numel() else 0
            before += stored
            kept = self.kept.get(layer_idx)
            if kept is None:
                after += stored
                continue
            if type(layer) is not DynamicLayer:
                raise TypeError(
                    f"kvlib presses prune DynamicCache layers; layer {layer_idx} is a {type(layer).__name__} "
                    "(use transformers.DynamicCache)"
                )
            layer.keys = layer.keys.gather(2, kept[..., None].expand(-1, -1, -1, layer.keys.shape[-1]))
            layer.values = layer.values.gather(2, kept[..., None].expand(-1, -1, -1, layer.values.shape[-1]))
            after += kept.shape[-1]
        if self.press.compression_ratio > 0 and not self.kept:
            raise ValueError("no layer of this model could be compressed: every attention layer uses a sliding window")
        return PressReport(self.prefix_length, dict(self.kept), before, after)


@contextmanager
def _pressed(model: nn.Module, press: Press) -> Iterator[None]:
    implementation = _attention_implementation(model)
    modules = _attention_modules(model)
    if getattr(model, "_kvlib_press_active", False):
        raise RuntimeError("a kvlib press is already active on this model; nest presses is not supported")
    state = _PressState(press, modules)
    registry = AttentionInterface._global_mapping
    had_entry = implementation in registry
    original = registry.get(implementation)
    if original is None:
        if implementation != "eager":
            raise TypeError(f"attention implementation {implementation!r} is not registered in transformers")
        eager = {id(m): _eager_function(m) for m in modules}

    def attention(module, query, key, value, attention_mask, **kwargs):
        inner = original if original is not None else eager.get(id(module)) or _eager_function(module)
        output = inner(module, query, key, value, attention_mask, **kwargs)
        state.observe(module, query, key, value, kwargs)
        return output

    def prune_after_forward(_module, args, kwargs, output):
        if state.prefix_length == 0:
            return output  # decoding steps inside the context leave the cache alone
        cache = next(
            (
                c
                for c in (getattr(output, "cache", None), kwargs.get("cache"), kwargs.get("past_key_values"))
                if c is not None
            ),
            None,
        )
        if cache is None:
            raise ValueError("a press needs the model called with use_cache=True and a cache to prune")
        press.last_report = state.prune(cache)
        state.kept.clear()
        state.prefix_length = 0
        return output

    hook = model.register_forward_hook(prune_after_forward, with_kwargs=True)
    registry[implementation] = attention
    model._kvlib_press_active = True
    try:
        yield
    finally:
        hook.remove()
        model._kvlib_press_active = False
        if had_entry:
            registry[implementation] = original
        else:
            registry.pop(implementation, None)
