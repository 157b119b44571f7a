from dataclasses import dataclass

import torch

from kvlib.presses.base import Press, n_kept, option
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
        n = keys.shape[-2]
        n_pruned = n - n_kept(n, self.compression_ratio)
        scores = torch.ones_like(keys[..., 0])
        scores[:, :, self.n_sink : self.n_sink + n_pruned] = 0
        return scores
