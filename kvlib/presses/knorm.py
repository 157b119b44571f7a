from dataclasses import dataclass

import torch

from kvlib.presses.base import Press
from kvlib.presses.registry import register


@register
@dataclass
class KnormPress(Press):
    """KNorm (Devoto et al., 2024): keys with a low L2 norm draw attention, so they are kept first."""

    name = "knorm"

    def queries_needed(self) -> int:
        return 0

    def score(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        return -keys.norm(dim=-1)
