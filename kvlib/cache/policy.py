"""A cache policy: how a prefix becomes the cache that later tokens read.

It answers four questions in one place, and every measurement kind drives it the same way:
- what is kept: the press (a pure scorer; `none` keeps everything);
- how it is stored: float or quantized (`kvlib.cache.storage.Storage`), applied after the press has pruned;
- how the prefix enters: in one forward pass (today's protocol) or chunk by chunk (`prefill_chunk`);
- which positions the kept keys claim: their original ones, or contiguous re-rotated ones.

Float storage and a one-shot prefill identify a result exactly as before the policy existed (`identity()` is
empty), so nothing stored earlier is measured again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.cache_utils import Cache

from kvlib.cache.chunked import check_policy, chunked_prefill
from kvlib.cache.layers import is_sliding, new_cache
from kvlib.cache.positions import held_next_position, rerotate_cache
from kvlib.cache.storage import Storage

if TYPE_CHECKING:  # the policy drives a press without depending on the press package
    from kvlib.presses.base import Press, SharedPrefill


@dataclass
class CachePolicy:
    """One configuration of the cache: a press and how its kept positions are stored."""

    press: Press
    storage: Storage = field(default_factory=Storage)
    # Tokens fed at a time, the press pruning after each chunk (`kvlib.cache.chunked`); None: one forward pass.
    prefill_chunk: int | None = None
    # Positions each full-attention layer keeps; None: the press's ratio of the final context length.
    kv_budget: int | None = None
    # "original": kept keys stay at their positions; "rerotate": contiguous ones (`kvlib.cache.positions`).
    positions: str = "original"

    def __post_init__(self) -> None:
        check_policy(self.press, self.prefill_chunk, self.kv_budget, self.positions)

    @property
    def kv_quant(self) -> str:
        return self.storage.name

    @property
    def shareable(self) -> bool:
        """Whether `from_shared` can build this policy's cache from a one-shot shared prefill (a chunked prefill,
        an absolute budget or re-rotated positions need their own prefill: `prefill`)."""
        return self.prefill_chunk is None and self.kv_budget is None and self.positions == "original"

    def identity(self) -> dict:
        """What this policy adds to a result's identity beyond the press (nothing for the default policy)."""
        reading = {"prefill_chunk": self.prefill_chunk, "kv_budget": self.kv_budget}
        reading = {name: value for name, value in reading.items() if value is not None}
        if self.positions != "original":
            reading["positions"] = self.positions
        return {**self.storage.identity(), **reading}

    @torch.no_grad()
    def prefill(self, model: nn.Module, ids: torch.Tensor, logits_to_keep: int = 1) -> tuple[torch.Tensor, Cache]:
        """Prefill `ids` [batch, n] under this policy: the press prunes the float prefill (after every chunk when
        chunked), the kept keys are re-rotated if asked, then the kept positions are stored at the policy's
        precision (quantized once, at the end). Returns the kept logits and the cache; the next token goes at
        `next_position(cache, n)`."""
        if self.prefill_chunk is not None or self.kv_budget is not None:
            chunk = self.prefill_chunk if self.prefill_chunk is not None else ids.shape[1]
            logits, cache = chunked_prefill(
                model, ids, self.press, chunk, self.kv_budget, self.positions, logits_to_keep
            )
            return logits, self.storage.store(cache)
        cache = new_cache(model)
        with self.press(model):
            logits = model(ids, cache=cache, use_cache=True, logits_to_keep=logits_to_keep).logits
        if self.positions == "rerotate":
            _rerotate_pruned(model, cache, self.press, ids.shape[1])
        return logits, self.storage.store(cache)

    def next_position(self, cache: Cache, prefix_length: int) -> int:
        """The position of the first token fed after a prefix of `prefix_length` tokens prefilled by this policy:
        `prefix_length` (original positions), or the cache's length (re-rotated: `kvlib.cache.extend` then
        takes this as its `start`)."""
        return held_next_position(cache) if self.positions == "rerotate" else prefix_length

    def from_shared(self, shared: SharedPrefill) -> Cache:
        """This policy's own cache from a shared prefill (bit-identical to `prefill`; the shared cache is untouched)."""
        if not self.shareable:
            raise ValueError(
                f"a policy with prefill_chunk={self.prefill_chunk}, kv_budget={self.kv_budget}, "
                f"positions={self.positions!r} needs its own prefill (CachePolicy.prefill), not a shared one"
            )
        return self.storage.store(self.press.prune(shared))


def _rerotate_pruned(model: nn.Module, cache: Cache, press: Press, length: int) -> None:
    """Re-rotate a one-shot pruned cache: each kept key from its token position to its rank."""
    kept = press.last_report.kept_indices if press.last_report is not None and press.compression_ratio > 0 else {}
    current = {}
    for layer_idx, layer in enumerate(cache.layers):
        if not is_sliding(layer) and layer.is_initialized:
            batch, heads = layer.keys.shape[:2]
            current[layer_idx] = kept.get(
                layer_idx, torch.arange(length, device=layer.keys.device).expand(batch, heads, -1)
            )
    rerotate_cache(model, cache, current, length)


def as_policy(press_or_policy: Press | CachePolicy) -> CachePolicy:
    """A policy as given, or a bare press with float storage and a one-shot prefill (today's default)."""
    return press_or_policy if isinstance(press_or_policy, CachePolicy) else CachePolicy(press_or_policy)
