from dataclasses import dataclass

import torch

from kvlib.presses.base import Press, option
from kvlib.presses.registry import register


@register
@dataclass
class StreamingLLMPress(Press):
    """StreamingLLM (Xiao et al., 2023): keep the first `n_sink` tokens (attention sinks) and the most recent ones."""

    n_sink: int = option(4, minimum=0)
    name = "streaming_llm"

    def queries_needed(self) -> int:
        return 0

    def min_prefix_length(self) -> int:
        return self.n_sink + 1

    def score(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        # Ranks, not a 0/1 mask: whatever the budget (the ratio's, or a chunked prefill's), the top positions are
        # the sinks, then the most recent ones. float32 ranks are exact up to 2**24 positions.
        batch, kv_heads, n, _ = keys.shape
        scores = torch.arange(n, dtype=torch.float32, device=keys.device)
        scores[: self.n_sink] = n
        return scores.expand(batch, kv_heads, n)
