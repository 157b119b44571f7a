from dataclasses import dataclass

import torch

from kvlib.presses.base import Press, option
from kvlib.presses.registry import register


@register
@dataclass
class RandomPress(Press):
    """Uniformly random positions: the floor any scoring method should beat.

    Seeded, leaves torch's global RNG alone, and draws the same positions for every row of a batch, so that a
    sequence is pruned the same way whatever it is batched with.
    """

    seed: int = option(0, minimum=0)
    name = "random"

    def queries_needed(self) -> int:
        return 0

    def score(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        batch, kv_heads, n, _ = keys.shape
        return torch.rand((1, kv_heads, n), generator=generator).to(keys.device).expand(batch, -1, -1)
