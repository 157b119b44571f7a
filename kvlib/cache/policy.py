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

from kvlib.cache.layers import new_cache
from kvlib.cache.storage import Storage

if TYPE_CHECKING:  # the policy drives a press without depending on the press package
    from kvlib.presses.base import Press, SharedPrefill


@dataclass
class CachePolicy:
    """One configuration of the cache: a press and how its kept positions are stored."""

    press: Press
    storage: Storage = field(default_factory=Storage)

    @property
    def kv_quant(self) -> str:
        return self.storage.name

    def identity(self) -> dict:
        """What this policy adds to a result's identity beyond the press (nothing for the default policy)."""
        return self.storage.identity()

    @torch.no_grad()
    def prefill(self, model: nn.Module, ids: torch.Tensor, logits_to_keep: int = 1) -> tuple[torch.Tensor, Cache]:
        """Prefill `ids` [batch, n] under this policy: the press prunes the float prefill, then the kept positions
        are stored at the policy's precision. Returns the kept logits and the cache."""
        cache = new_cache(model)
        with self.press(model):
            logits = model(ids, cache=cache, use_cache=True, logits_to_keep=logits_to_keep).logits
        return logits, self.storage.store(cache)

    def from_shared(self, shared: SharedPrefill) -> Cache:
        """This policy's own cache from a shared prefill (bit-identical to `prefill`; the shared cache is untouched)."""
        return self.storage.store(self.press.prune(shared))


def as_policy(press_or_policy: Press | CachePolicy) -> CachePolicy:
    """A policy as given, or a bare press with float storage and a one-shot prefill (today's default)."""
    return press_or_policy if isinstance(press_or_policy, CachePolicy) else CachePolicy(press_or_policy)
